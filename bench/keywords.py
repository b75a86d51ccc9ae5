"""Keyword lookup figures for docs/KEYWORDS.md section 6 (static SSE per segment).

    python -m bench.keywords [--images 1000000] [--segment 10000] [--repeat 3]

Builds one dictionary per segment of synthetic keywords (modality 1 of 4, body part 1 of 8,
an accession 1 of 100,000, study day, month, year) with crypto/sse.py, then times the
service's evaluation (cloud/keyword_index.py) of four queries over every segment: a rare
keyword, an absent one, a keyword on a quarter of the rows, and an AND of two fields. Prints
the best of ``repeat`` runs and the dictionary bytes per image. Synthetic keywords, because
the lookup cost depends on result sizes and segment sizes only, not on the words.
"""

from __future__ import annotations

import argparse
import time

import numpy as np

from cloud.keyword_index import SegmentKeywords, TokenClause, TokenQuery
from crypto.sse import build_dictionary, keyword_token

REPO = "bench-keywords"
INDEX_ROW_BYTES = 2208
"""A format-2 segment row at dimension 128: a 16-byte id and 274 float64 (measured with
app.core.repository.initial_index_key(128))."""


def _segment(rng: np.random.Generator, key: bytes, number: int, size: int
             ) -> tuple[SegmentKeywords, int]:
    day = rng.integers(0, 365, size)
    fields = {"modality": rng.integers(0, 4, size), "bodypart": rng.integers(0, 8, size),
              "accession": rng.integers(0, 100_000, size), "day": day, "month": day // 31,
              "year": np.zeros(size, dtype=np.int64)}
    index: dict[str, list[int]] = {}
    for name, values in fields.items():
        order = np.argsort(values, kind="stable")
        found, starts = np.unique(values[order], return_index=True)
        for value, rows in zip(found, np.split(order, starts[1:]), strict=True):
            index[f"{name}={value}"] = rows.tolist()
    seg_id = f"{number:032x}"
    data = build_dictionary(key, REPO, 1, seg_id, index)
    return SegmentKeywords.load(data, REPO, seg_id, 1, size), len(data)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=1_000_000)
    parser.add_argument("--segment", type=int, default=10_000)
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args(argv)
    rng = np.random.default_rng(7)
    key = bytes(range(32))
    start = time.perf_counter()
    built = [_segment(rng, key, n, args.segment) for n in range(args.images // args.segment)]
    segments = [s for s, _ in built]
    size = sum(n for _, n in built)
    print(f"built {len(segments)} dictionaries in {time.perf_counter() - start:.1f} s; "
          f"{size / args.images:.1f} bytes per image "
          f"({size / args.images / INDEX_ROW_BYTES:.1%} of a {INDEX_ROW_BYTES}-byte index row)")

    def clause(keyword: str) -> TokenClause:
        return TokenClause((keyword_token(key, REPO, 1, keyword),))

    queries = {"rare keyword (accession)": TokenQuery((clause("accession=42"),)),
               "absent keyword": TokenQuery((clause("modality=9"),)),
               "keyword on 25 % of rows": TokenQuery((clause("modality=1"),)),
               "modality AND bodypart": TokenQuery((clause("modality=1"), clause("bodypart=3")))}
    for label, query in queries.items():
        times, rows = [], 0
        for _ in range(args.repeat):
            start = time.perf_counter()
            rows = sum(int(s.evaluate(query).size) for s in segments)
            times.append(time.perf_counter() - start)
        print(f"{label}: {rows} rows, best of {args.repeat} {min(times) * 1e3:.1f} ms")


if __name__ == "__main__":
    main()
