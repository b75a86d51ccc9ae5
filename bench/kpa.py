"""Known-plaintext attack on the bound levels and on the full vectors (issue 11, item 3).

    python -m bench.kpa [--queries 20] [--json bench/results/kpa.json]

The attacker is the cloud (it sees every ciphertext and every query token) and knows some
stored images in clear (their features; e.g. images it planted or that were published).
For a query token and the stored vectors' ciphertexts it computes the scores the engine
computes, then solves for the query:

- a level of m rows scores s = r (Bp . Bq + rho_p rho_q - ||p||^2 / 2), linear in the
  m + 2 unknowns (r Bq, r rho_q, r): with B known, m + 2 known (plaintext, score) pairs
  give Bq exactly (and with it the query's level coordinates, for every later query alike);
- the full vectors score s = r (p . q - ||p||^2 / 2): d + 1 unknowns (r q, r).

Without B the attacker estimates it from public images (PCA, as the owner does on the
repository's own features: a rotation inside the subspace changes no score, so only the
subspace matters) and regresses on that basis, on a larger one (2m, 4m rows: a subspace
that contains the secret one gives it exactly), or on the raw features (d + 2 unknowns,
needs no basis at all). What it recovers is compared with the query's true projection
B^T B q (ambient coordinates, so the secret frame does not matter); the reported count is
the smallest number of known pairs at which the median relative error over the queries is
at most 1%, the best strategy winning.

Cases:
  a  B known: the basis of earlier versions, fitted on the public reference sample
     (resources/reference-radcrypt-v1.npy) that anyone recomputes.
  b  B secret, fitted on the repository's first import batch (64 images, as the product
     does), and the repository's images are of the same kind as the public images the
     attacker has (here: vectors matching the mean and covariance of the real sample
     features; the attacker's PCA is of the real sample).
  c  B secret, fitted the same way, and the repository's images differ from every public
     image (here: the real spectrum with random principal directions): the attacker's
     public PCA says nothing of B.
  full  the full vectors (what a repository with --bound-levels off exposes).

A measurement, never a test gate: it prints a table and writes JSON.
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
from pathlib import Path
from typing import Any

import numpy as np

from bench.report import write_json
from crypto.bounds import fit_basis
from crypto.index import IndexKey
from resources.reference import reference_features

F64 = np.ndarray
TOLERANCE = 0.01
FIRST_BATCH = 64  # the importer's batch: the basis of a new key version is fitted on it
STORED = 1000


def _matching(rng: np.random.Generator, n: int, sample: F64, rotate: bool) -> F64:
    """Vectors with the sample's mean and covariance (or its spectrum, rotated)."""
    mean = sample.mean(axis=0)
    centred = sample - mean
    _, singular, vt = np.linalg.svd(centred, full_matrices=False)
    scale = singular / np.sqrt(max(len(sample) - 1, 1))
    if rotate:  # same spectrum, principal directions unrelated to the sample's
        vt = np.linalg.qr(rng.standard_normal((sample.shape[1],) * 2))[0][: len(vt)]
    noise_floor = 1e-3 * float(scale[0])
    z = rng.standard_normal((n, len(scale))) * scale
    out: F64 = mean + z @ vt + noise_floor * rng.standard_normal((n, sample.shape[1]))
    return out


def level_scores(key: IndexKey, level: int, stored: F64, queries: F64) -> F64:
    """The engine's scores of ``stored`` for each query at one level (-1: full), (Q, n)."""
    enc, token = key.encrypt(stored), key.query(queries)
    if level < 0:
        result: F64 = token.full @ enc.full.T
    else:
        result = token.levels[level] @ enc.levels[level].T
    return result


def _residual(x: F64, basis: F64) -> F64:
    projected = x @ basis.T
    out: F64 = np.sqrt(np.maximum(np.einsum("ij,ij->i", x, x)
                                  - np.einsum("ij,ij->i", projected, projected), 0.0))
    return out


def recover(known: F64, scores: F64, strategy: str, guess: F64 | None) -> F64:
    """The attacker's estimate of the query's projection (ambient coordinates).

    ``known``: the known plaintexts (n, d); ``scores``: their scores for one query (n,);
    ``guess``: the attacker's basis (rows), None for the full vectors. Strategies:
    "basis" (regress on guess p, rho, -|p|^2/2), "ambient" (on p, rho, -|p|^2/2),
    "full" (on p, -|p|^2/2).
    """
    half = -0.5 * np.einsum("ij,ij->i", known, known)
    if strategy == "full":
        design = np.hstack([known, half[:, None]])
    elif strategy == "basis":
        assert guess is not None
        design = np.hstack([known @ guess.T, _residual(known, guess)[:, None], half[:, None]])
    else:
        assert guess is not None
        design = np.hstack([known, _residual(known, guess)[:, None], half[:, None]])
    theta = np.linalg.lstsq(design, scores, rcond=None)[0]
    r = theta[-1]
    if strategy == "basis":
        assert guess is not None
        out: F64 = (theta[: guess.shape[0]] / r) @ guess
    else:
        out = theta[: known.shape[1]] / r
    return out


def iterated(known: F64, scores: F64, start: F64, rounds: int = 8) -> list[F64]:
    """Estimate the secret subspace from many queries' tokens at once: each query's raw
    feature regression gives w = B^T B q up to the error of the guessed residual rho, all
    w lie in B's subspace, so their principal directions re-estimate it; repeat, then
    regress each query on the estimate. Needs as many queries as the level has rows."""
    guess = start
    for _ in range(rounds):
        w = np.array([recover(known, s, "ambient", guess) for s in scores])
        guess = np.linalg.svd(w, full_matrices=False)[2][: start.shape[0]]
    return [recover(known, s, "basis", guess) for s in scores]


def errors(key: IndexKey, level: int, stored: F64, queries: F64, counts: list[int],
           strategies: list[tuple[str, F64 | None]], rng: np.random.Generator
           ) -> dict[int, float]:
    """Median relative error over the queries, best strategy, for each number of known
    pairs (one set of known images, the same for every query)."""
    scores = level_scores(key, level, stored, queries)
    if level < 0:
        truth = queries
    else:
        b = key.basis[: key.levels[level]]
        truth = queries @ b.T @ b
    best: dict[int, float] = {}
    for count in counts:
        pick = rng.choice(len(stored), size=count, replace=False)
        known = stored[pick]
        medians = []
        for name, guess in strategies:
            if name == "iterated":
                assert guess is not None
                estimates = iterated(known, scores[:, pick], guess)
            else:
                estimates = [recover(known, scores[qi, pick], name, guess)
                             for qi in range(len(queries))]
            errs = [float(np.linalg.norm(e - t) / np.linalg.norm(t))
                    for e, t in zip(estimates, truth, strict=True)]
            medians.append(float(np.median(errs)))
        best[count] = min(medians)
    return best


def threshold(errs: dict[int, float]) -> int | None:
    """Smallest count whose error is within TOLERANCE, from which on it stays so."""
    found = None
    for count in sorted(errs, reverse=True):
        if errs[count] <= TOLERANCE:
            found = count
        else:
            break
    return found


def _counts(m: int, d: int, stored: int) -> list[int]:
    raw = {m + 1, m + 2, m + 3, m + 6, 2 * m + 2, 4 * m + 2, 64, d, d + 1, d + 2, d + 4,
           2 * d, 4 * d}
    return sorted(c for c in raw if 2 <= c <= stored)


def run(queries: int = 40, seed: int = 0, stored_count: int = STORED) -> dict[str, Any]:
    rng = np.random.default_rng(seed)
    public = reference_features("radcrypt-v1")
    if public is None:
        raise SystemExit("the reference sample resources/reference-radcrypt-v1.npy is missing")
    d = public.shape[1]
    levels = (8, 32)
    rows: list[dict[str, Any]] = []
    cases = {
        "a": ("B known (fitted on the public reference sample)", False, "public"),
        "b": ("B secret, repository like the public images", False, "own"),
        "c": ("B secret, repository unlike any public image", True, "own"),
    }
    for case, (label, rotate, fitted_on) in cases.items():
        data = _matching(rng, stored_count + FIRST_BATCH + queries, public, rotate)
        first, stored, qs = (data[:FIRST_BATCH], data[FIRST_BATCH:-queries],
                             data[-queries:])
        sample = public if fitted_on == "public" else first
        key = IndexKey.generate(d, sample=sample, levels=levels)
        for level, m in enumerate(levels):
            if case == "a":
                strategies: list[tuple[str, F64 | None]] = [("basis", key.basis[:m])]
            else:
                strategies = [("basis", fit_basis(public, d, min(d, f * m)))
                              for f in (1, 2, 4)]
                strategies.append(("ambient", fit_basis(public, d, m)))
                strategies.append(("iterated", fit_basis(public, d, m)))
            errs = errors(key, level, stored, qs, _counts(m, d, len(stored)), strategies, rng)
            rows.append({"case": case, "label": label, "target": f"level m = {m}",
                         "unknowns": m + 2, "errors": errs, "pairs_for_1pct": threshold(errs)})
            print(_line(rows[-1]), flush=True)
    data = _matching(rng, stored_count + queries, public, False)
    key = IndexKey.generate(d, levels=())
    errs = errors(key, -1, data[:-queries], data[-queries:], _counts(d, d, stored_count),
                  [("full", None)], rng)
    rows.append({"case": "full", "label": "full vectors (levels off)", "target": "full",
                 "unknowns": d + 1, "errors": errs, "pairs_for_1pct": threshold(errs)})
    print(_line(rows[-1]), flush=True)
    return {"rows": rows, "queries": queries, "stored": stored_count, "tolerance": TOLERANCE,
            "first_batch": FIRST_BATCH, "public_sample": len(public),
            "machine": {"platform": platform.platform(), "cpus": os.cpu_count(),
                        "python": platform.python_version(), "numpy": np.__version__},
            "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")}


def _line(row: dict[str, Any]) -> str:
    errs = row["errors"]
    shown = ", ".join(f"{c}: {100 * e:.3g}%" for c, e in sorted(errs.items()))
    return (f"{row['case']:<5}{row['target']:<14} unknowns {row['unknowns']:>4}  pairs for 1%: "
            f"{row['pairs_for_1pct'] or 'never (up to ' + str(max(errs)) + ')'}\n      {shown}")


def print_table(report: dict[str, Any]) -> None:
    print(f"\n{'case':<6}{'what':<52}{'target':<14}{'unknowns':>9}{'pairs for 1%':>14}")
    for r in report["rows"]:
        found = r["pairs_for_1pct"]
        shown = str(found) if found else f"> {max(r['errors'])}"
        print(f"{r['case']:<6}{r['label']:<52}{r['target']:<14}{r['unknowns']:>9}{shown:>14}")
    print(f"median relative error of the recovered projection over {report['queries']} "
          f"queries, best attack strategy; {report['stored']} stored vectors known to choose "
          "from")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--queries", type=int, default=40,
                        help="query tokens the attacker sees (the iterated attack needs "
                             "at least as many as a level has rows)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", type=Path, default=Path("bench/results/kpa.json"))
    args = parser.parse_args(argv)
    report = run(args.queries, args.seed)
    print_table(report)
    write_json(args.json, report)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
