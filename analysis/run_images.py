"""What a spectral report computes on one run: its images and their signal characteristics.

:class:`RunImages` are a run's ``images.pt`` artifact (or its PNGs);
:func:`signal_characteristics` computes PSNR, SSIM, HFE and SR of each output
with :mod:`suite.metrics` and the run's own :class:`SpectralSettings`, the data
range being the family's (:attr:`suite.families.Family.data_range`). Metric
histories and stage boundaries come from MLflow. Used by :mod:`analysis.report`.

Complex convention: images are real (magnitude images for MRI).
"""

from __future__ import annotations

import inspect
import math
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
import torch

from suite import metrics as M
from suite.families import find_family

OUTPUTS = ("zero_filled", "stage1", "final")
"""Outputs compared, in column order: the ``A^H y`` baseline (DE-Prox), the frozen DEQ (CRR), the run's output."""
_QUANTITIES = ("psnr", "ssim", "hfe", "hfe_residual", "sr")


def _default(fn: Any, name: str) -> Any:
    return inspect.signature(fn).parameters[name].default


@dataclass(frozen=True)
class SpectralSettings:
    """The definitions of HFE and SR a run used.

    Attributes:
        hfe_cutoff: disk radius as a fraction of the Nyquist radius.
        hfe_mode: ``"power"`` or ``"magnitude"``.
        sr_threshold: fraction of the ground truth's range.
        preset: the ``eval.preset`` the three values came from, or ``"none"``.
    """

    hfe_cutoff: float = _default(M.hfe, "cutoff")
    hfe_mode: str = _default(M.hfe, "mode")
    sr_threshold: float = _default(M.significant_residuals, "threshold")
    preset: str = "none"

    @classmethod
    def from_params(cls, params: Mapping[str, Any]) -> "SpectralSettings":
        """From a run's params (``eval.hfe_cutoff``, ...); defaults where absent or empty."""
        def get(key: str, default: Any, cast: Any) -> Any:
            value = params.get(key)
            if value is None or (isinstance(value, float) and math.isnan(value)) or value == "":
                return default
            return cast(value)

        base = cls()
        return cls(
            hfe_cutoff=get("eval.hfe_cutoff", base.hfe_cutoff, float),
            hfe_mode=get("eval.hfe_mode", base.hfe_mode, str),
            sr_threshold=get("eval.sr_threshold", base.sr_threshold, float),
            preset=get("eval.preset", base.preset, str),
        )


@dataclass
class RunImages:
    """A run's images, all ``(1, C, H, W)`` real tensors of one shape.

    Attributes:
        ground_truth: the target.
        final: the run's output (``images.pt["reconstruction"]``).
        stage1: the frozen DEQ's output for CRR (``images.pt["stage1"]``), or None.
        source: ``"images.pt"`` or ``"8-bit PNG"``.
        zero_filled: the ``A^H y`` baseline for DE-Prox (``images.pt["zero_filled"]``), or None.
        volume: the MRI volume these slices come from (``images.pt["volume"]``), or None.
    """

    ground_truth: torch.Tensor
    final: torch.Tensor
    stage1: torch.Tensor | None = None
    source: str = "images.pt"
    zero_filled: torch.Tensor | None = None
    volume: str | None = None

    def output(self, name: str) -> torch.Tensor | None:
        """One of :data:`OUTPUTS` by name."""
        return {"zero_filled": self.zero_filled, "stage1": self.stage1, "final": self.final}[name]


def _as_4d(x: torch.Tensor, name: str) -> torch.Tensor:
    """``(H, W)``, ``(C, H, W)`` or ``(1, C, H, W)`` as ``(1, C, H, W)``."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"images.pt[{name!r}] must be a tensor, got {type(x).__name__}")
    if x.is_complex():
        raise TypeError(f"images.pt[{name!r}] must be real (a magnitude image), got {x.dtype}")
    while x.ndim < 4:
        x = x.unsqueeze(0)
    if x.ndim != 4 or x.shape[0] != 1:
        raise ValueError(f"images.pt[{name!r}] must be (1, C, H, W), got shape {tuple(x.shape)}")
    return x.detach().cpu()


def images_from_dict(data: Mapping[str, Any], source: str = "images.pt") -> RunImages:
    """:class:`RunImages` from the ``images.pt`` dictionary.

    Args:
        data: ``{"ground_truth", "reconstruction"[, "stage1"][, "zero_filled"]}`` tensors
            ``(1, C, H, W)`` (``C`` slices of a volume), optionally ``"volume"`` (a name).
        source: where they came from (shown in the report).

    Raises:
        ValueError: a required key is missing or the shapes differ.
    """
    missing = [k for k in ("ground_truth", "reconstruction") if k not in data]
    if missing:
        raise ValueError(f"images.pt lacks {missing}; it has {sorted(data)}")
    gt = _as_4d(data["ground_truth"], "ground_truth")
    final = _as_4d(data["reconstruction"], "reconstruction")
    stage1 = _as_4d(data["stage1"], "stage1") if data.get("stage1") is not None else None
    zf = _as_4d(data["zero_filled"], "zero_filled") if data.get("zero_filled") is not None else None
    for name, x in (("reconstruction", final), ("stage1", stage1), ("zero_filled", zf)):
        if x is not None and x.shape != gt.shape:
            raise ValueError(f"images.pt[{name!r}] has shape {tuple(x.shape)}, ground truth {tuple(gt.shape)}")
    volume = data.get("volume")
    return RunImages(gt, final, stage1, source, zf, None if volume is None else str(volume))


def _read_png(path: Path) -> torch.Tensor:
    import skimage.io

    arr = np.asarray(skimage.io.imread(path), dtype=np.float32)
    if arr.ndim == 3:  # RGB(A) written by someone else: luminance
        arr = arr[..., :3].mean(axis=-1)
    return torch.from_numpy(arr / 255.0)[None, None]


def load_run_images(client: Any, run_id: str) -> tuple[RunImages | None, list[str]]:
    """Downloads a run's images: ``images.pt``, else its PNGs.

    Args:
        client: an ``MlflowClient``.
        run_id: the run.

    Returns:
        ``(images or None, notes)``; notes say what was missing or substituted.
    """
    notes: list[str] = []
    try:
        names = {Path(f.path).name for f in client.list_artifacts(run_id)}
    except Exception as err:  # unreachable artifact store: report without images
        return None, [f"artifacts of run {run_id} could not be listed: {err}"]
    with tempfile.TemporaryDirectory(prefix="deqbench-report-") as tmp:
        if "images.pt" in names:
            path = Path(client.download_artifacts(run_id, "images.pt", tmp))
            data = torch.load(path, map_location="cpu", weights_only=True)
            images = images_from_dict(data)
            if images.stage1 is None and "stage1.png" in names:
                images.stage1 = _read_png(Path(client.download_artifacts(run_id, "stage1.png", tmp)))
                notes.append("stage-1 image read from the 8-bit stage1.png (images.pt has no 'stage1')")
            return images, notes
        if {"ground_truth.png", "reconstruction.png"} <= names:
            png = {n: _read_png(Path(client.download_artifacts(run_id, n, tmp)))
                   for n in ("ground_truth.png", "reconstruction.png", "stage1.png") if n in names}
            notes.append("images.pt not recorded: values computed on the 8-bit PNGs (differ from logged metrics)")
            return RunImages(png["ground_truth.png"], png["reconstruction.png"], png.get("stage1.png"),
                             "8-bit PNG"), notes
    return None, [f"run {run_id} recorded no images (neither images.pt nor ground_truth.png/reconstruction.png)"]


# --------------------------------------------------------------------- numbers


def _data_range(family: str | None, gt: torch.Tensor) -> torch.Tensor | None:
    """The family's data range (:attr:`suite.families.Family.data_range`, e.g. a volume's maximum), else None."""
    fam = find_family(family)
    return fam.data_range(gt) if fam is not None and fam.data_range is not None else None


def significant_residual_mask(pred: torch.Tensor, target: torch.Tensor, threshold: float) -> torch.Tensor:
    """Pixels counted by :func:`suite.metrics.significant_residuals`.

    ``|target - pred| > threshold * (max - min of target)`` per sample, in the
    same dtype arithmetic, so ``100 * mask.mean()`` equals the SR share.

    Args:
        pred: ``(B, C, H, W)``.
        target: ``(B, C, H, W)``.
        threshold: fraction of the target's range.

    Returns:
        ``(B, C, H, W)`` boolean.
    """
    dtype = torch.float64 if torch.float64 in (pred.dtype, target.dtype) else torch.float32
    flat = target.reshape(target.shape[0], -1)
    bound = (threshold * (flat.amax(dim=1) - flat.amin(dim=1)).to(torch.float64)).to(dtype)
    return (target.to(dtype) - pred).abs() > bound.view(-1, 1, 1, 1)


def signal_characteristics(
    images: RunImages, settings: SpectralSettings, family: str | None = None
) -> dict[str, float]:
    """PSNR, SSIM, HFE and SR of each output, and HFE of the ground truth and residuals.

    All by :mod:`suite.metrics` with ``settings``; PSNR/SSIM use the ground
    truth's range, or the family's own (:attr:`suite.families.Family.data_range`:
    a volume's maximum for DE-Prox).

    Args:
        images: the run's images ``(1, C, H, W)``.
        settings: HFE/SR definitions.
        family: the run's family.

    Returns:
        Keys ``hfe_gt`` and, for each of :data:`OUTPUTS`: ``psnr_*``, ``ssim_*``,
        ``hfe_*``, ``hfe_residual_*``, ``sr_*`` (NaN where the output is missing),
        and ``gain_db = psnr_final - psnr_stage1``.
    """
    gt = images.ground_truth
    hfe_kw = {"cutoff": settings.hfe_cutoff, "mode": settings.hfe_mode}
    out = {"hfe_gt": float(M.hfe(gt, **hfe_kw)[0])}
    rng = _data_range(family, gt)
    for name in OUTPUTS:
        pred = images.output(name)
        if pred is None:
            for k in _QUANTITIES:
                out[f"{k}_{name}"] = math.nan
            continue
        out[f"psnr_{name}"] = float(M.psnr(pred, gt, data_range=rng)[0])
        out[f"ssim_{name}"] = float(M.ssim(pred, gt, data_range=rng)[0]) if min(gt.shape[-2:]) >= 7 else math.nan
        out[f"hfe_{name}"] = float(M.hfe(pred, **hfe_kw)[0])
        out[f"hfe_residual_{name}"] = float(M.hfe(gt - pred, **hfe_kw)[0])
        out[f"sr_{name}"] = float(M.significant_residuals(pred, gt, threshold=settings.sr_threshold)[0])
    out["gain_db"] = out["psnr_final"] - out["psnr_stage1"]
    return out


def metric_history(client: Any, run_id: str, key: str) -> list[tuple[int, float]]:
    """``(step, value)`` of one metric, by step (the newest value where a step repeats)."""
    by_step: dict[int, tuple[int, float]] = {}
    for m in client.get_metric_history(run_id, key):
        if m.step not in by_step or m.timestamp >= by_step[m.step][0]:
            by_step[m.step] = (m.timestamp, float(m.value))
    return [(s, by_step[s][1]) for s in sorted(by_step)]


def stage_boundaries(stage: Sequence[tuple[int, float]]) -> list[int]:
    """Epochs at which the logged ``stage`` changes: the first epoch of each new stage.

    Args:
        stage: ``(epoch, stage)`` history, any order.

    Returns:
        Sorted epochs whose stage differs from the previous logged epoch's.
    """
    ordered = sorted(stage)
    return [s for (_, prev), (s, cur) in zip(ordered, ordered[1:]) if cur != prev]
