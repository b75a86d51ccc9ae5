"""Outsourcing end to end, through app/core: real images in, encrypted search over HTTP,
originals back byte for byte. On SeaweedFS (300 images) and on moto's server (60 images).

Nothing is mocked: the store is a real S3 server over HTTP, the search service is the
process a Session starts (`python -m cloud.service`), and the answers are compared with
plaintext brute force over the same features (bench.datasets).
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from app.core import objects
from app.core.access import open_repository_as, session_for
from app.core.importer import Importer, image_id_for
from app.core.searcher import features_of_files, image_reader, search_features, search_files
from app.core.settings import config_file, default_config_dir, default_data_dir, load_settings
from bench import datasets
from cloud.store import StoreConfig
from resources.samples import perturb_file

try:
    import e2e_support as support
    import owned_repos
    import s3servers
except ImportError:  # pragma: no cover
    from tests import e2e_support as support
    from tests import owned_repos, s3servers

KINDS = ("noise", "window", "shift", "jpeg")
QUERIES = 50
K = 5


@pytest.fixture
def backend_config(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch
                   ) -> Iterator[StoreConfig]:
    """A fresh bucket on the backend named by the test's ``backend`` parameter; boto3 (in
    this process and in the service the session starts) gets its credentials from the
    environment, as it would in production."""
    backend = request.node.callspec.params["backend"]
    base: StoreConfig = request.getfixturevalue(f"{backend}_store_config")
    config = dataclasses.replace(base, bucket=s3servers.unique_bucket("e2e"))
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", str(config.access_key))
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", str(config.secret_key))
    yield config
    s3servers.drop_bucket(config)


def test_settings_are_isolated_by_the_autouse_fixture(isolated_env: Path) -> None:
    """Every path the client would write lies under the test's private directories."""
    home = Path.home().resolve()
    for path in (default_config_dir(), default_data_dir(), config_file(),
                 load_settings().data_path, load_settings().store_dir):
        assert path.resolve().is_relative_to(isolated_env.resolve()), path
        assert not (path.resolve().is_relative_to(home) and not
                    isolated_env.resolve().is_relative_to(home)), path
    assert not config_file().exists()
    assert load_settings().store == "embedded"


@pytest.mark.parametrize(("backend", "count"), [("seaweed", 300), ("moto", 60)])
def test_import_search_fetch(backend: str, count: int, backend_config: StoreConfig,
                             isolated_env: Path, tmp_path: Path,
                             record_property: pytest.RecordProperty) -> None:
    files = support.sample_images(count)
    settings = load_settings(store="s3", endpoint_url=backend_config.endpoint_url,
                             bucket=backend_config.bucket)
    assert settings.data_path.resolve().is_relative_to(isolated_env.resolve())
    repo_name = f"e2e-{backend}"

    owner = owned_repos.owner_identity("E2E Owner")
    with session_for(settings, owner) as session:
        owned_repos.create_owned_repository(session, repo_name, owner)
        repo = open_repository_as(session, owner, repo_name)  # from the grant, as a user would

        # -- import
        started = time.perf_counter()
        report = Importer(session.store, repo, workers=2, batch_size=64, writer=owner,
                          settings=settings).run(files)
        import_seconds = time.perf_counter() - started
        assert report.failed == [] and not report.cancelled
        assert len(report.imported) == count and report.already_present == []
        ids = [image_id_for(repo, hashlib.sha256(p.read_bytes()).digest()) for p in files]
        assert [i for _, i in sorted(report.imported)] == [
            i for _, i in sorted(zip(map(str, files), ids, strict=True))]
        reader = image_reader(session, repo)  # the live packs of the verified log
        every = support.image_ids(repo, files)  # each frame of a multi-frame file: an image
        assert reader.image_ids() == set(every)
        all_ids = ids + sorted(set(every) - set(ids))  # the files' own ids, then the frames
        assert len(report.segments) == len(report.packs) == -(-count // 64)
        record_property("import_images_per_second", count / import_seconds)
        print(f"\n[{backend}] imported {count} images in {import_seconds:.1f} s "
              f"({count / import_seconds:.1f} images/s)")

        # -- the plaintext database: the features in the decrypted metadata
        with ThreadPoolExecutor(4) as pool:
            metas = list(pool.map(lambda i: reader.meta(i)[0], all_ids))
        db = np.array([m["features"] for m in metas], dtype=np.float64)
        assert [m["name"] for m in metas] == [every[i].name for i in all_ids]
        assert [m["size"] for m in metas] == [every[i].stat().st_size for i in all_ids]
        # (a multi-frame query file is its middle frame: single-frame files are compared)
        spot = [n for n in (0, count // 2, count - 1) if support.frame_count(files[n]) == 1]
        assert spot
        assert np.array_equal(features_of_files(repo, [files[i] for i in spot]), db[spot])

        # -- 50 perturbed queries, one HTTP request for all of them
        picks = np.linspace(0, count - 1, QUERIES).astype(int)
        query_files = [perturb_file(files[i], tmp_path / "queries", KINDS[n % len(KINDS)],
                                    seed=n) for n, i in enumerate(picks)]
        queries = features_of_files(repo, query_files)
        started = time.perf_counter()
        results = search_files(session, repo, query_files, k=K)
        batch_ms = (time.perf_counter() - started) * 1000
        truth, truth_dist = datasets.plaintext_topk(db, queries, K)
        position = {image_id: n for n, image_id in enumerate(all_ids)}
        originals_first = originals_in_top = 0
        for qi, result in enumerate(results):
            assert result.query == str(query_files[qi])
            assert [h.rank for h in result.hits] == list(range(1, K + 1))
            assert len({h.image_id for h in result.hits}) == K  # no image twice
            found = np.array([position[h.image_id] for h in result.hits])
            assert datasets.agrees(found, db, queries[qi], truth_dist[qi]), (
                f"{query_files[qi].name}: encrypted {found}, plaintext {truth[qi]}")
            assert result.order_verified
            for hit, n in zip(result.hits, found, strict=True):
                assert hit.name == every[all_ids[n]].name
                assert hit.distance == pytest.approx(float(np.sum((db[n] - queries[qi]) ** 2)),
                                                     rel=1e-12, abs=1e-15)
            assert result.stats["vectors"] == len(every)
            assert result.complete is True  # every live segment of the log was searched
            originals_first += int(found[0] == picks[qi])
            originals_in_top += int(picks[qi] in found)
        # Not a property of the encryption (that is exactness, above) but of the features:
        # a perturbed copy finds its original among the first K, unless the sample set
        # holds other copies of the same picture (one DICOM file in several transfer
        # syntaxes, neighbouring frames of one series) that crowd it out.
        print(f"[{backend}] the original ranked first for {originals_first}/{QUERIES} "
              f"queries, in the top {K} for {originals_in_top}")
        assert originals_in_top >= 0.7 * QUERIES

        # -- latency of one query through HTTP (token, request, metadata of k hits)
        latencies = []
        for qi in range(10):
            started = time.perf_counter()
            single = search_features(session, repo, queries[qi : qi + 1], ["q"], k=1)[0]
            latencies.append((time.perf_counter() - started) * 1000)
            top = results[qi].hits[0]  # or a tie with it: a cine loop repeats frames
            assert (single.hits[0].image_id == top.image_id
                    or single.hits[0].distance == top.distance)
        record_property("search_ms_median", float(np.median(latencies)))
        engine = np.median([r.stats["milliseconds"] for r in results])
        print(f"[{backend}] {QUERIES} queries in one request: {batch_ms:.0f} ms (features, "
              f"token, HTTP, {QUERIES * K} metadata objects); one query (k=1) median "
              f"{np.median(latencies):.1f} ms, max {max(latencies):.1f} ms; engine median "
              f"{engine:.2f} ms")

        # -- every original back, byte for byte; every preview a PNG
        out = tmp_path / "fetched"

        def fetch(n: int) -> None:
            dest = out / f"{n:03d}-{files[n].name}"
            size = objects.fetch_original(session.store, repo.ring, repo.repo_id, ids[n], dest)
            assert size == files[n].stat().st_size
            assert dest.read_bytes() == files[n].read_bytes(), files[n].name

        started = time.perf_counter()
        with ThreadPoolExecutor(4) as pool:
            list(pool.map(fetch, range(count)))
        print(f"[{backend}] fetched and verified {count} originals in "
              f"{time.perf_counter() - started:.1f} s")
        assert sorted(p.name for p in out.iterdir()) == sorted(
            f"{n:03d}-{files[n].name}" for n in range(count))  # no temporary files left
        for n in spot:
            png = reader.thumb(ids[n])
            with Image.open(io.BytesIO(png)) as thumb:
                assert thumb.format == "PNG" and max(thumb.size) <= 256

        service_pids = support.processes_with_env("RADCRYPT_S3_BUCKET", backend_config.bucket)
        assert len(service_pids) == 1  # the session started one search service
    assert support.wait_gone(service_pids[0])  # and stopped it on close
    assert (settings.data_path / "service.log").exists()  # in the isolated data dir


@pytest.mark.parametrize("backend", ["moto"])
def test_search_in_the_same_session_sees_an_import_at_once(
    backend: str, backend_config: StoreConfig
) -> None:
    """A radiologist imports, searches, imports more, and searches again in one session.
    The search service caches its snapshot (re-listed every few seconds), so a client that
    imports through a session whose service already runs tells it (one refresh request, as
    app/gui/backend.py does); the next search then sees the new images at once."""
    files = support.sample_images(14)
    settings = load_settings(store="s3", endpoint_url=backend_config.endpoint_url,
                             bucket=backend_config.bucket)
    owner = owned_repos.owner_identity()
    with session_for(settings, owner) as session:
        repo = owned_repos.create_owned_repository(session, "same-session", owner)
        Importer(session.store, repo, writer=owner, settings=settings).run(files[:10])
        first = search_files(session, repo, [files[3]], k=1)[0]
        assert first.hits[0].name == files[3].name and first.stats["vectors"] == 10
        Importer(session.store, repo, writer=owner, settings=settings).run(files[10:])
        assert session.service_started
        assert session.service.refresh(repo.repo_id)["images"] == 14
        second = search_files(session, repo, [files[12]], k=1)[0]
        assert second.stats["vectors"] == 14
        assert second.hits[0].name == files[12].name
