"""Feature extractor "radcrypt-v1": 128 float64 numbers per image, numpy only.

What it computes, and why:

1. The display image (:meth:`DecodedImage.normalised`: default DICOM window or VOI LUT, else
   the file's natural range or its 1st..99th percentiles; MONOCHROME1 inverted) in [0, 1],
   as grey (Rec. 601 luminance for RGB). Working on what the radiologist sees makes a DICOM
   file and a PNG or JPEG screenshot of it look alike to the extractor.
2. Area-averaged resampling to 70 x 70, keeping the central 64 x 64 (separable, exact box
   averaging from running sums). Averaging divides pixel noise by the block
   width and erases JPEG block artefacts; dropping a 3-cell (4.3%) margin ignores the
   border that a small shift or rotation uncovers. The aspect ratio is not kept: copies of
   one image share it. Along a side shorter than 64 pixels the grid is blurred (Gaussian,
   sigma 0.7 of an image pixel), because nothing averages that image's noise otherwise.
3. Soft histogram equalisation of that grid: each value is replaced by the fraction of the
   grid below it, counted with a Gaussian tolerance of 0.03. A window/level change is a
   monotone map of intensities, which leaves ranks unchanged except where the new window
   clips; the tolerance keeps noise in flat regions from reshuffling ranks.
4. Three blocks, each multiplied by a fixed weight so that they contribute comparably to the
   median squared distance between two sample images: 34%, 23% and 43% (weights measured on
   the 300 exported sample images, the histogram's then lowered because a window change
   moves it most; frozen here: changing anything makes a new extractor name):

   - 64: the 8 x 8 lowest-frequency 2-D DCT-II coefficients of the equalised grid
     (orthonormal, divided by 64); the DC slot, which equalisation pins near 0.5, holds half
     the mean display brightness instead. Coarse layout survives noise, JPEG and small
     shifts or rotations, which move energy mostly into higher frequencies.
   - 32: a 32-bin intensity histogram (linear "soft" binning, smoothed over neighbouring
     bins, as fractions of the grid) of the grid standardised by its mean and standard
     deviation (at least 0.05). Standardising cancels linear intensity changes; the
     histogram ignores where things are, so shifts and rotations barely move it.
   - 32: gradient orientations of the lightly blurred equalised grid, 8 unsigned
     orientations x 2 x 2 spatial cells, magnitude weighted, soft in angle and position:
     edge direction and texture tell apart images with similar layout and brightness.

The vector is deliberately NOT normalised to unit length or zero mean: the encrypted search
prunes with lower bounds built from each vector's mean and spread (DESIGN.md section 4), and
those prune only if mean and spread vary from image to image (brightness, gradient energy
and histogram shape make them vary).
"""

from __future__ import annotations

from collections.abc import Callable
from functools import lru_cache
from pathlib import Path

import numpy as np

from app.imaging.decode import DecodedImage, decode_image, luminance

EXTRACTOR_NAME = "radcrypt-v1"
FEATURE_DIM = 128

GRID = 64
MARGIN = 3
DCT_SIDE = 8
HIST_BINS = 32
ORIENTATIONS = 8
CELLS = 2
EQUALISE_TOLERANCE = 0.03
MIN_STD = 0.05
WEIGHT_DCT = 2.6
WEIGHT_HIST = 2.6
WEIGHT_GRAD = 34.0

_EQ_BINS = 256
_ROW_LOOP_WIDTH = 64  # _area_resample_rows: rows at least this wide are summed row by row


@lru_cache(maxsize=64)
def _area_plan(n_in: int, n_out: int) -> tuple[np.ndarray, np.ndarray]:
    """Where the n_out + 1 cell edges fall among n_in pixels: integer part and fraction."""
    edges = np.arange(n_out + 1, dtype=np.float64) * (n_in / n_out)
    whole = np.minimum(np.floor(edges).astype(np.intp), n_in - 1)
    return whole, edges - whole


def _area_resample_rows(x: np.ndarray, n_out: int) -> np.ndarray:
    """Exact box averaging of the rows of ``x`` into ``n_out`` equal cells.

    Pixels are unit intervals, so a cell's mean is the difference of the running sum,
    interpolated linearly, at its two edges: exact for shrinking and enlarging alike (a
    2000-pixel side averages 29-pixel runs, a 16-pixel side repeats each pixel 4 times),
    and plain cumulative sums avoid multithreaded BLAS, which crawls on a busy machine.
    """
    n_in = x.shape[0]
    whole, frac = _area_plan(n_in, n_out)
    running = np.empty((n_in + 1, *x.shape[1:]), dtype=np.float64)
    running[0] = 0.0
    running[1:] = x
    if x.ndim == 2 and x.shape[1] >= _ROW_LOOP_WIDTH:
        # the same running sums as np.cumsum(axis=0), added row after row in the same
        # order (so bit for bit equal), about 5 times faster on wide rows: numpy's
        # accumulate walks each column down with the row stride
        for i in range(1, n_in + 1):
            np.add(running[i - 1], running[i], out=running[i])
    else:
        np.cumsum(running[1:], axis=0, out=running[1:])
    at_edges = running[whole] + frac[:, None] * (running[whole + 1] - running[whole])
    return np.diff(at_edges, axis=0) * (n_out / n_in)


@lru_cache(maxsize=64)
def _gauss_matrix(n: int, sigma: float) -> np.ndarray:
    """(n, n) Gaussian smoothing matrix, rows renormalised at the borders."""
    i = np.arange(n, dtype=np.float64)
    g = np.exp(-0.5 * ((i[:, None] - i[None, :]) / sigma) ** 2)
    return g / g.sum(axis=1, keepdims=True)


@lru_cache(maxsize=4)
def _dct_matrix(n: int) -> np.ndarray:
    """Orthonormal DCT-II matrix C (n x n): the coefficients of a signal x are C @ x."""
    k = np.arange(n)[:, None]
    i = np.arange(n)[None, :]
    c = np.cos(np.pi * (2 * i + 1) * k / (2 * n)) * np.sqrt(2.0 / n)
    c[0] /= np.sqrt(2.0)
    return c


@lru_cache(maxsize=1)
def _cell_weights() -> np.ndarray:
    """(CELLS*CELLS, GRID, GRID) soft memberships of each grid point in the spatial cells:
    bilinear between cell centres, so content sliding across a cell border fades over."""
    centres = (np.arange(CELLS) + 0.5) * GRID / CELLS
    coord = np.arange(GRID) + 0.5
    w1 = np.clip(1.0 - np.abs(coord[None, :] - centres[:, None]) / (GRID / CELLS), 0.0, 1.0)
    w1[0, coord < centres[0]] = 1.0
    w1[-1, coord > centres[-1]] = 1.0
    return (w1[:, None, :, None] * w1[None, :, None, :]).reshape(CELLS * CELLS, GRID, GRID)


def _grid(img: DecodedImage) -> np.ndarray:
    """Steps 1-2: the display grey image as a float64 GRID x GRID array in [0, 1]."""
    grey = luminance(img.normalised())
    side = GRID + 2 * MARGIN
    full = _area_resample_rows(_area_resample_rows(grey, side).T, side).T
    small = full[MARGIN:-MARGIN, MARGIN:-MARGIN]
    rows, cols = grey.shape
    if rows < GRID:
        small = _gauss_matrix(GRID, round(GRID / rows / np.sqrt(2.0), 3)) @ small
    if cols < GRID:
        small = small @ _gauss_matrix(GRID, round(GRID / cols / np.sqrt(2.0), 3)).T
    return small


def _equalise(small: np.ndarray) -> np.ndarray:
    """Step 3: soft histogram equalisation (Gaussian-smoothed cumulative histogram)."""
    idx = np.clip((small * _EQ_BINS).astype(np.intp), 0, _EQ_BINS - 1)
    hist = np.bincount(idx.ravel(), minlength=_EQ_BINS).astype(np.float64)
    radius = int(np.ceil(3 * EQUALISE_TOLERANCE * _EQ_BINS))
    x = np.arange(-radius, radius + 1) / _EQ_BINS
    kernel = np.exp(-0.5 * (x / EQUALISE_TOLERANCE) ** 2)
    hist = np.convolve(np.pad(hist, radius), kernel / kernel.sum(), mode="same")[radius:-radius]
    cdf = (np.cumsum(hist) - 0.5 * hist) / hist.sum()
    centres = (np.arange(_EQ_BINS) + 0.5) / _EQ_BINS
    return np.interp(small, centres, cdf)


def _dct_block(equalised: np.ndarray, brightness: float) -> np.ndarray:
    c = _dct_matrix(GRID)[:DCT_SIDE]
    coeffs = (c @ equalised @ c.T).ravel() / GRID
    coeffs[0] = 0.5 * brightness
    return coeffs


def _soft_hist(values: np.ndarray, bins: int) -> np.ndarray:
    """Counts of values in [0, 1], each split linearly between its two nearest bin centres."""
    pos = np.clip(values.ravel() * bins - 0.5, 0.0, bins - 1.0)
    left = np.floor(pos).astype(np.intp)
    frac = pos - left
    hist = np.bincount(left, 1.0 - frac, minlength=bins)
    hist += np.bincount(np.minimum(left + 1, bins - 1), frac, minlength=bins)
    return hist


def _hist_block(small: np.ndarray) -> np.ndarray:
    z = (small - small.mean()) / max(float(small.std()), MIN_STD)
    hist = _soft_hist(np.clip(0.5 + 0.2 * z, 0.0, 1.0), HIST_BINS) / small.size
    padded = np.concatenate([hist[:1], hist, hist[-1:]])
    return 0.25 * padded[:-2] + 0.5 * padded[1:-1] + 0.25 * padded[2:]


def _blur3(x: np.ndarray) -> np.ndarray:
    """Separable [1, 2, 1] / 4 blur with edge replication."""
    p = np.pad(x, 1, mode="edge")
    x = 0.25 * p[:-2, 1:-1] + 0.5 * p[1:-1, 1:-1] + 0.25 * p[2:, 1:-1]
    p = np.pad(x, ((0, 0), (1, 1)), mode="edge")
    return 0.25 * p[:, :-2] + 0.5 * p[:, 1:-1] + 0.25 * p[:, 2:]


def _gradient_block(equalised: np.ndarray) -> np.ndarray:
    s = _blur3(equalised)
    gy = np.zeros_like(s)
    gx = np.zeros_like(s)
    gy[1:-1] = 0.5 * (s[2:] - s[:-2])
    gx[:, 1:-1] = 0.5 * (s[:, 2:] - s[:, :-2])
    magnitude = np.hypot(gx, gy)
    theta = np.mod(np.arctan2(gy, gx), np.pi)  # unsigned: an edge and its negative agree
    pos = theta * (ORIENTATIONS / np.pi) - 0.5
    left = np.floor(pos)
    frac = pos - left
    bins = np.arange(ORIENTATIONS)[:, None, None]
    lo_bin = np.mod(left, ORIENTATIONS)[None]
    hi_bin = np.mod(left + 1, ORIENTATIONS)[None]
    per_orientation = ((lo_bin == bins) * (1 - frac) + (hi_bin == bins) * frac) * magnitude
    block = np.einsum("ohw,chw->co", per_orientation, _cell_weights())
    return block.ravel() / (GRID * GRID / (CELLS * CELLS))


def extract_features(img: DecodedImage) -> np.ndarray:
    """The radcrypt-v1 vector of one decoded image: float64, shape (128,)."""
    small = _grid(img)
    equalised = _equalise(small)
    vec = np.concatenate(
        [
            WEIGHT_DCT * _dct_block(equalised, float(small.mean())),
            WEIGHT_HIST * _hist_block(small),
            WEIGHT_GRAD * _gradient_block(equalised),
        ]
    )
    return vec.astype(np.float64)


def features_of_file(path: str | Path) -> np.ndarray:
    """Decode ``path`` (default frame) and extract radcrypt-v1 features."""
    return extract_features(decode_image(path))


_EXTRACTORS: dict[str, Callable[[DecodedImage], np.ndarray]] = {
    EXTRACTOR_NAME: extract_features,
}


def get_extractor(name: str) -> Callable[[DecodedImage], np.ndarray]:
    """The extractor registered under ``name`` (a repository's manifest records it)."""
    try:
        return _EXTRACTORS[name]
    except KeyError:
        known = ", ".join(sorted(_EXTRACTORS))
        raise ValueError(f"unknown feature extractor {name!r} (known: {known})") from None
