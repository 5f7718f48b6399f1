"""Losses: MSE, L1, differentiable SSIM (vs scikit-image) and the perpendicular loss."""

import math

import numpy as np
import pytest
import torch
from skimage.metrics import structural_similarity

from suite.training.losses import LOSSES, get_loss, l1_loss, magnitude, mse_loss, perp_loss, ssim, ssim_loss


def _polar(mag: torch.Tensor, phase: torch.Tensor) -> torch.Tensor:
    """(B, H, W) magnitude and phase -> (B, 2, H, W)."""
    return torch.stack([mag * torch.cos(phase), mag * torch.sin(phase)], dim=1)


def test_registry_and_unknown_name():
    assert set(LOSSES.names()) == {"mse", "l1", "ssim", "perp"}
    assert get_loss("perp") is perp_loss
    with pytest.raises(ValueError, match="unknown loss 'huber'; valid: l1, mse, perp, ssim"):
        get_loss("huber")


def test_mse_and_l1():
    gen = torch.Generator().manual_seed(0)
    a, b = torch.randn(2, 2, 5, 7, generator=gen), torch.randn(2, 2, 5, 7, generator=gen)
    assert mse_loss(a, b).item() == pytest.approx(((a - b) ** 2).mean().item())
    assert l1_loss(a, b).item() == pytest.approx((a - b).abs().mean().item())
    with pytest.raises(ValueError, match="shapes differ"):
        mse_loss(a, b[:, :1])


@pytest.mark.parametrize("shape", [(19, 23), (32, 32)])
def test_ssim_matches_scikit_image(shape):
    rng = np.random.default_rng(0)
    gt = rng.random((2, *shape)).cumsum(-1)  # some structure
    pred = gt + 0.3 * rng.standard_normal(gt.shape)
    data_range = gt.max(axis=(1, 2)) - gt.min(axis=(1, 2))
    ours = ssim(torch.from_numpy(pred), torch.from_numpy(gt))
    for i in range(2):
        ref = structural_similarity(
            gt[i], pred[i], win_size=7, gaussian_weights=False, use_sample_covariance=True,
            data_range=data_range[i], K1=0.01, K2=0.03,
        )
        assert ours[i].item() == pytest.approx(ref, abs=1e-6)


def test_ssim_loss_on_complex_uses_magnitude_and_is_differentiable():
    gen = torch.Generator().manual_seed(1)
    mag = torch.rand(2, 16, 15, generator=gen) + 0.5
    phase = torch.rand(2, 16, 15, generator=gen) * 6
    target = _polar(mag, phase)
    rotated = _polar(mag, phase + 1.0)  # same magnitude, different phase
    assert ssim_loss(rotated, target).item() == pytest.approx(0.0, abs=1e-6)
    pred = (target + 0.2 * torch.randn(target.shape, generator=gen)).requires_grad_()
    loss = ssim_loss(pred, target)
    assert 0 < loss.item() < 1
    loss.backward()
    assert torch.isfinite(pred.grad).all() and pred.grad.abs().max() > 0
    with pytest.raises(ValueError, match="win_size"):
        ssim(mag[:, :5, :5], mag[:, :5, :5])


def test_magnitude_shapes():
    x = torch.randn(3, 2, 4, 5)
    torch.testing.assert_close(magnitude(x), torch.sqrt(x[:, 0] ** 2 + x[:, 1] ** 2))
    assert magnitude(torch.rand(3, 1, 4, 5)).shape == (3, 4, 5)
    with pytest.raises(ValueError, match="expected"):
        magnitude(torch.rand(3, 3, 4, 5))


def test_perp_loss_analytic_cases():
    gen = torch.Generator().manual_seed(2)
    mag = torch.rand(2, 8, 9, generator=gen) + 0.5
    phase = torch.rand(2, 8, 9, generator=gen) * 6
    y = _polar(mag, phase)
    assert perp_loss(y, y).item() == pytest.approx(0.0, abs=1e-6)
    # pure phase error theta < 90 deg: P = |Y| |sin theta|, magnitude term 0
    theta = 0.4
    assert perp_loss(_polar(mag, phase + theta), y).item() == pytest.approx(
        (mag * math.sin(theta)).mean().item(), rel=1e-5
    )
    # beyond 90 deg the term keeps growing: 2|Y| - |Y| |sin theta|, 2|Y| at 180 deg
    theta = 2.5
    assert perp_loss(_polar(mag, phase + theta), y).item() == pytest.approx(
        (mag * (2 - math.sin(theta))).mean().item(), rel=1e-5
    )
    assert perp_loss(_polar(mag, phase + math.pi), y).item() == pytest.approx(2 * mag.mean().item(), rel=1e-5)
    # pure magnitude error: no perpendicular part, only the magnitude term
    scale = 1.3
    expected_l2 = (((scale - 1) * mag) ** 2).mean().item()
    assert perp_loss(scale * y, y).item() == pytest.approx(expected_l2, rel=1e-5)
    expected_l1 = ((scale - 1) * mag).mean().item()
    assert perp_loss(scale * y, y, magnitude_term="l1").item() == pytest.approx(expected_l1, rel=1e-5)
    assert perp_loss(scale * y, y, magnitude_term="none").item() == pytest.approx(0.0, abs=1e-6)


def test_perp_loss_is_symmetric_where_complex_l2_is_not():
    """Same relative magnitude error up or down, at a fixed phase error: the ⊥-loss
    penalises both equally (up to the magnitude term), the complex L2 prefers the
    smaller magnitude (the bias Terpstra et al. describe)."""
    mag = torch.ones(1, 4, 4)
    y = _polar(mag, torch.zeros_like(mag))
    theta = 0.5
    up = _polar(1.2 * mag, torch.full_like(mag, theta))
    down = _polar(0.8 * mag, torch.full_like(mag, theta))
    assert perp_loss(up, y).item() == pytest.approx(perp_loss(down, y).item(), rel=1e-6)
    assert mse_loss(down, y) < mse_loss(up, y)


def test_perp_loss_gradient_finite_at_zero_prediction():
    y = _polar(torch.ones(1, 3, 3), torch.zeros(1, 3, 3))
    pred = torch.zeros(1, 2, 3, 3, requires_grad=True)
    perp_loss(pred, y).backward()
    assert torch.isfinite(pred.grad).all()
    with pytest.raises(ValueError, match=r"\(B, 2, H, W\)"):
        perp_loss(torch.zeros(1, 3, 3), torch.zeros(1, 3, 3))
    with pytest.raises(ValueError, match="magnitude_term"):
        perp_loss(pred, y, magnitude_term="l3")
