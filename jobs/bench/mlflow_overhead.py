"""``deqbench bench mlflow_overhead``: what MLflow logging costs per training step.

The step: one epoch of a paper-shaped DEQ-INR (``configs/experiments/deq_inr.yaml``:
Fourier filters, hidden 256, Anderson + IFT, full batch, so one optimiser step
per epoch) at a CPU-sized resolution (``set``), trained by
``suite.training.fit`` -- the node job's code path. The fit loops call
``tracker.log_metrics`` once per epoch and the node job flushes the real
:class:`jobs.tracking.MlflowTracker` before every checkpoint
(``train.ckpt_every``) and at the end; this bench does the same with a
:class:`suite.training.checkpoint.Checkpointer` in a temporary directory.

After ``warmup_fits`` untimed fits, side by side, in alternating order over
``repeats`` (forward, reversed, ...), the same fit with each tracker of ``trackers``:

* ``none``: :class:`suite.training.NullTracker` (drops everything),
* ``memory``: :class:`suite.training.MemoryTracker`,
* ``mlflow``: :class:`jobs.tracking.MlflowTracker` on a fresh run in an SQLite
  store (``store``; a temporary directory by default).

Every tracker is wrapped in :class:`TimedTracker`, which times each
``log_metrics`` and ``flush`` call (``time.perf_counter``) and keeps a copy of
what was logged. Reported per step (= per logged epoch):

* the step time: the median ``time/epoch_s`` (training only);
* the tracker time per step: (time in ``log_metrics`` + time in ``flush``) /
  epochs, median over repeats; the overhead is ``mlflow`` minus ``none``;
* end to end: the fit's wall time (final flush included), ``mlflow`` minus
  ``none`` per epoch, paired by repeat (noisy: it is the difference of two
  long timings);
* the cost of one flush of N buffered epochs (``flush_epochs``), and of one
  unbuffered ``mlflow.log_metrics`` call (fluent API, synchronous) and one
  ``MlflowClient.log_batch`` per step, for comparison.

The paper-scale estimate combines the per-call ``log_metrics`` cost with one
flush of ``ckpt_every`` epochs amortised over them, and states the shortest
step for which it stays within 2 %.
"""

from __future__ import annotations

import json
import os
import shutil
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any, Dict, List, Mapping

TRACKERS = ("none", "memory", "mlflow")  # "none": NullTracker (YAML would read null as None)
EXPERIMENT = "bench_mlflow_overhead"

DEFAULTS: Dict[str, Any] = {
    "experiment": "configs/experiments/deq_inr.yaml",
    "set": {},
    "trackers": list(TRACKERS),
    "repeats": 3,
    "warmup_fits": 1,
    "threads": 1,
    "flush_epochs": [1, 10, 50, 500],
    "flush_repeats": 5,
    "unbuffered_steps": 100,
    "paper_ckpt_every": 50,
    "store": None,
    "out": "bench_mlflow_overhead.json",
}


class TimedTracker:
    """Wraps a tracker: times ``log_metrics`` and ``flush``, and keeps what was logged.

    Args:
        inner: the tracker (``NullTracker``, ``MemoryTracker``, ``MlflowTracker``).

    Attributes:
        log_s: seconds spent in ``inner.log_metrics``; ``log_calls``: how many calls.
        flush_s: seconds spent in ``inner.flush`` (0 when it has none); ``flushes``: how many.
        logged: ``{key: [(step, value), ...]}`` as passed to ``log_metrics``.
    """

    def __init__(self, inner: Any) -> None:
        self.inner = inner
        self.log_s = 0.0
        self.log_calls = 0
        self.flush_s = 0.0
        self.flushes = 0
        self.logged: Dict[str, List[tuple]] = {}

    def log_metrics(self, metrics: Mapping[str, float], step: int | None = None) -> None:
        t0 = time.perf_counter()
        self.inner.log_metrics(metrics, step=step)
        self.log_s += time.perf_counter() - t0
        self.log_calls += 1
        for k, v in metrics.items():
            self.logged.setdefault(k, []).append((step or 0, float(v)))

    def log_artifact(self, path: Any, subdir: str | None = None) -> None:
        self.inner.log_artifact(path, subdir)

    def flush(self) -> None:
        if not hasattr(self.inner, "flush"):
            return
        t0 = time.perf_counter()
        self.inner.flush()
        self.flush_s += time.perf_counter() - t0
        self.flushes += 1


def merge_config(cfg: Dict[str, Any]) -> Dict[str, Any]:
    """Defaults overlaid with ``cfg``, validated.

    Raises:
        ValueError: an unknown key or tracker, a bad count, or an experiment
            config that does not validate (``suite.config.ConfigError``).
    """
    unknown = sorted(set(cfg) - set(DEFAULTS))
    if unknown:
        raise ValueError(f"bench mlflow_overhead: unknown key(s) {unknown}; allowed: {sorted(DEFAULTS)}")
    out = {**DEFAULTS, **cfg}
    for key, lo in (("repeats", 1), ("warmup_fits", 0), ("threads", 1), ("flush_repeats", 1), ("unbuffered_steps", 1), ("paper_ckpt_every", 1)):
        v = out[key]
        if isinstance(v, bool) or not isinstance(v, int) or v < lo:
            raise ValueError(f"bench mlflow_overhead: {key} must be an integer >= {lo}, got {v!r}")
    fe = out["flush_epochs"]
    if not isinstance(fe, list) or not fe or not all(isinstance(n, int) and not isinstance(n, bool) and n >= 1 for n in fe):
        raise ValueError(f"bench mlflow_overhead: flush_epochs must be a non-empty list of integers >= 1, got {fe!r}")
    tr = out["trackers"]
    if not isinstance(tr, list) or not tr or any(t not in TRACKERS for t in tr) or len(set(tr)) != len(tr):
        raise ValueError(f"bench mlflow_overhead: trackers must be distinct names from {list(TRACKERS)}, got {tr!r}")
    if "none" not in tr or "mlflow" not in tr:
        raise ValueError(f"bench mlflow_overhead: trackers must include 'none' (NullTracker) and 'mlflow' (the overhead is "
                         f"their difference), got {tr!r}")
    if not isinstance(out["set"], dict):
        raise ValueError(f"bench mlflow_overhead: set must be a mapping of dotted config keys, got {out['set']!r}")
    _experiment_config(out)  # any registered family; load_config refuses an unknown one
    return out


def _experiment_config(cfg: Dict[str, Any]) -> Any:
    from suite.config import load_config

    return load_config(cfg["experiment"], {**cfg["set"], "train.device": "cpu"})


def _make_tracker(kind: str, uri: str, exp: Any, label: str) -> Any:
    from suite.training import MemoryTracker, NullTracker

    if kind == "none":
        return NullTracker()
    if kind == "memory":
        return MemoryTracker()
    from jobs import tracking
    from suite.config import flatten

    return tracking.start_run(uri, EXPERIMENT, label, flatten(exp), tracking.run_tags("bench", exp.family, 1))


def run_fit(kind: str, exp: Any, uri: str, workdir: Path, label: str) -> Dict[str, Any]:
    """One fit of ``exp`` with tracker ``kind``, flushing as the node job does.

    Returns:
        ``wall_s`` (fit + final flush), ``epoch_s`` (logged per-epoch times),
        ``log_s``/``log_calls``, ``flush_s``/``flushes``, ``epochs``, ``logged``
        (what the tracker received) and, for ``mlflow``, ``run_id``.
    """
    from suite.data import load_data
    from suite.models import build_model
    from suite.training import fit
    from suite.training.checkpoint import Checkpointer

    inner = _make_tracker(kind, uri, exp, label)
    timed = TimedTracker(inner)
    ckpt = Checkpointer(workdir / label / "ckpt", exp.train.ckpt_every)
    if kind == "mlflow":
        ckpt.before_save.append(timed.flush)  # as jobs.node: metrics flushed just before every checkpoint
    model, data = build_model(exp), load_data(exp)
    t0 = time.perf_counter()
    fit(exp, model, data, timed, ckpt=ckpt, outdir=None)
    timed.flush()  # as jobs.node after fit
    wall = time.perf_counter() - t0
    if kind == "mlflow":
        inner.terminate("FINISHED")
    epoch_s = [v for _, v in timed.logged.get("time/epoch_s", [])]
    return {"kind": kind, "wall_s": wall, "epoch_s": epoch_s, "epochs": len(epoch_s), "log_s": timed.log_s,
            "log_calls": timed.log_calls, "flush_s": timed.flush_s, "flushes": timed.flushes,
            "logged": timed.logged, "run_id": getattr(inner, "run_id", None)}


def _epoch_row(fits: List[Dict[str, Any]]) -> Dict[str, float]:
    """The metrics of one logged epoch (keys and values of a real run's first epoch)."""
    logged = fits[0]["logged"]
    return {k: v[0][1] for k, v in logged.items() if v and v[0][0] == 0}


def time_flushes(uri: str, row: Mapping[str, float], sizes: List[int], repeats: int) -> Dict[int, Dict[str, Any]]:
    """Cost of one ``MlflowTracker.flush`` of ``n`` buffered epochs, for ``n`` in ``sizes``.

    Every flush writes new steps into one run (``flush``), so the store grows as in a real run.

    Returns:
        ``n`` → ``flush_ms`` (median), ``per_epoch_ms``, ``run_id``, ``steps`` (how many were written).
    """
    from jobs import tracking

    tracker = tracking.start_run(uri, EXPERIMENT, "flush", {}, {"bench": "flush"})
    out: Dict[int, Dict[str, Any]] = {}
    step = 0
    for n in sizes:
        times = []
        for _ in range(repeats):
            for _ in range(n):
                tracker.log_metrics(row, step=step)
                step += 1
            t0 = time.perf_counter()
            tracker.flush()
            times.append(time.perf_counter() - t0)
        med = statistics.median(times)
        out[n] = {"flush_ms": 1e3 * med, "per_epoch_ms": 1e3 * med / n, "runs_ms": [1e3 * t for t in times]}
    tracker.terminate("FINISHED")
    return {"sizes": out, "run_id": tracker.run_id, "steps": step}


def time_unbuffered(uri: str, row: Mapping[str, float], steps: int) -> Dict[str, Any]:
    """One synchronous write per step: ``mlflow.log_metrics`` (fluent) and ``MlflowClient.log_batch``.

    Returns:
        ``fluent_ms`` and ``log_batch_ms`` (medians per call) and the two run ids.
    """
    import mlflow
    from mlflow.entities import Metric

    from jobs import tracking

    client = tracking.client(uri)
    exp_id = tracking.experiment_id(uri, EXPERIMENT)
    # The fluent API needs a global URI; mlflow.set_tracking_uri also exports it as
    # $MLFLOW_TRACKING_URI, which every later subprocess (a sweep's cells) would inherit.
    # Restore both: mlflow's own setting (None = unset) and the variable.
    from mlflow.tracking._tracking_service import utils as mlflow_uri

    previous, previous_env = mlflow_uri._tracking_uri, os.environ.get("MLFLOW_TRACKING_URI")
    mlflow.set_tracking_uri(uri)
    fluent: List[float] = []
    try:
        with mlflow.start_run(experiment_id=exp_id, run_name="unbuffered_fluent") as run:
            fluent_id = run.info.run_id
            for i in range(steps):
                t0 = time.perf_counter()
                mlflow.log_metrics(dict(row), step=i)
                fluent.append(time.perf_counter() - t0)
    finally:
        mlflow.set_tracking_uri(previous)
        if previous_env is None:
            os.environ.pop("MLFLOW_TRACKING_URI", None)
        else:
            os.environ["MLFLOW_TRACKING_URI"] = previous_env
    batch_run = client.create_run(exp_id, run_name="unbuffered_log_batch")
    batch: List[float] = []
    for i in range(steps):
        t0 = time.perf_counter()
        now = int(time.time() * 1000)
        client.log_batch(batch_run.info.run_id, metrics=[Metric(k, float(v), now, i) for k, v in row.items()])
        batch.append(time.perf_counter() - t0)
    client.set_terminated(batch_run.info.run_id, "FINISHED")
    return {"fluent_ms": 1e3 * statistics.median(fluent), "log_batch_ms": 1e3 * statistics.median(batch),
            "fluent_run_id": fluent_id, "log_batch_run_id": batch_run.info.run_id, "steps": steps}


def summarise(fits: Dict[str, List[Dict[str, Any]]]) -> Dict[str, Any]:
    """Per tracker: step time, tracker time per step, wall per epoch; and the overheads (mlflow − none)."""
    per: Dict[str, Dict[str, Any]] = {}
    for kind, rs in fits.items():
        per[kind] = {
            "epoch_s": statistics.median(statistics.median(r["epoch_s"]) for r in rs),
            "tracker_ms_per_step": statistics.median(1e3 * (r["log_s"] + r["flush_s"]) / r["epochs"] for r in rs),
            "log_ms_per_call": statistics.median(1e3 * r["log_s"] / r["log_calls"] for r in rs),
            "flush_ms": statistics.median(1e3 * r["flush_s"] / max(r["flushes"], 1) for r in rs),
            "flushes": rs[0]["flushes"],
            "wall_s": statistics.median(r["wall_s"] for r in rs),
            "wall_s_runs": [r["wall_s"] for r in rs],
        }
    step_s = statistics.median(per[k]["epoch_s"] for k in per)
    overhead_ms = per["mlflow"]["tracker_ms_per_step"] - per["none"]["tracker_ms_per_step"]
    paired = [1e3 * (m["wall_s"] - n["wall_s"]) / m["epochs"] for m, n in zip(fits["mlflow"], fits["none"])]
    return {"trackers": per, "step_s": step_s, "overhead_ms": overhead_ms, "overhead_pct": 100 * overhead_ms / (1e3 * step_s),
            "end_to_end_ms_per_step": statistics.median(paired), "end_to_end_runs_ms": paired}


def run_bench(cfg: Dict[str, Any]) -> Dict[str, Any]:
    """Runs the side-by-side fits and the flush / unbuffered measurements; returns everything measured."""
    import torch

    cfg = merge_config(cfg)
    exp = _experiment_config(cfg)
    torch.set_num_threads(cfg["threads"])
    keep = cfg["store"] is not None
    root = Path(cfg["store"]).absolute() if keep else Path(tempfile.mkdtemp(prefix="bench_mlflow_"))
    root.mkdir(parents=True, exist_ok=True)
    uri = f"sqlite:///{root / 'mlflow.db'}"
    from jobs import tracking

    c = tracking.client(uri)
    if c.get_experiment_by_name(EXPERIMENT) is None:
        c.create_experiment(EXPERIMENT, artifact_location=(root / "artifacts").as_uri())
    fits: Dict[str, List[Dict[str, Any]]] = {k: [] for k in cfg["trackers"]}
    load_before = os.getloadavg()
    try:
        with tempfile.TemporaryDirectory(prefix="bench_mlflow_ckpt_") as work:
            for i in range(cfg["warmup_fits"]):  # untimed: first-call costs (allocator, lazy imports, caches)
                run_fit("none", exp, uri, Path(work), f"warmup_{i}")
            for rep in range(cfg["repeats"]):
                order = cfg["trackers"] if rep % 2 == 0 else cfg["trackers"][::-1]
                for kind in order:
                    r = run_fit(kind, exp, uri, Path(work), f"{kind}_r{rep}")
                    fits[kind].append(r)
                    print(f"  repeat {rep} {kind}: step {statistics.median(r['epoch_s']):.3f} s, tracker "
                          f"{1e3 * (r['log_s'] + r['flush_s']) / r['epochs']:.3f} ms/step ({r['flushes']} flushes), "
                          f"wall {r['wall_s']:.2f} s, load {os.getloadavg()[0]:.2f}", flush=True)
        row = _epoch_row(fits["mlflow"])
        flushes = time_flushes(uri, row, cfg["flush_epochs"], cfg["flush_repeats"])
        unbuffered = time_unbuffered(uri, row, cfg["unbuffered_steps"])
        summary = summarise(fits)
        n = cfg["paper_ckpt_every"]
        paper_flush = time_flushes(uri, row, [n], cfg["flush_repeats"])["sizes"][n] if n not in cfg["flush_epochs"] \
            else flushes["sizes"][n]
        paper_ms = summary["trackers"]["mlflow"]["log_ms_per_call"] + paper_flush["per_epoch_ms"]
        paper = {"ckpt_every": n, "ms_per_step": paper_ms, "min_step_ms_for_2pct": paper_ms / 0.02}
    finally:
        if not keep:
            shutil.rmtree(root, ignore_errors=True)
    return {"config": cfg, "uri": uri if keep else None, "keys_per_epoch": len(row), "fits": fits, "summary": summary,
            "flush": flushes, "unbuffered": unbuffered, "paper": paper, "load_before": load_before,
            "load_after": os.getloadavg()}


def _report(res: Dict[str, Any]) -> str:
    s = res["summary"]
    lines = ["| tracker | step s (median time/epoch_s) | tracker ms/step | log_metrics ms/call | flushes per fit | "
             "ms per flush | fit wall s (per repeat) |", "|---|---:|---:|---:|---:|---:|---|"]
    for kind, t in s["trackers"].items():
        walls = ", ".join(f"{w:.2f}" for w in t["wall_s_runs"])
        lines.append(f"| {kind} | {t['epoch_s']:.3f} | {t['tracker_ms_per_step']:.4f} | {t['log_ms_per_call']:.4f} | "
                     f"{t['flushes']} | {t['flush_ms']:.2f} | {walls} |")
    lines += ["", f"| flush of N buffered epochs ({res['keys_per_epoch']} metrics each) | ms per flush | ms per epoch |",
              "|---:|---:|---:|"]
    for n, f in res["flush"]["sizes"].items():
        lines.append(f"| {n} | {f['flush_ms']:.2f} | {f['per_epoch_ms']:.3f} |")
    u = res["unbuffered"]
    lines += ["", f"unbuffered, one synchronous write per step: mlflow.log_metrics {u['fluent_ms']:.2f} ms/call, "
                  f"MlflowClient.log_batch {u['log_batch_ms']:.2f} ms/call",
              f"end to end (fit wall, mlflow - none, per epoch, paired by repeat): "
              f"{', '.join(f'{x:+.1f}' for x in s['end_to_end_runs_ms'])} ms (median {s['end_to_end_ms_per_step']:+.1f})",
              f"paper scale (flush every {res['paper']['ckpt_every']} epochs): {res['paper']['ms_per_step']:.3f} ms/step; "
              f"within 2 % for steps >= {res['paper']['min_step_ms_for_2pct']:.1f} ms"]
    return "\n".join(lines)


def main(cfg: Dict[str, Any]) -> int:
    """``deqbench bench mlflow_overhead``: prints the tables and the overhead line; writes ``out`` (JSON)."""
    merged = merge_config(cfg)
    exp = _experiment_config(merged)
    print(f"bench mlflow_overhead: {merged['experiment']} ({exp.family}, {exp.data.size}px, {exp.train.epochs} epochs, "
          f"ckpt_every {exp.train.ckpt_every}) trackers {merged['trackers']} x {merged['repeats']} repeats, "
          f"{merged['threads']} thread(s); load {os.getloadavg()[0]:.2f}", flush=True)
    res = run_bench(merged)
    print(_report(res))
    s = res["summary"]
    print(f"mlflow logging overhead per step: {s['overhead_ms']:.2f} ms ({s['overhead_pct']:.2f} % of step time)")
    print(f"load average before {res['load_before'][0]:.2f}, after {res['load_after'][0]:.2f}")
    out = Path(merged["out"])
    slim = {**res, "fits": {k: [{kk: vv for kk, vv in r.items() if kk != "logged"} for r in rs]
                            for k, rs in res["fits"].items()}}
    out.write_text(json.dumps(slim, indent=1, default=str))
    print(f"results: {out}")
    return 0
