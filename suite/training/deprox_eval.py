"""DE-Prox evaluation, fastMRI style: per validation volume, reconstructions, metrics, noise robustness, artifacts.

Evaluation follows fastMRI's ``evaluate.py`` per validation volume: magnitudes
in raw units (``|x| * std`` of each slice), the volume ``(1, S, H, W)`` with
data range = its ground truth's maximum, SSIM averaged over slices; every
registered image metric (:mod:`suite.metrics.registry`) is computed. Volumes are
sharded over ranks and their metrics gathered. Complex convention as in
:mod:`suite.training.deprox`.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
import torch
from torch import nn

import fastmri
from suite.config import ExperimentConfig
from suite.data.mri import SliceStore
from suite.metrics.registry import computed_metrics, score
from suite.models.deprox import DEProx, complex_magnitude, last_to_chan
from suite.physics.mri import add_kspace_noise, make_mri_physics
from suite.training import distributed as D
from suite.training.common import log_run_files, save_png
from suite.training.tracker import Tracker


def noise_key(sigma: float, metric: str) -> str:
    """``noise/<sigma>/<metric>`` with sigma written plainly: ``noise/0.01/psnr``, ``noise/0/ssim``."""
    return f"noise/{np.format_float_positional(float(sigma), trim='-')}/{metric}"


@torch.no_grad()
def reconstruct_volume(model: nn.Module, store: SliceStore, indices: Sequence[int], device: torch.device,
                       batch_size: int = -1, sigma: float = 0.0, gen: Optional[torch.Generator] = None
                       ) -> dict[str, torch.Tensor]:
    """Reconstructs the slices of one volume (``model`` in eval mode).

    Args:
        model: a DE-Prox model, ``x_hat, info = model(y, physics)``.
        store: the slices.
        indices: the volume's ``S`` slice indices.
        device: where to compute.
        batch_size: slices per forward pass (-1: all at once).
        sigma: extra k-space noise (:func:`add_kspace_noise`).
        gen: generator of that noise.

    Returns:
        Raw-unit magnitudes ``pred``, ``target``, ``zero_filled`` (each ``(S, H, W)``,
        CPU) and solver statistics ``nstep``, ``abs_lowest``, ``rel_lowest`` (each ``(S,)``).
    """
    step = len(indices) if batch_size < 1 else batch_size
    out: dict[str, list[torch.Tensor]] = {k: [] for k in ("pred", "target", "zero_filled", "nstep", "abs_lowest",
                                                          "rel_lowest")}
    for i in range(0, len(indices), step):
        b = store.batch(indices[i : i + step], device)
        y = add_kspace_noise(b["kspace"], b["mask"], sigma, gen) if sigma else b["kspace"]
        physics = make_mri_physics(b["mask"], b.get("sens_maps"))
        x_hat, info = model(y, physics)
        scale = b["std"].view(-1, 1, 1)
        out["pred"].append((complex_magnitude(x_hat) * scale).cpu())
        out["target"].append((fastmri.complex_abs(b["target_complex"]) * scale).cpu())
        out["zero_filled"].append((fastmri.complex_abs(physics.A_adjoint(y)) * scale).cpu())
        for k in ("nstep", "abs_lowest", "rel_lowest"):
            out[k].append(info[k].float().cpu())
    return {k: torch.cat(v) for k, v in out.items()}


def volume_metrics(pred: torch.Tensor, target: torch.Tensor, cfg: ExperimentConfig, full: bool = True
                   ) -> dict[str, float]:
    """fastMRI-style metrics of one volume.

    Args:
        pred: ``(S, H, W)`` raw-unit magnitudes.
        target: ``(S, H, W)`` ground truth.
        cfg: supplies the HFE/SR definitions (``eval``).
        full: also VIF, NMSE, HFE and SR (else PSNR and SSIM only).

    Returns:
        ``psnr``, ``ssim`` [, ``nmse``, ``vif``, ``hfe``, ``sr``]: PSNR/SSIM/VIF with data range
        = the volume's maximum, SSIM averaged over slices, HFE/SR of the volume's
        planes pooled (in %). VIF is NaN for slices under 41 x 41 pixels.
    """
    p, t = pred.unsqueeze(0), target.unsqueeze(0)
    return score(computed_metrics() if full else _QUICK_KEYS, p, t, cfg.eval, data_range=float(t.max()))


_QUICK_KEYS = ("psnr", "ssim")
_EVAL_KEYS = ("zf/psnr", "zf/ssim", "solver/eval_nstep", "solver/eval_abs_lowest", "solver/eval_rel_lowest")


def full_keys() -> tuple[str, ...]:
    """Every registered image metric (:func:`suite.metrics.registry.computed_metrics`), then :data:`_EVAL_KEYS`."""
    return (*computed_metrics(), *_EVAL_KEYS)


def _noise_gen(seed: int, sigma_index: int, volume: int) -> torch.Generator:
    return torch.Generator().manual_seed(((seed * 1_000_003 + sigma_index) * 1_000_033 + volume) % 2**63)


def evaluate(model: nn.Module, store: SliceStore, cfg: ExperimentConfig, device: torch.device, full: bool = True,
             sigma: float = 0.0, sigma_index: int = 0) -> tuple[list[dict[str, float]], Optional[dict]]:
    """Per-volume metrics of the validation volumes (sharded over ranks, gathered).

    Returns:
        One metrics dict per volume (in file order, with ``fname``) and the first
        volume's reconstruction (:func:`reconstruct_volume`; None on other ranks).
    """
    model.eval()
    keys = full_keys() if full else _QUICK_KEYS
    vols = store.volumes()
    s = D.shard(len(vols)) if D.is_distributed() else slice(0, len(vols))
    rows, first = [], None
    for v in range(s.start, s.stop):
        gen = _noise_gen(cfg.seed, sigma_index, v) if sigma else None
        rec = reconstruct_volume(model, store, vols[v][1], device, cfg.train.batch_size, sigma, gen)
        m = volume_metrics(rec["pred"], rec["target"], cfg, full)
        if full:
            zf = volume_metrics(rec["zero_filled"], rec["target"], cfg, full=False)
            m.update({"zf/psnr": zf["psnr"], "zf/ssim": zf["ssim"],
                      "solver/eval_nstep": float(rec["nstep"].mean()),
                      "solver/eval_abs_lowest": float(rec["abs_lowest"].mean()),
                      "solver/eval_rel_lowest": float(rec["rel_lowest"].mean())})
        rows.append([m[k] for k in keys])
        if v == 0:
            first = rec
    table = D.gather_rows(torch.tensor(rows, dtype=torch.float64).reshape(-1, len(keys)), len(vols))
    return [{"fname": vols[i][0], **dict(zip(keys, map(float, table[i])))} for i in range(len(vols))], first


def mean_over_volumes(rows: list[dict[str, float]], key: str) -> float:
    vals = [r[key] for r in rows if not math.isnan(r[key])]
    return float(np.mean(vals)) if vals else math.nan


@torch.no_grad()
def solver_trace(model: nn.Module, store: SliceStore, indices: Sequence[int], device: torch.device) -> dict:
    """torchdeq's forward residual trace on the middle slice of a volume (DEQ only)."""
    if not isinstance(model, DEProx):
        return {}
    mid = indices[len(indices) // 2]
    b = store.batch([mid], device)
    physics = make_mri_physics(b["mask"], b.get("sens_maps"))
    x0 = last_to_chan(physics.A_adjoint(b["kspace"]))
    _, info = model.deq(model.step_fn(b["kspace"], physics), x0)
    trace = {k: [float(v) for v in info[k][0] if float(v) < 1e7] for k in ("abs_trace", "rel_trace") if k in info}
    return {"slice": int(mid), **trace}


def write_artifacts(outdir: Path, tracker: Tracker, first: dict, fname: str, results: dict, rows: list[dict],
                     trace: dict) -> None:
    """Middle-slice PNGs (scaled by the volume maximum; residual by its own maximum), the
    first validation volume as ``images.pt`` (``(1, S, H, W)`` raw-unit magnitudes),
    ``metrics.json`` (final and per-volume) and ``solver_trace.json``."""
    outdir.mkdir(parents=True, exist_ok=True)
    pred, gt, zf = first["pred"], first["target"], first["zero_filled"]
    mid = pred.shape[0] // 2
    top = float(gt.max()) or 1.0
    resid = (gt[mid] - pred[mid]).abs()
    paths = [
        save_png(pred[mid] / top, outdir / "reconstruction.png"),
        save_png(resid / (float(resid.max()) or 1.0), outdir / "residual.png"),
        save_png(gt[mid] / top, outdir / "ground_truth.png"),
        save_png(zf[mid] / top, outdir / "zero_filled.png"),
    ]
    log_run_files(tracker, outdir, paths,
                  {"reconstruction": pred[None], "ground_truth": gt[None], "zero_filled": zf[None], "volume": fname},
                  {"metrics.json": {**results, "per_volume": rows}, "solver_trace.json": trace})
