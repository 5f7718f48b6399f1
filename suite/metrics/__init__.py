"""Image-quality metrics on batched torch tensors.

Every metric is ``f(pred, target, ...)`` on real tensors ``(B, H, W)`` or
``(B, C, H, W)`` and returns an unreduced ``(B,)`` tensor; reduction is the
caller's. Conventions (data range, channels, fastMRI volumes) are described in
:mod:`suite.metrics.quality`, :mod:`suite.metrics.vif` and
:mod:`suite.metrics.spectral`.
"""

from suite.metrics.quality import nmse, psnr, residual_map, significant_residuals, ssim
from suite.metrics.spectral import hfe, radial_frequencies, radial_power_spectrum
from suite.metrics.vif import vif

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
