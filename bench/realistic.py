"""A sample of real image features, so "realistic" benchmark vectors match real ones.

Computes radcrypt-v1 features of the offline sample images once and caches them in the
user's cache directory; falls back to a synthetic stand-in (and says so) when the
sample data is not installed. RADCRYPT_BENCH_FEATURES names a .npy of such features
instead (bench/data/real-features-v1.npy, shipped for a bare benchmark machine that has
neither the sample data nor platformdirs).
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import numpy as np

from bench import datasets

F64 = np.ndarray


def _cache_file() -> Path:
    named = os.environ.get("RADCRYPT_BENCH_FEATURES", "").strip()
    if named:
        return Path(named)
    import platformdirs  # not on a bare benchmark machine, which names the file instead

    return Path(platformdirs.user_cache_dir("radcrypt")) / "bench-real-features-v1.npy"


def real_feature_sample() -> tuple[F64, str]:
    """(features, source description) of real sample images, d = 128."""
    cache = _cache_file()
    if cache.exists():
        return np.load(cache), "radcrypt-v1 features of offline sample images (cached)"
    try:
        from app.imaging.features import features_of_file
        from resources.samples import decodable_dicom_files
    except ImportError as exc:  # imaging not installed: say so, use a stand-in
        print(f"note: real features unavailable ({exc}); using a synthetic stand-in",
              file=sys.stderr)
        rng = np.random.default_rng(0)
        return datasets.low_rank_varying(rng, 2000, 128), "synthetic low-rank stand-in"
    rows = []
    for path in decodable_dicom_files():
        try:
            rows.append(features_of_file(path))
        except ValueError:
            continue
    features = np.array(rows, dtype=np.float64)
    cache.parent.mkdir(parents=True, exist_ok=True)
    np.save(cache, features)
    return features, f"radcrypt-v1 features of {len(rows)} offline sample images"


def realistic(rng: np.random.Generator, n: int, d: int) -> F64:
    """n vectors matching the mean and covariance of real features (resized to d)."""
    sample, _ = real_feature_sample()
    if d != sample.shape[1]:
        # Other dimensions: tile/trim the real covariance structure through a random
        # orthonormal embedding, keeping its spectrum and the per-vector offset.
        embed = np.linalg.qr(rng.standard_normal((max(d, sample.shape[1]),) * 2))[0]
        sample = (sample @ embed[: sample.shape[1], :d]) + sample.mean(axis=1, keepdims=True)
    return datasets.matching_moments(rng, n, sample)
