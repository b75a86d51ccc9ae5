"""Which device the search engine runs on: ``cpu`` (the numba/numpy engine of
cloud/search.py) or ``cuda`` / ``cuda:N`` (the GPU backend, cloud/gpu/engine.py).

CuPy is an optional extra (``pip install 'radcrypt[gpu]'``): it is imported only when a
CUDA device is asked for, and its absence is a plain-words error, never a silent
fallback to the CPU (an operator who asked for the GPU must know it is not used).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from types import ModuleType

_DEVICE = re.compile(r"(cpu|cuda)(?::(\d{1,2}))?")


@dataclass(frozen=True)
class Device:
    """A parsed device: kind ``cpu`` or ``cuda``, and the CUDA ordinal (0 by default)."""

    kind: str
    ordinal: int = 0

    @property
    def is_gpu(self) -> bool:
        return self.kind == "cuda"

    def __str__(self) -> str:
        return "cpu" if not self.is_gpu else f"cuda:{self.ordinal}"


def parse_device(text: str) -> Device:
    """``cpu``, ``cuda`` or ``cuda:N``; anything else is a ValueError naming the value."""
    match = _DEVICE.fullmatch(text.strip().lower()) if isinstance(text, str) else None
    if match is None or (match.group(1) == "cpu" and match.group(2) is not None):
        raise ValueError(f"unknown device {text!r}: use cpu, cuda or cuda:N")
    return Device(match.group(1), int(match.group(2) or 0))


def array_module(text: str) -> ModuleType:
    """numpy for ``cpu``; for ``cuda[:N]`` cupy, with device N made current in this thread.

    The float32 scans' error bars assume true float32 products: CuPy's TF32 mode
    (CUPY_TF32=1, a 10-bit mantissa) would break them, so it is refused.
    """
    device = parse_device(text)
    if not device.is_gpu:
        import numpy

        return numpy
    import os

    if os.environ.get("CUPY_TF32", "0") not in ("", "0"):
        raise RuntimeError("CUPY_TF32 is set: the GPU backend needs full float32 products "
                           "(unset CUPY_TF32)")
    try:
        import cupy
    except ImportError:
        raise RuntimeError(f"device {device} needs CuPy: install radcrypt[gpu] "
                           "(pip install 'radcrypt[gpu]')") from None
    count = cupy.cuda.runtime.getDeviceCount()
    if device.ordinal >= count:
        raise RuntimeError(f"device {device} does not exist: this machine has {count} "
                           "CUDA device(s)")
    cupy.cuda.Device(device.ordinal).use()
    return cupy  # type: ignore[no-any-return]
