"""CKKS mode (issue 19): the keyword filter (``where=``) and `radcrypt check` of the CKKS side.

The filter: the client asks the service for the keyword-only answer (the matching ids) and
ranks only those among the decrypted CKKS scores; truth is plaintext brute force over the
rows whose decrypted metadata match the filter. The check: every live segment's CKKS block
parses, matches its segment and decrypts under its key version's CKKS key; the version's
evaluation-keys object is present, its head authenticates and its body is the one the head
names. Each tampering is performed on the bucket, then undone (the check never writes).

One module-scoped repository of real sample DICOM files (TenSEAL key generation is slow);
the last test rewrites its segments under a wrong CKKS key and must stay last.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, replace
from typing import Any

import numpy as np
import pytest

try:
    import owned_repos
    from workstation import sample_files
except ImportError:  # pragma: no cover
    from tests import owned_repos
    from tests.workstation import sample_files

from app.core import ckks_blocks
from app.core.errors import IntegrityError, ServiceError
from app.core.keywords import keywords_of
from app.core.logstate import verified_log
from cloud import ckks_store
from cloud.directory_store import DirectoryStore
from crypto import ckks

FILES = 16
BATCH = 8


@dataclass
class Archive:
    client: Any
    repo: Any
    store: DirectoryStore


@pytest.fixture(scope="module")
def archive(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Archive]:
    from app.core import client as facade
    from app.core.settings import Settings

    root = tmp_path_factory.mktemp("ckks-filter")
    settings = Settings(store="directory", data_dir=str(root / "owner"), workers=1)
    identity = facade.create_identity(settings, "Dr. Filter", owned_repos.STRONG_PASSWORD)
    with facade.Client(settings, identity) as client:
        repo = client.create_repository("hf", search="ckks")
        report = client.import_files(repo, sample_files(FILES), batch_size=BATCH)
        assert report.imported and not report.failed
        yield Archive(client, client.repository("hf"), DirectoryStore(settings.objects_dir))
    ckks_blocks.forget()


def _rows(archive: Archive) -> tuple[list[str], np.ndarray, list[set[str]]]:
    metas = archive.client.list_images(archive.repo)
    return ([m.image_id for m in metas], np.array([m.features for m in metas]),
            [keywords_of(m) for m in metas])


def _brute(ids: list[str], x: np.ndarray, q: np.ndarray, k: int) -> list[tuple[str, float]]:
    d = np.einsum("ij,ij->i", x - q, x - q)
    order = np.lexsort((np.array(ids, dtype=object), d))[:k]
    return [(ids[i], float(d[i])) for i in order]


def _half_modality(words: list[set[str]]) -> str:
    counts = Counter(w for ws in words for w in ws if w.startswith("modality="))
    return min(counts, key=lambda w: (abs(counts[w] - len(words) // 2), w))


def test_filtered_top_k_equals_brute_force_over_the_filtered_rows(archive: Archive) -> None:
    ids, x, words = _rows(archive)
    term = _half_modality(words)
    rng = np.random.default_rng(19)
    for terms in (term, f"NOT {term}"):
        keep = [n for n, ws in enumerate(words) if (term in ws) == (terms == term)]
        assert 0 < len(keep) < len(ids), (terms, Counter(w for ws in words for w in ws))
        sub_ids, sub_x = [ids[n] for n in keep], x[keep]
        outside = next(n for n in range(len(ids)) if n not in keep)
        queries = np.stack([x[outside], x[keep[0]], x[keep[-1]] + rng.normal(0, 0.01,
                                                                             x.shape[1])])
        results = archive.client.search_features(archive.repo, queries, ["a", "b", "c"], 3,
                                                 group=False, where=terms)
        for q, result in zip(queries, results, strict=True):
            want = _brute(sub_ids, sub_x, q, 3)
            assert [h.image_id for h in result.hits] == [i for i, _ in want], terms
            assert np.allclose([h.distance for h in result.hits], [d for _, d in want],
                               rtol=1e-12, atol=0)
            assert result.stats["mode"] == "ckks" and result.stats["matched"] == len(keep)
            assert result.complete is True and result.segments_expected >= FILES // BATCH
        assert "keywords" in results[0].timings_ms
    nothing = archive.client.search_features(archive.repo, x[0], ["q"], 3, group=False,
                                             where="modality=XA date=1900")[0]
    assert nothing.hits == [] and nothing.stats["matched"] == 0


def test_a_keyword_answer_naming_an_image_outside_the_filter_is_refused(
        archive: Archive, monkeypatch: pytest.MonkeyPatch) -> None:
    """The service adds a non-matching image to the keyword-only answer: the image then
    wins the CKKS ranking (the query is its own features), and the client's plaintext
    check of the hits against the filter refuses the answer."""
    ids, x, words = _rows(archive)
    term = _half_modality(words)
    intruder = next(n for n, ws in enumerate(words) if term not in ws)
    service = archive.client.session.service
    honest = service.search_v2

    def hostile(*args: Any, **kwargs: Any) -> Any:
        answer = honest(*args, **kwargs)
        if args[1] is None:  # the keyword-only request
            return replace(answer, hits=[[*answer.hits[0], (ids[intruder], 0.0)]],
                           matched=answer.matched + 1)
        return answer

    monkeypatch.setattr(service, "search_v2", hostile)
    with pytest.raises(ServiceError, match="does not match the keyword query"):
        archive.client.search_features(archive.repo, x[intruder], ["q"], 1, group=False,
                                       where=term)


def _problems(archive: Archive) -> list[tuple[str, str, str]]:
    report = archive.client.check_repository(archive.repo)
    return [(p.kind, p.type, p.id) for p in report.problems]


def test_check_passes_and_counts_the_ckks_side(archive: Archive) -> None:
    report = archive.client.check_repository(archive.repo)
    assert report.ok, [p.line() for p in report.problems]
    assert report.counts["ckks blocks"] == report.counts["segments"] >= FILES // BATCH
    assert report.counts["evaluation keys"] == 1


def test_check_names_altered_and_missing_evaluation_keys(archive: Archive) -> None:
    store, repo = archive.store, archive.repo
    name = ckks_store.eval_keys_key(repo.repo_id, 1)
    original = store.get(name)
    try:
        body = bytearray(original)
        body[ckks_store.EVAL_HEAD_SIZE + 4000] ^= 0x01  # the body only: the head still verifies
        store.put(name, bytes(body))
        assert _problems(archive) == [("altered", "evaluation keys", "ckks/1")]
        head = bytearray(original)
        head[20] ^= 0x01  # the head's digest: its MAC no longer verifies
        store.put(name, bytes(head))
        assert _problems(archive) == [("not authenticated", "evaluation keys", "ckks/1")]
        store.delete(name)
        assert _problems(archive) == [("missing", "evaluation keys", "ckks/1")]
    finally:
        store.put(name, original)
    assert _problems(archive) == []


def test_check_names_a_block_of_another_key(archive: Archive,
                                            monkeypatch: pytest.MonkeyPatch) -> None:
    """A member's compaction writes the merged segment's block under the CKKS key another
    key version would have (MAC, log entry and row count all valid): the check names the
    segment, and a search refuses its scores. Last test: the repository stays so."""
    client, repo = archive.client, archive.repo
    other = ckks.CkksKey(ckks.seed_from_data_key(repo.ring.version(1).data_key,
                                                 repo.repo_id, 2))
    with monkeypatch.context() as patched:
        patched.setattr(ckks_blocks, "key_of", lambda _repo, _version: other)
        assert client.compact_repository(repo).entries
    state = verified_log(archive.store, client.settings, repo)
    (merged,) = [o.id for o in state.segments(1)]
    assert _problems(archive) == [("wrong key", "segment", merged)]
    _ids, x, _words = _rows(archive)
    with pytest.raises(IntegrityError, match="not usable"):
        client.search_features(repo, x[0], ["q"], 1, group=False)
