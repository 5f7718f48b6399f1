"""Image-quality metrics on batched torch tensors.

Every metric is ``f(pred, target, ...)`` on real tensors ``(B, H, W)`` or
``(B, C, H, W)`` and returns an unreduced ``(B,)`` tensor; reduction is the
caller's. Conventions (data range, channels, fastMRI volumes) are described in
:mod:`suite.metrics.quality`, :mod:`suite.metrics.vif` and
:mod:`suite.metrics.spectral`. Each metric's name, direction and unit are
registered in :mod:`suite.metrics.registry`.

The functions are imported on first use, so that readers of the registry
(tables) do not import torch.
"""

from __future__ import annotations

import importlib
from typing import Any

_WHERE = {
    "psnr": "quality", "ssim": "quality", "nmse": "quality", "significant_residuals": "quality",
    "residual_map": "quality", "hfe": "spectral", "radial_power_spectrum": "spectral",
    "radial_frequencies": "spectral", "vif": "vif",
}

__all__ = [
    "psnr",
    "ssim",
    "nmse",
    "vif",
    "hfe",
    "significant_residuals",
    "residual_map",
    "radial_power_spectrum",
    "radial_frequencies",
]


def __getattr__(name: str) -> Any:
    if name in _WHERE:
        value = getattr(importlib.import_module(f"suite.metrics.{_WHERE[name]}"), name)
        globals()[name] = value  # also replaces the submodule ``vif`` that importing it bound to this name
        return value
    raise AttributeError(f"module 'suite.metrics' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(__all__)
