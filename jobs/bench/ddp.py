"""``deqbench bench ddp``: throughput of one training cell with 1 and 2 DDP ranks (gloo, CPU).

The cell is a DEQ-INR (the CRR stage-1 model) trained on shuffled pixel
mini-batches. Its data-parallel path is the suite's own
(:mod:`suite.training.distributed`, used by :mod:`suite.training.inr`): there
is no ``DistributedSampler``; every rank draws the same batch of pixel indices
and trains on its contiguous shard of the batch rows, the gradients are summed
in one flat all-reduce per step, the per-step metrics in two small ones. Same
global batch, so the updates match the 1-rank run up to rounding (the final
losses are reported side by side as a check).

Each variant ``RxT`` (``R`` ranks × ``T`` torch threads per rank) is launched
exactly as ``deqbench sweep`` launches a cell: :func:`jobs.launchers.local`'s
per-cell runner, i.e. ``python -m jobs.node cell.json`` for one rank and
``python -m torch.distributed.run --standalone --nproc_per_node=R -m jobs.node
cell.json`` for more, with ``OMP_NUM_THREADS=T`` and
``DEQBENCH_TORCH_THREADS=T``; rank 0 logs to MLflow (an SQLite store in a
temporary directory). The timing is the ``time/epoch_s`` series the run logged
(training only: it excludes evaluation, logging, checkpoints and process
start-up), the first ``warmup_epochs`` dropped; per run its median, per
variant the median over ``repeats`` runs. Variants run in alternating order
over repeats (forward, reversed, forward, ...) so drifting load hits all alike.

Throughput: one epoch is one pass over the ``size²`` pixels, so pixels/s is
``size² / (s/epoch)``.

Threads: ``1x2`` is the fair single-process reference (the same two cores).
On a shared machine multi-threaded variants stall on every op when another
process holds a core, and a 2-process job gets a larger share of a loaded
machine than a 1-process job, so the ratios are only meaningful at low load
(the bench prints the load average before and after).

On GPUs (NCCL, one GPU per rank) the gradient all-reduce is small (the model's
~10⁵ parameters, well under a millisecond on NVLink), so scaling is bounded by
what does not shrink with the shard: the solver loop's kernel launches and
host syncs (``.item()`` per step, 3 collectives per step), per-shard early
exit (the slowest shard's iteration count sets the step), and the unsharded
parts (final metrics, rank-0 logging). With a per-rank shard large enough to
fill the GPU (full-batch 512×512: 131 072 pixels per rank) near-linear
scaling is expected; with small mini-batches a step is launch-bound and a
second GPU gains little.

Config keys: see :data:`DEFAULTS` and ``configs/bench/ddp.yaml``.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import statistics
import tempfile
import time
from dataclasses import replace
from pathlib import Path
from typing import Any, Dict, List, Tuple

DEFAULTS: Dict[str, Any] = {
    "experiment": "configs/experiments/deq_inr.yaml",
    "set": {},
    "variants": ["1x1", "1x2", "2x1"],
    "repeats": 3,
    "warmup_epochs": 1,
    "workdir": None,
    "out": "bench_ddp.json",
}
_VARIANT = re.compile(r"^(\d+)x(\d+)$")


def _check_int(cfg: Dict[str, Any], key: str, lo: int) -> None:
    value = cfg[key]
    if isinstance(value, bool) or not isinstance(value, int) or value < lo:
        raise ValueError(f"bench ddp: {key} must be an integer >= {lo}, got {value!r}")


def parse_variant(text: Any) -> Tuple[int, int]:
    """``"2x1"`` → ``(ranks, threads per rank)`` = ``(2, 1)``.

    Raises:
        ValueError: not of the form ``RxT`` with ``R, T >= 1``.
    """
    m = _VARIANT.match(str(text))
    if not m or int(m.group(1)) < 1 or int(m.group(2)) < 1:
        raise ValueError(f"bench ddp: variant {text!r} must be 'RxT' (ranks x torch threads per rank, "
                         f"both >= 1), e.g. '1x1', '1x2', '2x1'")
    return int(m.group(1)), int(m.group(2))


def merge_config(cfg: Dict[str, Any]) -> Dict[str, Any]:
    """Defaults overlaid with ``cfg``, validated.

    Raises:
        ValueError: an unknown key, a bad variant, a non-positive count, or an
            experiment config that does not validate (``suite.config.ConfigError``).
    """
    unknown = sorted(set(cfg) - set(DEFAULTS))
    if unknown:
        raise ValueError(f"bench ddp: unknown key(s) {unknown}; allowed: {sorted(DEFAULTS)}")
    out = {**DEFAULTS, **cfg}
    _check_int(out, "repeats", 1)
    _check_int(out, "warmup_epochs", 0)
    if not isinstance(out["set"], dict):
        raise ValueError(f"bench ddp: set must be a mapping of dotted config keys, got {out['set']!r}")
    if not isinstance(out["variants"], list) or not out["variants"]:
        raise ValueError(f"bench ddp: variants must be a non-empty list such as ['1x1', '2x1'], got {out['variants']!r}")
    out["variants"] = [f"{r}x{t}" for r, t in map(parse_variant, out["variants"])]
    if len(set(out["variants"])) != len(out["variants"]):
        raise ValueError(f"bench ddp: variants must be distinct, got {out['variants']}")
    exp = _experiment_config(out, 1)
    if exp.family not in ("deq_inr", "crr"):
        raise ValueError(f"bench ddp: family {exp.family!r} is not supported; choices: deq_inr, crr "
                         "(throughput is counted in pixels per epoch)")
    if exp.train.epochs <= out["warmup_epochs"]:
        raise ValueError(f"bench ddp: train.epochs ({exp.train.epochs}) must exceed warmup_epochs "
                         f"({out['warmup_epochs']}) to leave timed epochs")
    return out


def _overrides(cfg: Dict[str, Any], ranks: int) -> Dict[str, Any]:
    return {**cfg["set"], "resources.tasks_per_node": ranks, "resources.nodes": 1, "train.device": "cpu",
            "name": "bench_ddp"}


def _experiment_config(cfg: Dict[str, Any], ranks: int) -> Any:
    from suite.config import load_config

    return load_config(cfg["experiment"], _overrides(cfg, ranks))


def run_variant(cfg: Dict[str, Any], variant: str, root: Path, uri: str, tag: str) -> Dict[str, Any]:
    """Runs the cell once as ``variant`` through the local launcher's per-cell runner.

    Args:
        cfg: the merged bench config.
        variant: ``"RxT"``.
        root: parent of this run's work directory.
        uri: MLflow tracking URI rank 0 logs to.
        tag: unique name of this run (work directory).

    Returns:
        ``state``, ``run_id``, ``epoch_s`` (the logged per-epoch times, in epoch
        order), ``epochs`` (their steps), ``fwd_nstep`` (mean), ``final_loss``,
        ``wall_s`` (whole launch, start-up included), ``world_size`` (the run's tag).

    Raises:
        RuntimeError: the cell did not finish (its log's tail is in the message).
    """
    from jobs import tracking
    from jobs.cells import single_cell
    from jobs.launchers.local import _run_one

    ranks, threads = parse_variant(variant)
    cell = single_cell(cfg["experiment"], _overrides(cfg, ranks), tracking_uri=uri)
    cell = replace(cell, workdir=str(root / tag), label=f"{variant} {tag}")
    t0 = time.perf_counter()
    res = _run_one(cell, threads)
    wall = time.perf_counter() - t0
    if res["state"] != "FINISHED":
        log = Path(cell.workdir) / "log.txt"
        tail = log.read_text(errors="replace")[-3000:] if log.is_file() else ""
        raise RuntimeError(f"bench ddp: {variant} run {tag} ended {res['state']}: {res.get('error')}\n{tail}")
    run_id = res["run_id"]
    times = list(tracking.iter_metric(uri, run_id, "time/epoch_s"))
    nstep = [v for _, v in tracking.iter_metric(uri, run_id, "solver/fwd_nstep")]
    loss = [v for _, v in tracking.iter_metric(uri, run_id, "loss")]
    run = tracking.client(uri).get_run(run_id)
    return {"state": res["state"], "run_id": run_id, "epochs": [s for s, _ in times], "epoch_s": [v for _, v in times],
            "fwd_nstep": statistics.fmean(nstep) if nstep else float("nan"),
            "final_loss": loss[-1] if loss else float("nan"), "wall_s": wall,
            "world_size": int(run.data.tags.get("world_size", "0"))}


def summarise(runs: Dict[str, List[Dict[str, Any]]], warmup: int, pixels: int) -> Dict[str, Dict[str, Any]]:
    """Per variant: median s/epoch over repeats (each run's median after ``warmup`` epochs) and throughput.

    Args:
        runs: variant → its runs (:func:`run_variant` outputs).
        warmup: leading epochs dropped from every run.
        pixels: pixels per epoch (one pass over the image).

    Returns:
        variant → ``epoch_s`` (median), ``epoch_s_runs`` (per run), ``px_per_s``,
        ``fwd_nstep``, ``final_loss`` (median over runs), ``wall_s`` (median).
    """
    out: Dict[str, Dict[str, Any]] = {}
    for variant, rs in runs.items():
        per_run = [statistics.median(r["epoch_s"][warmup:]) for r in rs]
        med = statistics.median(per_run)
        out[variant] = {"epoch_s": med, "epoch_s_runs": per_run, "px_per_s": pixels / med,
                        "fwd_nstep": statistics.median(r["fwd_nstep"] for r in rs),
                        "final_loss": statistics.median(r["final_loss"] for r in rs),
                        "wall_s": statistics.median(r["wall_s"] for r in rs)}
    return out


def speedups(summary: Dict[str, Dict[str, Any]], runs: Dict[str, List[Dict[str, Any]]], warmup: int) -> Dict[str, Any]:
    """``2x1`` against ``1x1`` and ``1x2``: ratio of medians and the range of per-repeat (paired) ratios."""
    out: Dict[str, Any] = {}
    if "2x1" not in summary:
        return out
    for ref in ("1x1", "1x2"):
        if ref not in summary:
            continue
        paired = [statistics.median(a["epoch_s"][warmup:]) / statistics.median(b["epoch_s"][warmup:])
                  for a, b in zip(runs[ref], runs["2x1"])]
        out[ref] = {"ratio": summary[ref]["epoch_s"] / summary["2x1"]["epoch_s"], "paired_min": min(paired),
                    "paired_max": max(paired)}
    return out


def _table(summary: Dict[str, Dict[str, Any]], pixels: int) -> str:
    lines = ["| variant | ranks | threads/rank | s/epoch (median) | per-run medians | px/s | fwd iters | final loss | launch wall s |",
             "|---|---:|---:|---:|---|---:|---:|---:|---:|"]
    for variant, s in summary.items():
        r, t = parse_variant(variant)
        runs = ", ".join(f"{x:.3f}" for x in s["epoch_s_runs"])
        lines.append(f"| {variant} | {r} | {t} | {s['epoch_s']:.3f} | {runs} | {s['px_per_s']:.0f} | "
                     f"{s['fwd_nstep']:.1f} | {s['final_loss']:.6g} | {s['wall_s']:.1f} |")
    return "\n".join(lines) + f"\n({pixels} px per epoch)"


def run_bench(cfg: Dict[str, Any]) -> Dict[str, Any]:
    """Runs every variant ``repeats`` times, alternating order; returns the raw runs and the summary."""
    cfg = merge_config(cfg)
    exp = _experiment_config(cfg, 1)
    pixels = exp.data.size ** 2
    keep = cfg["workdir"] is not None
    root = Path(cfg["workdir"]).absolute() if keep else Path(tempfile.mkdtemp(prefix="bench_ddp_"))
    root.mkdir(parents=True, exist_ok=True)
    uri = f"sqlite:///{root / 'mlflow.db'}"
    from jobs import tracking

    tracking.client(uri).create_experiment("bench_ddp", artifact_location=(root / "artifacts").as_uri())
    runs: Dict[str, List[Dict[str, Any]]] = {v: [] for v in cfg["variants"]}
    load_before = os.getloadavg()
    try:
        for rep in range(cfg["repeats"]):
            order = cfg["variants"] if rep % 2 == 0 else cfg["variants"][::-1]
            for variant in order:
                r = run_variant(cfg, variant, root, uri, f"{variant}_r{rep}")
                runs[variant].append(r)
                print(f"  repeat {rep} {variant}: s/epoch {statistics.median(r['epoch_s'][cfg['warmup_epochs']:]):.3f} "
                      f"(epochs {len(r['epoch_s'])}, launch {r['wall_s']:.1f} s, load {os.getloadavg()[0]:.2f})",
                      flush=True)
    finally:
        if not keep:
            shutil.rmtree(root, ignore_errors=True)
    summary = summarise(runs, cfg["warmup_epochs"], pixels)
    return {"config": cfg, "pixels_per_epoch": pixels, "runs": runs, "summary": summary,
            "speedup_2x1": speedups(summary, runs, cfg["warmup_epochs"]), "load_before": load_before,
            "load_after": os.getloadavg(), "cpus": os.cpu_count(), "store": uri if keep else None}


def main(cfg: Dict[str, Any]) -> int:
    """``deqbench bench ddp``: prints the table and the speedup lines; writes ``out`` (JSON)."""
    merged = merge_config(cfg)
    exp = _experiment_config(merged, 1)
    print(f"bench ddp: {merged['experiment']} ({exp.family}, {exp.data.size}px, batch {exp.train.batch_size}, "
          f"{exp.train.epochs} epochs) variants {merged['variants']} x {merged['repeats']} repeats; "
          f"load {os.getloadavg()[0]:.2f} on {os.cpu_count()} CPUs", flush=True)
    result = run_bench(merged)
    print(_table(result["summary"], result["pixels_per_epoch"]))
    sp = result["speedup_2x1"]
    if "1x1" in sp:
        print(f"ddp speedup 2 ranks vs 1 rank (1 thread): {sp['1x1']['ratio']:.2f}x "
              f"(paired per repeat {sp['1x1']['paired_min']:.2f}-{sp['1x1']['paired_max']:.2f})")
    if "1x2" in sp:
        print(f"vs 1 rank (2 threads): {sp['1x2']['ratio']:.2f}x "
              f"(paired per repeat {sp['1x2']['paired_min']:.2f}-{sp['1x2']['paired_max']:.2f})")
    print(f"load average before {result['load_before'][0]:.2f}, after {result['load_after'][0]:.2f}")
    out = Path(merged["out"])
    out.write_text(json.dumps(result, indent=1, default=str))
    print(f"results: {out}")
    return 0
