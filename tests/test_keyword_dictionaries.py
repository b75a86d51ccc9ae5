"""Keyword dictionaries written with every segment (issue 17, write side).

What must hold, on real DICOM sample files: every segment an import, a compaction, an
erasure or a revocation writes carries the dictionary of exactly its rows, so that the
rows a token finds equal the plaintext keywords of the images' metadata; the bucket holds
no keyword in clear; the same keyword in two repositories or two key versions gives
unrelated tokens, and an old version's token finds nothing in the new version's segments;
a segment written without a dictionary gets one at the next compaction.
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import pytest

try:
    from fixtures import format2_support as fx
except ImportError:  # pragma: no cover
    from tests.fixtures import format2_support as fx

from app.core import keyword_dicts
from app.core.access import create_repository_as, revoke_access
from app.core.compaction import compact
from app.core.erasure import Target, erase, plan_erasure
from app.core.keywords import keywords_of
from app.core.logstate import verified_log
from app.core.meta import ImageMeta
from app.core.repository import Repository
from app.core.settings import Settings
from cloud.directory_store import DirectoryStore
from cloud.segment_keywords import segment_dictionaries
from cloud.segments import decode_segment
from crypto.sse import Dictionary, keyword_token

FILES = 10
BATCH = 4

store = fx.store

def plaintext(store: DirectoryStore, settings: Settings, repo: Repository
              ) -> dict[str, set[str]]:
    """image id -> its keywords, from the decrypted metadata (the oracle)."""
    reader = fx.reader(store, settings, repo)
    return {i: keywords_of(ImageMeta.from_record(i, reader.meta(i)[0]))
            for i in reader.image_ids()}


def expected(oracle: dict[str, set[str]]) -> dict[str, set[str]]:
    """keyword -> image ids holding it."""
    out: dict[str, set[str]] = {}
    for image_id, words in oracle.items():
        for word in words:
            out.setdefault(word, set()).add(image_id)
    return out


def found(store: DirectoryStore, settings: Settings, repo: Repository, keyword: str,
          version: int | None = None, token_version: int | None = None) -> list[str]:
    """The image ids the dictionaries of the live segments of ``version`` give for the
    token of ``keyword`` under ``token_version`` (both default to the current one)."""
    state = verified_log(store, settings, repo)
    version = version or repo.keys.version
    token_version = token_version or version
    token = keyword_token(repo.ring.version(token_version).keyword_key, repo.repo_id,
                          token_version, keyword)
    out: list[str] = []
    for view in segment_dictionaries(store, state, version):
        assert view.base is not None, f"segment {view.seg_id} has no keyword dictionary"
        out += view.image_ids(token)
    return out


def assert_matches(store: DirectoryStore, settings: Settings, repo: Repository,
                   oracle: dict[str, set[str]]) -> None:
    by_keyword = expected(oracle)
    assert by_keyword, "the sample files gave no keyword at all"
    for keyword, ids in sorted(by_keyword.items()):
        got = found(store, settings, repo, keyword)
        assert Counter(got) == Counter(ids), keyword  # each image once, no other
    assert found(store, settings, repo, "modality=NOSUCHMODALITY") == []


def test_every_imported_segment_carries_the_dictionary_of_its_rows(store: DirectoryStore
                                                                     ) -> None:
    owner, _, repo = fx.repository(store, "kw-import", FILES, BATCH, 2)
    state = verified_log(store, owner.settings, repo)
    assert len(state.segments()) == 3
    oracle = plaintext(store, owner.settings, repo)
    assert len(oracle) >= FILES
    assert any(k.startswith("modality=") for ks in oracle.values() for k in ks)
    assert_matches(store, owner.settings, repo, oracle)
    # inside the MAC'd body: the dictionary parses, and the segment still authenticates
    for view in segment_dictionaries(store, state, repo.keys.version):
        assert view.base is not None and len(view.base.dictionary) >= 16


def test_the_bucket_holds_no_keyword_in_clear(store: DirectoryStore, tmp_path: Path) -> None:
    owner, _, repo = fx.repository(store, "kw-clear", FILES, BATCH, 2)
    oracle = plaintext(store, owner.settings, repo)
    needles = {k.encode() for ks in oracle.values() for k in ks}
    needles |= {k.split("=", 1)[1].encode() for ks in oracle.values() for k in ks
                if len(k.split("=", 1)[1]) >= 5}
    blobs = [p.read_bytes() for p in (tmp_path / "bucket").rglob("*") if p.is_file()]
    assert len(blobs) > 10
    leaked = sorted(n.decode() for n in needles if any(n in blob for blob in blobs))
    assert leaked == [], f"keywords found in clear in the bucket: {leaked[:5]}"


def test_the_same_keyword_gives_unrelated_tokens_across_repositories_and_versions(
        store: DirectoryStore) -> None:
    owner, (alice,), repo_a = fx.repository(store, "kw-a", 4, 4, 2, members=1)
    repo_b = create_repository_as(owner.session, owner.identity, "kw-b", storage_format=2)
    owner.importer(repo_b, 4).run(fx.sample_files(4))
    repo_b = owner.open("kw-b")
    oracle = plaintext(store, owner.settings, repo_a)
    keyword = sorted(k for k in next(iter(oracle.values())) if k.startswith("modality="))[0]
    token_a = keyword_token(repo_a.keys.keyword_key, repo_a.repo_id, 1, keyword)
    token_b = keyword_token(repo_b.keys.keyword_key, repo_b.repo_id, 1, keyword)
    assert token_a.to_bytes() != token_b.to_bytes()
    assert len(found(store, owner.settings, repo_a, keyword)) >= 1
    assert len(found(store, owner.settings, repo_b, keyword)) >= 1
    # B's token against A's dictionaries (A's bindings) finds nothing
    state_a = verified_log(store, owner.settings, repo_a)
    for view in segment_dictionaries(store, state_a, 1):
        assert view.base is not None and view.rows(token_b).size == 0

    # revocation: a new keyword key; the old token finds nothing in the new segments,
    # the new token finds exactly the plaintext answer
    revoke_access(owner.session, owner.identity, repo_a, alice.user_id)
    rotated = owner.open(repo_a.repo_id)
    assert rotated.keys.version == 2
    token_2 = keyword_token(rotated.keys.keyword_key, rotated.repo_id, 2, keyword)
    assert token_2.to_bytes() != token_a.to_bytes()
    assert found(store, owner.settings, rotated, keyword, version=2, token_version=1) == []
    assert_matches(store, owner.settings, rotated, plaintext(store, owner.settings, rotated))


def test_compaction_keeps_keyword_results_identical(store: DirectoryStore) -> None:
    owner, _, repo = fx.repository(store, "kw-compact", FILES, 2, 2)
    oracle = plaintext(store, owner.settings, repo)
    before = {k: sorted(found(store, owner.settings, repo, k)) for k in expected(oracle)}
    report = compact(store, owner.settings, repo, owner.identity, target_images=8,
                     pack_images=8)
    assert report.segments_after < report.segments_before
    after = {k: sorted(found(store, owner.settings, repo, k)) for k in expected(oracle)}
    assert after == before
    assert_matches(store, owner.settings, repo, oracle)


def test_erasure_removes_the_erased_rows_from_the_dictionaries(store: DirectoryStore) -> None:
    owner, _, repo = fx.repository(store, "kw-erase", FILES, BATCH, 2)
    oracle = plaintext(store, owner.settings, repo)
    victim = sorted(oracle)[3]
    plan = plan_erasure(store, owner.settings, repo, Target("image", victim))
    erase(store, owner.settings, repo, owner.identity, plan)
    left = {i: k for i, k in oracle.items() if i not in plan.image_ids}
    assert len(left) < len(oracle)
    assert_matches(store, owner.settings, repo, left)
    for keyword in oracle[victim]:
        assert victim not in found(store, owner.settings, repo, keyword)


def test_a_segment_without_a_dictionary_gets_one_at_the_next_compaction(
        store: DirectoryStore, monkeypatch: pytest.MonkeyPatch) -> None:
    with monkeypatch.context() as patched:  # a client from before issue 17
        patched.setattr(keyword_dicts, "can_embed", lambda: False)
        owner, _, repo = fx.repository(store, "kw-old", 4, 4, 2)
    state = verified_log(store, owner.settings, repo)
    (live,) = state.segments()
    old = decode_segment(store.get(f"radcrypt/v1/repos/{repo.repo_id}/segments/{live.id}"))
    assert old.dictionary is None
    report = compact(store, owner.settings, repo, owner.identity)
    assert (report.segments_before, report.segments_after, len(report.entries)) == (1, 1, 1)
    assert_matches(store, owner.settings, repo, plaintext(store, owner.settings, repo))
    # a dictionary copied into another segment finds nothing there (bound to its segment)
    state = verified_log(store, owner.settings, repo)
    (view,) = segment_dictionaries(store, state, 1)
    assert view.base is not None
    keyword = sorted(expected(plaintext(store, owner.settings, repo)))[0]
    token = keyword_token(repo.keys.keyword_key, repo.repo_id, 1, keyword)
    moved = Dictionary.from_bytes(bytes(decode_segment(store.get(
        f"radcrypt/v1/repos/{repo.repo_id}/segments/{view.seg_id}")).dictionary or b""))
    assert moved.search(token, repo.repo_id, "0" * 32, 1).size == 0
