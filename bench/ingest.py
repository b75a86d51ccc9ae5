"""Ingest throughput: decode, features, encryption and upload of 512x512 16-bit images.

    python -m bench.ingest --images 200 --workers 2

Writes distinct 512x512 16-bit CT DICOM files (a real CT slice from the offline sample
data, resampled, shifted and noised per file), then measures in the same run:
  plaintext work only  decode + radcrypt-v1 features, on the same worker threads
  full import          app.core.importer.Importer into the embedded SeaweedFS store
and reports images/s and the ratio. A benchmark: it never fails on a time.
"""

from __future__ import annotations

import argparse
import platform
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

from bench.report import write_json


def make_ct_files(directory: Path, count: int, seed: int = 0) -> list[Path]:
    """Distinct 512x512 uint16 CT slices as DICOM files (MONOCHROME2, rescale -1024)."""
    import pydicom
    from pydicom.data import get_testdata_file
    from pydicom.dataset import FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, generate_uid

    base = pydicom.dcmread(get_testdata_file("CT_small.dcm")).pixel_array.astype(np.float64)
    big = np.kron(base, np.ones((4, 4)))  # 128 -> 512
    rng = np.random.default_rng(seed)
    directory.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(count):
        image = np.roll(big, (int(rng.integers(-40, 40)), int(rng.integers(-40, 40))), (0, 1))
        image = image * rng.uniform(0.8, 1.2) + rng.normal(0, 20, image.shape) + 1024
        pixels = np.clip(image, 0, 4095).astype(np.uint16)
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.2"
        meta.MediaStorageSOPInstanceUID = generate_uid()
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
        ds.WindowCenter, ds.WindowWidth = 40, 400
        ds.PixelData = pixels.tobytes()
        path = directory / f"ct-{i:05d}.dcm"
        ds.save_as(path, enforce_file_format=True)
        paths.append(path)
    return paths


def plaintext_rate(paths: list[Path], workers: int) -> float:
    from app.imaging.features import features_of_file

    start = time.perf_counter()
    with ThreadPoolExecutor(workers) as pool:
        list(pool.map(features_of_file, paths))
    return len(paths) / (time.perf_counter() - start)


def import_rate(paths: list[Path], workers: int, work: Path) -> dict[str, float]:
    from app.core.importer import Importer
    from app.core.repository import create_repository
    from cloud.local import start_embedded_store
    from cloud.store import ObjectStore

    with start_embedded_store(work / "store") as handle:
        store = ObjectStore(handle.config())
        repo = create_repository(store, "ingest-bench", "bench password", scrypt_log2_n=10)
        start = time.perf_counter()
        report = Importer(store, repo, workers=workers).run(paths)
        seconds = time.perf_counter() - start
        if report.failed or len(report.imported) != len(paths):
            raise SystemExit(f"import failed: {report.failed[:3]}")
        stored = sum(size for _, size in store.list_objects(f"radcrypt/v1/repos/{repo.repo_id}/"))
    return {"images_per_s": len(paths) / seconds, "seconds": seconds,
            "stored_mb": stored / 2**20, "store": handle.kind}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=200)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--json", type=Path, default=Path("bench/results/ingest.json"))
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="radcrypt-ingest-") as tmp:
        work = Path(tmp)
        paths = make_ct_files(work / "files", args.images)
        plain = plaintext_rate(paths, args.workers)
        full = import_rate(paths, args.workers, work)
    ratio = full["images_per_s"] / plain
    print(f"{'images':>7}{'workers':>8}{'decode+features/s':>19}{'full import/s':>15}"
          f"{'import/plain':>13}{'stored MB':>10}")
    print(f"{args.images:>7}{args.workers:>8}{plain:19.1f}{full['images_per_s']:15.1f}"
          f"{ratio:13.2f}{full['stored_mb']:10.1f}")
    print("512x512 16-bit CT DICOM; full import = decode, features, thumbnail, AES-GCM, "
          f"secure-kNN, upload to the embedded {full['store']} store, segment commit")
    report = {"machine": platform.platform(), "images": args.images, "workers": args.workers,
              "plaintext_images_per_s": plain, "import": full, "ratio": ratio}
    write_json(args.json, report)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
