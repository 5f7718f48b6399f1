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

from suite.metrics._common import DataRange, check_number, check_pair, data_range_per_sample, float_dtype
from suite.metrics._filters import Scratch, box_sum_flat, plane_chunks, valid_view

__all__ = ["psnr", "ssim", "nmse", "residual_map", "significant_residuals"]


def _sum_squares(x: torch.Tensor) -> torch.Tensor:
    """Per-sample ``sum(x**2)`` as float64, overwriting ``x``.

    torch sums float32 with cascaded partial sums, accurate to a few float32
    ulps for any size, so float64 accumulation (several times slower) is not
    needed.

    Args:
        x: Floating tensor ``(B, ...)`` that may be overwritten.

    Returns:
        ``(B,)`` float64.
    """
    return x.reshape(x.shape[0], -1).square_().sum(dim=1).to(torch.float64)


def _squared_error_sum(p: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """Per-sample ``sum((t - p)**2)``.

    Args:
        p: ``(B, C, H, W)``.
        t: ``(B, C, H, W)``.

    Returns:
        ``(B,)`` float64.
    """
    return _sum_squares(t.to(float_dtype(p, t)) - p)


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
        ``(B,)`` float64 PSNR in dB; ``inf`` where ``pred == target``, ``-inf``
        for a constant target with ``data_range=None`` (its range is 0).
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
    energy = _sum_squares(t.to(float_dtype(t), copy=True))
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

    The work is done in float32 unless an input is float64; each plane is
    divided by ``R`` and centred near its target mean before second moments
    are formed, which keeps float32 results within about 1e-6 of skimage's
    float64 ones. Values do not depend on how planes are batched. Not
    differentiable: the inputs are detached (use a loss for training).

    Args:
        pred: Real tensor ``(B, H, W)`` or ``(B, C, H, W)``, ``H, W >= win_size``.
        target: Ground truth, same shape as ``pred``.
        data_range: ``R``; ``None`` uses each target's range ``max - min``, a
            number or ``(B,)`` tensor overrides it (fastMRI: the volume max).
        win_size: Odd side of the uniform window, at least 3.
        k1: Luminance constant.
        k2: Contrast constant.

    Returns:
        ``(B,)`` float64 SSIM; NaN for a constant target with
        ``data_range=None`` (its range is 0).

    Raises:
        ValueError: On mismatched shapes, a wrong ``win_size``, or images
            smaller than the window.
    """
    p, t = check_pair(pred, target)
    if isinstance(win_size, bool) or not isinstance(win_size, int) or win_size < 3 or win_size % 2 == 0:
        raise ValueError(f"win_size must be an odd integer >= 3, got {win_size!r}")
    k1, k2 = check_number("k1", k1), check_number("k2", k2)
    if min(p.shape[-2:]) < win_size:
        raise ValueError(
            f"images must be at least win_size={win_size} pixels in H and W, "
            f"got shape {tuple(pred.shape)}"
        )
    b, c, h, w = p.shape
    dtype = float_dtype(p, t)
    p, t = p.detach().to(dtype), t.detach().to(dtype)  # not differentiable; no copy for float input
    x_planes, y_planes = t.reshape(b * c, h, w), p.reshape(b * c, h, w)
    # Planes are divided by their sample's R, so the constants are plain numbers.
    scale = (1.0 / data_range_per_sample(t, data_range)).to(dtype).repeat_interleave(c).view(-1, 1, 1)
    # Near each scaled plane's mean; any per-plane constant would do (see _ssim_planes).
    centres = x_planes[:, ::4, ::4].mean(dim=(1, 2), keepdim=True).mul_(scale)
    npix = float(win_size**2)
    c1 = p.new_full((), 2.0 * (k1 * npix) ** 2)
    c2_per_pixel = p.new_full((), 2.0 * (npix - 1.0) * k2**2 / npix)
    scratch = Scratch(dtype, p.device)
    out = torch.empty(b * c, dtype=dtype, device=p.device)
    for chunk in plane_chunks(b * c, h, w):
        x, y = x_planes[chunk], y_planes[chunk]
        out[chunk] = _ssim_planes(x, y, scale[chunk], centres[chunk], win_size, c1, c2_per_pixel, scratch)
    return out.view(b, c).mean(dim=1, dtype=torch.float64)


def _ssim_planes(
    x: torch.Tensor,
    y: torch.Tensor,
    scale: torch.Tensor,
    centre: torch.Tensor,
    win_size: int,
    c1: torch.Tensor,
    c2_per_pixel: torch.Tensor,
    scratch: Scratch,
) -> torch.Tensor:
    """Mean SSIM of each plane.

    skimage's SSIM map (window means, sample covariance ``n / (n - 1)`` over
    ``n = win_size^2`` pixels) is rewritten with ``u = x + y`` and
    ``v = x - y``, which needs four filtered maps instead of five. With window
    sums ``Su, Sv, Suu, Svv`` and ``Pu = Suu - Su^2 / n``, ``Pv = Svv - Sv^2 / n``
    (so that ``4 (n - 1) sigma_xy = Pu - Pv`` and
    ``2 (n - 1) (sigma_x^2 + sigma_y^2) = Pu + Pv``), it is exactly::

        (Su^2 - Sv^2 + c1) (Pu - Pv + c2)
        ---------------------------------
        (Su^2 + Sv^2 + c1) (Pu + Pv + c2)

    with ``c1 = 2 (k1 R n)^2`` and ``c2 = 2 (n - 1) (k2 R)^2``; here ``R = 1``
    because the planes are divided by their data range first, and ``c2``
    enters as ``c2 / n`` added to every ``u^2``. ``u`` is centred on
    ``2 centre`` before squaring (variances do not change), which keeps float32
    cancellation small; ``v`` needs no centring.

    Args:
        x: Target planes ``(N, H, W)``.
        y: Predicted planes ``(N, H, W)``.
        scale: ``(N, 1, 1)``, one over each plane's data range.
        centre: ``(N, 1, 1)`` values near the means of ``x * scale``.
        win_size: Odd side of the uniform window.
        c1: 0-dim luminance constant as above.
        c2_per_pixel: 0-dim ``c2 / n``.
        scratch: Work buffers.

    Returns:
        ``(N,)`` mean of the SSIM map over the valid region.
    """
    shape = x.shape
    size, w = x.numel(), shape[-1]
    npix = float(win_size**2)
    scratch.take("maps", 4 * size)
    u = torch.add(x, y, out=scratch.part("maps", 0, size, shape))
    torch.addcmul(centre * -2.0, u, scale, out=u)
    v = torch.sub(x, y, out=scratch.part("maps", size, size, shape)).mul_(scale)
    torch.addcmul(c2_per_pixel, u, u, out=scratch.part("maps", 2 * size, size, shape))
    torch.mul(v, v, out=scratch.part("maps", 3 * size, size, shape))
    name, _ = box_sum_flat(scratch, "maps", 4 * size, w, win_size)
    length = size - (win_size - 1) * (w + 1)  # responses per map
    su, sv, pu, pv = (scratch.part(name, k * size, length) for k in range(4))
    pu.addcmul_(su, su, value=-1.0 / npix)  # Pu + c2
    pv.addcmul_(sv, sv, value=-1.0 / npix)
    var = torch.add(pu, pv, out=scratch.take("var", length))
    cs = torch.sub(pu, pv, out=pv)
    h = shape[-2]
    valid_view(su, h, w, win_size).add_(centre * (2.0 * npix))  # window sums of (x + y) * scale
    torch.addcmul(c1, su, su, out=su)
    lum_den = torch.addcmul(su, sv, sv, out=pu)
    lum = su.addcmul_(sv, sv, value=-1.0)
    ssim_map = lum.mul_(cs).div_(lum_den.mul_(var))
    return valid_view(ssim_map, h, w, win_size).mean(dim=(1, 2))


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
        ``(B,)`` float64 percentage in ``[0, 100]`` (for a constant target
        every nonzero residual counts).
    """
    p, t = check_pair(pred, target)
    threshold = check_number("threshold", threshold)
    b = p.shape[0]
    dtype = float_dtype(p, t)
    bound = (threshold * data_range_per_sample(t, None)).to(dtype).view(b, 1)
    resid = (t.to(dtype) - p).reshape(b, -1).abs()
    return (resid > bound).sum(dim=1, dtype=torch.float64) * (100.0 / resid.shape[1])
