"""Shared input checks for :mod:`suite.metrics`.

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
from typing import Union

import torch

DataRange = Union[None, float, int, torch.Tensor]

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


def check_number(name: str, value: object, *, positive: bool = False) -> float:
    """Check a real-number option: finite and ``>= 0`` (or ``> 0``).

    Args:
        name: Option name used in the message.
        value: The value received.
        positive: Require ``> 0`` instead of ``>= 0``.

    Returns:
        ``value`` as a Python float.

    Raises:
        ValueError: If ``value`` is not such a number.
    """
    bound = "> 0" if positive else ">= 0"
    ok = isinstance(value, numbers.Real) and not isinstance(value, bool) and math.isfinite(value)
    if not ok or not (value > 0 if positive else value >= 0):
        raise ValueError(f"{name} must be a finite number {bound}, got {value!r}")
    return float(value)


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
