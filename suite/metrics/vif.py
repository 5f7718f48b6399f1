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
from torch.nn.functional import threshold_

from suite.metrics._common import (
    DataRange,
    Scratch,
    check_pair,
    data_range_per_sample,
    filter_flat,
    float_dtype,
    gaussian_kernel_1d,
    plane_chunks,
    valid_view,
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


def _scale_terms(
    maps: torch.Tensor, n_planes: int, h: int, w: int, win: List[float], sigma_nsq: float, scratch: Scratch
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Numerator and denominator sums of one scale.

    The reference's special cases reduce to: a reference variance below EPS
    is zero (the pixel then adds nothing to either sum); the gain ``g`` is zero
    where it is negative or the distorted variance is below EPS; the noise
    variance ``s_v = s_dist - g s_cross`` is at least EPS.

    Args:
        maps: Flat work buffer of at least ``5 N h w`` elements whose first two
            ``N h w`` blocks hold the reference and distorted planes.
        n_planes: ``N``.
        h: Plane height at this scale.
        w: Plane width at this scale.
        win: 1-D Gaussian taps of this scale.
        sigma_nsq: Visual noise variance.
        scratch: Work buffers for the filter.

    Returns:
        ``(num, den)``, each ``(N,)`` float64: the plane sums of
        ``ln(1 + g^2 s_ref / (s_v + sigma_nsq))`` and ``ln(1 + s_ref / sigma_nsq)``.
    """
    size = n_planes * h * w
    ref, dist = maps[:size], maps[size : 2 * size]
    torch.mul(ref, ref, out=maps[2 * size : 3 * size])
    torch.mul(dist, dist, out=maps[3 * size : 4 * size])
    torch.mul(ref, dist, out=maps[4 * size : 5 * size])
    moments = filter_flat(maps[: 5 * size], w, win, scratch)
    length = size - (len(win) - 1) * (w + 1)
    mu1, mu2, s1, s2, s12 = (moments[k * size : k * size + length] for k in range(5))
    threshold_(s1.addcmul_(mu1, mu1, value=-1.0), _EPS, 0.0)  # sigma_ref^2, zeroed below EPS
    s2.addcmul_(mu2, mu2, value=-1.0)  # sigma_dist^2
    s12.addcmul_(mu1, mu2, value=-1.0)  # sigma_cross
    g = torch.div(s12, torch.add(s1, _EPS, out=mu1), out=mu1).clamp_(min=0.0)
    g.masked_fill_(s2 < _EPS, 0.0)
    sv_sq = torch.addcmul(s2, g, s12, value=-1.0, out=s12).clamp_(min=_EPS).add_(sigma_nsq)
    num = g.square_().mul_(s1).div_(sv_sq).log1p_()
    den = s1.div_(sigma_nsq).log1p_()
    return (
        valid_view(num, h, w, len(win)).sum(dim=(1, 2)).to(torch.float64),
        valid_view(den, h, w, len(win)).sum(dim=(1, 2)).to(torch.float64),
    )


def vif(
    pred: torch.Tensor,
    target: torch.Tensor,
    data_range: DataRange = None,
    sigma_nsq: float = 2.0,
) -> torch.Tensor:
    """Pixel-domain VIF (VIFp), four scales, per sample.

    Both images are multiplied by ``255 / R`` so that ``sigma_nsq`` has its
    meaning on the 0-255 scale; VIFp is unchanged by adding one constant to
    both images, so each plane is also centred near its target mean, which
    keeps float32 arithmetic accurate (float32 unless an input is float64,
    agreeing with the float64 reference to about 1e-6). The ratio
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
    p, t = p.to(dtype), t.to(dtype)  # no copy for float input
    scale = (255.0 / data_range_per_sample(t, data_range)).to(dtype).repeat_interleave(c).view(-1, 1, 1)
    ref_planes, dist_planes = t.reshape(b * c, h, w), p.reshape(b * c, h, w)
    scratch = Scratch(dtype, p.device)
    per_plane = torch.empty(b * c, dtype=torch.float64, device=p.device)
    for chunk in plane_chunks(b * c, h, w):
        per_plane[chunk] = _vif_planes(
            ref_planes[chunk], dist_planes[chunk], scale[chunk], float(sigma_nsq), scratch
        )
    return per_plane.view(b, c).mean(dim=1)


def _vif_planes(
    ref: torch.Tensor, dist: torch.Tensor, scale: torch.Tensor, sigma_nsq: float, scratch: Scratch
) -> torch.Tensor:
    """VIFp of each plane.

    Args:
        ref: Reference planes ``(N, H, W)``.
        dist: Distorted planes ``(N, H, W)``.
        scale: ``(N, 1, 1)`` factors mapping the planes onto the 0-255 scale.
        sigma_nsq: Visual noise variance.
        scratch: Work buffers.

    Returns:
        ``(N,)`` float64 ratio of summed information over the four scales.
    """
    n_planes, h, w = ref.shape
    size = n_planes * h * w
    maps = scratch.take("maps", 5 * size)
    # VIFp ignores a constant added to both images; centring keeps float32 accurate.
    centre = ref[:, ::4, ::4].mean(dim=(1, 2), keepdim=True, dtype=maps.dtype)
    torch.sub(ref, centre, out=maps[:size].view(ref.shape)).mul_(scale)
    torch.sub(dist, centre, out=maps[size : 2 * size].view(ref.shape)).mul_(scale)
    num = torch.zeros(n_planes, dtype=torch.float64, device=ref.device)
    den = torch.zeros_like(num)
    for level, win in enumerate(_WINDOWS):
        if level > 0:
            # Filter both images with this scale's window and keep every other pixel.
            smooth = filter_flat(maps[: 2 * size], w, win, scratch)
            h2, w2 = (h - len(win)) // 2 + 1, (w - len(win)) // 2 + 1
            size2 = n_planes * h2 * w2
            for k in range(2):  # smooth lives in scratch, not in maps
                part = smooth[k * size : (k + 1) * size - (len(win) - 1) * (w + 1)]
                maps[k * size2 : (k + 1) * size2].view(n_planes, h2, w2).copy_(
                    valid_view(part, h, w, len(win), stride=2)
                )
            h, w, size = h2, w2, size2
        n, d = _scale_terms(maps, n_planes, h, w, win, sigma_nsq, scratch)
        num += n
        den += d
    return num / den
