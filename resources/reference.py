"""Reference feature sample: radcrypt-v1 features of the public offline sample images.

Public data (pydicom's test files; no patient data), so it must never define a
repository's bound basis: anyone could recompute that basis and, with a few known images,
the level coordinates of every query (issue 11; app/core/basis.py fits B on the
repository's own first import batch instead). It is kept for measurements: the
known-plaintext attacker's public estimate (bench/kpa.py), the ciphertext-norm leak
(bench/norms.py), realistic benchmark vectors. Regenerate with
``python -m resources.reference``.
"""

from __future__ import annotations

import io
from importlib import resources

import numpy as np
from numpy.typing import NDArray

_FILES = {"radcrypt-v1": "reference-radcrypt-v1.npy"}


def reference_features(extractor: str) -> NDArray[np.float64] | None:
    """The shipped feature sample of ``extractor``, or None when we ship none."""
    name = _FILES.get(extractor)
    if name is None:
        return None
    path = resources.files("resources").joinpath(name)
    if not path.is_file():
        return None
    array: NDArray[np.float64] = np.load(io.BytesIO(path.read_bytes()), allow_pickle=False)
    return array


def _regenerate() -> None:
    from pathlib import Path

    from app.imaging.features import EXTRACTOR_NAME, features_of_file
    from resources.samples import decodable_dicom_files

    rows = [features_of_file(p) for p in decodable_dicom_files()]
    target = Path(__file__).with_name(_FILES[EXTRACTOR_NAME])
    np.save(target, np.array(rows, dtype=np.float64))
    print(f"wrote {len(rows)} reference vectors to {target}")


if __name__ == "__main__":
    _regenerate()
