"""Keyword search end to end on real files (issue 17): the facade (client.keywords, the
``where=`` filter of image search, labels), the embedded search service reading the
dictionaries the importer wrote into each segment (app/core/keyword_dicts.py) and the
label objects (app/core/labels.py). Truth is the plaintext filter over each image's
decrypted metadata (app.core.keywords) and brute-force distances over the stored
features of the matching images. Needs the write side's patches (p16-H4-segments,
-seglog, -seglog_format, -layout): without them the answers are incomplete and these
tests fail, as they should.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import pytest

from app.core.keywords import keywords_of, parse_query
from app.core.meta import ImageMeta

try:
    import e2e_support as support
    import owned_repos
except ImportError:  # pragma: no cover
    from tests import e2e_support as support
    from tests import owned_repos

REAL_FILES = 32


@dataclass
class Archive:
    client: Any
    repo: Any
    metas: dict[str, ImageMeta]  # image id -> decrypted metadata (the plaintext truth)


@pytest.fixture(scope="module")
def archive(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Archive]:
    from app.core import client as facade
    from app.core.settings import Settings

    root = tmp_path_factory.mktemp("keywords-e2e")
    settings = Settings(store="directory", data_dir=str(root / "data"), workers=1)
    identity = facade.create_identity(settings, "Dr. Keyword", owned_repos.STRONG_PASSWORD)
    files = support.copy_images(support.sample_images(REAL_FILES), root / "images")
    with facade.Client(settings, identity) as client:
        repo = client.create_repository("keywords-e2e", storage_format=2)
        report = client.import_files(repo, files, batch_size=15)
        assert report.imported and not report.failed
        metas = {m.image_id: m for m in client.list_images(repo)}
        yield Archive(client, repo, metas)


def _truth(archive: Archive, terms: str, labels: dict[str, set[str]] | None = None
           ) -> set[str]:
    query = parse_query(terms)
    labels = labels or {}
    return {i for i, m in archive.metas.items()
            if query.matches(keywords_of(m) | {f"label={w}" for w in labels.get(i, ())})}


REAL_QUERIES = ["modality=CT", "modality=MR,CT", "modality=US -date=2011", "bodypart=CHEST",
                "study=thorax", "study='whole body'", "date=2004-08-26", "date=2004..2005",
                "NOT modality=OT", "patient=ID1", "modality=NM bodypart=WHOLE_BODY",
                "series=t1", "modality=MR date=2005"]


def test_find_equals_the_plaintext_filter_on_real_files(archive: Archive) -> None:
    nonempty = 0
    for terms in REAL_QUERIES:
        result = archive.client.keywords.find(archive.repo, terms)
        expected = _truth(archive, terms)
        assert set(result.image_ids) == expected, terms
        assert len(result.image_ids) == len(expected)  # each once
        assert result.matched == len(expected) and not result.truncated
        assert result.complete is True, terms
        assert sum(s.image_count for s in result.studies) == len(expected)
        nonempty += bool(expected)
    assert nonempty >= 8  # the queries are about what the files hold


def test_values_are_those_present(archive: Archive) -> None:
    values = archive.client.keywords.values(archive.repo)
    assert "CT" in values["modality"] and "MR" in values["modality"]
    assert "CHEST" in values["bodypart"] and "2004-08-26" in values["date"]
    every = {k for m in archive.metas.values() for k in keywords_of(m)}
    for field_name, present in values.items():
        for value in present:
            assert f"{field_name}={value}" in every or field_name == "label"


def test_where_is_exact_among_the_matching_images(archive: Archive) -> None:
    """The combined query equals brute force over the plaintext-matching images' stored
    features (the true distances the client recomputes)."""
    client, repo = archive.client, archive.repo
    for terms in ("modality=MR", "modality=US,CR", "NOT modality=OT"):
        matching = sorted(_truth(archive, terms))
        for probe in list(archive.metas)[:3]:
            result = client.search_by_image_id(repo, probe, k=5, where=terms, group=False,
                                               exclude_self=False)
            got = [h.image_id for h in result.hits]
            assert set(got) <= set(matching), terms
            query = np.asarray(archive.metas[probe].features)
            truth = sorted(float(np.sum((np.asarray(archive.metas[i].features) - query) ** 2))
                           for i in matching)[: len(got)]
            assert len(got) == min(5, len(matching))
            assert np.allclose([h.distance for h in result.hits], truth, rtol=1e-9,
                               atol=1e-9), terms


def test_labels_are_found_and_tombstones_remove_them(archive: Archive) -> None:
    client, repo = archive.client, archive.repo
    ids = sorted(archive.metas)
    chosen = ids[:12:2]
    client.keywords.label_add(repo, chosen, "Teaching")
    labels = {i: {"teaching"} for i in chosen}
    assert client.keywords.labels(repo, chosen[0]) == ["teaching"]
    assert set(client.keywords.find(repo, "label=teaching").image_ids) == set(chosen)
    client.keywords.label_remove(repo, chosen[:2], "teaching")
    for i in chosen[:2]:
        labels[i] = set()
    for terms in ("label=teaching", "label=teaching modality=CT,MR,US", "-label=teaching"):
        assert set(client.keywords.find(repo, terms).image_ids) == _truth(
            archive, terms, labels), terms
    assert "teaching" in client.keywords.values(repo)["label"]


def test_a_revoked_users_old_tokens_find_nothing_after_the_revocation(tmp_path: Any) -> None:
    """After a revocation every segment is rewritten under the new key version, with a
    dictionary under its new keyword key: tokens made with the old keyword key (what the
    revoked user could still compute) find nothing, asked under either version; the new
    key's tokens find exactly the plaintext answer. (The revoked user cannot even sign a
    request any more; the tokens are sent here with a member's signature.)"""
    from app.core import client as facade
    from app.core.settings import Settings
    from crypto.identity import Identity

    settings = Settings(store="directory", data_dir=str(tmp_path / "data"), workers=1)
    identity = facade.create_identity(settings, "Dr. Owner", owned_repos.STRONG_PASSWORD)
    files = support.copy_images(support.sample_images(8), tmp_path / "images")
    with facade.Client(settings, identity) as client:
        repo = client.create_repository("keywords-revoke", storage_format=2)
        client.import_files(repo, files, batch_size=4)
        old_key, old_version = repo.keys.keyword_key, repo.keys.version
        reader = Identity.generate("Dr. Reader")
        record = client.register_user(reader.card().to_json())
        client.grant(repo, record.user_id)
        repo = client.revoke(repo, record.user_id)
        assert repo.keys.version == old_version + 1
        metas = {m.image_id: m for m in client.list_images(repo)}
        terms = "modality=CT,MR,US,CR,NM,OT"
        truth = {i for i, m in metas.items() if parse_query(terms).matches(keywords_of(m))}
        assert truth
        assert set(client.keywords.find(repo, terms).image_ids) == truth
        service = client.service()
        query = parse_query(terms)
        for version in (old_version, repo.keys.version):
            stale = query.tokens(old_key, repo.repo_id, version)
            answer = service.search_v2(repo.repo_id, None, 1000, version, keywords=stale)
            assert answer.hits == [[]] and answer.matched == 0, version
        fresh = query.tokens(repo.keys.keyword_key, repo.repo_id, repo.keys.version)
        answer = service.search_v2(repo.repo_id, None, 1000, repo.keys.version,
                                   keywords=fresh)
        assert {i for i, _ in answer.hits[0]} == truth
