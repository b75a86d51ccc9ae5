"""Measured distances behind the search card's words (docs/SIMILARITY.md).

    python -m bench.similarity [--count 60] [--json bench/results/similarity.json]

The words must mean the same on a real archive, made of series of slices, as on a heap of
unrelated pictures. So the distances are measured between three kinds of pair, each with
the word it should get:

- **copies of one image** (should be "near-duplicate" or closer): the first ``count``
  distinct pydicom sample pictures and every ``SLICE_STEP``-th slice of the demo's MNI152 MR
  study (resources/series.py), each against its copies a user might query with: "export"
  (the display image as an 8-bit PNG, a screenshot), the perturbations of resources.samples
  (noise, window, shift, jpeg, rotate) and "crop" (the central 90 %, as PNG). Sample copies
  are keyed by kind ("noise"), slice copies by "slice " + kind ("slice noise").
- **neighbouring slices of one series** (should be "similar"): adjacent slices of each
  MNI152 series ("neighbour slice", 2.8 to 6.5 mm apart in the demo) and adjacent slices (at
  most 10 mm apart) or frames of the real CT and MR series among the pydicom files ("series
  neighbour"). Slices
  two apart ("slice 2 apart") are recorded too, without a target word.
- **different images** (should be "different"): an MNI152 slice against every slice of the
  other two planes ("other plane"), and every pair of distinct sample pictures ("other",
  other patients and modalities); "nearest other" is each sample's nearest other picture.

Every distance is the squared distance between radcrypt-v1 feature vectors, which the search
card shows (app/core/searcher.py recomputes it from the decrypted features). The thresholds
of app/core/similarity.py are read off this table and its threshold sweep;
tests/test_similarity.py checks them against the JSON written here.
"""

from __future__ import annotations

import argparse
import datetime
import itertools
import os
import platform
import tempfile
import time
import warnings
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from app.core.similarity import THRESHOLDS, similarity_word
from app.imaging import DecodedImage, decode_image, extract_features, features_of_file
from bench.report import write_json
from resources.samples import (
    PERTURBATIONS,
    decodable_dicom_files,
    distinct_sample_files,
    perturb_file,
    same_picture,
)
from resources.series import PLANES, write_mr_brain_study

COPY_KINDS = ("export", *PERTURBATIONS, "crop")
SLICE_COPY_KINDS = tuple(f"slice {kind}" for kind in COPY_KINDS)
SERIES_SLICES = 24
"""Slices per MNI152 plane, as the demo writes them (resources.series)."""
SLICE_STEP = 3
"""Every third MNI152 slice gets copies: 8 per plane, 24 in all."""
SERIES_MODALITIES = ("CT", "MR")
MAX_GAP_MM = 10.0
"""Sample slices of one series farther apart than this are not neighbours."""
NEIGHBOURS = ("neighbour slice", "series neighbour")
DIFFERENT = ("other plane", "other")
GROUPS: dict[str, tuple[str, ...]] = {
    "copies": (*COPY_KINDS, *SLICE_COPY_KINDS),
    "neighbours": NEIGHBOURS,
    "different": DIFFERENT,
}
"""Which distances should get which word: copies -> near-duplicate (or identical),
neighbours -> similar, different -> different."""
SWEEP_NEAR = (0.02, 0.05, 0.1, 0.15, 0.2, 0.3, 0.5)
SWEEP_SIMILAR = (0.2, 0.25, 0.3, 0.35, 0.4, 0.5, 0.75, 1.0, 1.5)


def _copy(path: Path, dest: Path, kind: str, seed: int) -> Path:
    """A copy of ``path`` of the given kind (perturb_file's, or export/crop here)."""
    if kind in PERTURBATIONS:
        return perturb_file(path, dest, kind, seed)
    pixels = decode_image(path).display()
    if kind == "crop":
        h, w = pixels.shape[:2]
        dy, dx = round(0.05 * h), round(0.05 * w)
        pixels = pixels[dy:h - dy or h, dx:w - dx or w]
    dest.mkdir(parents=True, exist_ok=True)
    out = dest / f"{path.stem}-{kind}-{seed}.png"
    Image.fromarray(np.ascontiguousarray(pixels)).save(out, format="PNG")
    return out


def _sq(a: np.ndarray, b: np.ndarray) -> float:
    diff = a - b
    return float(diff @ diff)


def _summary(values: list[float]) -> dict[str, float]:
    a = np.asarray(values, dtype=np.float64)
    return {"n": int(a.size), "min": float(a.min()), "p05": float(np.percentile(a, 5)),
            "median": float(np.median(a)), "p95": float(np.percentile(a, 95)),
            "max": float(a.max())}


def copy_distances(originals: list[Path], workdir: Path, prefix: str = ""
                   ) -> dict[str, list[float]]:
    """Each original's distance to each kind of copy of it, keyed ``prefix + kind``."""
    distances: dict[str, list[float]] = {prefix + kind: [] for kind in COPY_KINDS}
    for i, path in enumerate(originals):
        original = features_of_file(path)
        for kind in COPY_KINDS:
            copy = features_of_file(_copy(path, workdir, kind, seed=i))
            distances[prefix + kind].append(_sq(copy, original))
    return distances


def pair_distances(features: np.ndarray) -> np.ndarray:
    """Every squared distance between the rows of ``features`` (n x n, clipped at 0)."""
    sq: np.ndarray = np.einsum("ij,ij->i", features, features)
    pair: np.ndarray = np.maximum(sq[:, None] + sq[None, :] - 2 * features @ features.T, 0.0)
    return pair


def _series_uid(path: Path) -> str:
    """The file's SeriesInstanceUID ("" when it has none or pydicom cannot read it)."""
    import pydicom

    try:
        return str(pydicom.dcmread(path, stop_before_pixels=True).get("SeriesInstanceUID", ""))
    except Exception:  # an unreadable header just means "no series known"
        return ""


def measure(originals: list[Path], workdir: Path) -> dict[str, list[float]]:
    """Sample copies per kind, plus "other" (every pair of distinct pictures of different
    series: slices of one series are neighbours, measured apart) and "nearest other"."""
    distances = copy_distances(originals, workdir / "copies")
    pair = pair_distances(np.array([features_of_file(p) for p in originals]))
    series = [_series_uid(p) for p in originals]
    same = np.array([[bool(a) and a == b for b in series] for a in series])
    pair[same] = np.inf
    np.fill_diagonal(pair, np.inf)
    upper = np.triu_indices(len(originals), k=1)
    distances["other"] = [float(x) for x in pair[upper] if np.isfinite(x)]
    distances["nearest other"] = [float(x) for x in pair.min(axis=1)]
    return distances


def mni_series(workdir: Path) -> dict[str, list[Path]]:
    """The demo's MNI152 study (resources.series), plane -> slice files in instance order."""
    files = write_mr_brain_study(workdir / "mni152", SERIES_SLICES * len(PLANES))
    by_plane: dict[str, list[Path]] = {plane.name: [] for plane in PLANES}
    for path in files:  # mni152-t1-<plane>-<instance>.dcm, written in instance order
        by_plane[path.stem.split("-")[2]].append(path)
    return by_plane


def measure_mni(workdir: Path) -> dict[str, list[float]]:
    """Slice copies, neighbouring slices, slices two apart and other planes of the MNI152
    study."""
    by_plane = mni_series(workdir)
    features = {plane: np.array([features_of_file(p) for p in paths])
                for plane, paths in by_plane.items()}
    sampled = [p for paths in by_plane.values() for p in paths[::SLICE_STEP]]
    distances = copy_distances(sampled, workdir / "slice-copies", prefix="slice ")
    distances["neighbour slice"] = [_sq(f[i], f[i + 1]) for f in features.values()
                                    for i in range(len(f) - 1)]
    distances["slice 2 apart"] = [_sq(f[i], f[i + 2]) for f in features.values()
                                  for i in range(len(f) - 2)]
    planes = list(features)
    distances["other plane"] = [
        float(x) for a, first in enumerate(planes) for second in planes[a + 1:]
        for x in pair_distances(np.vstack([features[first], features[second]]))[
            :len(features[first]), len(features[first]):].ravel()]
    return distances


def _location(ds: Any) -> float | None:
    """Where a slice lies along its normal (mm): SliceLocation, else ImagePositionPatient
    projected on the ImageOrientationPatient normal; None when the header has neither."""
    if "SliceLocation" in ds and ds.SliceLocation not in (None, ""):
        return float(ds.SliceLocation)
    if "ImagePositionPatient" in ds and "ImageOrientationPatient" in ds:
        orientation = np.array([float(v) for v in ds.ImageOrientationPatient])
        position = np.array([float(v) for v in ds.ImagePositionPatient])
        return float(position @ np.cross(orientation[:3], orientation[3:]))
    return None


def _series_pairs(files: Iterable[Path]) -> list[tuple[DecodedImage, DecodedImage]]:
    """Neighbouring slices of the real CT and MR series among the sample files: within a
    series, instances of one size ordered by position along the normal, adjacent ones at
    most ``MAX_GAP_MM`` apart (two at one position, or one picture twice, are not
    neighbours); and the adjacent frames of each multi-frame CT or MR file, counted once
    when the same frames come in several transfer syntaxes."""
    import pydicom

    slices: dict[str, dict[str, tuple[float, int, int, Path]]] = {}
    multiframe: list[Path] = []
    for path in files:
        try:
            ds = pydicom.dcmread(path, stop_before_pixels=True)
        except Exception:  # a sample pydicom cannot read is not a series
            continue
        if str(ds.get("Modality", "")) not in SERIES_MODALITIES:
            continue
        if int(ds.get("NumberOfFrames", 1) or 1) > 1:
            multiframe.append(path)
            continue
        location = _location(ds)
        if location is not None:
            slices.setdefault(str(ds.get("SeriesInstanceUID", "")), {}).setdefault(
                str(ds.SOPInstanceUID), (location, int(ds.Rows), int(ds.Columns), path))
    pairs: list[tuple[DecodedImage, DecodedImage]] = []
    for series in slices.values():
        ordered = sorted(series.values())
        for (z0, *size0, p0), (z1, *size1, p1) in itertools.pairwise(ordered):
            if size0 == size1 and 0 < z1 - z0 <= MAX_GAP_MM:
                first, second = decode_image(p0), decode_image(p1)
                if not same_picture(first, second):
                    pairs.append((first, second))
    seen: list[DecodedImage] = []
    for path in multiframe:
        frames = [decode_image(path, frame=i) for i in range(
            int(pydicom.dcmread(path, stop_before_pixels=True).NumberOfFrames))]
        if any(same_picture(frames[0], other) for other in seen):
            continue
        seen.append(frames[0])
        pairs += list(itertools.pairwise(frames))
    return pairs


def measure_series_neighbours() -> dict[str, list[float]]:
    """Neighbouring slices (or frames) of the real CT and MR series in the sample files."""
    return {"series neighbour": [_sq(extract_features(a), extract_features(b))
                                 for a, b in _series_pairs(decodable_dicom_files())]}


def words_per_kind(distances: dict[str, list[float]]) -> dict[str, dict[str, int]]:
    """How many distances of each kind get each word with the current thresholds."""
    return {kind: {word: sum(similarity_word(d) == word for d in values)
                   for word in (*THRESHOLDS, "different")}
            for kind, values in distances.items()}


def _pooled(distances: dict[str, list[float]], group: str) -> np.ndarray:
    return np.array([d for kind in GROUPS[group] for d in distances[kind]])


def error_rates(distances: dict[str, list[float]], near: float, similar: float
                ) -> dict[str, float]:
    """What thresholds ``near`` (near-duplicate) and ``similar`` get wrong, as fractions:
    copies not called near-duplicate ("missed"), neighbouring slices or different images
    called near-duplicate ("false near-duplicate ..."), neighbours called different, and
    different images called similar or closer."""
    copies = _pooled(distances, "copies")
    neighbours = _pooled(distances, "neighbours")
    rates = {"missed near-duplicate": float(np.mean(copies > near)),
             "false near-duplicate, neighbours": float(np.mean(neighbours <= near)),
             "neighbours called different": float(np.mean(neighbours > similar))}
    for kind in DIFFERENT:
        values = np.asarray(distances[kind])
        rates[f"false near-duplicate, {kind}"] = float(np.mean(values <= near))
        rates[f"{kind} not different"] = float(np.mean(values <= similar))
    return rates


def sweep(distances: dict[str, list[float]]) -> dict[str, Any]:
    """Error rates of candidate thresholds: near-duplicate and similar, each alone."""
    return {
        "near-duplicate": {str(t): {k: v for k, v in error_rates(distances, t, t).items()
                                    if "near-duplicate" in k} for t in SWEEP_NEAR},
        "similar": {str(t): {k: v for k, v in error_rates(distances, 0.0, t).items()
                             if "near-duplicate" not in k} for t in SWEEP_SIMILAR},
    }


def run(originals: list[Path], workdir: Path) -> dict[str, list[float]]:
    """Every distance the report holds (see the module docstring)."""
    distances = measure(originals, workdir)
    distances.update(measure_mni(workdir))
    distances.update(measure_series_neighbours())
    return distances


def _print_table(summary: dict[str, dict[str, float]], words: dict[str, dict[str, int]]
                 ) -> None:
    print(f"{'kind':16s} {'n':>5s} {'min':>9s} {'p05':>9s} {'median':>9s} {'p95':>9s} "
          f"{'max':>9s}   words (identical/near-duplicate/similar/different)")
    for kind, s in summary.items():
        w = words[kind]
        print(f"{kind:16s} {s['n']:5d} {s['min']:9.3g} {s['p05']:9.3g} {s['median']:9.3g} "
              f"{s['p95']:9.3g} {s['max']:9.3g}   "
              + "/".join(str(w[k]) for k in (*THRESHOLDS, "different")))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.similarity", description=__doc__)
    parser.add_argument("--count", type=int, default=60, help="distinct sample pictures")
    parser.add_argument("--json", type=Path, default=Path("bench/results/similarity.json"))
    args = parser.parse_args(argv)
    warnings.filterwarnings("ignore", category=UserWarning)
    started = time.perf_counter()
    originals = distinct_sample_files(args.count)
    with tempfile.TemporaryDirectory(prefix="radcrypt-similarity-") as tmp:
        distances = run(originals, Path(tmp))
    summary = {kind: _summary(values) for kind, values in distances.items()}
    words = words_per_kind(distances)
    _print_table(summary, words)
    rates = error_rates(distances, THRESHOLDS["near-duplicate"], THRESHOLDS["similar"])
    for name, rate in rates.items():
        print(f"{name:40s} {rate:7.1%}")
    report: dict[str, Any] = {
        "bench": "similarity",
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count(),
                    "load": list(os.getloadavg())},
        "images": len(originals),
        "files": [p.name for p in originals],
        "series slices": SERIES_SLICES * len(PLANES),
        "thresholds": dict(THRESHOLDS),
        "groups": {group: list(kinds) for group, kinds in GROUPS.items()},
        "summary": summary,
        "words": words,
        "error rates": rates,
        "sweep": sweep(distances),
        "distances": distances,
        "seconds": round(time.perf_counter() - started, 1),
    }
    write_json(args.json, report)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
