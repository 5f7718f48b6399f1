"""MRI operators: adjointness, agreement with a numpy FFT, noise, sensitivity maps."""

import numpy as np
import pytest
import torch

from suite.data.synth import fft2c as np_fft2c
from suite.data.synth import make_coil_sensitivities, make_phantom_volume
from suite.physics import (
    MultiCoilMRI,
    SingleCoilMRI,
    acs_bounds,
    complex_inner,
    estimate_sensitivity_maps,
    make_mri_physics,
    sense_combine,
)

B, C, H, W = 3, 4, 12, 11


def _random_mask(batch: int, width: int, gen: torch.Generator) -> torch.Tensor:
    mask = (torch.rand(batch, 1, 1, width, 1, generator=gen) < 0.4).double()
    mask[..., width // 2 - 1 : width // 2 + 2, :] = 1.0  # ACS
    return mask


def _operators(gen: torch.Generator):
    mask = _random_mask(B, W, gen)
    maps = torch.randn(B, C, H, W, 2, generator=gen, dtype=torch.float64)
    return [
        SingleCoilMRI(mask),
        SingleCoilMRI(mask[:1, 0]),  # unbatched fastMRI mask (1, 1, W, 1)
        MultiCoilMRI(mask, maps),
        MultiCoilMRI(mask[:1], maps),
    ]


@pytest.mark.parametrize("index", range(4))
def test_adjointness(index):
    gen = torch.Generator().manual_seed(index)
    op = _operators(gen)[index]
    x = torch.randn(B, H, W, 2, generator=gen, dtype=torch.float64)
    y = torch.randn_like(op.A(x))
    lhs = complex_inner(op.A(x), y)
    rhs = complex_inner(x, op.A_adjoint(y))
    scale = op.A(x).norm() * y.norm()
    assert torch.allclose(lhs, rhs, rtol=0, atol=1e-12 * float(scale))
    assert not torch.allclose(lhs, torch.zeros_like(lhs))


def test_single_coil_matches_numpy_fft():
    gen = torch.Generator().manual_seed(0)
    mask = _random_mask(B, W, gen)
    x = torch.randn(B, H, W, 2, generator=gen, dtype=torch.float64)
    xc = x[..., 0].numpy() + 1j * x[..., 1].numpy()
    expected = np_fft2c(xc) * mask[:, 0, 0, :, 0].numpy()[:, None, :]
    got = SingleCoilMRI(mask).A(x)
    assert got.shape == (B, 1, H, W, 2)
    np.testing.assert_allclose(got[:, 0, ..., 0].numpy(), expected.real, atol=1e-12)
    np.testing.assert_allclose(got[:, 0, ..., 1].numpy(), expected.imag, atol=1e-12)


def test_multicoil_is_sensitivity_weighted_fft():
    gen = torch.Generator().manual_seed(1)
    mask = _random_mask(B, W, gen)
    maps = torch.randn(B, C, H, W, 2, generator=gen, dtype=torch.float64)
    x = torch.randn(B, H, W, 2, generator=gen, dtype=torch.float64)
    to_c = lambda t: t[..., 0].numpy() + 1j * t[..., 1].numpy()  # noqa: E731
    expected = np_fft2c(to_c(maps) * to_c(x)[:, None]) * mask[:, :, 0, :, 0].numpy()[:, :, None, :]
    got = to_c(MultiCoilMRI(mask, maps).A(x))
    np.testing.assert_allclose(got, expected, atol=1e-12)


def test_forward_is_A_without_noise_and_adds_masked_noise():
    gen = torch.Generator().manual_seed(2)
    mask = _random_mask(1, 64, gen).float()
    x = torch.randn(1, 64, 64, 2, generator=gen)
    op = SingleCoilMRI(mask)
    assert torch.equal(op(x), op.A(x))
    torch.manual_seed(0)
    noisy = SingleCoilMRI(mask, noise_sigma=0.1)
    diff = noisy(x) - op.A(x)
    sampled = mask.expand_as(diff).bool()
    assert diff[~sampled].abs().max() == 0
    assert abs(float(diff[sampled].std()) - 0.1) < 0.01
    with pytest.raises(ValueError, match="noise_sigma"):
        SingleCoilMRI(mask, noise_sigma=-1.0)


def test_operator_norm_at_most_one_with_normalised_maps():
    gen = torch.Generator().manual_seed(3)
    mask = _random_mask(1, W, gen)
    kspace = torch.randn(1, C, H, W, 2, generator=gen, dtype=torch.float64)
    maps = estimate_sensitivity_maps(kspace, mask=mask)
    for op in (SingleCoilMRI(mask), MultiCoilMRI(mask, maps)):
        v = torch.randn(1, H, W, 2, generator=gen, dtype=torch.float64)
        for _ in range(200):
            v = op.A_adjoint_A(v)
            v = v / v.norm()
        assert float(op.A(v).norm()) <= 1.0 + 1e-9


def test_sensitivity_maps_sum_of_squares_is_one_on_support():
    gen = torch.Generator().manual_seed(4)
    rng = np.random.default_rng(0)
    image = make_phantom_volume(rng, 1, (24, 23), (20, 20), "brain")[0]
    true_maps = make_coil_sensitivities(rng, C, (24, 23), (20, 20))
    kspace_np = np_fft2c(image[None] * true_maps)
    kspace = torch.from_numpy(np.stack([kspace_np.real, kspace_np.imag], -1))
    mask = _random_mask(1, 23, gen)
    mask[..., 8:15, :] = 1.0
    maps = estimate_sensitivity_maps(kspace * mask[0], mask=mask, threshold=0.05)
    assert maps.shape == kspace.shape
    sos = (maps**2).sum(dim=(-1, 0))
    support = sos > 0
    assert 0.2 < float(support.double().mean()) < 1.0  # object found, background excluded
    assert torch.allclose(sos[support], torch.ones_like(sos[support]), atol=1e-10)
    # the maps recover the true normalised coil profiles up to one phase per pixel
    true_norm = np.abs(true_maps) / np.sqrt((np.abs(true_maps) ** 2).sum(0, keepdims=True))
    est = torch.linalg.vector_norm(maps, dim=-1).numpy()
    inside = (np.abs(image) > 0.3 * np.abs(image).max()) & support.numpy()
    corr = np.corrcoef(est[:, inside].ravel(), true_norm[:, inside].ravel())[0, 1]
    assert corr > 0.95
    # num_low_frequencies gives the same ACS as the detected one (7 centre columns)
    same = estimate_sensitivity_maps(kspace * mask[0], num_low_frequencies=7)
    lo, hi = acs_bounds(mask[0, 0, 0, :, 0])
    assert (lo, hi) == (8, 15)
    assert torch.allclose(same, maps)


def test_sense_combine_of_fully_sampled_coils_approximates_rss():
    rng = np.random.default_rng(1)
    image = make_phantom_volume(rng, 1, (32, 32), (28, 28), "knee")[0]
    true_maps = make_coil_sensitivities(rng, 6, (32, 32), (28, 28))
    coils = image[None] * true_maps
    kspace_np = np_fft2c(coils)
    kspace = torch.from_numpy(np.stack([kspace_np.real, kspace_np.imag], -1))
    maps = estimate_sensitivity_maps(kspace, num_low_frequencies=12, threshold=0.02)
    coil_t = torch.from_numpy(np.stack([coils.real, coils.imag], -1))
    combined = torch.linalg.vector_norm(sense_combine(coil_t, maps), dim=-1).numpy()
    rss = np.sqrt((np.abs(coils) ** 2).sum(0))
    inside = np.abs(image) > 0.3 * np.abs(image).max()
    rel = np.abs(combined - rss)[inside] / rss[inside]
    assert np.median(rel) < 0.05


def test_make_mri_physics_dispatch_and_bad_inputs():
    mask = torch.ones(2, 1, 1, W, 1)
    maps = torch.zeros(2, C, H, W, 2)
    assert isinstance(make_mri_physics(mask), SingleCoilMRI)
    assert isinstance(make_mri_physics(mask, maps), MultiCoilMRI)
    op = make_mri_physics(mask)
    assert "mask" in dict(op.named_buffers())
    assert "sens_maps" in dict(make_mri_physics(mask, maps).named_buffers())
    with pytest.raises(ValueError, match="trailing"):
        op.A(torch.randn(2, H, W, dtype=torch.complex64))
    with pytest.raises(ValueError, match=r"\(B, H, W, 2\)|4 dims"):
        op.A(torch.randn(2, H, W, 3))
    with pytest.raises(ValueError, match="last dim of 1"):
        SingleCoilMRI(torch.ones(1, 1, W))
    no_centre = torch.ones(1, 1, 1, W, 1)
    no_centre[..., W // 2, :] = 0
    with pytest.raises(ValueError, match="centre"):
        estimate_sensitivity_maps(torch.randn(1, C, H, W, 2), mask=no_centre)
    with pytest.raises(ValueError, match="mask or num_low_frequencies"):
        estimate_sensitivity_maps(torch.randn(1, C, H, W, 2))
