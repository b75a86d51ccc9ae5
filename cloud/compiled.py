"""numba compilation for the engine's loops (cloud/codes.py, cloud/rescore.py), made the
same way in one place: cached on disk once per machine, nogil (the engine's threads run
them at once), no bounds checks, and fast-math only where a caller names the flags its
error bound allows."""

from __future__ import annotations

from collections.abc import Callable
from typing import cast


def jit(fn: Callable[..., None], fastmath: set[str] | None = None) -> Callable[..., None]:
    """Compiled with numba, once per machine (its cache, in __pycache__ or the user's
    cache directory) or, where no cache directory is writable, once per process."""
    import numba

    options: dict[str, object] = {"nogil": True, "boundscheck": False,
                                  "fastmath": fastmath or False}
    try:
        compiled: object = numba.njit(cache=True, **options)(fn)  # type: ignore[call-overload]
    except RuntimeError:
        compiled = numba.njit(**options)(fn)  # type: ignore[call-overload]
    return cast(Callable[..., None], compiled)
