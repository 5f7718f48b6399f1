"""Spectral statistics: high-frequency energy and radial power spectra.

Complex convention: inputs are real-valued images; complex tensors raise
``TypeError``. Spectra are ``torch.fft.fft2`` over the last two axes. A
frequency's radius is its distance from DC in frequency-index units, with
signed indices ``k`` in ``[-N//2, (N - 1)//2]`` along an axis of length ``N``
(the positions of the ``fftshift``-centred spectrum relative to its centre
``(H//2, W//2)``); the Nyquist radius is ``min(H, W) / 2``.
"""

from __future__ import annotations

from typing import Optional

import torch

from suite.metrics._common import check_image, check_number, float_dtype

__all__ = ["hfe", "radial_power_spectrum", "radial_frequencies"]

_HFE_MODES = ("power", "magnitude")


def _radius(h: int, w: int, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """Distance of every FFT bin from DC, in frequency-index units.

    Args:
        h: Image height.
        w: Image width.
        device: Output device.
        dtype: Output floating dtype.

    Returns:
        ``(H, W)`` radii in unshifted FFT order.
    """
    ky = torch.fft.fftfreq(h, d=1.0 / h, device=device, dtype=dtype)
    kx = torch.fft.fftfreq(w, d=1.0 / w, device=device, dtype=dtype)
    return torch.sqrt(ky[:, None].square() + kx[None, :].square())


def hfe(
    pred: torch.Tensor,
    target: Optional[torch.Tensor] = None,
    cutoff: float = 0.25,
    mode: str = "power",
) -> torch.Tensor:
    """High-frequency energy (HFE) of ``pred``, in %.

    The share of the spectrum lying outside the low-frequency disk of radius
    ``cutoff * min(H, W) / 2`` around DC (frequencies with radius strictly
    greater than that count as high), pooled over the ``C`` planes of a
    sample::

        HFE = 100 * sum_{r > r0} E(k) / sum_k E(k),   r0 = cutoff * min(H, W) / 2

    with ``E = |FFT(pred)|^2`` for ``mode="power"`` and ``E = |FFT(pred)|`` for
    ``mode="magnitude"``. A constant image has HFE 0 (all energy at DC); a
    zero-mean checkerboard has HFE 100 (all energy at the corner frequency). An
    all-zero sample has no energy and is given HFE 0.

    Args:
        pred: Real tensor ``(B, H, W)`` or ``(B, C, H, W)``.
        target: Ignored; accepted so that every metric has the signature
            ``f(pred, target, ...)``. HFE describes ``pred`` alone.
        cutoff: Disk radius as a fraction of the Nyquist radius, ``>= 0``.
        mode: ``"power"`` or ``"magnitude"``.

    Returns:
        ``(B,)`` float64 percentage in ``[0, 100]``.

    Raises:
        ValueError: On a wrong shape, a negative ``cutoff`` or an unknown
            ``mode``.
    """
    x = check_image(pred, "pred")
    if mode not in _HFE_MODES:
        raise ValueError(f"mode must be one of {_HFE_MODES}, got {mode!r}")
    cutoff = check_number("cutoff", cutoff)
    b, c, h, w = x.shape
    dtype = float_dtype(x)
    spec = torch.fft.fft2(x.to(dtype)).abs()
    energy = spec.square() if mode == "power" else spec
    high = _radius(h, w, x.device, dtype) > cutoff * min(h, w) / 2.0
    total = energy.sum(dim=(1, 2, 3), dtype=torch.float64)
    outside = (energy * high).sum(dim=(1, 2, 3), dtype=torch.float64)
    return torch.where(total > 0, 100.0 * outside / total, torch.zeros_like(total))


def _check_bins(h: int, w: int, n_bins: Optional[int]) -> int:
    """Resolve ``n_bins`` (default ``min(H, W) // 2``) and check its range.

    Args:
        h: Image height.
        w: Image width.
        n_bins: Requested number of radial bins or ``None``.

    Returns:
        The number of bins.
    """
    most = min(h, w) // 2
    if n_bins is None:
        n_bins = most
    if isinstance(n_bins, bool) or not isinstance(n_bins, int) or not 1 <= n_bins <= max(most, 0):
        raise ValueError(
            f"n_bins must be an integer in [1, min(H, W) // 2 = {most}] for images of "
            f"{h} x {w} pixels, got {n_bins!r}"
        )
    return n_bins


def radial_power_spectrum(x: torch.Tensor, n_bins: Optional[int] = None) -> torch.Tensor:
    """Radially averaged power spectrum.

    The power ``|FFT(x)|^2`` uses the orthonormal FFT (``norm="ortho"``), so the
    power summed over all frequencies equals ``sum(x**2)``. Radii in
    ``[0, min(H, W) / 2)`` are split into ``n_bins`` rings of equal width; bin
    ``k`` is the mean power over the frequencies of ring ``k`` in all ``C``
    planes. The corner frequencies beyond the Nyquist radius are left out. Every
    ring holds at least one frequency because its width is at least 1. See
    :func:`radial_frequencies` for the bins' centres.

    Args:
        x: Real tensor ``(B, H, W)`` or ``(B, C, H, W)``.
        n_bins: Number of rings, in ``[1, min(H, W) // 2]``; default
            ``min(H, W) // 2`` (rings one frequency index wide).

    Returns:
        ``(B, n_bins)`` float64 mean power per ring, DC ring first.

    Raises:
        ValueError: On a wrong shape or ``n_bins`` out of range.
    """
    x4 = check_image(x, "x")
    b, c, h, w = x4.shape
    n_bins = _check_bins(h, w, n_bins)
    power = torch.fft.fft2(x4.to(torch.float64), norm="ortho").abs().square()
    r_max = min(h, w) / 2.0
    ring = torch.floor(_radius(h, w, x4.device, torch.float64) * (n_bins / r_max)).long()
    ring = ring.clamp_(max=n_bins).reshape(-1)  # index n_bins collects the corners
    sums = torch.zeros(b, n_bins + 1, dtype=torch.float64, device=x4.device)
    sums.index_add_(1, ring, power.sum(dim=1).reshape(b, -1))
    counts = torch.bincount(ring, minlength=n_bins + 1).to(torch.float64) * c
    return sums[:, :n_bins] / counts[:n_bins]


def radial_frequencies(h: int, w: int, n_bins: Optional[int] = None) -> torch.Tensor:
    """Centres of :func:`radial_power_spectrum`'s rings in cycles per pixel.

    Ring ``k`` spans radii ``[k, k + 1) * r_max / n_bins`` with
    ``r_max = min(H, W) / 2``; its centre, divided by ``min(H, W)``, is in
    cycles per pixel (0.5 at the Nyquist radius).

    Args:
        h: Image height.
        w: Image width.
        n_bins: As in :func:`radial_power_spectrum`.

    Returns:
        ``(n_bins,)`` float64 frequencies in ``(0, 0.5)``.
    """
    n_bins = _check_bins(h, w, n_bins)
    return (torch.arange(n_bins, dtype=torch.float64) + 0.5) * (0.5 / n_bins)
