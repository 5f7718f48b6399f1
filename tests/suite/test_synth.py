"""Synthetic fastMRI volumes: format, fastMRI's own loader, targets, phantoms."""

import h5py
import numpy as np
import pytest

import fastmri
from fastmri.data import SliceDataset
from fastmri.data import transforms as T
from fastmri.data.subsample import RandomMaskFunc
from suite.data.synth import (
    make_coil_sensitivities,
    make_phantom_volume,
    synth_command,
    write_synthetic_dataset,
)

SHAPE, RECON = (40, 37), (32, 32)


@pytest.fixture(scope="module")
def single_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("single")
    write_synthetic_dataset(out, n_volumes=2, n_slices=3, shape=SHAPE, n_coils=0, recon_size=RECON, seed=0)
    return out


@pytest.fixture(scope="module")
def multi_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("multi")
    write_synthetic_dataset(
        out, n_volumes=2, n_slices=3, shape=SHAPE, n_coils=4, recon_size=RECON, seed=1, anatomy="brain"
    )
    return out


@pytest.mark.parametrize("which", ["single", "multi"])
def test_file_layout_matches_fastmri(which, single_dir, multi_dir):
    root = single_dir if which == "single" else multi_dir
    files = sorted(root.glob("*.h5"))
    assert len(files) == 2
    key = "reconstruction_esc" if which == "single" else "reconstruction_rss"
    kshape = (3, *SHAPE) if which == "single" else (3, 4, *SHAPE)
    for path in files:
        with h5py.File(path, "r") as f:
            assert f["kspace"].dtype == np.complex64 and f["kspace"].shape == kshape
            assert f[key].dtype == np.float32 and f[key].shape == (3, *RECON)
            assert set(f.keys()) == {"kspace", key, "ismrmrd_header"}
            assert set(f.attrs) == {"acquisition", "max", "norm", "patient_id"}
            target = f[key][()]
            assert np.isclose(f.attrs["max"], target.max())
            assert np.isclose(f.attrs["norm"], np.linalg.norm(target), rtol=1e-5)
            assert f.attrs["acquisition"] == ("CORPD_FBK" if which == "single" else "AXT2")
            assert len(f.attrs["patient_id"]) == 64


@pytest.mark.parametrize("challenge", ["singlecoil", "multicoil"])
def test_fastmri_slice_dataset_opens_files(challenge, single_dir, multi_dir):
    root = single_dir if challenge == "singlecoil" else multi_dir
    ds = SliceDataset(root=root, challenge=challenge)
    assert len(ds) == 6
    kspace, mask, target, attrs, fname, slice_num = ds[4]
    assert mask is None and fname.endswith(".h5") and slice_num == 1
    assert attrs["encoding_size"] == (*SHAPE, 1)
    assert attrs["recon_size"] == (*RECON, 1)
    assert attrs["padding_left"] == 0 and attrs["padding_right"] == SHAPE[1]
    # the target is the ESC / RSS of the centre-cropped inverse FFT, as in fastMRI
    image = T.complex_center_crop(fastmri.ifft2c(T.to_tensor(kspace)), RECON)
    expected = fastmri.complex_abs(image)
    if challenge == "multicoil":
        expected = fastmri.rss(expected, dim=0)
    np.testing.assert_allclose(target, expected.numpy(), rtol=1e-4, atol=1e-6 * target.max())


def test_fastmri_transforms_run_on_synthetic_files(multi_dir):
    mask_func = RandomMaskFunc([0.08], [4])
    varnet = SliceDataset(multi_dir, "multicoil", transform=T.VarNetDataTransform(mask_func))
    sample = varnet[0]
    assert sample.masked_kspace.shape == (4, *SHAPE, 2)
    assert sample.crop_size == RECON
    unet = SliceDataset(multi_dir, "multicoil", transform=T.UnetDataTransform("multicoil", mask_func))
    assert unet[0].image.shape == RECON and unet[0].target.shape == RECON


def test_reproducible_and_randomised(tmp_path):
    a = write_synthetic_dataset(tmp_path / "a", n_volumes=2, n_slices=2, shape=(24, 23), recon_size=(16, 16), seed=5)
    b = write_synthetic_dataset(tmp_path / "b", n_volumes=2, n_slices=2, shape=(24, 23), recon_size=(16, 16), seed=5)
    c = write_synthetic_dataset(tmp_path / "c", n_volumes=1, n_slices=2, shape=(24, 23), recon_size=(16, 16), seed=6)
    read = lambda p: h5py.File(p, "r")["kspace"][()]  # noqa: E731
    assert np.array_equal(read(a[0]), read(b[0]))
    assert not np.allclose(read(a[0]), read(a[1]))  # volumes differ
    assert not np.allclose(read(a[0]), read(c[0]))  # seeds differ


@pytest.mark.parametrize("anatomy", ["knee", "brain"])
def test_phantom_is_plausible(anatomy):
    rng = np.random.default_rng(0)
    shape, extent = (80, 64), (64, 64)
    vol = make_phantom_volume(rng, 5, shape, extent, anatomy)
    mag = np.abs(vol)
    assert vol.dtype == np.complex128 and np.isclose(mag.max(), 1.0)
    # object inside the recon region, empty background, several tissue levels
    top, left = (shape[0] - extent[0]) // 2, (shape[1] - extent[1]) // 2
    inside = mag[:, top : top + extent[0], left : left + extent[1]]
    assert (mag**2).sum() - (inside**2).sum() < 1e-3 * (mag**2).sum()
    centre = mag[2]
    assert 0.2 < (centre > 0.05).mean() < 0.8
    hist, _ = np.histogram(centre[centre > 0.05], bins=10, range=(0, 1))
    assert (hist > 0.02 * hist.sum()).sum() >= 3
    # slices vary smoothly: the neighbour of the middle slice is closer than the end slice
    d_near = np.abs(mag[2] - mag[3]).mean()
    d_far = np.abs(mag[2] - mag[4]).mean()
    assert 0 < d_near < d_far
    # smooth phase: small neighbouring phase differences inside the object
    phase_step = np.abs(np.angle(vol[2, 1:] * np.conj(vol[2, :-1])))[(mag[2, 1:] > 0.1) & (mag[2, :-1] > 0.1)]
    assert np.median(phase_step) < 0.1
    other = make_phantom_volume(np.random.default_rng(1), 5, shape, extent, anatomy)
    assert np.abs(np.abs(other) - mag).mean() > 0.01  # randomised per volume


def test_coil_sensitivities_are_smooth_and_cover_the_fov():
    maps = make_coil_sensitivities(np.random.default_rng(0), 8, (64, 64), (56, 56))
    mag = np.abs(maps)
    assert maps.shape == (8, 64, 64)
    rel_step = np.abs(np.diff(maps, axis=-1)).max() / mag.max()
    assert rel_step < 0.1
    sos = np.sqrt((mag**2).sum(0))[8:56, 8:56]
    assert sos.min() > 0.1 * sos.max()  # no hole in the field of view
    peaks = [np.unravel_index(np.argmax(m), m.shape) for m in mag]
    assert len(set(peaks)) == 8  # coils look at different regions


def test_synth_command_and_bad_arguments(tmp_path):
    msg = synth_command(tmp_path / "cli", volumes=1, slices=2, coils=3, size=(24, 22), seed=0)
    assert str((tmp_path / "cli").resolve()) in msg and "multi-coil" in msg
    assert len(list((tmp_path / "cli").glob("*.h5"))) == 1
    with pytest.raises(ValueError, match="recon_size"):
        write_synthetic_dataset(tmp_path, shape=(24, 22), recon_size=(32, 32))
    with pytest.raises(ValueError, match="n_volumes"):
        write_synthetic_dataset(tmp_path, n_volumes=0, shape=(24, 22))
    with pytest.raises(ValueError, match="anatomy"):
        write_synthetic_dataset(tmp_path, shape=(24, 22), anatomy="liver")
