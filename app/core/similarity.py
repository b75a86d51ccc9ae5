"""The search distance in plain words: identical, near-duplicate, similar, different.

A radiologist reading a result card should not have to know what a squared distance of
0.0731 between radcrypt-v1 feature vectors means. The thresholds below were read off the
distances measured between perturbed copies of one image, neighbouring slices of one
series, slices of other planes and pictures of other patients (bench/similarity.py,
bench/results/similarity.json; the derivation and the overlap, which the features do not
remove, are in docs/SIMILARITY.md), so each word says what kind of pair usually lands at
that distance. They belong to the radcrypt-v1 extractor: another extractor needs its own
measurement. Qt-free, so the CLI and the GUI say the same.
"""

from __future__ import annotations

import math

EXTRACTOR = "radcrypt-v1"

THRESHOLDS: dict[str, float] = {
    "identical": 1e-6,
    "near-duplicate": 0.15,
    "similar": 0.3,
}
"""Word -> largest squared distance (inclusive) that still earns it; above the last one the
word is "different". Ordered from the closest word to the farthest."""

MEANINGS: dict[str, str] = {
    "identical": "the same features up to rounding: the same file or a lossless copy",
    "near-duplicate": "usually the same picture changed a little (an 8-bit export, noise, "
                      "JPEG, another window, a small shift or rotation), but a "
                      "neighbouring slice of the same series often lands here too",
    "similar": "as close as neighbouring slices of one series usually are (or a cropped "
               "or re-windowed copy); rarely an unrelated picture, sometimes another plane "
               "of the same study",
    "different": "as far apart as slices of other planes and unrelated pictures usually are",
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
