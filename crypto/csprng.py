"""Random numbers for key material, drawn from the operating system's CSPRNG.

numpy's default generator is fine for simulations but predictable from its state, so
every secret (matrices, split vectors, artificial dimensions, query scales) comes from
``secrets`` through these helpers instead.
"""

from __future__ import annotations

import secrets

import numpy as np
from numpy.typing import NDArray

_TWO_POW_53 = float(2**53)


def random_bytes(n: int) -> bytes:
    """Return ``n`` bytes from the OS CSPRNG."""
    return secrets.token_bytes(n)


def uniform(shape: int | tuple[int, ...]) -> NDArray[np.float64]:
    """Uniform floats in [0, 1) with 53 random bits each."""
    count = int(np.prod(shape))
    words = np.frombuffer(secrets.token_bytes(8 * count), dtype=np.uint64)
    return ((words >> np.uint64(11)).astype(np.float64) / _TWO_POW_53).reshape(shape)


def normal(shape: int | tuple[int, ...]) -> NDArray[np.float64]:
    """Standard normal floats (Box-Muller over CSPRNG uniforms)."""
    count = int(np.prod(shape))
    half = (count + 1) // 2
    u1 = 1.0 - uniform(half)  # in (0, 1]: log is finite
    u2 = uniform(half)
    radius = np.sqrt(-2.0 * np.log(u1))
    angle = 2.0 * np.pi * u2
    values = np.concatenate([radius * np.cos(angle), radius * np.sin(angle)])[:count]
    return values.reshape(shape)


def bits(n: int) -> NDArray[np.bool_]:
    """``n`` independent fair random bits."""
    raw = np.frombuffer(secrets.token_bytes((n + 7) // 8), dtype=np.uint8)
    return np.unpackbits(raw)[:n].astype(bool)
