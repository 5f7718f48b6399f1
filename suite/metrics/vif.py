"""Pixel-domain visual information fidelity (VIFp) of Sheikh & Bovik.

Complex convention: inputs are real-valued tensors (magnitude images for MRI);
complex tensors raise ``TypeError``.

This is ``vifvec``'s pixel-domain variant (``vifp_mscale.m``): four scales with
Gaussian windows of 17, 9, 5 and 3 taps (sigma = taps / 5), 'valid' filtering,
and a filter-then-decimate-by-two step between scales. The visual noise
variance ``sigma_nsq = 2`` refers to images on the 0-255 scale, so inputs are
first mapped to that scale with ``data_range``. ``sewar.full_ref.vifp`` on
0-255 float arrays reproduces the MATLAB code; this module matches it.
"""

from __future__ import annotations

from typing import List, Tuple

import torch

from suite.metrics._common import (
    DataRange,
    check_pair,
    data_range_per_sample,
    filter_valid,
    float_dtype,
    gaussian_kernel_1d,
    plane_chunks,
)

__all__ = ["vif"]

_EPS = 1e-10  # the reference code's small constant
_SCALES: Tuple[int, ...] = (17, 9, 5, 3)  # window taps per scale, sigma = taps / 5
_WINDOWS: List[List[float]] = [gaussian_kernel_1d(n, n / 5.0) for n in _SCALES]


def _check_size(h: int, w: int, shape: tuple) -> None:
    """Raise unless an ``h x w`` image keeps a non-empty map at every scale.

    Args:
        h: Image height.
        w: Image width.
        shape: The caller's input shape, for the message.
    """
    for side in (h, w):
        for scale, n in enumerate(_SCALES):
            if scale > 0:
                side = (side - n) // 2 + 1
            if side - n + 1 < 1:
                raise ValueError(
                    "images are too small for the 4 VIF scales (at least 41 x 41 pixels), "
                    f"got shape {shape}"
                )


def _scale_terms(maps: torch.Tensor, win: List[float], sigma_nsq: float) -> Tuple[torch.Tensor, torch.Tensor]:
    """Numerator and denominator sums of one scale.

    Args:
        maps: ``(5, N, H, W)`` work buffer: ``maps[0]`` holds the reference
            planes and ``maps[1]`` the distorted planes; the other three slots
            are overwritten.
        win: 1-D Gaussian taps of this scale.
        sigma_nsq: Visual noise variance.

    Returns:
        ``(num, den)``, each ``(N,)`` float64: the plane sums of
        ``ln(1 + g^2 s_ref / (s_v + sigma_nsq))`` and ``ln(1 + s_ref / sigma_nsq)``.
    """
    ref, dist = maps[0], maps[1]
    torch.mul(ref, ref, out=maps[2])
    torch.mul(dist, dist, out=maps[3])
    torch.mul(ref, dist, out=maps[4])
    mu1, mu2, e11, e22, e12 = filter_valid(maps, win).unbind(0)
    sigma1_sq = e11.sub_(mu1 * mu1).clamp_(min=0.0)
    sigma2_sq = e22.sub_(mu2 * mu2).clamp_(min=0.0)
    sigma12 = e12.sub_(mu1.mul_(mu2))

    # The reference's special cases, in its order.
    g = sigma12 / (sigma1_sq + _EPS)
    sv_sq = sigma2_sq - g * sigma12
    flat_ref = sigma1_sq < _EPS
    g.masked_fill_(flat_ref, 0.0)
    sv_sq = torch.where(flat_ref, sigma2_sq, sv_sq)
    sigma1_sq.masked_fill_(flat_ref, 0.0)
    flat_dist = sigma2_sq < _EPS
    g.masked_fill_(flat_dist, 0.0)
    sv_sq.masked_fill_(flat_dist, 0.0)
    negative = g < 0
    sv_sq = torch.where(negative, sigma2_sq, sv_sq)
    g.masked_fill_(negative, 0.0)
    sv_sq.clamp_(min=_EPS)

    num = g.square_().mul_(sigma1_sq).div_(sv_sq.add_(sigma_nsq)).log1p_()
    den = sigma1_sq.div_(sigma_nsq).log1p_()
    # Natural logs: the reference's log10 factor cancels in num / den.
    return num.sum(dim=(1, 2), dtype=torch.float64), den.sum(dim=(1, 2), dtype=torch.float64)


def vif(
    pred: torch.Tensor,
    target: torch.Tensor,
    data_range: DataRange = None,
    sigma_nsq: float = 2.0,
) -> torch.Tensor:
    """Pixel-domain VIF (VIFp), four scales, per sample.

    Both images are multiplied by ``255 / R`` so that ``sigma_nsq`` has its
    meaning on the 0-255 scale; VIFp is unchanged by adding one constant to
    both images, so each plane is also centred on its target mean, which keeps
    float32 arithmetic accurate (float32 unless an input is float64). The ratio
    of summed information is computed per ``(H, W)`` plane and the ``C``
    values are averaged, as ``sewar.full_ref.vifp`` does over channels.

    Args:
        pred: Distorted image, real tensor ``(B, H, W)`` or ``(B, C, H, W)``,
            ``H, W >= 41``.
        target: Reference image, same shape as ``pred``.
        data_range: ``R``, the span mapped to 255. ``None`` uses each target's
            range ``max - min``; a number or ``(B,)`` tensor overrides it (use
            255 for 8-bit images to reproduce the reference exactly).
        sigma_nsq: Visual noise variance on the 0-255 scale, ``> 0``.

    Returns:
        ``(B,)`` float64 VIF: 1 for ``pred == target``, below 1 for most
        distortions, above 1 for contrast enhancement; NaN for a constant
        target plane (no reference information).

    Raises:
        ValueError: On mismatched shapes, images smaller than 41 x 41 pixels,
            or a non-positive ``sigma_nsq``.
    """
    p, t = check_pair(pred, target)
    if isinstance(sigma_nsq, bool) or not isinstance(sigma_nsq, (int, float)) or not sigma_nsq > 0:
        raise ValueError(f"sigma_nsq must be a positive number, got {sigma_nsq!r}")
    b, c, h, w = p.shape
    _check_size(h, w, tuple(pred.shape))
    dtype = float_dtype(p, t)
    scale = (255.0 / data_range_per_sample(t, data_range)).to(dtype).repeat_interleave(c)
    ref_planes, dist_planes = t.reshape(b * c, h, w), p.reshape(b * c, h, w)
    per_plane = torch.empty(b * c, dtype=torch.float64, device=p.device)
    for chunk in plane_chunks(b * c, h, w):
        maps = torch.empty((5, chunk.stop - chunk.start, h, w), dtype=dtype, device=p.device)
        ref, dist = maps[0], maps[1]
        ref.copy_(ref_planes[chunk])
        offset = ref.mean(dim=(1, 2), keepdim=True)
        s = scale[chunk].view(-1, 1, 1)
        ref.sub_(offset).mul_(s)
        torch.sub(dist_planes[chunk], offset, out=dist).mul_(s)
        per_plane[chunk] = _vif_planes(maps, float(sigma_nsq))
    return per_plane.view(b, c).mean(dim=1)


def _vif_planes(maps: torch.Tensor, sigma_nsq: float) -> torch.Tensor:
    """VIFp of each plane, images on the 0-255 scale.

    Args:
        maps: ``(5, N, H, W)`` work buffer with the reference planes in
            ``maps[0]`` and the distorted planes in ``maps[1]``.
        sigma_nsq: Visual noise variance.

    Returns:
        ``(N,)`` float64 ratio of summed information over the four scales.
    """
    num = torch.zeros(maps.shape[1], dtype=torch.float64, device=maps.device)
    den = torch.zeros_like(num)
    for level, win in enumerate(_WINDOWS):
        if level > 0:
            smaller = filter_valid(maps[:2], win, stride=2)
            maps = maps.new_empty((5,) + smaller.shape[1:])
            maps[:2].copy_(smaller)
        n, d = _scale_terms(maps, win, sigma_nsq)
        num += n
        den += d
    return num / den
