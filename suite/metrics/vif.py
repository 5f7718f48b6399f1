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

from suite.metrics._common import DataRange, check_number, check_pair, data_range_per_sample, float_dtype
from suite.metrics._filters import Scratch, filter_flat, gaussian_kernel_1d, plane_chunks, valid_view

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
    scratch: Scratch, n_planes: int, h: int, w: int, win: List[float], sigma_nsq: float
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Numerator and denominator sums of one scale.

    The reference's special cases reduce to: a reference variance below EPS
    is zero (the pixel then adds nothing to either sum); the gain ``g`` is zero
    where it is negative or the distorted variance is below EPS; the noise
    variance ``s_v = s_dist - g s_cross`` is at least EPS.

    Args:
        scratch: Work buffers; buffer ``"maps"`` holds the reference planes and
            then the distorted planes (``N h w`` elements each) and has room
            for three more such blocks.
        n_planes: ``N``.
        h: Plane height at this scale.
        w: Plane width at this scale.
        win: 1-D Gaussian taps of this scale.
        sigma_nsq: Visual noise variance.

    Returns:
        ``(num, den)``, each ``(N,)`` float64: the plane sums of
        ``ln(1 + g^2 s_ref / (s_v + sigma_nsq))`` and ``ln(1 + s_ref / sigma_nsq)``.
    """
    size = n_planes * h * w
    ref, dist = scratch.part("maps", 0, size), scratch.part("maps", size, size)
    torch.mul(ref, ref, out=scratch.part("maps", 2 * size, size))
    torch.mul(dist, dist, out=scratch.part("maps", 3 * size, size))
    torch.mul(ref, dist, out=scratch.part("maps", 4 * size, size))
    name, _ = filter_flat(scratch, "maps", 5 * size, w, win)
    length = size - (len(win) - 1) * (w + 1)  # responses per map
    mu1, mu2, s1, s2, s12 = (scratch.part(name, k * size, length) for k in range(5))
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
    values are averaged, as ``sewar.full_ref.vifp`` does over channels. Not
    differentiable: the inputs are detached.

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
    sigma_nsq = check_number("sigma_nsq", sigma_nsq, positive=True)
    b, c, h, w = p.shape
    _check_size(h, w, tuple(pred.shape))
    dtype = float_dtype(p, t)
    p, t = p.detach().to(dtype), t.detach().to(dtype)  # not differentiable; no copy for float input
    scale = (255.0 / data_range_per_sample(t, data_range)).to(dtype).repeat_interleave(c).view(-1, 1, 1)
    ref_planes, dist_planes = t.reshape(b * c, h, w), p.reshape(b * c, h, w)
    # VIFp ignores a constant added to both images; centring keeps float32 accurate.
    centres = ref_planes[:, ::4, ::4].mean(dim=(1, 2), keepdim=True)
    scratch = Scratch(dtype, p.device)
    per_plane = torch.empty(b * c, dtype=torch.float64, device=p.device)
    for chunk in plane_chunks(b * c, h, w):
        per_plane[chunk] = _vif_planes(
            ref_planes[chunk], dist_planes[chunk], centres[chunk], scale[chunk], sigma_nsq, scratch
        )
    return per_plane.view(b, c).mean(dim=1)


def _vif_planes(
    ref: torch.Tensor,
    dist: torch.Tensor,
    centre: torch.Tensor,
    scale: torch.Tensor,
    sigma_nsq: float,
    scratch: Scratch,
) -> torch.Tensor:
    """VIFp of each plane.

    Args:
        ref: Reference planes ``(N, H, W)``.
        dist: Distorted planes ``(N, H, W)``.
        centre: ``(N, 1, 1)`` values near the reference planes' means.
        scale: ``(N, 1, 1)`` factors mapping the planes onto the 0-255 scale.
        sigma_nsq: Visual noise variance.
        scratch: Work buffers.

    Returns:
        ``(N,)`` float64 ratio of summed information over the four scales.
    """
    n_planes, h, w = ref.shape
    size = n_planes * h * w
    scratch.take("maps", 5 * size)
    torch.sub(ref, centre, out=scratch.part("maps", 0, size, ref.shape)).mul_(scale)
    torch.sub(dist, centre, out=scratch.part("maps", size, size, ref.shape)).mul_(scale)
    num = torch.zeros(n_planes, dtype=torch.float64, device=ref.device)
    den = torch.zeros_like(num)
    for level, win in enumerate(_WINDOWS):
        if level > 0:
            # Filter both images with this scale's window, keep every other pixel.
            name, _ = filter_flat(scratch, "maps", 2 * size, w, win)
            h2, w2 = (h - len(win)) // 2 + 1, (w - len(win)) // 2 + 1
            size2 = n_planes * h2 * w2
            for k in range(2):  # the filtered images live in `name`, not in "maps"
                smooth = scratch.part(name, k * size, size - (len(win) - 1) * (w + 1))
                scratch.part("maps", k * size2, size2, (n_planes, h2, w2)).copy_(
                    valid_view(smooth, h, w, len(win), stride=2)
                )
            h, w, size = h2, w2, size2
        n, d = _scale_terms(scratch, n_planes, h, w, win, sigma_nsq)
        num += n
        den += d
    return num / den
