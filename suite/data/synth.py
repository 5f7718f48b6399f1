"""Synthetic fastMRI-format volumes for tests, demos and smoke sweeps.

Each file mimics a raw fastMRI HDF5 volume closely enough that
``fastmri.data.SliceDataset`` opens it unchanged:

- ``kspace``: complex64, ``(slices, H, W)`` single-coil or ``(slices, C, H, W)``
  multi-coil, fully sampled, centred (fastMRI's ``fft2c`` convention, ``"ortho"``).
- ``reconstruction_esc`` (single-coil) or ``reconstruction_rss`` (multi-coil):
  float32 ``(slices, h, w)`` with ``(h, w) = recon_size`` (320 x 320 by default):
  the magnitude (ESC) or root-sum-of-squares (RSS) of the centre crop of the
  inverse FFT of ``kspace`` -- exactly how fastMRI defines its targets.
- ``ismrmrd_header``: ISMRMRD XML with ``encodedSpace``/``reconSpace`` matrix
  sizes and ``encodingLimits/kspace_encoding_step_1`` centre/maximum.
- attributes ``acquisition``, ``max``, ``norm``, ``patient_id``.

Complex convention: numpy complex arrays (``complex64`` on disk), as in the raw
fastMRI files. Image rows are the readout direction (``H``), columns the phase
encodes (``W``), so masks from ``fastmri.data.subsample`` act on columns.

Phantoms are knee- or brain-like: nested soft-edged ellipses (an ellipsoid
sliced at ``n_slices`` positions, so cross-sections shrink towards the ends of
the volume) with smooth 3-D texture and a smooth background phase; shapes,
positions, rotation, texture and coils are randomised per volume. The object
fits inside the centre ``recon_size`` region, like a knee in fastMRI's 2x
readout-oversampled field of view. Multi-coil sensitivities are smooth Gaussian
profiles of coils placed around the field of view (birdcage-like) with smooth
phase.
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional, Sequence, Union

import h5py
import numpy as np
from scipy.ndimage import gaussian_filter

__all__ = [
    "write_synthetic_dataset",
    "synth_command",
    "make_phantom_volume",
    "make_coil_sensitivities",
    "ismrmrd_header",
    "ANATOMIES",
]

ANATOMIES = ("knee", "brain")
_DEFAULT_ACQUISITION = {"knee": "CORPD_FBK", "brain": "AXT2"}
_ISMRMRD_NS = "http://www.ismrm.org/ISMRMRD"


def fft2c(image: np.ndarray) -> np.ndarray:
    """Centred orthonormal 2-D FFT over the last two axes (numpy twin of fastMRI's ``fft2c``)."""
    axes = (-2, -1)
    return np.fft.fftshift(np.fft.fft2(np.fft.ifftshift(image, axes=axes), norm="ortho"), axes=axes)


def ifft2c(kspace: np.ndarray) -> np.ndarray:
    """Centred orthonormal 2-D inverse FFT over the last two axes."""
    axes = (-2, -1)
    return np.fft.fftshift(np.fft.ifft2(np.fft.ifftshift(kspace, axes=axes), norm="ortho"), axes=axes)


def center_crop(data: np.ndarray, size: Sequence[int]) -> np.ndarray:
    """Centre crop of the last two axes, with fastMRI's ``center_crop`` offsets."""
    h, w = data.shape[-2:]
    top, left = (h - size[0]) // 2, (w - size[1]) // 2
    return data[..., top : top + size[0], left : left + size[1]]


def _grid(shape: Sequence[int], extent: Sequence[int]) -> tuple[np.ndarray, np.ndarray]:
    """Pixel coordinates ``(Y, X)`` of an ``(H, W)`` grid, each ``(H, W)``.

    Units: the centre ``extent`` region spans ``[-1, 1]`` along each axis; the
    origin is pixel ``(H // 2, W // 2)`` (the centred-FFT origin).
    """
    h, w = shape
    yy = (np.arange(h) - h // 2) / (extent[0] / 2.0)
    xx = (np.arange(w) - w // 2) / (extent[1] / 2.0)
    return np.meshgrid(yy, xx, indexing="ij")


def _soft_ellipse(
    yy: np.ndarray,
    xx: np.ndarray,
    centre: Sequence[float],
    axes: Sequence[float],
    angle: float,
    edge: float,
) -> np.ndarray:
    """Soft indicator of an ellipse in ``[0, 1]``, shape of ``yy``.

    Args:
        yy, xx: ``(H, W)`` coordinates from :func:`_grid`.
        centre: ``(cy, cx)``.
        axes: Semi-axes ``(ay, ax)``; non-positive axes give an empty ellipse.
        angle: Rotation in radians.
        edge: Edge width in grid units (a logistic ramp).
    """
    if min(axes) <= 0:
        return np.zeros_like(yy)
    c, s = np.cos(angle), np.sin(angle)
    dy, dx = yy - centre[0], xx - centre[1]
    u, v = c * dy + s * dx, -s * dy + c * dx
    r = np.sqrt((u / axes[0]) ** 2 + (v / axes[1]) ** 2)
    dist = (1.0 - r) * min(axes)  # approximate signed distance to the boundary
    return 1.0 / (1.0 + np.exp(-np.clip(dist / edge, -50, 50)))


def _texture(rng: np.random.Generator, shape: Sequence[int], sigma_px: float) -> np.ndarray:
    """Smooth zero-mean, unit-std 3-D random field ``(S, H, W)`` (varies smoothly across slices)."""
    field = gaussian_filter(rng.standard_normal(shape), sigma=(1.0, sigma_px, sigma_px), mode="wrap")
    return (field - field.mean()) / (field.std() + 1e-12)


def _knee_slice(yy, xx, z, p, tex, edge) -> np.ndarray:
    """One knee-like magnitude slice ``(H, W)``: fat/muscle, femur, tibia, cartilage, patella."""
    scale = np.sqrt(max(1.0 - (z / 1.15) ** 2, 0.05))
    rot = p["angle"]
    cy, cx = p["centre"]
    img = np.zeros_like(yy)
    outer = _soft_ellipse(yy, xx, (cy, cx), (0.92 * scale, p["width"] * scale), rot, edge)
    muscle = _soft_ellipse(yy, xx, (cy, cx), (0.86 * scale, (p["width"] - 0.08) * scale), rot, edge)
    img += 0.9 * (outer - muscle)  # subcutaneous fat
    img += (0.38 + 0.06 * tex) * muscle
    gap = p["gap"]
    bone_w = p["bone_w"] * scale
    for sign, length in ((-1, p["femur"]), (1, p["tibia"])):
        by = cy + sign * (gap + length / 2)
        bone = _soft_ellipse(yy, xx, (by, cx), (length / 2, bone_w), rot, edge)
        marrow = _soft_ellipse(yy, xx, (by, cx), (length / 2 - 0.03, bone_w - 0.03), rot, edge)
        cart = _soft_ellipse(yy, xx, (by - sign * (length / 2 - 0.01), cx), (0.05, bone_w * 0.9), rot, edge)
        img = img * (1 - bone) + 0.08 * bone  # dark cortical bone
        img = img * (1 - marrow) + (0.75 + 0.08 * tex) * marrow
        img = img * (1 - cart * muscle) + 0.55 * cart * muscle
    patella = _soft_ellipse(
        yy, xx, (cy - 0.05, cx + p["width"] * scale * 0.72), (0.16 * scale, 0.06 * scale), rot, edge
    )
    img = img * (1 - patella) + (0.7 + 0.05 * tex) * patella
    return np.clip(img, 0.0, None)


def _brain_slice(yy, xx, z, p, tex, edge) -> np.ndarray:
    """One brain-like magnitude slice ``(H, W)``: scalp, skull, CSF, grey/white matter, ventricles."""
    scale = np.sqrt(max(1.0 - (z / 1.1) ** 2, 0.05))
    rot = p["angle"]
    cy, cx = p["centre"]
    ay, ax = 0.9 * scale, p["width"] * scale
    head = _soft_ellipse(yy, xx, (cy, cx), (ay, ax), rot, edge)
    skull = _soft_ellipse(yy, xx, (cy, cx), (ay - 0.05, ax - 0.05), rot, edge)
    csf = _soft_ellipse(yy, xx, (cy, cx), (ay - 0.1, ax - 0.1), rot, edge)
    grey = _soft_ellipse(yy, xx, (cy, cx), (ay - 0.13, ax - 0.13), rot, edge)
    white = _soft_ellipse(yy, xx, (cy, cx), (0.7 * (ay - 0.13), 0.7 * (ax - 0.13)), rot, edge)
    img = 0.8 * (head - skull) + 0.05 * (skull - csf) + 0.95 * (csf - grey)
    img += (0.6 + 0.07 * tex) * (grey - white) + (0.42 + 0.05 * tex) * white
    vscale = max(1.0 - (z / 0.6) ** 2, 0.0)
    for sign in (-1, 1):
        vent = _soft_ellipse(
            yy, xx, (cy - 0.05, cx + sign * 0.09), (0.22 * vscale, 0.05 * vscale), rot + sign * 0.25, edge
        )
        img = img * (1 - vent) + 0.95 * vent
    for lesion in p["lesions"]:
        blob = _soft_ellipse(yy, xx, lesion["centre"], (lesion["r"] * scale,) * 2, 0.0, edge)
        img = img * (1 - blob * white) + lesion["value"] * blob * white
    return np.clip(img, 0.0, None)


def make_phantom_volume(
    rng: np.random.Generator,
    n_slices: int,
    shape: Sequence[int],
    extent: Sequence[int],
    anatomy: str = "knee",
) -> np.ndarray:
    """Complex phantom volume ``(n_slices, H, W)`` complex128 with peak magnitude 1.

    Args:
        rng: Source of the per-volume randomness (shape, pose, texture, phase).
        n_slices: Number of slices.
        shape: Image grid ``(H, W)``.
        extent: ``(h, w)`` centre region the object must fit into (the recon size).
        anatomy: ``"knee"`` or ``"brain"``.
    """
    if anatomy not in ANATOMIES:
        raise ValueError(f"unknown anatomy {anatomy!r}; valid: {', '.join(ANATOMIES)}")
    yy, xx = _grid(shape, extent)
    edge = 1.2 / (min(extent) / 2.0)  # about one pixel
    tex_sigma = max(min(extent) / 40.0, 1.0)
    tex = _texture(rng, (n_slices, *shape), tex_sigma)
    if anatomy == "knee":
        params = {
            "angle": rng.uniform(-0.15, 0.15),
            "centre": rng.uniform(-0.05, 0.05, size=2),
            "width": rng.uniform(0.55, 0.75),
            "gap": rng.uniform(0.03, 0.06),
            "femur": rng.uniform(0.6, 0.8),
            "tibia": rng.uniform(0.5, 0.7),
            "bone_w": rng.uniform(0.3, 0.42),
        }
        slice_fn = _knee_slice
    else:
        n_lesions = int(rng.integers(0, 4))
        params = {
            "angle": rng.uniform(-0.2, 0.2),
            "centre": rng.uniform(-0.04, 0.04, size=2),
            "width": rng.uniform(0.7, 0.82),
            "lesions": [
                {
                    "centre": rng.uniform(-0.35, 0.35, size=2),
                    "r": rng.uniform(0.03, 0.07),
                    "value": rng.uniform(0.2, 0.9),
                }
                for _ in range(n_lesions)
            ],
        }
        slice_fn = _brain_slice
    zs = np.linspace(-0.75, 0.75, n_slices) if n_slices > 1 else np.zeros(1)
    phase_coef = rng.uniform(-1.0, 1.0, size=5) * np.array([np.pi, 0.6, 0.6, 0.3, 0.3])
    volume = np.empty((n_slices, *shape), dtype=np.complex128)
    for s, z in enumerate(zs):
        mag = slice_fn(yy, xx, z, params, tex[s], edge)
        phase = (
            phase_coef[0]
            + phase_coef[1] * yy
            + phase_coef[2] * xx
            + phase_coef[3] * yy * xx
            + phase_coef[4] * (yy**2 + xx**2)
            + 0.2 * z
        )
        volume[s] = mag * np.exp(1j * phase)
    peak = np.abs(volume).max()
    return volume / (peak if peak > 0 else 1.0)


def make_coil_sensitivities(
    rng: np.random.Generator,
    n_coils: int,
    shape: Sequence[int],
    extent: Sequence[int],
) -> np.ndarray:
    """Smooth birdcage-like coil sensitivities ``(n_coils, H, W)`` complex128.

    Coil ``c`` sits at angle ``2 pi c / n_coils`` (plus jitter) on a circle just
    outside the object; its magnitude is a broad Gaussian around that position
    and its phase a smooth ramp that depends on the coil angle.

    Args:
        rng: Per-volume randomness.
        n_coils: Number of coils (>= 1).
        shape: Image grid ``(H, W)``.
        extent: Centre region ``(h, w)`` (the object's region).
    """
    yy, xx = _grid(shape, extent)
    radius = rng.uniform(1.1, 1.4)
    width = rng.uniform(0.7, 1.0)
    offset = rng.uniform(0, 2 * np.pi)
    maps = np.empty((n_coils, *shape), dtype=np.complex128)
    for c in range(n_coils):
        theta = offset + 2 * np.pi * c / n_coils + rng.uniform(-0.1, 0.1)
        py, px = radius * np.sin(theta), radius * np.cos(theta)
        mag = np.exp(-((yy - py) ** 2 + (xx - px) ** 2) / (2 * width**2))
        phase = theta + 0.5 * (np.cos(theta) * yy - np.sin(theta) * xx)
        maps[c] = mag * np.exp(1j * phase)
    return maps


def ismrmrd_header(
    encoded_size: Sequence[int],
    recon_size: Sequence[int],
    n_coils: int = 1,
    protocol: str = "CORPD_FBK",
) -> bytes:
    """Minimal ISMRMRD XML header as written in fastMRI's raw files.

    Args:
        encoded_size: ``(H, W)`` of the k-space (readout, phase encodes).
        recon_size: ``(h, w)`` of the reconstruction.
        n_coils: Receiver channels.
        protocol: Protocol name (fastMRI's ``acquisition`` attribute).

    Returns:
        UTF-8 XML. ``encodingLimits/kspace_encoding_step_1`` spans all ``W`` phase
        encodes with centre ``W // 2``, so fastMRI's ``padding_left`` is 0 and
        ``padding_right`` is ``W``.
    """
    h, w = int(encoded_size[0]), int(encoded_size[1])
    rh, rw = int(recon_size[0]), int(recon_size[1])
    return f"""<?xml version="1.0" encoding="utf-8"?>
<ismrmrdHeader xmlns="{_ISMRMRD_NS}" xmlns:xsi="http://www.w3.org/2001/XMLSchema-instance">
  <measurementInformation>
    <protocolName>{protocol}</protocolName>
    <patientPosition>HFS</patientPosition>
  </measurementInformation>
  <acquisitionSystemInformation>
    <systemVendor>deqbench-synthetic</systemVendor>
    <receiverChannels>{int(n_coils)}</receiverChannels>
  </acquisitionSystemInformation>
  <experimentalConditions>
    <H1resonanceFrequency_Hz>127744000</H1resonanceFrequency_Hz>
  </experimentalConditions>
  <encoding>
    <encodedSpace>
      <matrixSize><x>{h}</x><y>{w}</y><z>1</z></matrixSize>
      <fieldOfView_mm><x>{h * 0.5:.1f}</x><y>{w * 0.5:.1f}</y><z>3.0</z></fieldOfView_mm>
    </encodedSpace>
    <reconSpace>
      <matrixSize><x>{rh}</x><y>{rw}</y><z>1</z></matrixSize>
      <fieldOfView_mm><x>{rh * 0.5:.1f}</x><y>{rw * 0.5:.1f}</y><z>3.0</z></fieldOfView_mm>
    </reconSpace>
    <trajectory>cartesian</trajectory>
    <encodingLimits>
      <kspace_encoding_step_1><minimum>0</minimum><maximum>{w - 1}</maximum><center>{w // 2}</center></kspace_encoding_step_1>
      <kspace_encoding_step_2><minimum>0</minimum><maximum>0</maximum><center>0</center></kspace_encoding_step_2>
      <slice><minimum>0</minimum><maximum>0</maximum><center>0</center></slice>
      <average><minimum>0</minimum><maximum>0</maximum><center>0</center></average>
      <contrast><minimum>0</minimum><maximum>0</maximum><center>0</center></contrast>
      <phase><minimum>0</minimum><maximum>0</maximum><center>0</center></phase>
      <repetition><minimum>0</minimum><maximum>0</maximum><center>0</center></repetition>
      <set><minimum>0</minimum><maximum>0</maximum><center>0</center></set>
      <segment><minimum>0</minimum><maximum>0</maximum><center>0</center></segment>
    </encodingLimits>
  </encoding>
</ismrmrdHeader>
""".encode("utf-8")


def _check_positive_int(name: str, value: object, minimum: int = 1) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")
    return int(value)


def write_synthetic_dataset(
    out_dir: Union[str, Path],
    n_volumes: int = 4,
    n_slices: int = 16,
    shape: Sequence[int] = (640, 368),
    n_coils: int = 0,
    seed: int = 0,
    recon_size: Optional[Sequence[int]] = None,
    anatomy: str = "knee",
    acquisition: Optional[str] = None,
    noise_level: float = 0.01,
    intensity: float = 1e-4,
) -> list[Path]:
    """Writes ``n_volumes`` fastMRI-format HDF5 volumes into ``out_dir``.

    Args:
        out_dir: Directory (created if missing). Files are named
            ``synth_s{seed}_v{k:03d}.h5``; existing files with these names are replaced.
        n_volumes: Number of volumes.
        n_slices: Slices per volume.
        shape: k-space / full image size ``(H, W)`` (fastMRI knee: ``(640, 368)``).
        n_coils: ``0`` or ``1`` -> single-coil (``kspace (S, H, W)``,
            ``reconstruction_esc``); ``>= 2`` -> multi-coil (``kspace (S, C, H, W)``,
            ``reconstruction_rss``).
        seed: Seeds everything; the same arguments give byte-identical arrays.
        recon_size: Target size ``(h, w)``; default ``(min(320, H), min(320, W))``.
        anatomy: ``"knee"`` or ``"brain"``.
        acquisition: The ``acquisition`` attribute; default ``CORPD_FBK`` (knee) or
            ``AXT2`` (brain).
        noise_level: Std of complex Gaussian k-space noise (per real/imag part),
            relative to the image's peak magnitude.
        intensity: Peak image magnitude, roughly the order of real fastMRI scans.

    Returns:
        The written paths, sorted.

    Raises:
        ValueError: a size, count or name is out of range.
    """
    n_volumes = _check_positive_int("n_volumes", n_volumes)
    n_slices = _check_positive_int("n_slices", n_slices)
    n_coils = _check_positive_int("n_coils", n_coils, minimum=0)
    if len(shape) != 2:
        raise ValueError(f"shape must be (H, W), got {shape!r}")
    h, w = (_check_positive_int("shape", v, minimum=8) for v in shape)
    if recon_size is None:
        recon_size = (min(320, h), min(320, w))
    if len(recon_size) != 2:
        raise ValueError(f"recon_size must be (h, w), got {recon_size!r}")
    rh, rw = (_check_positive_int("recon_size", v) for v in recon_size)
    if rh > h or rw > w:
        raise ValueError(f"recon_size {(rh, rw)} must fit inside shape {(h, w)}")
    if anatomy not in ANATOMIES:
        raise ValueError(f"unknown anatomy {anatomy!r}; valid: {', '.join(ANATOMIES)}")
    if noise_level < 0 or intensity <= 0:
        raise ValueError(f"need noise_level >= 0 and intensity > 0, got {noise_level!r}, {intensity!r}")
    acquisition = acquisition or _DEFAULT_ACQUISITION[anatomy]
    multicoil = n_coils >= 2

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    seeds = np.random.SeedSequence(int(seed)).spawn(n_volumes)
    paths = []
    for k, vol_seed in enumerate(seeds):
        rng = np.random.default_rng(vol_seed)
        image = make_phantom_volume(rng, n_slices, (h, w), (rh, rw), anatomy)  # (S, H, W)
        if multicoil:
            maps = make_coil_sensitivities(rng, n_coils, (h, w), (rh, rw))
            image = image[:, None] * maps[None]  # (S, C, H, W)
        kspace = fft2c(image)
        if noise_level > 0:
            noise = rng.standard_normal((*kspace.shape, 2)) @ np.array([1.0, 1j])
            kspace = kspace + noise_level * noise
        kspace = (intensity * kspace).astype(np.complex64)
        recon = np.abs(center_crop(ifft2c(kspace.astype(np.complex128)), (rh, rw)))
        if multicoil:
            target = np.sqrt((recon**2).sum(axis=1)).astype(np.float32)
            key = "reconstruction_rss"
        else:
            target = recon.astype(np.float32)
            key = "reconstruction_esc"
        path = out / f"synth_s{int(seed)}_v{k:03d}.h5"
        with h5py.File(path, "w") as f:
            f.create_dataset("kspace", data=kspace)
            f.create_dataset(key, data=target)
            f.create_dataset(
                "ismrmrd_header",
                data=np.bytes_(ismrmrd_header((h, w), (rh, rw), max(n_coils, 1), acquisition)),
            )
            f.attrs["acquisition"] = acquisition
            f.attrs["max"] = float(target.max())
            f.attrs["norm"] = float(np.linalg.norm(target))
            f.attrs["patient_id"] = _patient_id(rng)
        paths.append(path)
    return sorted(paths)


def _patient_id(rng: np.random.Generator) -> str:
    """A reproducible 64-hex-digit id, like fastMRI's anonymised ``patient_id``."""
    return "".join(f"{b:02x}" for b in rng.integers(0, 256, size=32, dtype=np.uint8))


def synth_command(
    out: Union[str, Path],
    volumes: int = 4,
    slices: int = 16,
    coils: int = 0,
    size: Sequence[int] = (640, 368),
    seed: int = 0,
    recon_size: Optional[Sequence[int]] = None,
    anatomy: str = "knee",
) -> str:
    """Body of ``deqbench data synth --out DIR [--volumes N --slices S --coils C --size H W --seed K]``.

    Writes the dataset and returns the one-line message the CLI prints (it says
    where the files went). Argument names match the CLI flags.
    """
    paths = write_synthetic_dataset(
        out,
        n_volumes=volumes,
        n_slices=slices,
        shape=tuple(size),
        n_coils=coils,
        seed=seed,
        recon_size=recon_size,
        anatomy=anatomy,
    )
    kind = f"multi-coil ({coils} coils)" if coils >= 2 else "single-coil"
    return (
        f"wrote {len(paths)} synthetic {kind} {anatomy} volumes "
        f"({slices} slices, k-space {size[0]}x{size[1]}) to {Path(out).resolve()}"
    )
