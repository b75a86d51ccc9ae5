"""Do ciphertext norms follow plaintext norms? Spearman's rank correlation, before and after.

    python -m bench.norms [--repeats 40]

Real radcrypt-v1 features (the reference sample in resources/, 145 images; fine for
measuring, never used for a basis) are encrypted in batches of 1, 64 and all at once,
each repeated with fresh randomness; for the first level (m = 8), the second (m = 32) and
the full vectors, the rank correlation between ||E(p)|| and ||p|| over all encryptions.
"before" re-implements the noise of earlier versions (artificial dimensions and split noise
scaled by each vector's own RMS + 1); "after" is crypto/sknn.py with the extractor's norm
bound, as the importer calls it (app/core/basis.py NORM_BOUNDS). A measurement, not a test.
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
from pathlib import Path
from typing import Any

import numpy as np

from app.core.basis import NORM_BOUNDS
from bench.report import write_json
from crypto import csprng
from crypto.index import IndexKey
from crypto.sknn import SknnKey
from resources.reference import reference_features


def _before(key: SknnKey, vectors: np.ndarray, sq_norms: np.ndarray | None = None,
            norm_bound: float = 0.0) -> np.ndarray:
    """SknnKey.encrypt as it was before issue 11 (noise scaled by the vector's own RMS)."""
    x = np.atleast_2d(vectors)
    n = x.shape[0]
    norms = np.einsum("ij,ij->i", x, x) if sq_norms is None else np.asarray(sq_norms)
    spread = np.sqrt(np.mean(x * x, axis=1, keepdims=True)) + 1.0
    lifted = np.empty((n, key.lifted_dim))
    lifted[:, : key.dim] = x
    lifted[:, key.dim] = -0.5 * norms
    lifted[:, key.dim + 1 :] = csprng.normal((n, key.extra)) * spread
    noise = csprng.normal((n, key.lifted_dim)) * spread
    share_a = np.where(key.split, 0.5 * lifted + noise, lifted)
    share_b = np.where(key.split, 0.5 * lifted - noise, lifted)
    out: np.ndarray = np.hstack([share_a @ key.m1, share_b @ key.m2])
    return out


def spearman(a: np.ndarray, b: np.ndarray) -> float:
    ranks = [np.argsort(np.argsort(x, kind="stable")).astype(float) for x in (a, b)]
    return float(np.corrcoef(ranks[0], ranks[1])[0, 1])


def measure(features: np.ndarray, key: IndexKey, batch: int, repeats: int,
            rng: np.random.Generator) -> list[float]:
    plain: list[np.ndarray] = []
    cipher: list[list[np.ndarray]] = [[] for _ in range(len(key.levels) + 1)]
    norms = np.linalg.norm(features, axis=1)
    for _ in range(repeats):
        order = rng.permutation(len(features))
        for start in range(0, len(order), batch):
            rows = order[start : start + batch]
            enc = key.encrypt(features[rows], norm_bound=NORM_BOUNDS["radcrypt-v1"])
            plain.append(norms[rows])
            for i, array in enumerate((*enc.levels, enc.full)):
                cipher[i].append(np.linalg.norm(array, axis=1))
    both = np.concatenate(plain)
    return [spearman(both, np.concatenate(c)) for c in cipher]


def run(repeats: int, seed: int = 0) -> dict[str, Any]:
    features = reference_features("radcrypt-v1")
    if features is None:
        raise SystemExit("the reference sample resources/reference-radcrypt-v1.npy is missing")
    rng = np.random.default_rng(seed)
    key = IndexKey.generate(features.shape[1], sample=features[:64])
    rows = []
    after_encrypt = SknnKey.encrypt
    for label, encrypt in (("before", _before), ("after", after_encrypt)):
        SknnKey.encrypt = encrypt  # type: ignore[method-assign,assignment]
        try:
            for batch in (1, 64, len(features)):
                reps = max(1, repeats // 4) if batch == 1 else repeats
                rho = measure(features, key, batch, reps, rng)
                rows.append({"noise": label, "batch": batch, "encryptions": reps * len(features),
                             "spearman": dict(zip(["level8", "level32", "full"], rho,
                                                  strict=True))})
        finally:
            SknnKey.encrypt = after_encrypt  # type: ignore[method-assign]
    return {"rows": rows, "vectors": len(features),
            "machine": {"platform": platform.platform(), "cpus": os.cpu_count(),
                        "python": platform.python_version(), "numpy": np.__version__},
            "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=40)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", type=Path, default=Path("bench/results/norms.json"))
    args = parser.parse_args(argv)
    report = run(args.repeats, args.seed)
    print(f"{'noise':<8}{'batch':>6}{'encryptions':>13}{'level 8':>9}{'level 32':>10}{'full':>8}")
    for r in report["rows"]:
        s = r["spearman"]
        print(f"{r['noise']:<8}{r['batch']:>6}{r['encryptions']:>13}{s['level8']:9.3f}"
              f"{s['level32']:10.3f}{s['full']:8.3f}")
    print("Spearman rank correlation of ||E(p)|| with ||p|| (sampling noise ~1/sqrt(n))")
    write_json(args.json, report)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
