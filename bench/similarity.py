"""Measured distances behind the search card's words (docs/SIMILARITY.md).

    python -m bench.similarity [--count 60] [--json bench/results/similarity.json]

The first ``count`` distinct pictures among the decodable pydicom sample files (the same
choice as the robustness test, tests/test_features.py), each with copies a user might query
with: "export" (the display image as an 8-bit PNG: a screenshot of the same picture), the
perturbations of resources.samples (noise, window, shift, jpeg, rotate) and "crop" (the
central 90 % of the display image, as PNG). For each kind, the squared distance between the
copy's radcrypt-v1 features and the original's, which is the distance the search card shows
(app/core/searcher.py recomputes it from the decrypted features). "nearest other" is each
original's distance to the nearest *other* picture of the set, "other" every pair of
distinct pictures. The thresholds in app/core/similarity.py are read off this table; the
test tests/test_similarity.py checks them against the JSON written here.
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from app.core.similarity import THRESHOLDS, similarity_word
from app.imaging import DecodedImage, decode_image, features_of_file
from bench.report import write_json
from resources.samples import PERTURBATIONS, decodable_dicom_files, perturb_file, same_picture

COPY_KINDS = ("export", *PERTURBATIONS, "crop")


def distinct_originals(count: int) -> list[Path]:
    """The first ``count`` distinct pictures of the sample files (tests/test_features.py)."""
    chosen: list[Path] = []
    pictures: list[DecodedImage] = []
    for path in decodable_dicom_files():
        img = decode_image(path)
        if any(same_picture(img, other) for other in pictures):
            continue
        chosen.append(path)
        pictures.append(img)
        if len(chosen) == count:
            break
    return chosen


def _copy(path: Path, dest: Path, kind: str, seed: int) -> Path:
    """A copy of ``path`` of the given kind (perturb_file's, or export/crop here)."""
    if kind in PERTURBATIONS:
        return perturb_file(path, dest, kind, seed)
    pixels = decode_image(path).display()
    if kind == "crop":
        h, w = pixels.shape[:2]
        dy, dx = round(0.05 * h), round(0.05 * w)
        pixels = pixels[dy:h - dy or h, dx:w - dx or w]
    out = dest / f"{path.stem}-{kind}-{seed}.png"
    Image.fromarray(np.ascontiguousarray(pixels)).save(out, format="PNG")
    return out


def _summary(values: list[float]) -> dict[str, float]:
    a = np.asarray(values, dtype=np.float64)
    return {"n": int(a.size), "min": float(a.min()), "p05": float(np.percentile(a, 5)),
            "median": float(np.median(a)), "p95": float(np.percentile(a, 95)),
            "max": float(a.max())}


def measure(originals: list[Path], workdir: Path) -> dict[str, list[float]]:
    """Distances per kind of copy, plus "nearest other" and "other" (every pair)."""
    features = np.array([features_of_file(p) for p in originals])
    distances: dict[str, list[float]] = {kind: [] for kind in COPY_KINDS}
    for i, path in enumerate(originals):
        for kind in COPY_KINDS:
            copy = features_of_file(_copy(path, workdir, kind, seed=i))
            diff = copy - features[i]
            distances[kind].append(float(diff @ diff))
    sq = np.einsum("ij,ij->i", features, features)
    pair = np.maximum(sq[:, None] + sq[None, :] - 2 * features @ features.T, 0.0)
    upper = np.triu_indices(len(originals), k=1)
    distances["other"] = [float(x) for x in pair[upper]]
    np.fill_diagonal(pair, np.inf)
    distances["nearest other"] = [float(x) for x in pair.min(axis=1)]
    return distances


def words_per_kind(distances: dict[str, list[float]]) -> dict[str, dict[str, int]]:
    """How many distances of each kind get each word with the current thresholds."""
    return {kind: {word: sum(similarity_word(d) == word for d in values)
                   for word in (*THRESHOLDS, "different")}
            for kind, values in distances.items()}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.similarity", description=__doc__)
    parser.add_argument("--count", type=int, default=60, help="distinct sample pictures")
    parser.add_argument("--json", type=Path, default=Path("bench/results/similarity.json"))
    args = parser.parse_args(argv)
    warnings.filterwarnings("ignore", category=UserWarning)
    started = time.perf_counter()
    originals = distinct_originals(args.count)
    with tempfile.TemporaryDirectory(prefix="radcrypt-similarity-") as tmp:
        distances = measure(originals, Path(tmp))
    summary = {kind: _summary(values) for kind, values in distances.items()}
    words = words_per_kind(distances)
    print(f"{'kind':14s} {'n':>5s} {'min':>10s} {'p05':>10s} {'median':>10s} {'p95':>10s} "
          f"{'max':>10s}   words (identical/near-duplicate/similar/different)")
    for kind, s in summary.items():
        w = words[kind]
        print(f"{kind:14s} {s['n']:5d} {s['min']:10.4g} {s['p05']:10.4g} {s['median']:10.4g} "
              f"{s['p95']:10.4g} {s['max']:10.4g}   "
              + "/".join(str(w[k]) for k in (*THRESHOLDS, "different")))
    report: dict[str, Any] = {
        "bench": "similarity",
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count(),
                    "load": list(os.getloadavg())},
        "images": len(originals),
        "files": [p.name for p in originals],
        "thresholds": dict(THRESHOLDS),
        "summary": summary,
        "words": words,
        "distances": distances,
        "seconds": round(time.perf_counter() - started, 1),
    }
    write_json(args.json, report)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
