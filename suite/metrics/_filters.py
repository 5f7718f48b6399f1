"""Separable 'valid' window filters for SSIM and VIF, tuned for CPUs.

Complex convention: real floating tensors only (the callers convert).

Layout: the ``N`` planes ``(N, H, W)`` of a chunk, and several such stacks of
moment maps, are one contiguous 1-D buffer. A filter pass along H is a sum of
copies shifted by whole rows (``W`` elements), a pass along W a sum of copies
shifted by single elements, so every torch operation runs over one long
contiguous array; responses whose window crosses a row or plane boundary are
computed too but never read (:func:`valid_view` skips them). This is several
times faster on a CPU than ``conv2d`` with one channel, which is what the
metrics spend their time on.

Buffers come from a :class:`Scratch` by name, and so do the shifted views of
them, because both the allocations (page faults) and the slicing (a few
microseconds per view) would otherwise cost as much as the arithmetic for
chunks of one plane.
"""

from __future__ import annotations

import math
from typing import Dict, Iterator, List, Optional, Sequence, Tuple

import torch

# Pixels per chunk of planes processed together: the moment maps of one
# chunk stay in the CPU cache. One 320 x 320 plane (fastMRI) is one chunk.
CHUNK_PIXELS = 1 << 17


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


def gaussian_kernel_1d(size: int, sigma: float) -> List[float]:
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
    """Named flat work buffers, and views of them, for one metric call.

    A buffer is allocated on first use and grows when a longer one is asked
    for; views are cached by ``(name, start, length, shape)``. A buffer's full
    extent must be requested (:meth:`take`) before views inside it
    (:meth:`part`), so that growing never strands a view in use.
    """

    def __init__(self, dtype: torch.dtype, device: torch.device) -> None:
        self.dtype = dtype
        self.device = device
        self._buffers: Dict[str, torch.Tensor] = {}
        self._views: Dict[Tuple[str, int, int, Optional[Tuple[int, ...]]], torch.Tensor] = {}

    def take(self, name: str, length: int, shape: Optional[Tuple[int, ...]] = None) -> torch.Tensor:
        """The first ``length`` elements of buffer ``name`` (uninitialised).

        Args:
            name: Buffer name.
            length: Number of elements.
            shape: Optional shape to view them as.

        Returns:
            1-D tensor of ``length`` elements, or a view of ``shape``.
        """
        buf = self._buffers.get(name)
        if buf is None or buf.numel() < length:
            self._buffers[name] = torch.empty(length, dtype=self.dtype, device=self.device)
            self._views = {k: v for k, v in self._views.items() if k[0] != name}
        return self.part(name, 0, length, shape)

    def part(
        self, name: str, start: int, length: int, shape: Optional[Tuple[int, ...]] = None
    ) -> torch.Tensor:
        """Elements ``[start, start + length)`` of buffer ``name``.

        Args:
            name: Name of a buffer already taken at least this long.
            start: First element.
            length: Number of elements.
            shape: Optional shape to view them as.

        Returns:
            A cached view into the buffer.
        """
        key = (name, start, length, shape)
        view = self._views.get(key)
        if view is None:
            buf = self._buffers[name]
            if start + length > buf.numel():
                raise RuntimeError(
                    f"scratch view [{start}, {start + length}) lies beyond buffer {name!r} "
                    f"of {buf.numel()} elements"
                )
            view = buf[start : start + length]
            if shape is not None:
                view = view.view(shape)
            self._views[key] = view
        return view


def _shift_sum(
    scratch: Scratch, src: str, src_len: int, taps: Sequence[float], step: int, dst: str
) -> int:
    """``dst[j] = sum_i taps[i] * src[j + i * step]`` for ``j < src_len - (len(taps) - 1) * step``.

    Args:
        scratch: Holds both buffers.
        src: Source buffer name (``src_len`` elements used).
        src_len: Source length.
        taps: Filter taps.
        step: Spacing of the taps.
        dst: Destination buffer name.

    Returns:
        The destination length.
    """
    length = src_len - (len(taps) - 1) * step
    out = scratch.take(dst, length)
    torch.mul(scratch.part(src, 0, length), taps[0], out=out)
    for i in range(1, len(taps)):
        out.add_(scratch.part(src, i * step, length), alpha=taps[i])
    return length


def filter_flat(scratch: Scratch, src: str, src_len: int, w: int, taps: Sequence[float]) -> Tuple[str, int]:
    """Separable 2-D correlation of stacked planes of width ``w`` (see module doc).

    Args:
        scratch: Work buffers; uses ``"rows"`` and ``"cols"``.
        src: Buffer holding the planes, one after the other.
        src_len: Number of elements used in ``src``.
        w: Plane width.
        taps: 1-D taps applied along H, then along W (symmetric taps make
            correlation and convolution coincide).

    Returns:
        ``(name, length)`` of the result: entry ``j`` is the response of the
        window whose first element is ``src[j]``;
        ``length = src_len - (len(taps) - 1) * (w + 1)``.
    """
    rows = _shift_sum(scratch, src, src_len, taps, w, "rows")
    return "cols", _shift_sum(scratch, "rows", rows, taps, 1, "cols")


def _box_sum(scratch: Scratch, src: str, src_len: int, n: int, step: int, tag: str) -> Tuple[str, int]:
    """``out[j] = sum_{i < n} src[j + i * step]`` by doubling.

    Sums of 2, 4, 8, ... consecutive taps are built from each other and the
    binary digits of ``n`` pick which to add: ``n = 7`` takes 4 additions
    instead of 6.

    Args:
        scratch: Holds the buffers; uses names ``tag + "2"``, ``tag + "4"``, ...
        src: Source buffer name.
        src_len: Number of elements used in ``src``.
        n: Number of taps, ``>= 2``.
        step: Spacing of the taps.
        tag: Prefix of the buffer names used.

    Returns:
        ``(name, length)`` of the result, ``length = src_len - (n - 1) * step``.
    """
    length = src_len - (n - 1) * step
    blocks, size = [(src, src_len)], 1
    while 2 * size <= n:
        prev, prev_len = blocks[-1]
        m, name = prev_len - size * step, f"{tag}{2 * size}"
        torch.add(scratch.part(prev, 0, m), scratch.part(prev, size * step, m), out=scratch.take(name, m))
        blocks.append((name, m))
        size *= 2
    out_name = blocks[-1][0]
    out, offset = scratch.part(out_name, 0, length), size
    for k in range(len(blocks) - 2, -1, -1):
        if n >> k & 1:
            out.add_(scratch.part(blocks[k][0], offset * step, length))
            offset += 1 << k
    return out_name, length


def box_sum_flat(scratch: Scratch, src: str, src_len: int, w: int, n: int) -> Tuple[str, int]:
    """Sums over ``n x n`` windows of stacked planes of width ``w``.

    Same layout as :func:`filter_flat` with ``n`` unit taps, summed by doubling
    along each axis.

    Args:
        scratch: Work buffers; uses names starting ``"box"``.
        src: Buffer holding the planes, one after the other.
        src_len: Number of elements used in ``src``.
        w: Plane width.
        n: Window side, ``>= 2``.

    Returns:
        ``(name, length)`` of the result, ``length = src_len - (n - 1) * (w + 1)``.
    """
    rows, rows_len = _box_sum(scratch, src, src_len, n, w, "box_rows")
    return _box_sum(scratch, rows, rows_len, n, 1, "box_cols")


def valid_view(flat: torch.Tensor, h: int, w: int, n: int, stride: int = 1) -> torch.Tensor:
    """The 'valid' responses of :func:`filter_flat` or :func:`box_sum_flat`.

    Args:
        flat: The responses for ``P`` planes of ``h x w`` pixels, starting at the
            first plane of interest: ``P h w - (n - 1) (w + 1)`` elements.
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
