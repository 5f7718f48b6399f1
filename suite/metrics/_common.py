"""Shared input checks and filters for :mod:`suite.metrics`.

Complex convention: every metric takes real-valued tensors only. Complex MRI
images must be reduced to a real image first (e.g. ``fastmri.complex_abs`` or
``torch.abs``); a complex tensor raises ``TypeError``.

Shapes: a metric input is ``(B, H, W)`` or ``(B, C, H, W)``. Internally it is
viewed as ``(B, C, H, W)`` with ``C = 1`` for 3-D input; each of the ``B``
samples yields one value.
"""

from __future__ import annotations

import math
import numbers
from typing import Dict, Iterator, Sequence, Union

import torch

DataRange = Union[None, float, int, torch.Tensor]

# Pixels per chunk of planes processed together by SSIM and VIF: the moment
# maps of a chunk stay in the CPU cache, which makes the filters several times
# faster than sweeping whole batches through memory.
CHUNK_PIXELS = 1 << 18


def check_image(x: torch.Tensor, name: str = "x") -> torch.Tensor:
    """Check one metric input and view it as ``(B, C, H, W)``.

    Args:
        x: Real-valued tensor of shape ``(B, H, W)`` or ``(B, C, H, W)``.
        name: Argument name used in error messages.

    Returns:
        ``x`` viewed as ``(B, C, H, W)`` (a view, no copy).

    Raises:
        TypeError: If ``x`` is not a tensor, or is complex or boolean.
        ValueError: If ``x`` is not 3-D or 4-D, or has an empty dimension.
    """
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if x.is_complex() or x.dtype == torch.bool:
        raise TypeError(
            f"{name} must be a real-valued tensor, got dtype {x.dtype}; "
            "take the magnitude of complex images first (e.g. fastmri.complex_abs)"
        )
    if x.ndim not in (3, 4):
        raise ValueError(
            f"{name} must have shape (B, H, W) or (B, C, H, W), got shape {tuple(x.shape)}"
        )
    if x.numel() == 0:
        raise ValueError(f"{name} must not be empty, got shape {tuple(x.shape)}")
    return x.unsqueeze(1) if x.ndim == 3 else x


def check_pair(pred: torch.Tensor, target: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Check a ``(pred, target)`` pair and view both as ``(B, C, H, W)``.

    Args:
        pred: Prediction, ``(B, H, W)`` or ``(B, C, H, W)``.
        target: Ground truth of the same shape as ``pred``.

    Returns:
        ``(pred, target)``, both viewed as ``(B, C, H, W)``.

    Raises:
        TypeError: See :func:`check_image`.
        ValueError: If the shapes differ, besides :func:`check_image`'s cases.
    """
    p = check_image(pred, "pred")
    t = check_image(target, "target")
    if pred.shape != target.shape:
        raise ValueError(
            f"pred and target must have the same shape, got {tuple(pred.shape)} "
            f"and {tuple(target.shape)}"
        )
    if pred.device != target.device:
        raise ValueError(f"pred and target must be on one device, got {pred.device} and {target.device}")
    return p, t


def float_dtype(*xs: torch.Tensor) -> torch.dtype:
    """Working dtype: float64 if any input is float64, else float32.

    Args:
        xs: Input tensors of any real dtype.

    Returns:
        ``torch.float64`` or ``torch.float32``.
    """
    return torch.float64 if any(x.dtype == torch.float64 for x in xs) else torch.float32


def data_range_per_sample(target: torch.Tensor, data_range: DataRange) -> torch.Tensor:
    """Resolve the ``data_range`` argument to one positive value per sample.

    Args:
        target: Ground truth, ``(B, C, H, W)``.
        data_range: ``None`` for the per-sample range ``max - min`` of
            ``target`` (over ``C x H x W``); a positive number for all samples;
            or a tensor of shape ``()`` or ``(B,)`` of positive values.

    Returns:
        ``(B,)`` float64 tensor on ``target``'s device.

    Raises:
        TypeError: If ``data_range`` has another type.
        ValueError: If a given ``data_range`` has the wrong shape or is not
            positive and finite.
    """
    b = target.shape[0]
    if data_range is None:
        flat = target.reshape(b, -1)
        return (flat.amax(dim=1) - flat.amin(dim=1)).to(torch.float64)
    if isinstance(data_range, bool) or not isinstance(data_range, (numbers.Real, torch.Tensor)):
        raise TypeError(
            "data_range must be None, a positive number or a (B,) tensor, "
            f"got {type(data_range).__name__}"
        )
    r = torch.as_tensor(data_range, dtype=torch.float64, device=target.device)
    if r.ndim == 0:
        r = r.expand(b)
    if r.shape != (b,):
        raise ValueError(
            f"data_range must be a scalar or have shape ({b},), got shape {tuple(r.shape)}"
        )
    if not bool(torch.all(torch.isfinite(r) & (r > 0))):
        raise ValueError(f"data_range must be positive and finite, got {r.tolist()}")
    return r


def plane_chunks(n_planes: int, h: int, w: int) -> Iterator[slice]:
    """Split ``n_planes`` planes of ``h x w`` pixels into cache-sized slices.

    Args:
        n_planes: Number of ``(H, W)`` planes.
        h: Plane height.
        w: Plane width.

    Yields:
        Consecutive slices covering ``range(n_planes)``, each at least one
        plane and at most about :data:`CHUNK_PIXELS` pixels.
    """
    step = max(1, CHUNK_PIXELS // (h * w))
    for start in range(0, n_planes, step):
        yield slice(start, min(start + step, n_planes))


def gaussian_kernel_1d(size: int, sigma: float) -> list[float]:
    """Normalised 1-D Gaussian taps, centred, as MATLAB's ``fspecial``.

    The 2-D kernel ``fspecial('gaussian', size, sigma)`` is the outer product of
    these taps with themselves (no tap falls under MATLAB's ``eps`` cut-off for
    the sizes used here).

    Args:
        size: Odd number of taps.
        sigma: Standard deviation in pixels.

    Returns:
        ``size`` Python floats summing to one.
    """
    half = (size - 1) / 2
    taps = [math.exp(-((i - half) ** 2) / (2.0 * sigma**2)) for i in range(size)]
    total = math.fsum(taps)
    return [t / total for t in taps]


class Scratch:
    """Flat work buffers reused across the chunks of one metric call.

    Filtering a chunk needs a few large temporaries; allocating them afresh for
    every chunk costs page faults, so they are taken from named buffers that
    grow to the largest size requested and are then reused. A tensor returned
    by :meth:`take` is overwritten by the next request for the same name.
    """

    def __init__(self, dtype: torch.dtype, device: torch.device) -> None:
        self.dtype = dtype
        self.device = device
        self._buffers: Dict[str, torch.Tensor] = {}

    def take(self, name: str, numel: int) -> torch.Tensor:
        """A 1-D buffer of ``numel`` elements (uninitialised) for ``name``."""
        buf = self._buffers.get(name)
        if buf is None or buf.numel() < numel:
            buf = torch.empty(numel, dtype=self.dtype, device=self.device)
            self._buffers[name] = buf
        return buf[:numel]


def _shift_sum(flat: torch.Tensor, taps: Sequence[float], step: int, out: torch.Tensor) -> torch.Tensor:
    """``out[j] = sum_i taps[i] * flat[j + i * step]`` on 1-D tensors.

    Args:
        flat: Contiguous 1-D tensor of length ``L``.
        taps: Filter taps.
        step: Spacing of the taps in ``flat``.
        out: 1-D buffer of length ``L - (len(taps) - 1) * step``.

    Returns:
        ``out``.
    """
    length = out.numel()
    torch.mul(flat[:length], taps[0], out=out)
    for i in range(1, len(taps)):
        out.add_(flat[i * step : i * step + length], alpha=taps[i])
    return out


def filter_flat(flat: torch.Tensor, w: int, taps: Sequence[float], scratch: Scratch) -> torch.Tensor:
    """Separable 2-D correlation of stacked ``(H, W)`` planes, flattened.

    The planes are seen as one contiguous 1-D array; the same ``taps`` are
    applied along H (a shift by ``w`` moves one row) and then along W (a shift
    by 1 moves one column), as sums of shifted slices: every operation runs over
    one contiguous array, several times faster on a CPU than ``conv2d`` with one
    channel. Entry ``j`` of the result is the filter response whose window
    starts at flat position ``j``; entries whose window crosses a row or plane
    boundary are meaningless (but finite) and :func:`valid_view` skips them.

    Args:
        flat: Contiguous 1-D tensor, planes of width ``w`` one after the other.
        w: Plane width.
        taps: 1-D filter taps (symmetric filters make correlation and
            convolution coincide).
        scratch: Work buffers (names ``"rows"`` and ``"cols"``).

    Returns:
        1-D tensor of length ``flat.numel() - (len(taps) - 1) * (w + 1)`` in
        ``scratch``.
    """
    n = len(taps)
    rows = _shift_sum(flat, taps, w, scratch.take("rows", flat.numel() - (n - 1) * w))
    return _shift_sum(rows, taps, 1, scratch.take("cols", rows.numel() - (n - 1)))


def _box_sum(flat: torch.Tensor, n: int, step: int, scratch: Scratch, tag: str) -> torch.Tensor:
    """``out[j] = sum_{i < n} flat[j + i * step]`` by doubling.

    Sums of 2, 4, 8, ... consecutive taps are built from each other and the
    binary digits of ``n`` pick which to add: ``n = 7`` takes 4 additions
    instead of 6.

    Args:
        flat: Contiguous 1-D tensor of length ``L``.
        n: Number of taps, ``>= 2``.
        step: Spacing of the taps in ``flat``.
        scratch: Work buffers; the result lives in one of them.
        tag: Prefix of the buffer names used.

    Returns:
        1-D tensor of length ``L - (n - 1) * step``.
    """
    length = flat.numel() - (n - 1) * step
    blocks, size = [flat], 1
    while 2 * size <= n:
        prev = blocks[-1]
        m = prev.numel() - size * step
        nxt = scratch.take(f"{tag}{2 * size}", m)
        blocks.append(torch.add(prev[:m], prev[size * step : size * step + m], out=nxt))
        size *= 2
    out, offset = blocks[-1][:length], size
    for k in range(len(blocks) - 2, -1, -1):
        if n >> k & 1:
            out.add_(blocks[k][offset * step : offset * step + length])
            offset += 1 << k
    return out


def box_sum_flat(flat: torch.Tensor, w: int, n: int, scratch: Scratch) -> torch.Tensor:
    """Sums over ``n x n`` windows of stacked planes, flattened.

    Same layout as :func:`filter_flat` with ``n`` unit taps, summed by
    doubling along each axis.

    Args:
        flat: Contiguous 1-D tensor, planes of width ``w`` one after the other.
        w: Plane width.
        n: Window side, ``>= 2``.
        scratch: Work buffers (names starting ``"box"``).

    Returns:
        1-D tensor of length ``flat.numel() - (n - 1) * (w + 1)`` in ``scratch``.
    """
    return _box_sum(_box_sum(flat, n, w, scratch, "box_rows"), n, 1, scratch, "box_cols")


def valid_view(flat: torch.Tensor, h: int, w: int, n: int, stride: int = 1) -> torch.Tensor:
    """The 'valid' outputs of :func:`filter_flat` or :func:`box_sum_flat`.

    Args:
        flat: Filter output for ``P`` planes of ``h x w`` pixels (or a slice of
            it starting at the first plane of interest).
        h: Plane height.
        w: Plane width.
        n: Filter length.
        stride: Subsampling step along both axes.

    Returns:
        Strided view ``(P, Ho, Wo)`` with ``Ho = (h - n) // stride + 1`` (and
        ``Wo`` likewise), rows contiguous.
    """
    h_out, w_out = (h - n) // stride + 1, (w - n) // stride + 1
    planes = (flat.numel() + (n - 1) * (w + 1)) // (h * w)
    return flat.as_strided((planes, h_out, w_out), (h * w, stride * w, stride))
