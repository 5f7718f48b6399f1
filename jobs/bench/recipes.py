"""``deqbench bench recipes``: DEQ-INR time-to-quality, and the suite against a plain torchdeq loop.

Side by side in one process, on the same image, size and seeds:

- **reference**: TorchDEQ deq-zoo ``deq-inr``'s recipe written directly against
  torchdeq in :func:`reference_loop` (about 40 lines: no tracker, no
  checkpoints, no config): Fourier MFN, weight norm, fixed-point solve from zero
  on the first step only, a per-pixel cache of the last state as every later
  step's start, phantom gradient with 3 steps, Adam, full batch. Its modules are
  created in the same order from the same seed as the suite's
  :class:`~suite.models.deq_inr.DEQINR`, so both start from identical weights.
- **recipes**: named experiment files (``configs/experiments/deq_inr_*.yaml``)
  trained through the suite (``load_config`` → ``build_model`` → ``load_data`` →
  ``fit``, with real checkpoints and an in-memory tracker).

Every run evaluates the whole image every ``eval_every`` steps (solving from
zero with the run's evaluation solver) outside the timed training steps.
Reported per recipe (medians over seeds): PSNR against steps and against
cumulative training time, steps and seconds to ``target_db``, seconds per step;
and the suite's TorchDEQ recipe over the reference loop: seconds per step and
whole-run wall time (evaluations, checkpoints and tracking included). PSNR is
the suite's (data range of the ground truth); ``psnr_r1`` uses data range 1,
as TorchDEQ's script does. A figure (``figure``) and JSON (``out``) are written.
"""

from __future__ import annotations

import itertools
import json
import math
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any, Dict, List

import torch
from torch import nn

from jobs.bench._common import merge_config, print_table

DEFAULTS: Dict[str, Any] = {
    "out": "bench_recipes.json",
    "figure": "bench_recipes.png",
    "image": "camera",
    "size": 128,
    "input_scale": 64.0,
    "hidden": 256,
    "lr": 1.0e-3,
    "seeds": [0, 1],
    "threads": 1,
    "eval_every": 50,
    "target_db": 35.0,
    "reference": {"steps": 1000, "f_max_iter": 100, "f_tol": 1.0e-3, "phantom_steps": 3},
    "recipes": {},
    "merge": [],
    "reuse": "",
    "probe_reps": 0,
}


def reference_loop(image: torch.Tensor, cfg: Dict[str, Any], seed: int) -> Dict[str, Any]:
    """TorchDEQ deq-inr's recipe as a plain loop over torchdeq (see module docstring).

    Args:
        image: ``(1, 1, H, W)`` ground truth in [0, 1].
        cfg: the bench config (``hidden``, ``input_scale``, ``lr``, ``eval_every``, ``reference``).
        seed: weights' seed (the suite seeds ``torch.manual_seed(seed)`` the same way).

    Returns:
        ``curve``: ``[(step, training seconds so far, psnr), ...]`` at every
        evaluation; ``step_s``: seconds of each training step; ``wall_s``; ``cpu_s``:
        the process's CPU time for the whole run (one thread: hardly moved by other
        processes' load, unlike wall time).
    """
    from torchdeq import get_deq
    from torchdeq.norm import apply_norm, reset_norm

    from suite.data.images import coordinate_grid
    from suite.metrics import psnr

    t_wall, t_cpu = time.perf_counter(), time.process_time()
    ref, h = cfg["reference"], cfg["hidden"]
    torch.manual_seed(seed)
    x = coordinate_grid(*image.shape[-2:])
    y = image.reshape(-1, 1) * 2 - 1
    inj = nn.Linear(2, 2 * h)  # two Fourier filters u0, u1
    with torch.no_grad():
        inj.bias.uniform_(-math.pi, math.pi)
        inj.weight.mul_(cfg["input_scale"] / math.sqrt(2))
    f = nn.Sequential(nn.Linear(h, h))
    nn.init.uniform_(f[0].weight, -math.sqrt(1 / h), math.sqrt(1 / h))
    apply_norm(f, norm_type="weight_norm")
    deq = get_deq(core="sliced", f_solver="fixed_point_iter", f_max_iter=ref["f_max_iter"], f_tol=ref["f_tol"],
                  grad=ref["phantom_steps"], tau=1.0)
    head = nn.Linear(h, 1)
    params = list(inj.parameters()) + list(f.parameters()) + list(head.parameters())
    opt = torch.optim.Adam(params, lr=cfg["lr"])

    def solve(z0: torch.Tensor, max_iter: int | None) -> torch.Tensor:
        u0, u1 = torch.sin(inj(x)).chunk(2, dim=-1)
        reset_norm(f)
        z_out, _ = deq(lambda z: f(z + u0) * u1, z0, solver_kwargs=None if max_iter is None else {"f_max_iter": max_iter})
        return z_out[-1]

    cache = torch.zeros(x.shape[0], h)
    curve, step_s, trained = [], [], 0.0
    for i in range(ref["steps"]):
        t0 = time.perf_counter()
        deq.train()
        z = solve(cache, None if i == 0 else 0)
        loss = torch.mean((head(z) - y) ** 2)
        opt.zero_grad()
        loss.backward()
        opt.step()
        cache = z.detach()
        step_s.append(time.perf_counter() - t0)
        trained += step_s[-1]
        if (i + 1) % cfg["eval_every"] == 0 or i + 1 == ref["steps"]:
            deq.eval()
            with torch.no_grad():
                pred = ((head(solve(torch.zeros_like(cache), None)) + 1) / 2).clamp(0, 1).reshape(image.shape)
            curve.append((i + 1, trained, float(psnr(pred, image)[0])))
    return {"curve": curve, "step_s": step_s, "wall_s": time.perf_counter() - t_wall,
            "cpu_s": time.process_time() - t_cpu}


def suite_run(spec: Dict[str, Any], cfg: Dict[str, Any], seed: int) -> Dict[str, Any]:
    """Trains one recipe through the suite; same return shape as :func:`reference_loop`."""
    from suite.config import load_config
    from suite.data import load_data
    from suite.models import build_model
    from suite.training import Checkpointer, MemoryTracker, fit

    t_wall, t_cpu = time.perf_counter(), time.process_time()
    sets = {"data.image": cfg["image"], "data.size": cfg["size"], "model.input_scale": cfg["input_scale"],
            "model.hidden": cfg["hidden"], "train.lr": cfg["lr"], "train.eval_every": cfg["eval_every"],
            "train.epochs": spec["steps"], "train.batch_size": -1, "seed": seed, **(spec.get("set") or {})}
    exp = load_config(spec["experiment"], sets)

    class Progress(MemoryTracker):
        """Prints each evaluation as it is logged (long runs are not silent)."""

        def log_metrics(self, metrics: Any, step: int | None = None) -> None:
            super().log_metrics(metrics, step)
            if "psnr" in metrics and step is not None and step < exp.train.epochs:
                print(f"    step {step + 1}: {metrics['psnr']:.2f} dB, {sum(self.series('time/epoch_s')):.0f} s trained",
                      flush=True)

    tracker = Progress()
    torch.manual_seed(seed)
    model, data = build_model(exp), load_data(exp)
    with tempfile.TemporaryDirectory() as tmp:
        fit(exp, model, data, tracker, ckpt=Checkpointer(tmp, exp.train.ckpt_every))
    step_s = tracker.series("time/epoch_s")
    cum = dict(enumerate(itertools.accumulate(step_s)))
    curve = [(int(s) + 1, cum[int(s)], v) for s, v in tracker.history["psnr"] if s is not None and int(s) < len(step_s)]
    return {"curve": curve, "step_s": step_s, "wall_s": time.perf_counter() - t_wall,
            "cpu_s": time.process_time() - t_cpu, "eval_rel_lowest": tracker.last("solver/eval_rel_lowest")}


def _to_target(curve: List[tuple], target: float) -> tuple[float, float]:
    """(steps, seconds) at the first evaluation at or above ``target`` dB; (nan, nan) if never."""
    for step, secs, value in curve:
        if value >= target:
            return float(step), secs
    return math.nan, math.nan


def _median(xs: List[float]) -> float:
    xs = [x for x in xs if not math.isnan(x)]
    return statistics.median(xs) if xs else math.nan


def summarise(runs: Dict[str, List[Dict[str, Any]]], target: float, r1_offset: float) -> List[Dict[str, Any]]:
    """One row per recipe: medians over seeds (see module docstring)."""
    rows = []
    for name, seeds in runs.items():
        reached = [_to_target(r["curve"], target) for r in seeds]
        at = lambda k: _median([next((v for s, _, v in r["curve"] if s == k), math.nan) for r in seeds])  # noqa: E731
        rows.append({
            "recipe": name, "seeds": len(seeds),
            "psnr_1000": at(1000), "psnr_1000_r1": at(1000) + r1_offset,
            "psnr_final": _median([r["curve"][-1][2] for r in seeds]), "steps": seeds[0]["curve"][-1][0],
            "steps_to_target": _median([s for s, _ in reached]), "s_to_target": _median([t for _, t in reached]),
            "reached": sum(not math.isnan(s) for s, _ in reached),
            "s_per_step": _median([statistics.median(r["step_s"]) for r in seeds]),
            "wall_s": _median([r["wall_s"] for r in seeds]),
            "cpu_s": _median([r.get("cpu_s", math.nan) for r in seeds]),
        })
    return rows


def plot(runs: Dict[str, List[Dict[str, Any]]], path: Path, target: float) -> None:
    """PSNR against steps and against training time (median over seeds per evaluation)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for name, seeds in runs.items():
        n = min(len(r["curve"]) for r in seeds)
        steps = [seeds[0]["curve"][i][0] for i in range(n)]
        secs = [statistics.median(r["curve"][i][1] for r in seeds) for i in range(n)]
        vals = [statistics.median(r["curve"][i][2] for r in seeds) for i in range(n)]
        axes[0].plot(steps, vals, label=name)
        axes[1].plot(secs, vals, label=name)
    for ax, xl in zip(axes, ["optimiser steps", "training time (s)"]):
        ax.axhline(target, color="grey", lw=0.8, ls="--")
        ax.set_xlabel(xl)
        ax.set_ylabel("PSNR (dB)")
        ax.grid(alpha=0.3)
    axes[1].set_xscale("log")
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def step_probe(cfg: Dict[str, Any]) -> Dict[str, float]:
    """Median seconds per training step of every recipe, the recipes alternating step by step.

    Side by side in one process (``probe_reps`` rounds, the first dropped), so a load
    change hits every recipe alike: the fair per-step cost, where the long runs'
    own timings were taken at different loads.
    """
    from suite.config import load_config
    from suite.data import load_data
    from suite.models import build_model
    from suite.training.warm_start import Recipe, recipe_step

    torch.set_num_threads(cfg["threads"])
    sets = {"data.image": cfg["image"], "data.size": cfg["size"], "model.input_scale": cfg["input_scale"],
            "model.hidden": cfg["hidden"], "train.lr": cfg["lr"]}
    runs = {}
    for name, spec in cfg["recipes"].items():
        exp = load_config(spec["experiment"], {**sets, **(spec.get("set") or {})})
        model, data = build_model(exp), load_data(exp)
        runs[name] = (model, data, Recipe(exp.deq, data.coords.shape[0], model.hidden, torch.device("cpu")),
                      torch.optim.Adam(model.parameters(), lr=cfg["lr"]))
    times: Dict[str, List[float]] = {name: [] for name in runs}
    for step in range(cfg["probe_reps"]):
        for name, (model, data, recipe, opt) in runs.items():
            model.train()
            t0 = time.perf_counter()
            forward, commit = recipe_step(model, recipe, data.coords, None, step)
            pred, _ = forward(slice(None))
            loss = torch.mean((pred - data.target) ** 2)
            opt.zero_grad()
            loss.backward()
            opt.step()
            commit()
            if step:
                times[name].append(time.perf_counter() - t0)
    return {name: statistics.median(t) for name, t in times.items()}


def _measure(cfg: Dict[str, Any]) -> tuple[Dict[str, List[Dict[str, Any]]], float]:
    """Runs the reference loop and every recipe for each seed; JSON after each run."""
    import os

    from suite.data.images import load_image

    torch.set_num_threads(cfg["threads"])
    image = load_image(cfg["image"], cfg["size"])
    r1_offset = -20 * math.log10(float(image.max() - image.min()))  # PSNR at data range 1 minus the suite's
    load = os.getloadavg()
    print(f"bench recipes: {cfg['image']} {cfg['size']}x{cfg['size']}, seeds {cfg['seeds']}, "
          f"{cfg['threads']} thread(s), load {load[0]:.1f}", flush=True)
    runs: Dict[str, List[Dict[str, Any]]] = {"reference loop (torchdeq)": []}
    runs.update({name: [] for name in cfg["recipes"]})
    # runs of an earlier, interrupted measurement with the same settings (its JSON), by name and seed
    done = json.loads(Path(cfg["reuse"]).read_text())["runs"] if cfg["reuse"] else {}
    for seed in cfg["seeds"]:  # interleaved: reference and recipes of one seed back to back
        for name in runs:
            spec = cfg["recipes"].get(name)
            old = [r for r in done.get(name, []) if r.get("seed") == seed]
            if old:
                runs[name].append(old[0])
                print(f"  seed {seed} {name}: reused from {cfg['reuse']}", flush=True)
                continue
            res = reference_loop(image, cfg, seed) if spec is None else suite_run(spec, cfg, seed)
            res["seed"], res["load_after"] = seed, os.getloadavg()[0]
            runs[name].append(res)
            print(f"  seed {seed} {name}: {res['curve'][-1][2]:.2f} dB after {res['curve'][-1][0]} steps, "
                  f"{statistics.median(res['step_s']):.3f} s/step, wall {res['wall_s']:.0f} s", flush=True)
            Path(cfg["out"]).write_text(json.dumps({"config": cfg, "r1_offset_db": r1_offset, "runs": runs}, indent=1))
    return runs, r1_offset


def main(cfg: Dict[str, Any]) -> int:

    cfg = merge_config(cfg, DEFAULTS, "bench recipes", opaque=("recipes",))
    from suite.training.common import keep_cpu_heap

    keep_cpu_heap()  # as fit does (when asked): the plain loop and the suite's runs get the same allocator
    if cfg["probe_reps"]:
        import os

        load = os.getloadavg()[0]
        probe = step_probe(cfg)
        print_table(["recipe", "s/step (side by side)"], [[n, f"{v:.3f}"] for n, v in probe.items()])
        print(f"load {load:.1f} before, {os.getloadavg()[0]:.1f} after")
        return 0
    if cfg["merge"]:  # summarise runs made by several processes (e.g. one per seed, side by side)
        parts = [json.loads(Path(f).read_text()) for f in cfg["merge"]]
        runs = {name: [r for part in parts for r in part["runs"].get(name, [])] for name in parts[0]["runs"]}
        cfg["recipes"], r1_offset = parts[0]["config"]["recipes"], parts[0]["r1_offset_db"]
        print(f"bench recipes: merged {', '.join(cfg['merge'])}")
    else:
        runs, r1_offset = _measure(cfg)
    rows = summarise(runs, cfg["target_db"], r1_offset)
    fmt = lambda v, p=2: "—" if isinstance(v, float) and math.isnan(v) else f"{v:.{p}f}"  # noqa: E731
    print_table(["recipe", "PSNR@1000", "PSNR@1000 (range 1)", "final PSNR", "steps", f"steps to {cfg['target_db']:g}",
                 f"train s to {cfg['target_db']:g}", "s/step", "wall s"],
                [[r["recipe"], fmt(r["psnr_1000"]), fmt(r["psnr_1000_r1"]), fmt(r["psnr_final"]), str(r["steps"]),
                  fmt(r["steps_to_target"], 0) + f" ({r['reached']}/{r['seeds']})", fmt(r["s_to_target"], 0),
                  fmt(r["s_per_step"], 3), fmt(r["wall_s"], 0)] for r in rows])
    ref = rows[0]
    for r in rows[1:]:
        if cfg["recipes"][r["recipe"]].get("compare_with_reference"):
            r["ratio_step"] = r["s_per_step"] / ref["s_per_step"]
            r["ratio_wall"] = (r["wall_s"] / r["steps"]) / (ref["wall_s"] / ref["steps"])
            r["ratio_cpu"] = (r["cpu_s"] / r["steps"]) / (ref["cpu_s"] / ref["steps"])
            print(f"{r['recipe']} / reference loop: {r['ratio_step']:.3f}x per training step, "
                  f"{r['ratio_wall']:.3f}x wall per step, {r['ratio_cpu']:.3f}x CPU time per step "
                  f"(evaluations, checkpoints, tracking included), "
                  f"PSNR@1000 {r['psnr_1000'] - ref['psnr_1000']:+.3f} dB", flush=True)
    plot(runs, Path(cfg["figure"]), cfg["target_db"])
    Path(cfg["out"]).write_text(json.dumps({"config": cfg, "r1_offset_db": r1_offset, "runs": runs, "summary": rows},
                                           indent=1))
    print(f"results: {cfg['out']}; figure: {cfg['figure']}")
    return 0
