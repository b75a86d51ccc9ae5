"""The search distance in plain words: identical, near-duplicate, similar, different.

A radiologist reading a result card should not have to know what a squared distance of
0.0731 between radcrypt-v1 feature vectors means. The thresholds below were read off the
distances measured between sample pictures and copies of them (bench/similarity.py,
bench/results/similarity.json; the derivation is in docs/SIMILARITY.md), so each word says
what kind of copy usually lands at that distance. They belong to the radcrypt-v1 extractor:
another extractor needs its own measurement. Qt-free, so the CLI and the GUI say the same.
"""

from __future__ import annotations

import math

EXTRACTOR = "radcrypt-v1"

THRESHOLDS: dict[str, float] = {
    "identical": 1e-6,
    "near-duplicate": 0.5,
    "similar": 1.5,
}
"""Word -> largest squared distance (inclusive) that still earns it; above the last one the
word is "different". Ordered from the closest word to the farthest."""

MEANINGS: dict[str, str] = {
    "identical": "the same features up to rounding: the same file or a lossless copy",
    "near-duplicate": "the same picture, changed a little: an 8-bit export, noise, JPEG, "
                      "another window, a small shift, rotation or crop",
    "similar": "closer than 9 in 10 pairs of different pictures: often the same kind "
               "of image, not necessarily the same patient or study",
    "different": "as far apart as unrelated pictures usually are",
}


def similarity_word(distance: float) -> str:
    """The word for a squared feature distance (as Hit.distance gives it).

    A negative or non-finite distance is a bug upstream, not a similarity: ValueError.
    """
    if not math.isfinite(distance) or distance < 0:
        raise ValueError(f"a search distance must be a finite number >= 0, not {distance!r}")
    for word, limit in THRESHOLDS.items():
        if distance <= limit:
            return word
    return "different"


def similarity_tooltip(distance: float) -> str:
    """The word's meaning and the raw distance, for a tooltip."""
    word = similarity_word(distance)
    return (f"{word}: {MEANINGS[word]}.\nSquared distance between the {EXTRACTOR} feature "
            f"vectors: {distance:.6g}, recomputed here from the decrypted features "
            "(0 = identical features). Thresholds: docs/SIMILARITY.md.")
