"""Image-quality metrics against independent references on real images.

References: scikit-image (PSNR, SSIM), fastMRI's ``evaluate`` (per-volume PSNR,
SSIM, NMSE), sewar's ``vifp`` on the 0-255 scale (the MATLAB VIFp), numpy FFTs
and hand-derived spectra for HFE, counted pixels for SR.
"""

from __future__ import annotations

import functools
from pathlib import Path

import fastmri.evaluate
import numpy as np
import pytest
import scipy.fft
import scipy.ndimage
import sewar.full_ref
import torch
from PIL import Image
from skimage import color, data
from skimage.metrics import peak_signal_noise_ratio, structural_similarity
from skimage.transform import resize

from suite.metrics import (
    hfe,
    nmse,
    psnr,
    radial_frequencies,
    radial_power_spectrum,
    residual_map,
    significant_residuals,
    ssim,
    vif,
)

DATA = Path(__file__).resolve().parents[1] / "data"
TOL = 1e-4
CROP = (127, 131)  # odd, non-square


# ----------------------------------------------------------------------------- images


def _crop(img: np.ndarray, top: int = 150, left: int = 170) -> np.ndarray:
    return img[top : top + CROP[0], left : left + CROP[1]]


def _camera() -> np.ndarray:
    return _crop(data.camera().astype(np.float64))


def _astronaut() -> np.ndarray:
    return _crop(color.rgb2gray(data.astronaut()) * 255.0, 30, 200)


def _noise(img: np.ndarray) -> np.ndarray:
    return img + np.random.default_rng(0).normal(0.0, 12.0, img.shape)


def _blur(img: np.ndarray) -> np.ndarray:
    return scipy.ndimage.gaussian_filter(img, 1.5)


def _jpeg_like(img: np.ndarray, step: float = 60.0) -> np.ndarray:
    """Coarse quantisation of orthonormal 8 x 8 block DCT coefficients."""
    h, w = img.shape
    padded = np.pad(img, ((0, -h % 8), (0, -w % 8)), mode="edge")
    blocks = padded.reshape(padded.shape[0] // 8, 8, padded.shape[1] // 8, 8)
    coef = scipy.fft.dctn(blocks, axes=(1, 3), norm="ortho")
    coef = np.round(coef / step) * step
    out = scipy.fft.idctn(coef, axes=(1, 3), norm="ortho").reshape(padded.shape)
    return out[:h, :w]


IMAGES = {"camera": _camera, "astronaut": _astronaut}
DISTORTIONS = {"noise": _noise, "blur": _blur, "jpeg": _jpeg_like}
CASES = [(i, d) for i in IMAGES for d in DISTORTIONS]


@functools.lru_cache(maxsize=None)
def _cached_pair(image: str, distortion: str) -> tuple[np.ndarray, np.ndarray]:
    target = IMAGES[image]()
    return target, DISTORTIONS[distortion](target)


def _pair(image: str, distortion: str) -> tuple[np.ndarray, np.ndarray]:
    """(target, distorted) float64 arrays on the 0-255 scale (fresh copies)."""
    return tuple(a.copy() for a in _cached_pair(image, distortion))


@functools.lru_cache(maxsize=None)
def _sewar_vifp(image: str, distortion: str) -> float:
    target, pred = _cached_pair(image, distortion)
    return sewar.full_ref.vifp(target, pred, sigma_nsq=2)


def _goldhill() -> tuple[np.ndarray, np.ndarray]:
    ref = np.asarray(Image.open(DATA / "goldhill.gif"), dtype=np.float64)
    dist = np.asarray(Image.open(DATA / "goldhill_jpeg.gif"), dtype=np.float64)
    return ref, dist


def _t(*arrays: np.ndarray, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """Stack 2-D arrays into a (B, H, W) tensor."""
    return torch.stack([torch.as_tensor(a) for a in arrays]).to(dtype)


def _mri_volume(seed: int, slices: int = 5, shape: tuple[int, int] = (67, 61)) -> np.ndarray:
    """A float32 magnitude volume (S, H, W) at fastMRI's scale (~1e-4)."""
    rng = np.random.default_rng(seed)
    phantom = resize(data.shepp_logan_phantom(), shape, anti_aliasing=True)
    vol = []
    for s in range(slices):
        body = phantom * (0.6 + 0.4 * np.sin(np.pi * (s + 1) / (slices + 1)))
        noisy = body + rng.normal(0, 0.02, shape) + 1j * rng.normal(0, 0.02, shape)
        vol.append(np.abs(noisy))
    return (np.stack(vol) * 3e-4).astype(np.float32)


# ----------------------------------------------------------------------------- PSNR / SSIM


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("image,distortion", CASES)
def test_psnr_ssim_match_skimage(image, distortion, dtype):
    target, pred = _pair(image, distortion)
    p, t = _t(pred, dtype=dtype), _t(target, dtype=dtype)
    assert psnr(p, t, data_range=255.0).item() == pytest.approx(
        peak_signal_noise_ratio(target, pred, data_range=255.0), abs=TOL
    )
    assert ssim(p, t, data_range=255.0).item() == pytest.approx(
        structural_similarity(target, pred, data_range=255.0), abs=TOL
    )
    # data_range=None is the target's own range.
    span = target.max() - target.min()
    assert psnr(p, t).item() == pytest.approx(peak_signal_noise_ratio(target, pred, data_range=span), abs=TOL)
    assert ssim(p, t).item() == pytest.approx(structural_similarity(target, pred, data_range=span), abs=TOL)


def test_ssim_options_match_skimage():
    target, pred = _pair("camera", "noise")
    got = ssim(_t(pred), _t(target), data_range=255.0, win_size=11, k1=0.02, k2=0.05).item()
    ref = structural_similarity(target, pred, data_range=255.0, win_size=11, K1=0.02, K2=0.05)
    assert got == pytest.approx(ref, abs=TOL)
    assert got != pytest.approx(ssim(_t(pred), _t(target), data_range=255.0).item(), abs=1e-3)


def test_uint8_input():
    target = data.camera()[100:227, 200:331]
    pred = np.clip(_noise(target.astype(np.float64)), 0, 255).astype(np.uint8)
    p, t = torch.from_numpy(pred)[None], torch.from_numpy(target)[None]
    assert psnr(p, t, 255.0).item() == pytest.approx(peak_signal_noise_ratio(target, pred, data_range=255), abs=TOL)
    assert ssim(p, t, 255.0).item() == pytest.approx(structural_similarity(target, pred, data_range=255), abs=TOL)
    assert vif(p, t, 255.0).item() == pytest.approx(sewar.full_ref.vifp(target, pred, sigma_nsq=2), abs=TOL)


def test_full_size_goldhill_matches_skimage_and_sewar():
    ref, dist = _goldhill()
    p, t = _t(dist, dtype=torch.float32), _t(ref, dtype=torch.float32)
    assert psnr(p, t, 255.0).item() == pytest.approx(peak_signal_noise_ratio(ref, dist, data_range=255.0), abs=TOL)
    assert ssim(p, t, 255.0).item() == pytest.approx(structural_similarity(ref, dist, data_range=255.0), abs=TOL)
    assert vif(p, t, 255.0).item() == pytest.approx(sewar.full_ref.vifp(ref, dist, sigma_nsq=2), abs=TOL)


# ----------------------------------------------------------------------------- fastMRI volumes


def test_volume_metrics_match_fastmri():
    gt = _mri_volume(0)
    pred = scipy.ndimage.gaussian_filter(gt, (0, 1.0, 1.0)).astype(np.float32)
    pred += np.random.default_rng(1).normal(0, 5e-6, pred.shape).astype(np.float32)
    t, p = torch.from_numpy(gt)[None], torch.from_numpy(pred)[None]  # (1, S, H, W), float32
    gt64, pred64 = gt.astype(np.float64), pred.astype(np.float64)
    vmax = float(gt.max())
    assert psnr(p, t, data_range=vmax).item() == pytest.approx(fastmri.evaluate.psnr(gt64, pred64), abs=TOL)
    assert ssim(p, t, data_range=vmax).item() == pytest.approx(
        float(fastmri.evaluate.ssim(gt64, pred64)[0]), abs=TOL
    )
    assert nmse(p, t).item() == pytest.approx(float(fastmri.evaluate.nmse(gt64, pred64)), rel=TOL)


def test_volume_batch_uses_each_volume_max():
    gts = [_mri_volume(seed) for seed in (2, 3)]
    gts[1] *= 3.0
    preds = [g + np.float32(2e-5) * np.random.default_rng(4).standard_normal(g.shape, dtype=np.float32) for g in gts]
    t, p = torch.from_numpy(np.stack(gts)), torch.from_numpy(np.stack(preds))  # (2, S, H, W)
    vmax = t.reshape(2, -1).amax(dim=1)
    got_psnr, got_ssim = psnr(p, t, data_range=vmax), ssim(p, t, data_range=vmax)
    assert got_psnr.shape == got_ssim.shape == (2,)
    for i, (g, q) in enumerate(zip(gts, preds)):
        g64, q64 = g.astype(np.float64), q.astype(np.float64)
        assert got_psnr[i].item() == pytest.approx(fastmri.evaluate.psnr(g64, q64), abs=TOL)
        assert got_ssim[i].item() == pytest.approx(float(fastmri.evaluate.ssim(g64, q64)[0]), abs=TOL)


# ----------------------------------------------------------------------------- VIF


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("image,distortion", CASES)
def test_vif_matches_sewar(image, distortion, dtype):
    target, pred = _pair(image, distortion)
    got = vif(_t(pred, dtype=dtype), _t(target, dtype=dtype), data_range=255.0).item()
    assert got == pytest.approx(_sewar_vifp(image, distortion), abs=TOL)


def test_vif_rescales_to_0_255():
    target, pred = _pair("astronaut", "blur")
    ref = _sewar_vifp("astronaut", "blur")
    # Unit-range images with data_range=1 are mapped back onto 0-255.
    assert vif(_t(pred / 255.0), _t(target / 255.0), data_range=1.0).item() == pytest.approx(ref, abs=TOL)
    # data_range=None maps the target's own range onto 255 (VIF ignores offsets).
    span = target.max() - target.min()
    stretched = sewar.full_ref.vifp(target * 255.0 / span, pred * 255.0 / span, sigma_nsq=2)
    assert vif(_t(pred), _t(target)).item() == pytest.approx(stretched, abs=TOL)
    # sigma_nsq is passed through.
    assert vif(_t(pred), _t(target), 255.0, sigma_nsq=10.0).item() == pytest.approx(
        sewar.full_ref.vifp(target, pred, sigma_nsq=10.0), abs=TOL
    )


def test_vif_smallest_image():
    target, pred = _pair("camera", "noise")
    target, pred = target[:41, :41], pred[:41, :41]
    got = vif(_t(pred), _t(target), 255.0).item()
    assert got == pytest.approx(sewar.full_ref.vifp(target, pred, sigma_nsq=2), abs=TOL)


# ----------------------------------------------------------------------------- batching and channels

ALL_METRICS = {
    "psnr": psnr,
    "ssim": ssim,
    "nmse": nmse,
    "vif": vif,
    "hfe": hfe,
    "sr": significant_residuals,
}


@pytest.mark.parametrize("name", ALL_METRICS)
def test_batch_equals_one_by_one(name):
    metric = ALL_METRICS[name]
    pairs = [_pair("camera", "noise"), _pair("astronaut", "jpeg"), _pair("camera", "blur")]
    targets = _t(*[tg for tg, _ in pairs], dtype=torch.float32)
    preds = _t(*[pr for _, pr in pairs], dtype=torch.float32)
    batched = metric(preds, targets)
    assert batched.shape == (3,)
    single = torch.cat([metric(preds[i : i + 1], targets[i : i + 1]) for i in range(3)])
    torch.testing.assert_close(batched, single, rtol=0, atol=1e-9)
    assert len(set(batched.tolist())) == 3  # the samples really differ


@pytest.mark.parametrize("name", ["ssim", "vif"])
def test_chunking_does_not_change_values(name, monkeypatch):
    import suite.metrics._filters as filters

    metric = ALL_METRICS[name]
    (t1, p1), (t2, p2), (t3, p3) = _pair("camera", "noise"), _pair("astronaut", "blur"), _pair("camera", "jpeg")
    t = _t(t1, t2, t3, t2, t1, t3, dtype=torch.float32).view(2, 3, *CROP)
    p = _t(p1, p2, p3, p3, p2, p1, dtype=torch.float32).view(2, 3, *CROP)
    monkeypatch.setattr(filters, "CHUNK_PIXELS", 1)  # one plane per chunk
    one_by_one = metric(p, t)
    monkeypatch.setattr(filters, "CHUNK_PIXELS", 1 << 30)  # all planes of a call at once
    torch.testing.assert_close(metric(p, t), one_by_one, rtol=0, atol=0)


@pytest.mark.parametrize("name", ["ssim", "vif"])
def test_channels_are_averaged(name):
    metric = ALL_METRICS[name]
    (t1, p1), (t2, p2) = _pair("camera", "noise"), _pair("astronaut", "blur")
    t, p = _t(t1, t2)[None], _t(p1, p2)[None]  # (1, 2, H, W)
    per_channel = [metric(p[:, i], t[:, i], data_range=255.0).item() for i in range(2)]
    assert metric(p, t, data_range=255.0).item() == pytest.approx(np.mean(per_channel), abs=1e-12)


@pytest.mark.parametrize("name", ALL_METRICS)
def test_inputs_that_require_grad(name):
    metric = ALL_METRICS[name]
    target, pred = _pair("camera", "blur")
    t, p = _t(target, dtype=torch.float32), _t(pred, dtype=torch.float32)
    assert metric(p.clone().requires_grad_(), t).item() == metric(p, t).item()


def test_psnr_pools_channels():
    (t1, p1), (t2, p2) = _pair("camera", "noise"), _pair("astronaut", "blur")
    target, pred = np.stack([t1, t2]), np.stack([p1, p2])
    got = psnr(torch.from_numpy(pred)[None], torch.from_numpy(target)[None], data_range=255.0).item()
    assert got == pytest.approx(peak_signal_noise_ratio(target, pred, data_range=255.0), abs=TOL)


# ----------------------------------------------------------------------------- HFE


def _checkerboard(h: int, w: int) -> np.ndarray:
    return np.where((np.arange(h)[:, None] + np.arange(w)[None, :]) % 2 == 0, 1.0, -1.0)


def test_hfe_constant_and_checkerboard():
    assert hfe(torch.full((2, 33, 40), 7.0)).tolist() == pytest.approx([0.0, 0.0], abs=1e-9)
    board = _t(_checkerboard(32, 48))
    assert hfe(board).item() == pytest.approx(100.0, abs=1e-9)
    assert hfe(board, mode="magnitude").item() == pytest.approx(100.0, abs=1e-9)
    # A 0/1 board: DC and the corner frequency carry equal energy.
    assert hfe((board + 1) / 2).item() == pytest.approx(50.0, abs=1e-9)
    assert hfe(torch.zeros(1, 16, 16)).item() == 0.0


def test_hfe_cutoff_and_mode():
    """Two cosines at radii 4 and 20 (Nyquist radius 32), amplitudes a and b."""
    a, b = 3.0, 1.0
    cols = np.arange(64)
    row = a * np.cos(2 * np.pi * 4 * cols / 64) + b * np.cos(2 * np.pi * 20 * cols / 64)
    x = _t(np.tile(row, (64, 1)))
    # Cut-off 0.25 -> disk radius 8: the radius-20 cosine is the high part.
    assert hfe(x).item() == pytest.approx(100 * b**2 / (a**2 + b**2), abs=1e-9)
    assert hfe(x, mode="magnitude").item() == pytest.approx(100 * b / (a + b), abs=1e-9)
    # Cut-off 0.1 -> radius 3.2: both are high. Cut-off 0.7 -> radius 22.4: none.
    assert hfe(x, cutoff=0.1).item() == pytest.approx(100.0, abs=1e-9)
    assert hfe(x, cutoff=0.7).item() == pytest.approx(0.0, abs=1e-9)


def test_hfe_matches_centred_numpy_spectrum():
    """Odd-sized real image, against an fftshift-centred numpy computation."""
    img = _camera()
    h, w = img.shape
    spec = np.fft.fftshift(np.fft.fft2(img))
    yy, xx = np.mgrid[:h, :w]
    radius = np.hypot(yy - h // 2, xx - w // 2)
    for cutoff in (0.1, 0.25, 0.5):
        outside = radius > cutoff * min(h, w) / 2
        for mode, energy in (("power", np.abs(spec) ** 2), ("magnitude", np.abs(spec))):
            expected = 100 * energy[outside].sum() / energy.sum()
            assert hfe(_t(img), cutoff=cutoff, mode=mode).item() == pytest.approx(expected, rel=1e-9)
    # target is ignored
    assert hfe(_t(img), _t(_blur(img))).item() == hfe(_t(img)).item()


# ----------------------------------------------------------------------------- SR and residuals


def test_significant_residuals_counts_pixels():
    target = _camera()
    span = target.max() - target.min()
    pred = target + 0.01 * span  # below 5 % everywhere ...
    flat = np.random.default_rng(5).choice(target.size, size=37, replace=False)
    pred.flat[flat] -= 0.2 * span  # ... except at 37 pixels
    p, t = _t(pred), _t(target)
    assert significant_residuals(p, t).item() == pytest.approx(37 / target.size * 100, abs=1e-12)
    assert significant_residuals(p, t, threshold=0.5).item() == 0.0
    assert significant_residuals(p, t, threshold=0.005).item() == 100.0


def test_residual_map_and_nmse():
    target, pred = _pair("camera", "noise")
    p, t = _t(pred)[None], _t(target)[None]  # (1, 1, H, W)
    res = residual_map(p, t)
    assert res.shape == p.shape
    np.testing.assert_allclose(res[0, 0].numpy(), np.abs(target - pred))
    assert nmse(p, t).item() == pytest.approx(float(fastmri.evaluate.nmse(target, pred)), rel=1e-12)


# ----------------------------------------------------------------------------- radial spectrum


def test_radial_power_spectrum_peaks():
    n = 48
    cols = np.arange(n)
    x = _t(np.tile(np.cos(2 * np.pi * 5 * cols / n), (n, 1)), np.full((n, n), 2.0))
    spec = radial_power_spectrum(x)
    assert spec.shape == (2, n // 2)
    # Cosine: all power (sum x^2 = n^2 / 2, orthonormal FFT) at radius 5, in ring 5.
    ring5 = np.hypot(*np.meshgrid(np.fft.fftfreq(n, 1 / n), np.fft.fftfreq(n, 1 / n)))
    count = int(((ring5 >= 5) & (ring5 < 6)).sum())
    assert spec[0, 5].item() == pytest.approx(n * n / 2 / count, rel=1e-9)
    assert spec[0].sum().item() == pytest.approx(spec[0, 5].item(), rel=1e-9)
    # Constant 2: only DC, whose ring holds DC alone: power (2 n)^2.
    assert spec[1, 0].item() == pytest.approx((2.0 * n) ** 2, rel=1e-9)
    assert spec[1, 1:].abs().max().item() < 1e-18
    coarse = radial_power_spectrum(x, n_bins=4)
    assert coarse.shape == (2, 4) and coarse[0].argmax().item() == 0  # radius 5 < 24 / 4 = 6
    freqs = radial_frequencies(n, n, 4)
    torch.testing.assert_close(freqs, torch.tensor([0.0625, 0.1875, 0.3125, 0.4375], dtype=torch.float64))


# ----------------------------------------------------------------------------- errors


def test_errors_name_the_shape():
    x = torch.rand(2, 50, 50)
    with pytest.raises(ValueError, match=r"same shape.*\(2, 50, 50\).*\(2, 50, 49\)"):
        psnr(x, torch.rand(2, 50, 49))
    with pytest.raises(ValueError, match=r"\(B, H, W\) or \(B, C, H, W\).*\(50, 50\)"):
        ssim(x[0], x[0])
    with pytest.raises(ValueError, match=r"\(1, 2, 3, 50, 50\)"):
        nmse(torch.rand(1, 2, 3, 50, 50), torch.rand(1, 2, 3, 50, 50))
    with pytest.raises(ValueError, match=r"win_size=7.*\(2, 6, 50\)"):
        ssim(torch.rand(2, 6, 50), torch.rand(2, 6, 50))
    with pytest.raises(ValueError, match="odd integer"):
        ssim(x, x, win_size=8)
    with pytest.raises(ValueError, match=r"too small for the 4 VIF scales.*\(2, 40, 50\)"):
        vif(torch.rand(2, 40, 50), torch.rand(2, 40, 50))
    with pytest.raises(TypeError, match="real-valued"):
        psnr(torch.rand(2, 50, 50, dtype=torch.complex64), torch.rand(2, 50, 50, dtype=torch.complex64))
    with pytest.raises(TypeError, match="torch.Tensor"):
        nmse(np.zeros((2, 50, 50)), x)
    with pytest.raises(ValueError, match=r"shape \(2,\).*\(3,\)"):
        psnr(x, x, data_range=torch.ones(3))
    with pytest.raises(ValueError, match="positive"):
        ssim(x, x, data_range=0.0)
    with pytest.raises(ValueError, match="power.*magnitude.*'phase'"):
        hfe(x, mode="phase")
    with pytest.raises(ValueError, match="cutoff"):
        hfe(x, cutoff=-0.1)
    with pytest.raises(ValueError, match="sigma_nsq must be a finite number > 0, got 0"):
        vif(x, x, sigma_nsq=0)
    with pytest.raises(ValueError, match="threshold.*'5%'"):
        significant_residuals(x, x, threshold="5%")
    with pytest.raises(ValueError, match=r"n_bins.*\[1, .* 25\]"):
        radial_power_spectrum(x, n_bins=26)
