"""Training of DEQ-INR and CRR (stage 1: DEQ-INR; stage 2: residual refiner).

Per epoch the tracker receives, with the global epoch as step: ``loss``,
``psnr`` (every ``train.eval_every`` epochs), ``solver/fwd_nstep``,
``solver/bwd_nstep``, ``solver/abs_lowest``, ``solver/rel_lowest``,
``time/epoch_s``, and ``stage``. At the end: ``psnr``, ``ssim``, ``nmse``,
``vif``, ``hfe``, ``sr`` (every registered image metric), ``mem/train_peak_mb``,
``mem/infer_peak_mb``, ``mem/peak_mb``, ``time/total_s`` (CRR also
``stage1/psnr`` and ``crr/gain_db``) and artifacts: reconstruction and residual
PNGs, ``metrics.json`` and ``solver_trace.json``.

Resuming: a checkpoint holds the stage, the next epoch, model/optimiser/RNG
state and the accumulated wall time, so an interrupted run continues where it
stopped and ends with the same numbers as an uninterrupted one (CPU).

Data parallel (a ``torch.distributed`` process group is running, see
:mod:`suite.training.distributed`): every rank draws the same batches and
trains on its shard of each batch's pixels; the loss is the mean over the
global batch (``Σ shard / batch size`` per rank, gradients summed over ranks),
so the updates are those of one process on the whole batch, up to float
rounding. Full-grid evaluations are sharded and gathered, per-epoch metrics are
reduced over ranks, and only rank 0 writes checkpoints and artifacts (the
caller gives the other ranks a tracker that drops everything). One caveat: the
solvers' early exit (``f_tol``/``b_tol``) tests the worst pixel of the local
shard, so a run whose solver stops early can differ from the one-process run
by more than rounding. Without a process group the code is unchanged.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Callable

import torch
from torch import nn

from suite import metrics as M
from suite.config import EvalConfig, ExperimentConfig
from suite.data.images import ImageData, pixels_to_image
from suite.metrics.registry import computed_metrics, score
from suite.training.checkpoint import Checkpointer
from suite.training import distributed as D
from suite.training.common import (  # noqa: F401  (DivergedError: re-exported)
    DivergedError, PhasePeak, check_finite, index_batches, log_run_files, pick_device, resume, save, save_png,
)
from suite.training.tracker import Tracker
from suite.training.warm_start import Recipe, evaluate_grid, recipe_step


def _psnr(pred_img: torch.Tensor, data: ImageData) -> float:
    return float(M.psnr(pred_img, data.image)[0])


def _batches(n: int, batch_size: int, gen: torch.Generator, device: torch.device) -> list[torch.Tensor | None]:
    """Index batches of one epoch; ``[None]`` means full batch."""
    return index_batches(n, batch_size, gen, device)


def _check_finite(loss: torch.Tensor, stage: int, epoch: int) -> None:
    check_finite(loss, stage, epoch, "a smaller train.lr, deq.solver=anderson, or model.norm=weight_norm")


def _ddp_step(model: nn.Module, opt: torch.optim.Optimizer, forward: Callable[[slice], tuple[torch.Tensor, dict]],
              y: torch.Tensor, stage: int, epoch: int) -> dict[str, float]:
    """One data-parallel step on this rank's shard of a batch.

    Args:
        forward: shard → ``(prediction (n_r, 1), solver stats)``.
        y: ``(n, 1)`` targets of the whole batch.

    Returns:
        The batch's metrics as one process on the whole batch would report them
        (shard means weighted by shard size, summed over ranks).
    """
    n = y.shape[0]
    s = D.shard(n)
    pred, stats = forward(s)
    err = ((pred - y[s]) ** 2).sum()
    opt.zero_grad(set_to_none=True)
    (err / n).backward()
    D.all_reduce_grads(model.parameters())
    n_r = s.stop - s.start
    row = D.reduce_mean({"loss": err.item() / max(n_r, 1), **stats}, weight=n_r)
    _check_finite(torch.tensor(row["loss"]), stage, epoch)
    opt.step()
    return row


def _deq_epoch(model: nn.Module, opt: torch.optim.Optimizer, data: ImageData, batches: list, stage: int, epoch: int,
               recipe: Recipe) -> dict[str, float]:
    """One epoch of stage 1; returns loss and solver statistics averaged over batches.

    Optimiser step ``s = epoch · len(batches) + b`` decides, through ``recipe``,
    whether the forward solver runs; warm starts come from and go to its cache.
    """
    model.train()
    sums: dict[str, float] = {}
    for b, idx in enumerate(batches):
        x = data.coords if idx is None else data.coords[idx]
        y = data.target if idx is None else data.target[idx]
        forward, commit = recipe_step(model, recipe, x, idx, epoch * len(batches) + b)
        if D.is_distributed():
            # The backward solver's step count is known after backward: reduce it separately.
            row = _ddp_step(model, opt, forward, y, stage, epoch)
            row["solver/bwd_nstep"] = D.reduce_mean({"b": getattr(model, "last_bwd_nstep", 0.0)})["b"]
        else:
            pred, stats = forward(slice(None))
            loss = torch.mean((pred - y) ** 2)
            _check_finite(loss, stage, epoch)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            row = {"loss": loss.item(), "solver/bwd_nstep": getattr(model, "last_bwd_nstep", 0.0), **stats}
        commit()
        for k, v in row.items():
            sums[k] = sums.get(k, 0.0) + v
    return {k: v / len(batches) for k, v in sums.items()}


def _refiner_epoch(model: nn.Module, opt: torch.optim.Optimizer, data: ImageData, y_deq: torch.Tensor, batches: list, epoch: int) -> dict[str, float]:
    """One epoch of CRR stage 2 (the DEQ is frozen; its output is cached in ``y_deq``)."""
    model.train()
    total = 0.0
    for idx in batches:
        x = data.coords if idx is None else data.coords[idx]
        y = data.target if idx is None else data.target[idx]
        yd = y_deq if idx is None else y_deq[idx]
        if D.is_distributed():
            total += _ddp_step(model.refiner, opt, lambda s: (model(x[s], yd[s]), {}), y, 2, epoch)["loss"]
            continue
        loss = torch.mean((model(x, yd) - y) ** 2)
        _check_finite(loss, 2, epoch)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        total += loss.item()
    return {"loss": total / len(batches)}


def final_metrics(pred: torch.Tensor, target: torch.Tensor, ev: EvalConfig = EvalConfig()) -> dict[str, float]:
    """Every registered image metric (:func:`suite.metrics.registry.computed_metrics`) of a final
    ``(1, 1, H, W)`` output against its ground truth (data range: the ground truth's)."""
    return score(computed_metrics(), pred, target, ev)


def _write_artifacts(outdir: Path, tracker: Tracker, pred: torch.Tensor, data: ImageData, results: dict, trace: dict,
                     stage1: torch.Tensor | None = None) -> None:
    """Reconstruction, residual map (scaled to its max), metrics and solver traces.

    For CRR also the frozen DEQ's (stage-1) reconstruction, ``stage1.png`` and
    ``images.pt["stage1"]``, so reports can compare the stages.
    """
    outdir.mkdir(parents=True, exist_ok=True)
    residual = M.residual_map(pred, data.image)
    paths = [
        save_png(pred, outdir / "reconstruction.png"),
        save_png(residual / residual.max().clamp_min(1e-12), outdir / "residual.png"),
        save_png(data.image, outdir / "ground_truth.png"),
    ]
    images = {"reconstruction": pred.cpu(), "ground_truth": data.image.cpu()}
    if stage1 is not None:
        images["stage1"] = stage1.cpu()
        paths.append(save_png(stage1, outdir / "stage1.png"))
    log_run_files(tracker, outdir, paths, images, {"metrics.json": results, "solver_trace.json": trace})


def fit_inr(
    cfg: ExperimentConfig,
    model: nn.Module,
    data: ImageData,
    tracker: Tracker,
    ckpt: Checkpointer | None = None,
    outdir: str | Path | None = None,
    refine: bool = False,
) -> dict[str, float]:
    """Fits a DEQ-INR, then with ``refine`` a CRR refiner on the frozen DEQ (stage 2).

    Args:
        cfg: the resolved experiment.
        model: :class:`~suite.models.deq_inr.DEQINR`, or with ``refine`` :class:`~suite.models.crr.CRR`
            (any model with the same interface: ``solve``, ``hidden``; with ``refine`` ``deq``,
            ``refiner``, ``freeze_deq``).
        data: the image (see :func:`suite.data.images.image_data`).
        tracker: receives metrics (see module docstring) and artifacts.
        ckpt: checkpoint manager; resumes from its newest checkpoint if any.
        outdir: where artifacts are written (None: no artifacts).
        refine: run CRR's stage 2 (section ``crr``).

    Returns:
        The final metrics (also logged). Memory: ``mem/train_peak_mb`` (both stages'
        epochs), ``mem/infer_peak_mb`` (the frozen DEQ's and the final evaluation),
        ``mem/peak_mb`` the larger, each by :class:`~suite.training.common.PhasePeak`.

    Raises:
        DivergedError: the loss became non-finite.
    """
    is_crr = refine
    device = pick_device(cfg.train.device)
    model.to(device)
    data = data.to(device)
    deq = model.deq if is_crr else model
    gen = torch.Generator().manual_seed(cfg.seed)
    opt = torch.optim.Adam(deq.parameters(), lr=cfg.train.lr)
    recipe = Recipe(cfg.deq, data.coords.shape[0], deq.hidden, device)
    prog, state = resume(ckpt, model, gen)
    if state is not None:
        recipe.load_state_dict(state.get("recipe"))
        if prog.stage == 1:
            opt.load_state_dict(state["opt"])
    t_start = time.perf_counter() - prog.elapsed

    def checkpoint(opt_: torch.optim.Optimizer, step: int) -> None:
        save(ckpt, prog, t_start, model, opt_, gen, step, recipe=recipe.state_dict())

    e1 = cfg.train.epochs
    if prog.stage == 1:
        with PhasePeak(device) as peak:
            for epoch in range(prog.epoch, e1):
                t0 = time.perf_counter()
                batches = _batches(data.coords.shape[0], cfg.train.batch_size, gen, device)
                row = _deq_epoch(deq, opt, data, batches, 1, epoch, recipe)
                row["time/epoch_s"] = time.perf_counter() - t0
                if (epoch + 1) % cfg.train.eval_every == 0 or epoch + 1 == e1:
                    y_pix, ev = evaluate_grid(deq, data.coords, recipe)
                    row.update(ev, psnr=_psnr(pixels_to_image(y_pix, *data.shape), data))
                tracker.log_metrics({**row, "stage": 1.0}, step=epoch)
                prog.epoch = epoch + 1
                prog.train_mem = max(prog.train_mem, peak.read())
                if ckpt and ckpt.due(prog.epoch) and prog.epoch < e1 + (cfg.crr.epochs if is_crr else 0):
                    checkpoint(opt, prog.epoch)
        prog.train_mem = max(prog.train_mem, peak.value)
        deq.eval()

    with PhasePeak(device) as peak:
        y_deq_pix, eval_stats = evaluate_grid(deq, data.coords, recipe)
        with torch.no_grad():
            k = min(4096, data.coords.shape[0])
            _, stats, _ = deq.solve(data.coords[:k], z0=recipe.cache[:k] if recipe.eval_from_cache else None)
    infer_mem = peak.value
    stage1_img = pixels_to_image(y_deq_pix, *data.shape)
    stage1_psnr = _psnr(stage1_img, data)
    trace = {"eval_rel_trace": stats["rel_trace"], "eval_nstep": stats["nstep"], "eval_init": cfg.deq.eval_init}
    final_img = stage1_img

    if is_crr:
        model.freeze_deq()
        e2 = cfg.crr.epochs
        opt2 = torch.optim.Adam(model.refiner.parameters(), lr=cfg.crr.lr)
        if prog.stage == 1:
            prog.stage, prog.epoch = 2, 0
            prog.best = {**prog.best, "psnr": stage1_psnr, "epoch": -1, "state": None}
        elif state is not None:
            opt2.load_state_dict(state["opt"])
        n_pix = data.coords.shape[0]
        refine_fn = lambda x: D.on_grid(lambda s: model(x[s], y_deq_pix[s]), n_pix, chunk=None)  # noqa: E731  (full grid only)
        with PhasePeak(device) as peak:
            for epoch in range(prog.epoch, e2):
                t0 = time.perf_counter()
                row = _refiner_epoch(model, opt2, data, y_deq_pix, _batches(data.coords.shape[0], cfg.train.batch_size, gen, device), epoch)
                row["time/epoch_s"] = time.perf_counter() - t0
                model.eval()
                with torch.no_grad():
                    cur = _psnr(pixels_to_image(refine_fn(data.coords), *data.shape), data)
                row["psnr"] = cur
                if cfg.crr.keep_best and cur > prog.best["psnr"]:
                    prog.best.update(psnr=cur, epoch=epoch, state={k: v.detach().clone() for k, v in model.refiner.state_dict().items()})
                tracker.log_metrics({**row, "stage": 2.0}, step=e1 + epoch)
                prog.epoch = epoch + 1
                prog.train_mem = max(prog.train_mem, peak.read())
                if ckpt and ckpt.due(prog.epoch) and prog.epoch < e2:
                    checkpoint(opt2, e1 + prog.epoch)
        prog.train_mem = max(prog.train_mem, peak.value)
        if cfg.crr.keep_best:
            if prog.best["state"] is None:
                # No epoch beat the frozen DEQ: the conservative choice is a zero residual.
                for p in model.refiner.last.parameters():
                    torch.nn.init.zeros_(p)
            else:
                model.refiner.load_state_dict(prog.best["state"])
        model.eval()
        with PhasePeak(device) as peak, torch.no_grad():
            final_img = pixels_to_image(refine_fn(data.coords), *data.shape)
        infer_mem = max(infer_mem, peak.value)

    results = final_metrics(final_img, data.image, cfg.eval)
    results["mem/train_peak_mb"] = prog.train_mem
    results["mem/infer_peak_mb"] = infer_mem
    results["mem/peak_mb"] = max(prog.train_mem, infer_mem)
    results["time/total_s"] = time.perf_counter() - t_start
    results.update(eval_stats)  # solver/eval_nstep, solver/eval_abs_lowest, solver/eval_rel_lowest
    if is_crr:
        results["stage1/psnr"] = stage1_psnr
        results["crr/gain_db"] = results["psnr"] - stage1_psnr
        results["crr/best_epoch"] = float(prog.best["epoch"])
    tracker.log_metrics(results, step=e1 + (cfg.crr.epochs if is_crr else 0))
    if outdir is not None and D.is_main():
        _write_artifacts(Path(outdir), tracker, final_img, data, results, trace, stage1_img if is_crr else None)
    return results
