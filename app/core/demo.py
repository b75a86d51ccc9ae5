"""The end-to-end demonstration, shared by ``radcrypt demo`` and ``main.py --demo``.

Everything real: an embedded S3 server, the search service as its own process, a fresh
repository in storage format 2 with fresh keys (its import signs the segment log with the
demo owner's identity, and every search answer is checked for completeness), real images
grouped as a radiologist's archive is (resources/series.py: an MR brain study of three
series written as DICOM from nilearn's MNI152 T1 template; then pydicom's offline test
files, real CT and MR slices and multi-frame files among them, each its own study),
perturbed copies as queries. A query matches when the encrypted search returns its
original, or an image at the same plaintext distance (a tie); plaintext agreement is
judged against every stored image (every frame of a multi-frame file too), decrypted here.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from app.core.access import create_repository_as, session_for
from app.core.errors import RadcryptError
from app.core.importer import Importer, ImportReport
from app.core.progress import CancelToken, ProgressCallback, no_progress
from app.core.repository import Repository
from app.core.searcher import features_of_files, search_features
from app.core.session import Session
from app.core.settings import Settings
from cloud.processes import create_time, pid_alive
from crypto.identity import Identity

PERTURBATIONS = ("noise", "window", "shift", "jpeg")
DEMO_DIR_PREFIX = "radcrypt-demo-"
DEMO_OWNER_FILE = "owner.json"
DEMO_REPO = "demo"
TIE_RTOL = 1e-9


@dataclass
class DemoRow:
    query: str
    perturbation: str
    expected: str
    returned: str
    distance: float
    milliseconds: float
    matched: bool
    plaintext_agrees: bool

    def as_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


@dataclass
class DemoReport:
    images: int
    import_seconds: float
    rows: list[DemoRow] = field(default_factory=list)
    store_endpoint: str = ""
    archive_images: int = 0  # searchable images: ``images`` files, every frame of each

    @property
    def all_matched(self) -> bool:
        return bool(self.rows) and all(r.matched for r in self.rows)

    @property
    def agreement(self) -> float:
        return float(np.mean([r.plaintext_agrees for r in self.rows])) if self.rows else 0.0

    def as_dict(self) -> dict[str, Any]:
        return {"images": self.images, "archive_images": self.archive_images,
                "import_seconds": self.import_seconds,
                "agreement_with_plaintext": self.agreement, "all_matched": self.all_matched,
                "queries": [r.as_dict() for r in self.rows]}


NEAR_DUPLICATE_FRACTION = 0.1


SAME_VECTOR = 1e-12
"""Relative squared distance under which an archived vector is the candidate itself."""


def distinct_images(features: np.ndarray, count: int,
                    archive: np.ndarray | None = None) -> np.ndarray:
    """Positions of ``count`` images, evenly spread, that have no near-duplicate.

    The sample set holds neighbouring frames of cine loops and lossy copies of one
    picture, which are closer to each other than a shifted or re-windowed copy is to its
    original: for those, "expected" is ambiguous and the true nearest neighbour may be the
    neighbouring frame. An image qualifies when its nearest other image is farther than
    a tenth of the median distance between images. ``archive`` (every stored vector, the
    frames of multi-frame files included) is what "other image" ranges over when given;
    a vector equal to the candidate is the candidate itself. The choice depends on the
    archive alone, never on search results.
    """
    others = features if archive is None else archive
    sq = np.einsum("ij,ij->i", features, features)
    sq_o = np.einsum("ij,ij->i", others, others)
    dist = np.maximum(sq[:, None] + sq_o[None, :] - 2.0 * features @ others.T, 0.0)
    if archive is None:
        np.fill_diagonal(dist, np.inf)
    else:
        dist[dist <= SAME_VECTOR * (sq[:, None] + sq_o[None, :])] = np.inf
    finite = dist[np.isfinite(dist)]
    threshold = NEAR_DUPLICATE_FRACTION * float(np.median(finite)) if finite.size else 0.0
    candidates = np.flatnonzero(dist.min(axis=1) >= threshold)
    if candidates.size < count:
        candidates = np.arange(len(features))
    return candidates[np.linspace(0, candidates.size - 1, count).astype(int)]


def sample_files(workdir: Path, count: int) -> list[Path]:
    """Real images to import (needs the ``samples`` extra): resources.series.demo_files,
    the MR brain study's series first, then the offline sample set up to ``count`` files."""
    try:
        from resources.series import SeriesUnavailable, demo_files
    except ImportError as exc:
        raise RadcryptError("the demo needs the sample images: pip install "
                            f"'radcrypt[samples]' ({exc})") from None
    try:
        return demo_files(workdir, count)
    except SeriesUnavailable as exc:
        raise RadcryptError(str(exc)) from None


def stored_features(session: Session, repo: Repository) -> np.ndarray:
    """Every archived image's stored feature vector (format 2: the live packs' feature
    arrays, decrypted here): the plaintext side of the demo's agreement check, which
    covers each frame of a multi-frame file, not only the one a file's query decodes."""
    from app.core.searcher import image_reader

    reader = image_reader(session, repo)
    packs = sorted({reader.pack_of(image_id) for image_id in reader.image_ids()})
    arrays = [reader.features_of_pack(pack_id)[1] for pack_id in packs]
    if not arrays:
        raise RadcryptError(f"demo repository {repo.repo_id!r} holds no images")
    return np.concatenate(arrays).astype(np.float64)


def make_demo_workdir(parent: Path | None = None) -> Path:
    """A fresh temporary folder for a demo run, marked with the running process (pid and
    creation time, against pid reuse) so that a later run can tell it was left behind by
    a demo that was killed outright (SIGKILL runs no cleanup) and remove it. Folders that
    earlier killed demos left are removed first."""
    base = parent if parent is not None else Path(tempfile.gettempdir())
    remove_abandoned_demo_dirs(base)
    workdir = Path(tempfile.mkdtemp(prefix=DEMO_DIR_PREFIX, dir=base))
    owner = {"pid": os.getpid(), "create_time": create_time(os.getpid())}
    (workdir / DEMO_OWNER_FILE).write_text(json.dumps(owner), encoding="utf-8")
    return workdir


def remove_abandoned_demo_dirs(parent: Path) -> list[Path]:
    """Remove demo folders under ``parent`` whose owner file names a process that is gone;
    folders without one (another program's, or a demo starting right now) stay."""
    removed = []
    for path in parent.glob(DEMO_DIR_PREFIX + "*"):
        try:
            owner = json.loads((path / DEMO_OWNER_FILE).read_text(encoding="utf-8"))
            pid, created = int(owner["pid"]), owner.get("create_time")
            created = float(created) if created is not None else None
        except (OSError, ValueError, KeyError, TypeError):
            continue
        if not pid_alive(pid, created):
            with contextlib.suppress(OSError):
                shutil.rmtree(path)
                removed.append(path)
    return removed


def demo_owner() -> Identity:
    """The demo's throw-away owner identity (never written to disk)."""
    return Identity.generate("Demo owner")


def prepare_demo_repository(session: Session, workdir: Path, count: int = 300,
                            progress: ProgressCallback = no_progress,
                            owner: Identity | None = None, cancel: CancelToken | None = None
                            ) -> tuple[Repository, list[Path], ImportReport, Identity]:
    """Create the demo repository, owned by ``owner`` (a fresh identity without one), and
    import the sample images. Returns the owner too: it opens and searches the repository.
    ``cancel`` (the GUI's, pressed by Cancel, closing the window or SIGTERM) stops the
    import between batches: Cancelled, so that a shutdown does not wait for the rest."""
    cancel = cancel if cancel is not None else CancelToken()
    owner = owner if owner is not None else demo_owner()
    repo = create_repository_as(session, owner, DEMO_REPO + "-" + secrets.token_hex(3),
                                storage_format=2)
    files = sample_files(workdir, count)
    cancel.check()
    report = Importer(session.store, repo, workers=session.settings.workers,
                      progress=progress, writer=owner, settings=session.settings,
                      cancel=cancel).run(files)
    cancel.check()
    if report.failed:
        first = report.failed[0]
        raise RadcryptError(f"demo import failed for {len(report.failed)} files, "
                            f"first {first[0]}: {first[1]}")
    return repo, files, report, owner


def run_demo(settings: Settings, workdir: Path, count: int = 300, queries: int = 20,
             progress: ProgressCallback = no_progress) -> DemoReport:
    from resources.samples import perturb_file

    owner = demo_owner()
    with session_for(settings, owner) as session:  # requests signed by the demo's owner
        repo, files, imported, _ = prepare_demo_repository(session, workdir, count, progress,
                                                           owner)
        endpoint = session.store_config.endpoint_url if session.store_config else None
        report = DemoReport(images=len(files), import_seconds=imported.seconds,
                            store_endpoint=endpoint or "")
        session.service.health()  # start the service before anything is timed
        archive = features_of_files(repo, files)
        stored = stored_features(session, repo)
        report.archive_images = len(stored)
        picks = distinct_images(archive, queries, stored)
        query_dir = workdir / "queries"
        for n, index in enumerate(picks):
            kind = PERTURBATIONS[n % len(PERTURBATIONS)]
            original = files[index]
            query_path = perturb_file(original, query_dir, kind, seed=n)
            query = features_of_files(repo, [query_path])
            start = time.perf_counter()
            result = search_features(session, repo, query, [str(query_path)], k=1)[0]
            elapsed = (time.perf_counter() - start) * 1000
            hit = result.hits[0]
            d_all = np.einsum("ij,ij->i", stored - query, stored - query)
            scale = TIE_RTOL * (float(d_all.min()) + float(query[0] @ query[0]))
            d_expected = float(np.sum((archive[index] - query[0]) ** 2))
            report.rows.append(DemoRow(
                query=query_path.name, perturbation=kind, expected=original.name,
                returned=hit.name, distance=hit.distance, milliseconds=elapsed,
                matched=hit.name == original.name or abs(hit.distance - d_expected) <= scale,
                plaintext_agrees=abs(hit.distance - float(d_all.min())) <= scale,
            ))
        return report
