"""DE-Prox MRI reconstruction: data assembly, two-stage training, fastMRI-style evaluation.

One cell of family ``deprox`` runs, by ``deprox.kind``:

- ``deq`` / ``unrolled``: stage 1 pre-trains the denoiser ``R`` (a DnCNN) as a
  Gaussian denoiser of the target images for ``deprox.pretrain_epochs`` epochs
  (MSE, noise std ``deprox.pretrain_sigma``, Adam at ``deprox.pretrain_lr``);
  stage 2 fine-tunes the whole reconstruction network ``x <- R(x - eta A^H(Ax - y))``
  end to end for ``train.epochs`` epochs with ``deprox.loss`` (Adam at
  ``train.lr``), starting from the stage-1 weights. Either stage may be 0 epochs.
- ``zero_filled``: no training, evaluation only.

Complex convention: the models' images are real ``(B, 2, H, W)`` tensors
(channel 0 real, channel 1 imaginary, :mod:`suite.models.deprox`); the data and
the physics use fastMRI's trailing-2 convention (``(B, H, W, 2)`` images,
``(B, C, H, W, 2)`` k-space, :mod:`suite.data.fastmri`). Metrics see real
magnitudes only.

Per epoch the tracker receives, with the global epoch as step (stage 1 epochs
``0..P-1``, stage 2 epochs ``P..P+E-1``): ``loss``, ``stage`` (1 or 2),
``time/epoch_s``; in stage 2 also ``solver/fwd_nstep``, ``solver/bwd_nstep``
(IFT: the backward solver's iterations; phantom gradient: its steps; unrolled:
K), ``solver/abs_lowest``, ``solver/rel_lowest`` (batch means) and, every
``train.eval_every`` epochs, the validation ``psnr``. After stage 1:
``stage1/psnr`` (the network with the pre-trained denoiser, before
fine-tuning). At step ``P+E`` the final metrics (see :func:`fit_deprox`).

Evaluation follows fastMRI's ``evaluate.py`` per validation volume: magnitudes
in raw units (``|x| * std`` of each slice; ground truth ``|target_complex| *
std``, for single-coil data the stored ESC target, for multi-coil data the
SENSE-combined image), the volume ``(1, S, H, W)`` with data range = its ground
truth's maximum, SSIM averaged over slices; the reported value is the mean over
volumes.

Memory: ``mem/train_peak_mb`` (both stages) and ``mem/infer_peak_mb`` (the
final clean evaluation) are measured separately by :class:`PhasePeak` (CUDA:
allocator peak after a reset; CPU: sampled resident set size, see there);
``mem/peak_mb`` is the larger of the two (the heaviest phase).

Resuming: checkpoints hold the stage, the next epoch, model/optimiser/RNG state,
wall time, the training memory peak so far and ``stage1/psnr``, so a run
interrupted in either stage ends with the same numbers as an uninterrupted one
(CPU).

Data parallel (a ``torch.distributed`` process group, :mod:`suite.training.distributed`):
every rank draws the same slice batches and trains on its shard of each
batch, the loss being ``mean over the shard x shard / batch`` so the summed
gradients are those of one process; evaluation shards the validation volumes
and gathers their metrics; rank 0 checkpoints and writes artifacts.
"""

from __future__ import annotations

import math
import time
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

import fastmri
from suite.config import ExperimentConfig
from suite.data.mri import (  # noqa: F401  (re-exported: the data of this family)
    DEProxData, SliceStore, ensure_synthetic, load_deprox_data, split_files, synthetic_dir,
)
from suite.metrics.registry import computed_metrics, score
from suite.models.deprox import DEProx, Unrolled, ZeroFilled, complex_magnitude, last_to_chan
from suite.physics.mri import add_kspace_noise, make_mri_physics
from suite.training import distributed as D
from suite.training.checkpoint import Checkpointer
from suite.training.common import (  # noqa: F401  (DivergedError, PhasePeak: re-exported)
    DivergedError, PhasePeak, check_finite, index_batches, log_run_files, pick_device, resume, save, save_png,
)
from suite.training.losses import get_loss
from suite.training.tracker import Tracker

__all__ = [
    "SliceStore",
    "DEProxData",
    "load_deprox_data",
    "synthetic_dir",
    "ensure_synthetic",
    "split_files",
    "PhasePeak",
    "add_kspace_noise",
    "reconstruct_volume",
    "volume_metrics",
    "noise_key",
    "fit_deprox",
    "DivergedError",
]


# --------------------------------------------------------------------- training steps


_HINT = "a smaller train.lr or deprox.pretrain_lr, deq.solver=anderson, or a smaller deprox.eta"


def _check_finite(loss: float, stage: int, epoch: int) -> None:
    check_finite(loss, stage, epoch, _HINT)


def _batches(n: int, batch_size: int, gen: torch.Generator) -> list[torch.Tensor]:
    """Shuffled slice-index batches of one epoch (``batch_size`` -1: one batch of all)."""
    return index_batches(n, batch_size, gen, whole="shuffled")


def _zero_loss(params: list[nn.Parameter]) -> torch.Tensor:
    """A zero loss that still gives every parameter a (zero) gradient (an empty DDP shard)."""
    return sum((p * 0).sum() for p in params)


def _pretrain_epoch(model: nn.Module, opt: torch.optim.Optimizer, store: SliceStore, cfg: ExperimentConfig,
                    gen: torch.Generator, device: torch.device, epoch: int) -> dict[str, float]:
    """Stage 1: one epoch of Gaussian denoising of the targets (MSE); returns the mean loss."""
    den = model.denoiser
    den.train()
    params = list(den.parameters())
    h, w = cfg.mri.crop
    total, count = 0.0, 0
    for idx in _batches(len(store), cfg.train.batch_size, gen):
        n = len(idx)
        noise = torch.randn(n, 2, h, w, generator=gen) * cfg.deprox.pretrain_sigma  # whole batch, every rank
        s = D.shard(n) if D.is_distributed() else slice(0, n)
        n_r = s.stop - s.start
        opt.zero_grad(set_to_none=True)
        if n_r:
            x = last_to_chan(store.batch(idx[s].tolist(), device)["target_complex"])
            err = F.mse_loss(den(x + noise[s].to(device)), x)
            (err * (n_r / n)).backward()
            local = err.item()
        else:
            den.prepare_spectral_norm((h, w), update=True)  # what a training forward does
            _zero_loss(params).backward()
            local = 0.0
        D.all_reduce_grads(params)
        loss = D.reduce_mean({"loss": local}, weight=n_r)["loss"]
        _check_finite(loss, 1, epoch)
        opt.step()
        total, count = total + loss, count + 1
    return {"loss": total / count}


def _backward_steps(model: nn.Module, cfg: ExperimentConfig) -> float:
    """Backward iterations of the last step: IFT solver steps, phantom steps, or K."""
    if isinstance(model, DEProx):
        if model.ift:
            info = model.last_backward_info
            return float(info["nstep"].float().mean()) if "nstep" in info else 0.0
        return float(cfg.deq.phantom_steps)
    if isinstance(model, Unrolled):
        return float(model.n_iter)
    return 0.0


def _finetune_epoch(model: nn.Module, opt: torch.optim.Optimizer, store: SliceStore, cfg: ExperimentConfig,
                    gen: torch.Generator, device: torch.device, epoch: int) -> dict[str, float]:
    """Stage 2: one epoch end to end; returns loss and solver statistics averaged over batches."""
    model.train()
    params = list(model.parameters())
    loss_fn = get_loss(cfg.deprox.loss)
    sums: dict[str, float] = {}
    batches = _batches(len(store), cfg.train.batch_size, gen)
    for idx in batches:
        n = len(idx)
        s = D.shard(n) if D.is_distributed() else slice(0, n)
        n_r = s.stop - s.start
        opt.zero_grad(set_to_none=True)
        if n_r:
            b = store.batch(idx[s].tolist(), device)
            physics = make_mri_physics(b["mask"], b.get("sens_maps"))
            x_hat, info = model(b["kspace"], physics)
            err = loss_fn(x_hat, last_to_chan(b["target_complex"]))
            (err * (n_r / n)).backward()
            local = {"loss": err.item(), "solver/fwd_nstep": float(info["nstep"].float().mean()),
                     "solver/abs_lowest": float(info["abs_lowest"].mean()),
                     "solver/rel_lowest": float(info["rel_lowest"].mean()),
                     "solver/bwd_nstep": _backward_steps(model, cfg)}
        else:
            model.denoiser.prepare_spectral_norm(tuple(cfg.mri.crop), update=True)
            _zero_loss(params).backward()
            local = dict.fromkeys(("loss", "solver/fwd_nstep", "solver/abs_lowest", "solver/rel_lowest",
                                   "solver/bwd_nstep"), 0.0)
        D.all_reduce_grads(params)
        row = D.reduce_mean(local, weight=n_r)
        _check_finite(row["loss"], 2, epoch)
        opt.step()
        for k, v in row.items():
            sums[k] = sums.get(k, 0.0) + v
    return {k: v / len(batches) for k, v in sums.items()}


# --------------------------------------------------------------------- evaluation


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


def _full_keys() -> tuple[str, ...]:
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
    keys = _full_keys() if full else _QUICK_KEYS
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


def _mean(rows: list[dict[str, float]], key: str) -> float:
    vals = [r[key] for r in rows if not math.isnan(r[key])]
    return float(np.mean(vals)) if vals else math.nan


@torch.no_grad()
def _solver_trace(model: nn.Module, store: SliceStore, indices: Sequence[int], device: torch.device) -> dict:
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


def _write_artifacts(outdir: Path, tracker: Tracker, first: dict, fname: str, results: dict, rows: list[dict],
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


# --------------------------------------------------------------------- the loop


def fit_deprox(
    cfg: ExperimentConfig,
    model: nn.Module,
    data: DEProxData,
    tracker: Tracker,
    ckpt: Checkpointer | None = None,
    outdir: str | Path | None = None,
) -> dict[str, float]:
    """Trains (two stages) and evaluates a DE-Prox, unrolled or zero-filled model.

    Args:
        cfg: the resolved experiment (family ``deprox``).
        model: :class:`DEProx`, :class:`Unrolled` or :class:`ZeroFilled` (``build_model(cfg)``).
        data: :func:`load_deprox_data`.
        tracker: receives the metrics (module docstring) and artifacts.
        ckpt: checkpoint manager; resumes from its newest checkpoint if any.
        outdir: where artifacts are written (None: none).

    Returns:
        Final metrics, logged at step ``P + E``: ``psnr``, ``ssim``, ``nmse``,
        ``vif``, ``hfe``, ``sr`` (means over validation volumes), ``zf/psnr``,
        ``zf/ssim`` (zero-filled, same volumes), ``solver/eval_nstep``,
        ``solver/eval_abs_lowest``, ``solver/eval_rel_lowest`` (means over
        validation slices; not for zero-filled), ``noise/<sigma>/psnr`` and
        ``noise/<sigma>/ssim`` for each ``eval.noise_sigmas``,
        ``mem/infer_peak_mb``, ``mem/train_peak_mb`` (trained kinds),
        ``mem/peak_mb``, ``time/total_s``, ``stage1/psnr`` (when pre-trained),
        and for zero-filled ``solver/fwd_nstep = solver/bwd_nstep = 0``.

    Raises:
        DivergedError: the loss became non-finite.
        ValueError: a trained kind without training data.
    """
    device = pick_device(cfg.train.device)
    model.to(device)
    trains = not isinstance(model, ZeroFilled)
    if trains and data.train is None:
        raise ValueError(f"deprox.kind {cfg.deprox.kind!r} trains, but the data has no training slices")
    e1 = cfg.deprox.pretrain_epochs if trains else 0
    e2 = cfg.train.epochs if trains else 0
    gen = torch.Generator().manual_seed(cfg.seed)
    prog, state = resume(ckpt, model, gen)
    t_start = time.perf_counter() - prog.elapsed

    def checkpoint(opt: torch.optim.Optimizer, step: int) -> None:
        save(ckpt, prog, t_start, model, opt, gen, step)

    def val_psnr() -> float:
        return _mean(evaluate(model, data.val, cfg, device, full=False)[0], "psnr")

    if trains and prog.stage == 1:
        opt = torch.optim.Adam(model.denoiser.parameters(), lr=cfg.deprox.pretrain_lr)
        if state is not None:
            opt.load_state_dict(state["opt"])
        if prog.epoch < e1:
            with PhasePeak(device) as peak:
                for epoch in range(prog.epoch, e1):
                    t0 = time.perf_counter()
                    row = _pretrain_epoch(model, opt, data.train, cfg, gen, device, epoch)
                    tracker.log_metrics({**row, "time/epoch_s": time.perf_counter() - t0, "stage": 1.0}, step=epoch)
                    prog.epoch = epoch + 1
                    prog.train_mem = max(prog.train_mem, peak.read())
                    if ckpt and ckpt.due(prog.epoch):
                        checkpoint(opt, prog.epoch)
            prog.train_mem = max(prog.train_mem, peak.value)
        if e1 > 0:
            prog.stage1_psnr = val_psnr()
            tracker.log_metrics({"stage1/psnr": prog.stage1_psnr}, step=e1)
        prog.stage, prog.epoch, state = 2, 0, None  # stage 2 starts a fresh optimiser

    if trains:
        opt = torch.optim.Adam(model.parameters(), lr=cfg.train.lr)
        if state is not None:
            opt.load_state_dict(state["opt"])
        if prog.epoch < e2:
            with PhasePeak(device) as peak:
                for epoch in range(prog.epoch, e2):
                    t0 = time.perf_counter()
                    row = _finetune_epoch(model, opt, data.train, cfg, gen, device, epoch)
                    row["time/epoch_s"] = time.perf_counter() - t0
                    if (epoch + 1) % cfg.train.eval_every == 0 or epoch + 1 == e2:
                        row["psnr"] = val_psnr()
                    tracker.log_metrics({**row, "stage": 2.0}, step=e1 + epoch)
                    prog.epoch = epoch + 1
                    prog.train_mem = max(prog.train_mem, peak.read())
                    if ckpt and ckpt.due(prog.epoch):
                        checkpoint(opt, e1 + prog.epoch)
            prog.train_mem = max(prog.train_mem, peak.value)

    model.eval()
    with PhasePeak(device) as peak:
        rows, first = evaluate(model, data.val, cfg, device, full=True)
    results = {k: _mean(rows, k) for k in _full_keys()}
    if not trains:  # no solver: iteration counts are 0, residuals do not apply
        results = {k: v for k, v in results.items() if not k.startswith("solver/eval_") or k == "solver/eval_nstep"}
        results.update({"solver/fwd_nstep": 0.0, "solver/bwd_nstep": 0.0})
    results["mem/infer_peak_mb"] = peak.value
    if trains:
        results["mem/train_peak_mb"] = prog.train_mem
    results["mem/peak_mb"] = max(peak.value, prog.train_mem)
    for i, sigma in enumerate(cfg.eval.noise_sigmas):
        noisy = rows if sigma == 0 else evaluate(model, data.val, cfg, device, full=False, sigma=sigma,
                                                 sigma_index=i)[0]
        results[noise_key(sigma, "psnr")] = _mean(noisy, "psnr")
        results[noise_key(sigma, "ssim")] = _mean(noisy, "ssim")
    if prog.stage1_psnr is not None:
        results["stage1/psnr"] = prog.stage1_psnr
    results["time/total_s"] = time.perf_counter() - t_start
    tracker.log_metrics(results, step=e1 + e2)
    if outdir is not None and D.is_main():
        vols = data.val.volumes()
        trace = {"eval_per_volume": [{k: r[k] for k in ("fname", "solver/eval_nstep", "solver/eval_abs_lowest",
                                                        "solver/eval_rel_lowest") if k in r} for r in rows],
                 "eval_middle_slice": _solver_trace(model, data.val, vols[0][1], device)}
        _write_artifacts(Path(outdir), tracker, first, vols[0][0], results, rows, trace)
    return results
