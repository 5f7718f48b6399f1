"""Training losses for image reconstruction: MSE, L1, SSIM and the perpendicular (⊥) loss.

Complex convention: complex images are real ``(B, 2, H, W)`` tensors with the
real part in channel 0 and the imaginary part in channel 1 (as the DE-Prox
models return them). Magnitude images are ``(B, H, W)`` or ``(B, 1, H, W)``.

Every loss has the signature ``loss(pred, target) -> scalar`` (mean over the
batch) and is registered in :data:`LOSSES` (``get_loss(name)``); the SSIM
*metric* with per-image results lives in :func:`ssim` here only for the loss
(the evaluation metrics are :mod:`suite.metrics`).
"""

from __future__ import annotations

from typing import Callable, Optional

import torch
import torch.nn.functional as F

from suite.registry import Registry

__all__ = [
    "LOSSES",
    "get_loss",
    "mse_loss",
    "l1_loss",
    "ssim",
    "ssim_loss",
    "perp_loss",
    "magnitude",
]

LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
LOSSES: Registry[LossFn] = Registry("loss")


def magnitude(x: torch.Tensor) -> torch.Tensor:
    """Magnitude image ``(B, H, W)`` of a complex ``(B, 2, H, W)`` or magnitude input.

    ``(B, H, W)`` and ``(B, 1, H, W)`` inputs are returned as ``(B, H, W)``. The
    gradient at zero magnitude is 0 (``vector_norm``), not NaN.
    """
    if x.ndim == 4 and x.shape[1] == 2:
        return torch.linalg.vector_norm(x, dim=1)
    if x.ndim == 4 and x.shape[1] == 1:
        return x[:, 0]
    if x.ndim == 3:
        return x
    raise ValueError(f"expected (B, 2, H, W) complex or (B, [1,] H, W) magnitude, got shape {tuple(x.shape)}")


def _check_same_shape(pred: torch.Tensor, target: torch.Tensor) -> None:
    if pred.shape != target.shape:
        raise ValueError(f"pred and target shapes differ: {tuple(pred.shape)} vs {tuple(target.shape)}")


@LOSSES.register("mse")
def mse_loss(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Mean squared error over all entries (for complex inputs: real and imaginary parts)."""
    _check_same_shape(pred, target)
    return F.mse_loss(pred, target)


@LOSSES.register("l1")
def l1_loss(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Mean absolute error over all entries."""
    _check_same_shape(pred, target)
    return F.l1_loss(pred, target)


def ssim(
    pred: torch.Tensor,
    target: torch.Tensor,
    data_range: Optional[torch.Tensor] = None,
    win_size: int = 7,
    k1: float = 0.01,
    k2: float = 0.03,
) -> torch.Tensor:
    """Differentiable mean SSIM per image, uniform window (fastMRI / scikit-image settings).

    Uses a ``win_size`` x ``win_size`` uniform window over the valid region and the
    sample covariance, matching ``skimage.metrics.structural_similarity(...,
    win_size=7, gaussian_weights=False, use_sample_covariance=True)`` and
    ``fastmri.SSIMLoss``.

    Args:
        pred: ``(B, 2, H, W)`` complex (its magnitude is used) or magnitude ``(B, [1,] H, W)``.
        target: Same kind as ``pred``.
        data_range: ``(B,)`` dynamic range per image; default ``target.max - target.min``
            per image (of the magnitude).
        win_size: Odd window size ``<= min(H, W)``.
        k1, k2: SSIM constants.

    Returns:
        ``(B,)`` mean SSIM of each image.
    """
    x, y = magnitude(pred), magnitude(target)
    _check_same_shape(x, y)
    if win_size % 2 == 0 or win_size > min(x.shape[-2:]):
        raise ValueError(f"win_size must be odd and <= min(H, W) = {min(x.shape[-2:])}, got {win_size}")
    if data_range is None:
        flat = y.detach().flatten(1)
        data_range = flat.amax(1) - flat.amin(1)
    data_range = torch.as_tensor(data_range, dtype=x.dtype, device=x.device).reshape(-1, 1, 1, 1)
    x, y = x.unsqueeze(1), y.unsqueeze(1)
    window = torch.ones(1, 1, win_size, win_size, dtype=x.dtype, device=x.device) / win_size**2
    n = win_size**2
    cov_norm = n / (n - 1)
    ux, uy = F.conv2d(x, window), F.conv2d(y, window)
    uxx, uyy, uxy = F.conv2d(x * x, window), F.conv2d(y * y, window), F.conv2d(x * y, window)
    vx, vy, vxy = cov_norm * (uxx - ux * ux), cov_norm * (uyy - uy * uy), cov_norm * (uxy - ux * uy)
    c1, c2 = (k1 * data_range) ** 2, (k2 * data_range) ** 2
    s = ((2 * ux * uy + c1) * (2 * vxy + c2)) / ((ux**2 + uy**2 + c1) * (vx + vy + c2))
    return s.flatten(1).mean(1)


@LOSSES.register("ssim")
def ssim_loss(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """``1 - SSIM`` on magnitudes, averaged over the batch (see :func:`ssim`)."""
    return 1.0 - ssim(pred, target).mean()


def perp_loss(
    pred: torch.Tensor,
    target: torch.Tensor,
    magnitude_term: str = "l2",
    eps: float = 1e-8,
) -> torch.Tensor:
    """Perpendicular loss (⊥-loss) of Terpstra et al. 2022 for complex images.

    Per pixel, with ``X = pred``, ``Y = target`` and ``theta`` the angle between
    them in the complex plane,

        P(X, Y) = |Re(X) Im(Y) - Im(X) Re(Y)| / |X| = |Y| |sin theta|,

    the distance from ``Y`` to the line spanned by ``X`` -- the error component
    perpendicular to the prediction, zero for a pure magnitude error. For
    ``|theta| > 90 deg`` it is replaced by ``2 |Y| - P`` so the term keeps growing
    with the phase error up to ``2 |Y|`` at 180 deg (as in the authors' reference
    code). The loss is ``mean(P) + magnitude loss``, where the magnitude loss
    (``"l2"``: mean squared, the paper's ⊥+ℓ2; ``"l1"``; ``"none"``) compares
    ``|X|`` with ``|Y|``. It is symmetric in magnitude and phase errors, unlike
    the complex L2 loss, which favours underestimated magnitudes.

    Args:
        pred: ``(B, 2, H, W)``.
        target: ``(B, 2, H, W)``.
        magnitude_term: ``"l2"`` (default), ``"l1"`` or ``"none"``.
        eps: Guards the division by ``|X|``.

    Returns:
        Scalar loss.
    """
    _check_same_shape(pred, target)
    if pred.ndim != 4 or pred.shape[1] != 2:
        raise ValueError(f"perp_loss needs complex (B, 2, H, W) inputs, got shape {tuple(pred.shape)}")
    if magnitude_term not in ("l2", "l1", "none"):
        raise ValueError(f"unknown magnitude_term {magnitude_term!r}; valid: l2, l1, none")
    xr, xi = pred[:, 0], pred[:, 1]
    yr, yi = target[:, 0], target[:, 1]
    mag_x = torch.linalg.vector_norm(pred, dim=1)
    mag_y = torch.linalg.vector_norm(target, dim=1)
    perp = torch.abs(xr * yi - xi * yr) / (mag_x + eps)
    opposite = (xr * yr + xi * yi) < 0  # cos(theta) < 0
    term = torch.where(opposite, 2 * mag_y - perp, perp).mean()
    if magnitude_term == "l2":
        term = term + F.mse_loss(mag_x, mag_y)
    elif magnitude_term == "l1":
        term = term + F.l1_loss(mag_x, mag_y)
    return term


LOSSES.register("perp")(perp_loss)


def get_loss(name: str) -> LossFn:
    """The loss called ``name`` (``mse``, ``l1``, ``ssim``, ``perp``); a wrong name lists them."""
    return LOSSES.get(name)
