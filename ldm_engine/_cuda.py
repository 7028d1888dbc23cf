"""Access to the compiled extension ``ldm_engine._C`` (absent when built without CUDA)."""

from __future__ import annotations

import functools


@functools.lru_cache(maxsize=None)
def extension():
    """The ``_C`` module, or None when the package was built without it."""
    try:
        from ldm_engine import _C
    except ImportError:
        return None
    return _C


def device_info() -> dict:
    """Build and device facts from ``_C``; says plainly when ``_C`` or a GPU is absent."""
    ext = extension()
    if ext is None:
        return {"extension": False, "device_count": 0,
                "error": "ldm_engine._C was not built (no nvcc at install time, or LDM_ENGINE_CUDA=0)"}
    info = dict(ext.device_info())
    info["extension"] = True
    return info
