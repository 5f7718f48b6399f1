"""fastMRI multi-slice dataset: slices, crops, masks, normalisation, bad input."""

import warnings

import h5py
import numpy as np
import pytest
import torch

import fastmri
from fastmri.data import transforms as T
from fastmri.data.subsample import EquispacedMaskFractionFunc, RandomMaskFunc
from suite.data.fastmri import FastMRISliceDataset, magnitude_to_target, make_mask_func
from suite.data.synth import write_synthetic_dataset
from suite.physics import make_mri_physics

SHAPE, CROP = (40, 37), (32, 32)


@pytest.fixture(scope="module")
def single(tmp_path_factory):
    out = tmp_path_factory.mktemp("sc")
    write_synthetic_dataset(out, n_volumes=2, n_slices=3, shape=SHAPE, recon_size=CROP, seed=0)
    return out


@pytest.fixture(scope="module")
def multi(tmp_path_factory):
    out = tmp_path_factory.mktemp("mc")
    write_synthetic_dataset(out, n_volumes=2, n_slices=3, shape=SHAPE, n_coils=4, recon_size=CROP, seed=1)
    return out


def _dataset(root, challenge="singlecoil", **kw):
    kw.setdefault("slice_range", None)
    kw.setdefault("crop_size", CROP)
    return FastMRISliceDataset(root, challenge, **kw)


def _raw_kspace(item_fname, root, slice_num):
    with h5py.File(root / item_fname, "r") as f:
        k = T.to_tensor(f["kspace"][slice_num])
    return k if k.ndim == 4 else k.unsqueeze(0)


@pytest.mark.parametrize("challenge", ["singlecoil", "multicoil"])
@pytest.mark.parametrize("crop_mode", ["image", "kspace"])
def test_item_layout_and_collate(challenge, crop_mode, single, multi):
    root = single if challenge == "singlecoil" else multi
    ds = _dataset(root, challenge, crop_mode=crop_mode)
    assert len(ds) == 6
    coils = 1 if challenge == "singlecoil" else 4
    batch = torch.utils.data.default_collate([ds[0], ds[4]])
    assert batch["kspace"].shape == (2, coils, *CROP, 2)
    assert batch["mask"].shape == (2, 1, 1, CROP[1], 1)
    assert batch["image"].shape == batch["target"].shape == (2, *CROP)
    assert batch["target_complex"].shape == (2, *CROP, 2)
    assert batch["mean"].shape == batch["std"].shape == batch["max_value"].shape == (2,)
    assert batch["slice_num"].tolist() == [0, 1] and batch["fname"][0] != batch["fname"][1]
    assert ("sens_maps" in batch) == (challenge == "multicoil")
    if challenge == "multicoil":
        sos = (batch["sens_maps"] ** 2).sum(dim=(1, -1))
        on = sos > 0
        assert on.float().mean() > 0.2
        assert torch.allclose(sos[on], torch.ones_like(sos[on]), atol=1e-5)


def test_image_crop_matches_independent_pipeline(single):
    ds = _dataset(single)
    item = ds[1]
    raw = _raw_kspace(item["fname"], single, item["slice_num"])
    cropped = fastmri.fft2c(T.complex_center_crop(fastmri.ifft2c(raw), CROP))
    mask, _ = RandomMaskFunc([0.08, 0.04], [4, 8])(cropped.shape, seed=tuple(map(ord, item["fname"])))
    assert torch.equal(item["mask"], mask)
    scale = item["std"] + 1e-11
    torch.testing.assert_close(item["kspace"] * scale, cropped * mask + 0.0, rtol=1e-4, atol=1e-9)
    # target: the stored ESC, instance-normalised with the zero-filled statistics
    with h5py.File(single / item["fname"], "r") as f:
        stored = torch.from_numpy(f["reconstruction_esc"][item["slice_num"]])
    zf = fastmri.complex_abs(fastmri.ifft2c(cropped * mask)[0])
    assert torch.isclose(item["mean"], zf.mean()) and torch.isclose(item["std"], zf.std())
    torch.testing.assert_close(item["target"], ((stored - zf.mean()) / scale).clamp(-6, 6))
    torch.testing.assert_close(item["image"], ((zf - zf.mean()) / scale).clamp(-6, 6))
    # the complex target is consistent with the measurements: A x = y
    physics = make_mri_physics(item["mask"][None])
    y = physics.A(item["target_complex"][None])
    torch.testing.assert_close(y, item["kspace"][None], rtol=1e-4, atol=1e-5)
    assert item["max_value"] == pytest.approx(h5py.File(single / item["fname"], "r").attrs["max"])


def test_kspace_crop_differs_and_recomputes_target(single):
    img = _dataset(single, crop_mode="image")[2]
    ksp = _dataset(single, crop_mode="kspace")[2]
    raw = _raw_kspace(ksp["fname"], single, ksp["slice_num"])
    top, left = SHAPE[0] // 2 - CROP[0] // 2, SHAPE[1] // 2 - CROP[1] // 2
    block = raw[:, top : top + CROP[0], left : left + CROP[1]]
    torch.testing.assert_close(ksp["kspace"] * (ksp["std"] + 1e-11), block * ksp["mask"] + 0.0, rtol=1e-4, atol=1e-9)
    expected = fastmri.complex_abs(fastmri.ifft2c(block))[0]
    torch.testing.assert_close(ksp["target"], ((expected - ksp["mean"]) / (ksp["std"] + 1e-11)).clamp(-6, 6))
    assert not torch.allclose(img["image"], ksp["image"], atol=1e-2)  # different aliasing


def test_slice_range_default_half_open_and_clipping(tmp_path):
    write_synthetic_dataset(tmp_path / "deep", n_volumes=1, n_slices=30, shape=(20, 19), recon_size=(16, 16))
    write_synthetic_dataset(tmp_path / "short", n_volumes=1, n_slices=20, shape=(20, 19), recon_size=(16, 16))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        deep = FastMRISliceDataset(tmp_path / "deep", crop_size=(16, 16))
    assert [s for _, s in deep.examples] == list(range(11, 27))  # half-open [11, 27)
    assert deep.clipped == {}
    with pytest.warns(UserWarning, match=r"clipped to \[11, 20\)"):
        short = FastMRISliceDataset(tmp_path / "short", crop_size=(16, 16))
    name = short.files[0].name
    assert short.clipped == {name: (11, 20)} and short.slice_ranges[name] == (11, 20)
    assert [s for _, s in short.examples] == list(range(11, 20))
    with pytest.raises(ValueError, match=rf"{name}.*outside the volume.*20 slices"):
        FastMRISliceDataset(tmp_path / "short", crop_size=(16, 16), slice_range=(25, 30))
    with pytest.raises(ValueError, match="start < stop"):
        FastMRISliceDataset(tmp_path / "short", crop_size=(16, 16), slice_range=(5, 5))


def test_masks_reproducible_per_volume(single):
    a, b = _dataset(single), _dataset(single)
    by_file = {}
    for i in range(len(a)):
        item = a[i]
        assert torch.equal(item["mask"], b[i]["mask"])  # same across dataset instances
        by_file.setdefault(item["fname"], []).append(item["mask"])
    masks = [ms[0] for ms in by_file.values()]
    for ms in by_file.values():
        assert all(torch.equal(m, ms[0]) for m in ms)  # one mask per volume
    assert not torch.equal(masks[0], masks[1])  # different volumes, different masks
    fresh = _dataset(single, use_seed=False)
    draws = [fresh[0]["mask"] for _ in range(5)]
    assert any(not torch.equal(d, draws[0]) for d in draws)


@pytest.mark.parametrize("acc,cf", [(4, 0.08), (8, 0.04)])
def test_equispaced_fraction_mask(acc, cf, tmp_path):
    write_synthetic_dataset(tmp_path, n_volumes=1, n_slices=1, shape=(24, 320), recon_size=(16, 320))
    ds = FastMRISliceDataset(tmp_path, slice_range=None, crop_size=(16, 320), mask_type="equispaced_fraction",
                             accelerations=(acc,), center_fractions=(cf,))
    item = ds[0]
    mask = item["mask"].flatten()
    assert abs(320 / mask.sum().item() - acc) < 0.5
    assert item["num_low_frequencies"] == round(320 * cf)
    ref, _ = EquispacedMaskFractionFunc([cf], [acc])((1, 16, 320, 2), seed=tuple(map(ord, item["fname"])))
    assert torch.equal(item["mask"], ref)
    lo = (320 - item["num_low_frequencies"] + 1) // 2
    assert mask[lo : lo + item["num_low_frequencies"]].all()


def test_magnitude_to_target_inverts_normalisation(single):
    batch = torch.utils.data.default_collate([_dataset(single)[i] for i in range(2)])
    mapped = magnitude_to_target(batch["target_complex"], batch["mean"], batch["std"])
    torch.testing.assert_close(mapped, batch["target"], rtol=1e-4, atol=1e-4)
    with pytest.raises(ValueError, match="permute"):
        magnitude_to_target(batch["target_complex"].permute(0, 3, 1, 2), batch["mean"], batch["std"])


def test_clamp(single):
    item = _dataset(single, clamp=0.5)[1]
    assert item["target"].max() == pytest.approx(0.5) and item["image"].min() >= -0.5
    free = _dataset(single, clamp=1e9)[1]
    inside = free["target"].abs() < 0.5
    torch.testing.assert_close(item["target"][inside], free["target"][inside])


# --- bad input -------------------------------------------------------------------------


def test_missing_paths(tmp_path):
    with pytest.raises(FileNotFoundError, match="nowhere"):
        FastMRISliceDataset(tmp_path / "nowhere")
    with pytest.raises(FileNotFoundError, match="gone.h5"):
        FastMRISliceDataset([tmp_path / "gone.h5"])
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="no .h5 files"):
        FastMRISliceDataset(tmp_path / "empty")


def _h5(path, **datasets):
    with h5py.File(path, "w") as f:
        for k, v in datasets.items():
            f.create_dataset(k, data=v)
    return path


def test_bad_files(tmp_path, multi):
    target = np.zeros((2, 16, 16), np.float32)
    no_k = _h5(tmp_path / "no_kspace.h5", reconstruction_esc=target)
    with pytest.raises(ValueError, match=r"no_kspace\.h5.*no 'kspace'"):
        FastMRISliceDataset(no_k, crop_size=(16, 16))
    real = _h5(tmp_path / "real.h5", kspace=np.zeros((2, 16, 16), np.float32), reconstruction_esc=target)
    with pytest.raises(ValueError, match=r"real\.h5.*complex.*float32"):
        FastMRISliceDataset(real, crop_size=(16, 16))
    flat = _h5(tmp_path / "flat.h5", kspace=np.zeros((16, 16), np.complex64), reconstruction_esc=target)
    with pytest.raises(ValueError, match=r"flat\.h5.*\(slices, H, W\)"):
        FastMRISliceDataset(flat, crop_size=(16, 16))
    mc_file = sorted(multi.glob("*.h5"))[0]
    with pytest.raises(ValueError, match=rf"{mc_file.name}.*singlecoil.*\(slices, H, W\)"):
        FastMRISliceDataset(mc_file, "singlecoil", crop_size=CROP)
    no_t = _h5(tmp_path / "no_target.h5", kspace=np.zeros((2, 16, 16), np.complex64))
    with pytest.raises(ValueError, match=r"no_target\.h5.*reconstruction_esc"):
        FastMRISliceDataset(no_t, crop_size=(16, 16))
    assert len(FastMRISliceDataset(no_t, crop_size=(16, 16), crop_mode="kspace", slice_range=None)) == 2
    small = _h5(tmp_path / "small.h5", kspace=np.zeros((2, 8, 8), np.complex64), reconstruction_esc=target)
    with pytest.raises(ValueError, match=r"small\.h5.*smaller than crop_size"):
        FastMRISliceDataset(small, crop_size=(16, 16))
    junk = tmp_path / "junk.h5"
    junk.write_bytes(b"not hdf5")
    with pytest.raises(ValueError, match=r"junk\.h5.*not a readable HDF5"):
        FastMRISliceDataset(junk)


@pytest.mark.parametrize(
    "kwargs,match",
    [
        ({"accelerations": (0.5,), "center_fractions": (0.08,)}, "acceleration must be a number >= 1"),
        ({"accelerations": (4,), "center_fractions": (1.0,)}, r"center fraction must be in \(0, 1\)"),
        ({"accelerations": (4,), "center_fractions": (0.3,)}, "must be < 1"),
        ({"accelerations": (4, 8), "center_fractions": (0.08,)}, "equal length"),
        ({"mask_type": "spiral"}, "unknown mask_type 'spiral'; valid: random, equispaced"),
        ({"mask_type": "equispaced", "accelerations": (2.5,), "center_fractions": (0.08,)}, "integer"),
    ],
)
def test_bad_mask_arguments(kwargs, match, single):
    with pytest.raises(ValueError, match=match):
        _dataset(single, **kwargs)
    mask_kwargs = {k: v for k, v in kwargs.items() if k in ("mask_type", "accelerations", "center_fractions")}
    with pytest.raises(ValueError, match=match):
        make_mask_func(**mask_kwargs)


def test_bad_options(single):
    with pytest.raises(ValueError, match="unknown challenge 'knee'"):
        FastMRISliceDataset(single, "knee")
    with pytest.raises(ValueError, match="unknown crop_mode 'both'"):
        _dataset(single, crop_mode="both")
