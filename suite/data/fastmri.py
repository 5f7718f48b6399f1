"""fastMRI multi-slice dataset for physics-based reconstruction (DE-Prox and baselines).

Reads raw fastMRI HDF5 volumes (real or from :mod:`suite.data.synth`):
single-coil ``kspace (slices, H, W)`` with ``reconstruction_esc`` targets, or
multi-coil ``kspace (slices, coils, H, W)`` with ``reconstruction_rss``
targets, plus ``ismrmrd_header``.

Complex convention (the whole module): a complex tensor is a real tensor with a
trailing dimension of size 2 holding (real, imaginary) -- fastMRI's
convention, so ``fastmri.fft2c``/``ifft2c`` and ``fastmri.data.transforms``
apply directly. k-space always carries a coil dimension: ``(C, H, W, 2)`` per
slice with ``C = 1`` for single-coil data.

Per slice the dataset

1. selects slices ``slice_range = (start, stop)``, a HALF-OPEN range like
   Python's ``range`` (default ``(11, 27)``: slices 11..26, 16 per volume),
   clipped to each volume's depth; clipped volumes are reported with a
   ``UserWarning`` and recorded in :attr:`FastMRISliceDataset.clipped`;
2. crops to ``crop_size`` (default 320 x 320) either in image space
   (``crop_mode="image"``: inverse FFT, centre crop, FFT back -- the k-space of
   exactly the target's field of view, as the stored targets assume) or in
   k-space (``crop_mode="kspace"``: keep the central k-space block, i.e. the
   full field of view at lower resolution; the readout oversampling then
   folds into the image and the stored targets no longer match, so the target
   is recomputed from the cropped, fully sampled k-space);
3. undersamples the columns with a ``fastmri.data.subsample`` mask
   (``create_mask_for_mask_type``), reproducible per volume: the seed is
   derived from the file name (``tuple(map(ord, fname))``, as fastMRI does), so
   every slice of a volume shares one mask;
4. normalises by instance statistics of the zero-filled magnitude image (RSS
   over coils for multi-coil data): ``mean``, ``std`` as
   ``fastmri.data.transforms.normalize_instance``; magnitude images are served
   as ``clamp((m - mean) / std, -clamp, clamp)`` (fastMRI's U-Net transform), the
   k-space and the complex target are divided by ``std`` only, so the forward
   model stays linear (no shift, no clamp).

Each item is a dict (collates with the default ``DataLoader`` collate):

=====================  =====================  ==========================================
key                    shape                  meaning
=====================  =====================  ==========================================
``kspace``             ``(C, H, W, 2)``       undersampled k-space / ``std``
``mask``               ``(1, 1, W, 1)``       column mask (float 0/1)
``sens_maps``          ``(C, H, W, 2)``       multi-coil only: maps from the ACS
``image``              ``(H, W)``             zero-filled magnitude, instance-normalised, clamped
``target``             ``(H, W)``             target magnitude, instance-normalised, clamped
``target_complex``     ``(H, W, 2)``          complex ground truth / ``std`` (single-coil: the
                                              cropped image; multi-coil: SENSE-combined coils)
``mean``, ``std``      ``()``                 instance statistics (raw units)
``max_value``          ``()``                 volume maximum of the target (raw units)
``num_low_frequencies`` int                   ACS width of the mask
``fname``, ``slice_num`` str, int             file name and slice index
=====================  =====================  ==========================================

Models reconstruct ``x_hat ~ target_complex`` (the k-space scale); raw-unit
magnitudes are ``|x_hat| * std``, comparable to ``target * std + mean`` and to
``max_value`` for fastMRI-style PSNR. For single-coil data
``|target_complex| * std`` equals the stored ESC target (wherever the clamp did
not bite); for multi-coil data the SENSE-combined magnitude approximates the
stored RSS target (the maps come from the low-resolution ACS only).
"""

from __future__ import annotations

import os
import warnings
import xml.etree.ElementTree as etree
from pathlib import Path
from typing import Optional, Sequence, Union

import h5py
import numpy as np
import torch
from torch.utils.data import Dataset

import fastmri
from fastmri.data import transforms as T
from fastmri.data.subsample import MaskFunc, create_mask_for_mask_type

from suite.physics.mri import estimate_sensitivity_maps, sense_combine

__all__ = [
    "FastMRISliceDataset",
    "MASK_TYPES",
    "CHALLENGES",
    "CROP_MODES",
    "make_mask_func",
    "volume_seed",
    "kspace_center_crop",
    "magnitude_to_target",
]

MASK_TYPES = ("random", "equispaced", "equispaced_fraction", "magic", "magic_fraction")
CHALLENGES = ("singlecoil", "multicoil")
CROP_MODES = ("image", "kspace")
_TARGET_KEY = {"singlecoil": "reconstruction_esc", "multicoil": "reconstruction_rss"}
_KSPACE_NDIM = {"singlecoil": 3, "multicoil": 4}
_NORM_EPS = 1e-11  # as fastMRI's UnetDataTransform


def make_mask_func(
    mask_type: str = "random",
    accelerations: Sequence[int] = (4, 8),
    center_fractions: Sequence[float] = (0.08, 0.04),
) -> MaskFunc:
    """Validated ``fastmri.data.subsample.create_mask_for_mask_type``.

    Each call of the mask function picks one ``(center_fraction, acceleration)``
    pair uniformly (pairs are matched by position).

    Args:
        mask_type: One of :data:`MASK_TYPES`.
        accelerations: Undersampling factors, each ``>= 1`` (integers for the
            ``equispaced`` and ``magic`` types, which step by it).
        center_fractions: Fully sampled centre fractions, each in ``(0, 1)``, with
            ``center_fraction * acceleration < 1`` (else the centre alone exceeds
            the sampling budget).

    Raises:
        ValueError: a value is out of range, the lengths differ, or the type is unknown.
    """
    if mask_type not in MASK_TYPES:
        raise ValueError(f"unknown mask_type {mask_type!r}; valid: {', '.join(MASK_TYPES)}")
    accelerations, center_fractions = list(accelerations), list(center_fractions)
    if not accelerations or len(accelerations) != len(center_fractions):
        raise ValueError(
            f"accelerations {accelerations} and center_fractions {center_fractions} "
            "must be non-empty and of equal length (they are paired)"
        )
    for acc, cf in zip(accelerations, center_fractions):
        if isinstance(acc, bool) or not isinstance(acc, (int, float)) or not acc >= 1:
            raise ValueError(f"acceleration must be a number >= 1, got {acc!r}")
        if mask_type in ("equispaced", "magic") and float(acc) != int(acc):
            raise ValueError(f"mask_type {mask_type!r} needs integer accelerations, got {acc!r}")
        if isinstance(cf, bool) or not isinstance(cf, (int, float)) or not 0 < cf < 1:
            raise ValueError(f"center fraction must be in (0, 1), got {cf!r}")
        if cf * acc >= 1:
            raise ValueError(
                f"center fraction {cf} x acceleration {acc} must be < 1: the fully sampled "
                "centre alone would exceed 1/acceleration of the columns"
            )
    if mask_type in ("equispaced", "magic"):
        accelerations = [int(a) for a in accelerations]
    return create_mask_for_mask_type(mask_type, center_fractions, accelerations)


def volume_seed(fname: str) -> tuple[int, ...]:
    """Mask seed of a volume, fastMRI's ``tuple(map(ord, fname))`` (file name only)."""
    return tuple(map(ord, fname))


def kspace_center_crop(kspace: torch.Tensor, size: Sequence[int]) -> torch.Tensor:
    """Central k-space block that keeps the zero frequency at index ``(h // 2, w // 2)``.

    Args:
        kspace: ``(..., H, W, 2)``, centred (zero frequency at ``(H // 2, W // 2)``).
        size: ``(h, w)`` with ``h <= H`` and ``w <= W``.

    Returns:
        ``(..., h, w, 2)``.
    """
    height, width = kspace.shape[-3], kspace.shape[-2]
    h, w = int(size[0]), int(size[1])
    if not (0 < h <= height and 0 < w <= width):
        raise ValueError(f"crop {(h, w)} does not fit k-space of size {(height, width)}")
    top, left = height // 2 - h // 2, width // 2 - w // 2
    return kspace[..., top : top + h, left : left + w, :]


def magnitude_to_target(
    x_hat: torch.Tensor,
    mean: torch.Tensor,
    std: torch.Tensor,
    clamp: Optional[float] = 6.0,
) -> torch.Tensor:
    """Maps a reconstruction in the k-space scale to the space of the served ``target``.

    ``|x_hat| * std`` is in raw units; instance normalisation then gives
    ``(|x_hat| * std - mean) / std = |x_hat| - mean / std``, clamped like the target.

    Args:
        x_hat: ``(B, H, W, 2)`` complex (this module's convention) or ``(B, H, W)`` magnitude.
        mean: ``(B,)`` served means.
        std: ``(B,)`` served stds.
        clamp: Clamp bound, or ``None`` for none.

    Returns:
        ``(B, H, W)``.
    """
    if x_hat.ndim == 4 and x_hat.shape[-1] == 2:
        mag = fastmri.complex_abs(x_hat)
    elif x_hat.ndim == 3:
        mag = x_hat
    else:
        raise ValueError(
            f"x_hat must be complex (B, H, W, 2) or a magnitude (B, H, W), got shape {tuple(x_hat.shape)}; "
            "convert a (B, 2, H, W) model output with x.permute(0, 2, 3, 1)"
        )
    out = mag - (mean / (std + _NORM_EPS)).view(-1, 1, 1)
    return out.clamp(-clamp, clamp) if clamp is not None else out


def _list_files(root: Union[str, Path, Sequence[Union[str, Path]]]) -> list[Path]:
    """HDF5 files of a directory (``*.h5``, sorted), one file, or a list of files."""
    if isinstance(root, (str, os.PathLike)):
        path = Path(root)
        if not path.exists():
            raise FileNotFoundError(f"fastMRI data path {str(path)!r} does not exist")
        if path.is_dir():
            files = sorted(p for p in path.iterdir() if p.suffix == ".h5")
            if not files:
                raise ValueError(f"no .h5 files in directory {str(path)!r}")
            return files
        return [path]
    files = [Path(p) for p in root]
    if not files:
        raise ValueError("no fastMRI files given (empty list)")
    for p in files:
        if not p.is_file():
            raise FileNotFoundError(f"fastMRI file {str(p)!r} does not exist")
    return files


def _header_recon_size(hf: h5py.File) -> Optional[tuple[int, int]]:
    """``reconSpace/matrixSize`` (x, y) from the ISMRMRD header, or ``None`` if absent."""
    if "ismrmrd_header" not in hf:
        return None
    try:
        root = etree.fromstring(hf["ismrmrd_header"][()])
        ns = {"i": "http://www.ismrm.org/ISMRMRD"}
        x = root.find(".//i:encoding//i:reconSpace//i:matrixSize//i:x", ns)
        y = root.find(".//i:encoding//i:reconSpace//i:matrixSize//i:y", ns)
        return (int(x.text), int(y.text)) if x is not None and y is not None else None
    except (etree.ParseError, TypeError, ValueError):
        return None


def _check_finite(path: Path, slice_num: int, kspace: np.ndarray, target: Optional[np.ndarray],
                  max_value: Optional[float], target_key: str) -> None:
    """Refuses a slice whose k-space or target is not finite (NaN/inf would train on garbage), or a bad ``max``."""
    if not np.isfinite(kspace).all():
        raise ValueError(f"{path}: slice {slice_num}: 'kspace' holds non-finite values (NaN or inf)")
    if target is not None and (target.dtype.kind not in "fiu" or not np.isfinite(target).all()):
        raise ValueError(f"{path}: slice {slice_num}: '{target_key}' must hold finite real numbers "
                         f"(dtype {target.dtype})")
    if max_value is not None and not (np.isfinite(max_value) and max_value > 0):
        raise ValueError(f"{path}: attribute 'max' must be a finite number > 0, got {max_value!r}")


class FastMRISliceDataset(Dataset):
    """Multi-slice fastMRI dataset serving undersampled k-space, mask and targets.

    Args:
        root: A directory of ``.h5`` volumes, one volume, or a list of volumes.
        challenge: ``"singlecoil"`` or ``"multicoil"``.
        slice_range: Half-open ``(start, stop)`` slice range per volume, clipped to
            each volume's depth; ``None`` for all slices. Default ``(11, 27)``.
        crop_size: ``(h, w)`` reconstruction size; default ``(320, 320)``.
        crop_mode: ``"image"`` (default) or ``"kspace"``; see the module docstring.
        mask_type: One of :data:`MASK_TYPES`; default ``"random"``.
        accelerations: Default ``(4, 8)``.
        center_fractions: Default ``(0.08, 0.04)`` (paired with ``accelerations``).
        use_seed: Seed each volume's mask from its file name (reproducible);
            ``False`` draws a fresh mask per item.
        clamp: Clamp bound of the instance-normalised magnitudes (default 6).
        sens_threshold: Background threshold of :func:`estimate_sensitivity_maps`.

    Attributes:
        files: The volumes, in order.
        examples: ``(path, slice)`` pairs, in order.
        slice_ranges: File name -> effective half-open slice range.
        clipped: File name -> effective range, for volumes whose range was clipped.

    Raises:
        FileNotFoundError: ``root`` or a listed file does not exist.
        ValueError: a file is not HDF5, lacks ``kspace`` (or its target in image
            crop mode), has a non-complex ``kspace`` or one whose number of
            dimensions does not match ``challenge``, is smaller than
            ``crop_size``, or has no slice in ``slice_range``; or an argument is
            out of range. Messages name the file.
    """

    def __init__(
        self,
        root: Union[str, Path, Sequence[Union[str, Path]]],
        challenge: str = "singlecoil",
        slice_range: Optional[Sequence[int]] = (11, 27),
        crop_size: Sequence[int] = (320, 320),
        crop_mode: str = "image",
        mask_type: str = "random",
        accelerations: Sequence[int] = (4, 8),
        center_fractions: Sequence[float] = (0.08, 0.04),
        use_seed: bool = True,
        clamp: float = 6.0,
        sens_threshold: float = 0.05,
    ) -> None:
        if challenge not in CHALLENGES:
            raise ValueError(f"unknown challenge {challenge!r}; valid: {', '.join(CHALLENGES)}")
        if crop_mode not in CROP_MODES:
            raise ValueError(f"unknown crop_mode {crop_mode!r}; valid: {', '.join(CROP_MODES)}")
        if len(crop_size) != 2 or any(int(c) != c or c < 1 for c in crop_size):
            raise ValueError(f"crop_size must be two positive integers (h, w), got {crop_size!r}")
        if slice_range is not None:
            if len(slice_range) != 2 or any(int(s) != s for s in slice_range):
                raise ValueError(f"slice_range must be (start, stop) integers or None, got {slice_range!r}")
            if not 0 <= slice_range[0] < slice_range[1]:
                raise ValueError(
                    f"slice_range {tuple(slice_range)} must satisfy 0 <= start < stop (half-open)"
                )
        if not clamp > 0:
            raise ValueError(f"clamp must be > 0, got {clamp!r}")
        self.challenge = challenge
        self.crop_size = (int(crop_size[0]), int(crop_size[1]))
        self.crop_mode = crop_mode
        self.mask_func = make_mask_func(mask_type, accelerations, center_fractions)
        self.use_seed = use_seed
        self.clamp = float(clamp)
        self.sens_threshold = float(sens_threshold)
        self.slice_range = None if slice_range is None else (int(slice_range[0]), int(slice_range[1]))
        self.target_key = _TARGET_KEY[challenge]

        self.files = _list_files(root)
        self.examples: list[tuple[Path, int]] = []
        self.slice_ranges: dict[str, tuple[int, int]] = {}
        self.clipped: dict[str, tuple[int, int]] = {}
        for path in self.files:
            depth = self._validate_file(path)
            start, stop = (0, depth) if self.slice_range is None else self.slice_range
            if start >= depth:
                raise ValueError(
                    f"{path}: slice range [{start}, {stop}) lies outside the volume, "
                    f"which has {depth} slices (valid indices 0..{depth - 1})"
                )
            if stop > depth:
                warnings.warn(
                    f"{path.name}: slice range [{start}, {stop}) clipped to [{start}, {depth}) "
                    f"(volume has {depth} slices)",
                    UserWarning,
                    stacklevel=2,
                )
                stop = depth
                self.clipped[path.name] = (start, stop)
            self.slice_ranges[path.name] = (start, stop)
            self.examples.extend((path, s) for s in range(start, stop))

    def _validate_file(self, path: Path) -> int:
        """Checks one volume and returns its number of slices."""
        if not path.is_file():
            raise FileNotFoundError(f"fastMRI file {str(path)!r} does not exist")
        try:
            hf = h5py.File(path, "r")
        except OSError as err:
            raise ValueError(f"{path}: not a readable HDF5 file ({err})") from None
        with hf:
            if "kspace" not in hf:
                raise ValueError(f"{path}: no 'kspace' dataset (found: {sorted(hf.keys())})")
            kspace = hf["kspace"]
            if kspace.dtype.kind != "c":
                raise ValueError(f"{path}: 'kspace' must be complex (fastMRI: complex64), got dtype {kspace.dtype}")
            want = _KSPACE_NDIM[self.challenge]
            if kspace.ndim != want:
                layout = "(slices, H, W)" if want == 3 else "(slices, coils, H, W)"
                raise ValueError(
                    f"{path}: {self.challenge} 'kspace' must be {layout}, got shape {kspace.shape}"
                )
            height, width = kspace.shape[-2:]
            if self.crop_size[0] > height or self.crop_size[1] > width:
                raise ValueError(f"{path}: k-space {height}x{width} is smaller than crop_size {self.crop_size}")
            if self.crop_mode == "image":
                if self.target_key not in hf:
                    raise ValueError(
                        f"{path}: no '{self.target_key}' target for {self.challenge} data "
                        f"(found: {sorted(hf.keys())}); crop_mode='kspace' recomputes targets"
                    )
                target = hf[self.target_key]
                if target.ndim != 3 or target.shape[0] != kspace.shape[0]:
                    raise ValueError(
                        f"{path}: '{self.target_key}' must be (slices, h, w) with {kspace.shape[0]} "
                        f"slices, got shape {target.shape}"
                    )
                if self.crop_size[0] > target.shape[1] or self.crop_size[1] > target.shape[2]:
                    raise ValueError(
                        f"{path}: target {target.shape[1]}x{target.shape[2]} is smaller than crop_size {self.crop_size}"
                    )
            return int(kspace.shape[0])

    def __len__(self) -> int:
        return len(self.examples)

    def __getitem__(self, index: int) -> dict:
        path, slice_num = self.examples[index]
        try:
            with h5py.File(path, "r") as hf:
                kspace_np = hf["kspace"][slice_num]
                target_np = hf[self.target_key][slice_num] if self.crop_mode == "image" else None
                max_value = float(hf.attrs["max"]) if "max" in hf.attrs and self.crop_mode == "image" else None
        except (OSError, TypeError, ValueError) as err:  # truncated data, an attribute that is not a number
            raise ValueError(f"{path}: slice {slice_num} cannot be read ({type(err).__name__}: "
                             f"{str(err).splitlines()[0] if str(err) else ''})") from None
        _check_finite(path, slice_num, kspace_np, target_np, max_value, self.target_key)
        kspace = T.to_tensor(kspace_np.astype(np.complex64))  # (H, W, 2) or (C, H, W, 2)
        if kspace.ndim == 3:
            kspace = kspace.unsqueeze(0)
        return self.transform(kspace, target_np, max_value, path.name, slice_num)

    def transform(
        self,
        kspace: torch.Tensor,
        target_np: Optional[np.ndarray],
        max_value: Optional[float],
        fname: str,
        slice_num: int,
    ) -> dict:
        """Crop, undersample and normalise one slice.

        Args:
            kspace: Fully sampled ``(C, H, W, 2)`` float32.
            target_np: Stored target ``(h, w)`` (image crop mode) or ``None``.
            max_value: Volume maximum of the target, or ``None`` to use the slice's.
            fname: File name (seeds the mask).
            slice_num: Slice index.

        Returns:
            The item dict described in the module docstring.
        """
        if self.crop_mode == "image":
            full_image = T.complex_center_crop(fastmri.ifft2c(kspace), self.crop_size)
            kspace = fastmri.fft2c(full_image)
        else:
            kspace = kspace_center_crop(kspace, self.crop_size)
            full_image = fastmri.ifft2c(kspace)  # (C, h, w, 2)

        seed = volume_seed(fname) if self.use_seed else None
        masked, mask, num_low = T.apply_mask(kspace, self.mask_func, seed=seed)

        zero_filled = fastmri.ifft2c(masked)
        zf_mag = fastmri.rss_complex(zero_filled, dim=0)  # |x| for C = 1
        _, mean, std = T.normalize_instance(zf_mag, eps=_NORM_EPS)
        scale = std + _NORM_EPS

        if target_np is not None:
            target = T.center_crop(torch.from_numpy(np.asarray(target_np, dtype=np.float32)), self.crop_size)
        else:
            target = fastmri.rss_complex(full_image, dim=0)
        if max_value is None:
            max_value = float(target.max())

        item = {}
        if self.challenge == "multicoil":
            sens_maps = estimate_sensitivity_maps(masked, mask=mask, threshold=self.sens_threshold)
            target_complex = sense_combine(full_image, sens_maps)
            item["sens_maps"] = sens_maps
        else:
            target_complex = full_image[0]
        item.update(
            kspace=masked / scale,
            mask=mask,
            image=T.normalize(zf_mag, mean, std, _NORM_EPS).clamp(-self.clamp, self.clamp),
            target=T.normalize(target, mean, std, _NORM_EPS).clamp(-self.clamp, self.clamp),
            target_complex=target_complex / scale,
            mean=mean,
            std=std,
            max_value=torch.tensor(max_value, dtype=torch.float32),
            num_low_frequencies=int(num_low),
            fname=fname,
            slice_num=int(slice_num),
        )
        return item
