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

Evaluation (:mod:`suite.training.deprox_eval`) follows fastMRI's ``evaluate.py`` per validation volume: magnitudes
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

import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from suite.config import ExperimentConfig
from suite.data.mri import (  # noqa: F401  (re-exported: the data of this family)
    DEProxData, SliceStore, ensure_synthetic, load_deprox_data, split_files, synthetic_dir,
)
from suite.models.deprox import DEProx, Unrolled, ZeroFilled, last_to_chan
from suite.physics.mri import add_kspace_noise, make_mri_physics  # noqa: F401  (add_kspace_noise: re-exported)
from suite.training import distributed as D
from suite.training.checkpoint import Checkpointer
from suite.training.deprox_eval import (  # noqa: F401  (reconstruct_volume, volume_metrics: re-exported)
    evaluate, full_keys, mean_over_volumes, noise_key, reconstruct_volume, solver_trace, volume_metrics,
    write_artifacts,
)
from suite.training.common import (  # noqa: F401  (DivergedError, PhasePeak: re-exported)
    DivergedError, PhasePeak, check_finite, index_batches, pick_device, resume, save,
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
        return mean_over_volumes(evaluate(model, data.val, cfg, device, full=False)[0], "psnr")

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
    results = {k: mean_over_volumes(rows, k) for k in full_keys()}
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
        results[noise_key(sigma, "psnr")] = mean_over_volumes(noisy, "psnr")
        results[noise_key(sigma, "ssim")] = mean_over_volumes(noisy, "ssim")
    if prog.stage1_psnr is not None:
        results["stage1/psnr"] = prog.stage1_psnr
    results["time/total_s"] = time.perf_counter() - t_start
    tracker.log_metrics(results, step=e1 + e2)
    if outdir is not None and D.is_main():
        vols = data.val.volumes()
        trace = {"eval_per_volume": [{k: r[k] for k in ("fname", "solver/eval_nstep", "solver/eval_abs_lowest",
                                                        "solver/eval_rel_lowest") if k in r} for r in rows],
                 "eval_middle_slice": solver_trace(model, data.val, vols[0][1], device)}
        write_artifacts(Path(outdir), tracker, first, vols[0][0], results, rows, trace)
    return results
