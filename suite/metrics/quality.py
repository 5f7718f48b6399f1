"""Full-reference image quality: PSNR, SSIM, NMSE and residual statistics.

Complex convention: inputs are real-valued tensors (magnitude images for MRI);
complex tensors raise ``TypeError``.

Every metric takes ``pred`` and ``target`` of shape ``(B, H, W)`` or
``(B, C, H, W)`` and returns an unreduced ``(B,)`` float64 tensor, one value per
sample. The channel axis is part of the sample: PSNR, NMSE and the
significant-residual share pool all ``C x H x W`` values, SSIM averages its
per-channel values. A volume passed as ``(1, S, H, W)`` with
``data_range=volume.max()`` therefore reproduces ``fastmri.evaluate``'s
per-volume ``psnr``, ``ssim`` and ``nmse``; a single image uses the range of its
ground truth, as scikit-image does.
"""

from __future__ import annotations

import torch

from suite.metrics._common import (
    DataRange,
    check_pair,
    data_range_per_sample,
    filter_valid,
    float_dtype,
    plane_chunks,
)

__all__ = ["psnr", "ssim", "nmse", "residual_map", "significant_residuals"]


def _squared_error_sum(p: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """Per-sample ``sum((t - p)**2)`` accumulated in float64.

    Args:
        p: ``(B, C, H, W)``.
        t: ``(B, C, H, W)``.

    Returns:
        ``(B,)`` float64.
    """
    diff = t.to(float_dtype(p, t)) - p
    return diff.reshape(diff.shape[0], -1).square().sum(dim=1, dtype=torch.float64)


def psnr(pred: torch.Tensor, target: torch.Tensor, data_range: DataRange = None) -> torch.Tensor:
    """Peak signal-to-noise ratio in dB, ``10 log10(R^2 / MSE)`` per sample.

    The MSE pools all ``C x H x W`` values of a sample, as
    ``skimage.metrics.peak_signal_noise_ratio`` on the whole array.

    Args:
        pred: Real tensor ``(B, H, W)`` or ``(B, C, H, W)``.
        target: Ground truth, same shape as ``pred``.
        data_range: Peak value ``R``. ``None`` uses each target's range
            ``max - min`` (single-image convention); a number or a ``(B,)``
            tensor overrides it (fastMRI convention: the volume's maximum).

    Returns:
        ``(B,)`` float64 PSNR in dB; ``inf`` where ``pred == target``.
    """
    p, t = check_pair(pred, target)
    r = data_range_per_sample(t, data_range)
    mse = _squared_error_sum(p, t) / p[0].numel()
    return 10.0 * torch.log10(r.square() / mse)


def nmse(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Normalised mean squared error ``||target - pred||^2 / ||target||^2``.

    Same as ``fastmri.evaluate.nmse`` per sample (over ``C x H x W``).

    Args:
        pred: Real tensor ``(B, H, W)`` or ``(B, C, H, W)``.
        target: Ground truth, same shape as ``pred``.

    Returns:
        ``(B,)`` float64 NMSE (dimensionless).
    """
    p, t = check_pair(pred, target)
    energy = t.reshape(t.shape[0], -1).square().sum(dim=1, dtype=torch.float64)
    return _squared_error_sum(p, t) / energy


def ssim(
    pred: torch.Tensor,
    target: torch.Tensor,
    data_range: DataRange = None,
    win_size: int = 7,
    k1: float = 0.01,
    k2: float = 0.03,
) -> torch.Tensor:
    """Structural similarity, scikit-image's default variant, per sample.

    Matches ``skimage.metrics.structural_similarity(target, pred,
    data_range=R)`` on each ``(H, W)`` plane: a uniform ``win_size x win_size``
    window, sample covariance (``N / (N - 1)``), constants ``(k1 R)^2`` and
    ``(k2 R)^2``, and the mean over the region that is at least
    ``(win_size - 1) // 2`` pixels from the border (the 'valid' region, so no
    padding is involved). The ``C`` plane values are averaged, so a volume
    ``(1, S, H, W)`` gives fastMRI's slice-averaged volume SSIM.

    The images are divided by ``R`` first (SSIM is invariant to a common
    rescaling of images and ``R``), which keeps float32 arithmetic accurate;
    the work is done in float32 unless an input is float64.

    Args:
        pred: Real tensor ``(B, H, W)`` or ``(B, C, H, W)``, ``H, W >= win_size``.
        target: Ground truth, same shape as ``pred``.
        data_range: ``R``; ``None`` uses each target's range ``max - min``, a
            number or ``(B,)`` tensor overrides it (fastMRI: the volume max).
        win_size: Odd side of the uniform window, at least 3.
        k1: Luminance constant.
        k2: Contrast constant.

    Returns:
        ``(B,)`` float64 SSIM.

    Raises:
        ValueError: On mismatched shapes, a wrong ``win_size``, or images
            smaller than the window.
    """
    p, t = check_pair(pred, target)
    if isinstance(win_size, bool) or not isinstance(win_size, int) or win_size < 3 or win_size % 2 == 0:
        raise ValueError(f"win_size must be an odd integer >= 3, got {win_size!r}")
    if min(p.shape[-2:]) < win_size:
        raise ValueError(
            f"images must be at least win_size={win_size} pixels in H and W, "
            f"got shape {tuple(pred.shape)}"
        )
    b, c, h, w = p.shape
    dtype = float_dtype(p, t)
    scale = (1.0 / data_range_per_sample(t, data_range)).to(dtype).repeat_interleave(c)
    x_planes, y_planes = t.reshape(b * c, h, w), p.reshape(b * c, h, w)
    per_plane = torch.empty(b * c, dtype=torch.float64, device=p.device)
    for chunk in plane_chunks(b * c, h, w):
        s = scale[chunk].view(-1, 1, 1)
        maps = torch.empty((5, chunk.stop - chunk.start, h, w), dtype=dtype, device=p.device)
        torch.mul(x_planes[chunk], s, out=maps[0])
        torch.mul(y_planes[chunk], s, out=maps[1])
        per_plane[chunk] = _ssim_planes(maps, win_size, k1, k2)
    return per_plane.view(b, c).mean(dim=1)


def _ssim_planes(maps: torch.Tensor, win_size: int, k1: float, k2: float) -> torch.Tensor:
    """Mean SSIM of each plane for images already divided by the data range.

    Args:
        maps: ``(5, N, H, W)`` work buffer: ``maps[0]`` holds the target planes
            and ``maps[1]`` the predicted planes, both with data range 1; the
            other three slots are overwritten.
        win_size: Odd side of the uniform window.
        k1: Luminance constant.
        k2: Contrast constant.

    Returns:
        ``(N,)`` float64 mean of the SSIM map over the valid region.
    """
    x, y = maps[0], maps[1]
    # Centre each plane on its target mean before forming second moments:
    # (co)variances do not change, and float32 cancellation shrinks.
    offset = x.mean(dim=(1, 2), keepdim=True)
    x.sub_(offset)
    y.sub_(offset)
    torch.mul(x, x, out=maps[2])
    torch.mul(y, y, out=maps[3])
    torch.mul(x, y, out=maps[4])
    ux, uy, uxx, uyy, uxy = filter_valid(maps, [1.0 / win_size] * win_size).unbind(0)
    cov_norm = win_size**2 / (win_size**2 - 1.0)
    c1, c2 = k1**2, k2**2
    a2 = uxy.sub_(ux * uy).mul_(2.0 * cov_norm).add_(c2)
    b2 = uxx.sub_(ux.square()).add_(uyy.sub_(uy.square())).mul_(cov_norm).add_(c2)
    ux.add_(offset)
    uy.add_(offset)
    a1 = (ux * uy).mul_(2.0).add_(c1)
    b1 = ux.square_().add_(uy.square_()).add_(c1)
    ssim_map = a1.mul_(a2).div_(b1.mul_(b2))
    return ssim_map.mean(dim=(1, 2), dtype=torch.float64)


def residual_map(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Absolute residual ``|target - pred|``.

    Args:
        pred: Real tensor ``(B, H, W)`` or ``(B, C, H, W)``.
        target: Ground truth, same shape as ``pred``.

    Returns:
        Tensor of the input shape (and promoted dtype).
    """
    check_pair(pred, target)
    return (target - pred).abs()


def significant_residuals(
    pred: torch.Tensor, target: torch.Tensor, threshold: float = 0.05
) -> torch.Tensor:
    """Share of pixels with a significant residual (SR), in %.

    A pixel counts when ``|target - pred| > threshold * R``, ``R`` being the
    sample's target range ``max - min`` over ``C x H x W``; the share is taken
    over all ``C x H x W`` pixels of the sample.

    Args:
        pred: Real tensor ``(B, H, W)`` or ``(B, C, H, W)``.
        target: Ground truth, same shape as ``pred``.
        threshold: Fraction of the target range, ``>= 0``.

    Returns:
        ``(B,)`` float64 percentage in ``[0, 100]``.
    """
    p, t = check_pair(pred, target)
    if isinstance(threshold, bool) or not isinstance(threshold, (int, float)) or not threshold >= 0:
        raise ValueError(f"threshold must be a number >= 0, got {threshold!r}")
    b = p.shape[0]
    dtype = float_dtype(p, t)
    bound = (threshold * data_range_per_sample(t, None)).to(dtype).view(b, 1)
    resid = (t.to(dtype) - p).reshape(b, -1).abs()
    return (resid > bound).sum(dim=1, dtype=torch.float64) * (100.0 / resid.shape[1])
