"""Ingest throughput: decode, features, encryption and upload of 512x512 16-bit images.

    python -m bench.ingest --images 400 --workers 2 --repeat 3 [--storage-format 1|2|both]

Writes distinct 512x512 16-bit CT DICOM files (a real CT slice from the offline sample
data, resampled, shifted and noised per file), then, --repeat times, measures in turn:
  plaintext work only  decode + radcrypt-v1 features, on the same number of threads
  full import          app.core.importer.Importer into the embedded SeaweedFS store (a new
                       repository each time, in storage format 2 (packs and a segment log:
                       the default) or 1 (read-only in the product: written here as old
                       clients wrote it), or both in turn with --storage-format both),
                       decoding in child processes ("processes", the default for this many
                       files) and on threads ("threads")
and reports images/s (median, min-max), the ratio import/plaintext of each repetition,
and where the CPU went, in ms per image: this process (which hashes, encrypts and
uploads), its decoding children (decode, features, preview), the store's server, and
everything else on the machine in cores (other people's jobs: on a shared machine the
absolute rates move with them, the CPU per image much less). The load average before and
after is recorded. A benchmark: it never fails on a time.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np

from bench.report import write_json

MODES = {"processes": True, "threads": False}


def save_ct(path: Path, pixels: np.ndarray, sop_uid: str,
            window: tuple[int, int] | None = (40, 400)) -> Path:
    """One uint16 CT slice as a DICOM file (explicit VR little endian, MONOCHROME2, 12
    bits stored, rescale -1024): what the benchmarks and the reliability tests import."""
    import pydicom
    from pydicom.dataset import FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.2"
    meta.MediaStorageSOPInstanceUID = sop_uid
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = pydicom.Dataset()
    ds.file_meta = meta
    ds.SOPClassUID = meta.MediaStorageSOPClassUID
    ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
    ds.Modality = "CT"
    ds.Rows, ds.Columns = pixels.shape
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit = 16, 12, 11
    ds.PixelRepresentation = 0
    ds.RescaleIntercept, ds.RescaleSlope = -1024, 1
    if window is not None:
        ds.WindowCenter, ds.WindowWidth = window
    ds.PixelData = pixels.astype(np.uint16).tobytes()
    ds.save_as(path, enforce_file_format=True)
    return path


def make_ct_files(directory: Path, count: int, seed: int = 0) -> list[Path]:
    """Distinct 512x512 uint16 CT slices as DICOM files (MONOCHROME2, rescale -1024)."""
    import pydicom
    from pydicom.data import get_testdata_file
    from pydicom.uid import generate_uid

    base = pydicom.dcmread(get_testdata_file("CT_small.dcm")).pixel_array.astype(np.float64)
    big = np.kron(base, np.ones((4, 4)))  # 128 -> 512
    rng = np.random.default_rng(seed)
    directory.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(count):
        image = np.roll(big, (int(rng.integers(-40, 40)), int(rng.integers(-40, 40))), (0, 1))
        image = image * rng.uniform(0.8, 1.2) + rng.normal(0, 20, image.shape) + 1024
        pixels = np.clip(image, 0, 4095).astype(np.uint16)
        paths.append(save_ct(directory / f"ct-{i:05d}.dcm", pixels, generate_uid()))
    return paths


# --- CPU accounting (Linux /proc; elsewhere only this process is counted) -------------------


def _clock_ticks() -> float:
    try:
        return float(os.sysconf("SC_CLK_TCK"))
    except (AttributeError, ValueError, OSError):
        return 100.0


def _pid_cpu(pid: int | None) -> float | None:
    """CPU seconds (user + system) of another live process, or None if unknown."""
    if not pid:
        return None
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return None
    return (int(fields[11]) + int(fields[12])) / _clock_ticks()


def _machine_busy() -> float | None:
    """CPU seconds all cores spent not idle, since boot."""
    try:
        values = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    except (OSError, ValueError):
        return None
    return (sum(values[:8]) - values[3] - values[4]) / _clock_ticks()


class CpuMeter:
    """CPU used during a block: this process and its reaped children (the importer's
    decoding children), one other process (the store's server), and the whole machine."""

    def __init__(self, other_pid: int | None = None) -> None:
        self.other_pid = other_pid

    def __enter__(self) -> CpuMeter:
        self._wall = time.perf_counter()
        self._own = self._own_cpu()
        self._parent = self._parent_cpu()
        self._other = _pid_cpu(self.other_pid)
        self._busy = _machine_busy()
        return self

    def __exit__(self, *exc: object) -> None:
        self.seconds = time.perf_counter() - self._wall
        self.own = self._own_cpu() - self._own
        self.parent = self._parent_cpu() - self._parent
        other = _pid_cpu(self.other_pid)
        self.other = other - self._other if other is not None and self._other is not None \
            else None
        busy = _machine_busy()
        self.busy = busy - self._busy if busy is not None and self._busy is not None else None

    @staticmethod
    def _own_cpu() -> float:
        t = os.times()
        return t.user + t.system + t.children_user + t.children_system

    @staticmethod
    def _parent_cpu() -> float:
        t = os.times()
        return t.user + t.system

    def report(self, images: int) -> dict[str, Any]:
        """ms of CPU per image, and cores in use on average (others: everything else)."""
        out: dict[str, Any] = {"seconds": self.seconds,
                               "images_per_s": images / self.seconds,
                               "cpu_ms_per_image": 1000 * self.own / images,
                               "parent_cpu_ms_per_image": 1000 * self.parent / images,
                               "children_cpu_ms_per_image":
                                   1000 * (self.own - self.parent) / images,
                               "cores": self.own / self.seconds}
        if self.other is not None:
            out["store_cpu_ms_per_image"] = 1000 * self.other / images
            out["store_cores"] = self.other / self.seconds
        if self.busy is not None:
            others = self.busy - self.own - (self.other or 0.0)
            out["others_cores"] = max(0.0, others / self.seconds)
        return out


def _load_average() -> list[float] | None:
    try:
        return [round(v, 2) for v in os.getloadavg()]
    except (AttributeError, OSError):
        return None


def _fmt_load(load: list[float] | None) -> str:
    return "unknown" if load is None else " ".join(f"{v:.2f}" for v in load)


# --- the measurements -----------------------------------------------------------------------


def plaintext_rate(paths: list[Path], workers: int) -> dict[str, Any]:
    from app.imaging.features import features_of_file

    features_of_file(paths[0])  # imports and caches, as a running importer has them
    with CpuMeter() as meter, ThreadPoolExecutor(workers) as pool:
        list(pool.map(features_of_file, paths))
    return meter.report(len(paths))


def _format1_importer(base: type) -> type:
    """The importer writing format 1 as clients before issue 13 did (per-image preview and
    metadata objects, a format-1 segment per batch). The product refuses to write format
    1 now (read-only: ``repo migrate --format 2``); its FORMAT1_WRITER switch, kept for
    tests that play an old client, lets the benchmark measure that write path too."""
    return type("Format1Importer", (base,), {"FORMAT1_WRITER": True})


def import_rate(store: Any, store_pid: int | None, paths: list[Path], workers: int,
                processes: bool, name: str, storage_format: int = 2) -> dict[str, Any]:
    import tempfile
    from types import SimpleNamespace

    from app.core.access import create_repository_as
    from app.core.importer import Importer
    from app.core.settings import Settings
    from crypto.identity import Identity

    # Repositories belong to identities: a throw-away owner, its pins (and, format 2, the
    # log's rollback memory) in a temporary dir; format 2's log entries are its signatures.
    with tempfile.TemporaryDirectory(prefix="radcrypt-bench-") as data_dir:
        settings = Settings(data_dir=data_dir)
        session = SimpleNamespace(store=store, settings=settings)
        owner = Identity.generate("Bench Owner")
        repo = create_repository_as(session, owner, name,  # type: ignore[arg-type]
                                    storage_format=storage_format)
        kind = Importer if storage_format == 2 else _format1_importer(Importer)
        importer = kind(store, repo, workers=workers, processes=processes,
                        writer=owner, settings=settings)
        with CpuMeter(store_pid) as meter:
            report = importer.run(paths)
    if report.failed or len(report.imported) != len(paths):
        raise SystemExit(f"import failed: {report.failed[:3]}")
    result = meter.report(len(paths))
    result["stored_mb"] = sum(
        size for _, size in store.list_objects(f"radcrypt/v1/repos/{repo.repo_id}/")) / 2**20
    result["segments"] = len(report.segments)
    result["storage_format"] = storage_format
    return result


def _spread(values: list[float]) -> dict[str, float]:
    return {"median": statistics.median(values), "min": min(values), "max": max(values)}


def summarise(runs: list[dict[str, Any]], modes: list[str]) -> dict[str, Any]:
    summary: dict[str, Any] = {
        "plaintext_images_per_s": _spread([r["plaintext"]["images_per_s"] for r in runs])}
    for mode in modes:
        imports = [r[mode] for r in runs]
        summary[mode] = {
            "images_per_s": _spread([i["images_per_s"] for i in imports]),
            "ratio_to_plaintext": _spread(
                [r[mode]["images_per_s"] / r["plaintext"]["images_per_s"] for r in runs]),
            "cpu_ms_per_image": _spread([i["cpu_ms_per_image"] for i in imports]),
        }
        for key in ("parent_cpu_ms_per_image", "children_cpu_ms_per_image",
                    "store_cpu_ms_per_image", "others_cores"):
            if all(key in i for i in imports):
                summary[mode][key] = _spread([i[key] for i in imports])
    return summary


def print_table(summary: dict[str, Any], args: argparse.Namespace, modes: list[str]) -> None:
    def fmt(s: dict[str, float], digits: int = 1) -> str:
        return f"{s['median']:.{digits}f} [{s['min']:.{digits}f}-{s['max']:.{digits}f}]"

    plain = summary["plaintext_images_per_s"]
    print(f"{args.images} images, {args.workers} workers, {args.repeat} repetitions: "
          "median [min-max]")
    print(f"{'':<26}{'images/s':>20}{'import/plain':>18}{'parent ms/img':>18}"
          f"{'children ms/img':>18}{'store ms/img':>18}{'others (cores)':>18}")
    print(f"{'decode+features only':<26}{fmt(plain):>20}")
    for mode in modes:
        s = summary[mode]
        cols = [fmt(s[k]) if k in s else "-" for k in
                ("parent_cpu_ms_per_image", "children_cpu_ms_per_image",
                 "store_cpu_ms_per_image")]
        others = fmt(s["others_cores"], 2) if "others_cores" in s else "-"
        print(f"{'import, ' + mode:<26}{fmt(s['images_per_s']):>20}"
              f"{fmt(s['ratio_to_plaintext'], 2):>18}" + "".join(f"{c:>18}" for c in cols)
              + f"{others:>18}")
    print("512x512 16-bit CT DICOM; import = decode, features, preview, AES-GCM, secure-kNN, "
          "uploads to the embedded store (format 1: three objects per image and a segment "
          "per 64 images; format 2: the original per image, a pack, a segment and a log "
          "entry per 64). parent: this process (hashing, encryption, uploads, commits); "
          "children: its decoding children (decode, features, preview); store: the store's "
          "server; others: the rest of the machine, in cores.")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=400)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--mode", choices=[*MODES, "both"], default="both")
    parser.add_argument("--storage-format", choices=["1", "2", "both"], default="2",
                        help="storage format of the repositories imported into (default 2; "
                             "both: format 1 and 2 in turn, in every repetition)")
    parser.add_argument("--json", type=Path, default=Path("bench/results/ingest.json"))
    args = parser.parse_args(argv)
    modes = list(MODES) if args.mode == "both" else [args.mode]
    formats = [1, 2] if args.storage_format == "both" else [int(args.storage_format)]
    columns = [(mode, fmt) for fmt in formats for mode in modes]
    names = [f"{mode}, format {fmt}" for mode, fmt in columns]

    from cloud.local import start_embedded_store
    from cloud.store import ObjectStore

    load_before = _load_average()
    runs: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="radcrypt-ingest-") as tmp:
        work = Path(tmp)
        paths = make_ct_files(work / "files", args.images)
        with start_embedded_store(work / "store") as handle:
            store = ObjectStore(handle.config())
            store_pid = handle.pid if handle.kind == "seaweedfs" else None
            for i in range(args.repeat):
                run: dict[str, Any] = {"plaintext": plaintext_rate(paths, args.workers)}
                for (mode, fmt), label in zip(columns, names, strict=True):
                    run[label] = import_rate(store, store_pid, paths, args.workers,
                                             MODES[mode], f"ingest-{mode}-f{fmt}-{i}", fmt)
                runs.append(run)
                print(f"repetition {i + 1}: plaintext {run['plaintext']['images_per_s']:.1f}/s, "
                      + ", ".join(f"{m} {run[m]['images_per_s']:.1f}/s" for m in names),
                      flush=True)
            kind = handle.kind
    summary = summarise(runs, names)
    print_table(summary, args, names)
    load = _load_average()
    print(f"load average (1, 5, 15 min) at the start: {_fmt_load(load_before)}, "
          f"at the end: {_fmt_load(load)}")
    report = {"machine": platform.platform(), "cpus": os.cpu_count(), "store": kind,
              "images": args.images, "workers": args.workers, "repeat": args.repeat,
              "storage_formats": formats, "load_average_start": load_before,
              "load_average_end": load, "summary": summary, "runs": runs}
    write_json(args.json, report)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
