"""``deqbench bench orchestration``: seconds of overhead per cell of each launcher.

``cells`` trivial cells -- real cells of the suite (a sweep expanded by
:func:`jobs.cells.expand_sweep`, each run by :func:`jobs.node.run_cell`) whose
training is near-zero work: ``experiment`` with the ``set`` overrides, seeds
``0 .. cells-1`` so every cell has its own hash -- go through each backend:

- ``direct``: ``run_cell(cell)`` in a loop in this process, one at a time
  (the baseline);
- ``local``: the local launcher, ``workers`` cells at a time, each a process forked
  from its warm server (:func:`jobs.launchers.local.fork_context`);
- ``local_fresh``: the local launcher running each cell as a fresh
  ``python -m jobs.node`` interpreter (what it did before the warm server, and
  still does for DDP cells), for a side-by-side under the same load;
- ``submitit``: Slurm job arrays through submitit on the local cluster
  (``submitit_config``, its ``slurm_array_parallelism`` set to ``workers``);
- ``ray``: Ray Tune on a local Ray (``ray_config``, ``num_cpus`` and
  ``max_concurrent_trials`` set to ``workers``).

The three launchers go through :func:`jobs.launchers.get_launcher` ``(name).launch``,
the call ``deqbench sweep`` makes (launcher-config validation, submission,
waiting, reading the outcomes), so each measured total includes a launcher's
fixed start-up cost (e.g. ``ray.init``/``shutdown``, Slurm polling) spread over
the cells. Not timed: expanding the sweep, creating each backend's fresh SQLite
MLflow store and experiment, one warm-up cell in this process, and this
process's first import of ray, submitit and mlflow (printed; a
``deqbench sweep`` process pays them once per sweep).

Each backend and repeat gets fresh temporary directories (runs dir and
``mlflow.db``), so no cell is ever skipped as already finished; after each run
the store is checked: every cell's newest run must be FINISHED. The backends
alternate order across repeats (forward, reversed, ...) so that a change of
machine load weighs on all alike; the median total over ``repeats`` is
reported. A launcher that cannot run here (Slurm down, Ray not importable)
is skipped with the reason printed, unless it is listed in ``require``.

Reported per backend: total wall seconds ``T`` for the ``N`` cells, ``T/N``,
and the overhead per cell against the direct loop, ``(T - T_direct) / N``.
The launchers run ``workers`` cells at a time while the direct loop runs one,
so that overhead is what a user waits for, net of parallelism; the column
``worker-s/cell`` gives ``(workers * T - T_direct) / N``, the worker time each
cell occupies beyond the direct loop's (exact when ``workers`` cores are free).
The last line is ``overhead per cell vs direct: local N.NNs, local_fresh N.NNs, submitit N.NNs, ray N.NNs``.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Tuple

from jobs.bench._common import table_lines

BACKENDS = ("direct", "local", "local_fresh", "submitit", "ray")
SWEEP_NAME = "bench_orchestration"
REPO = Path(__file__).resolve().parents[2]

DEFAULTS: Dict[str, Any] = {
    "cells": 32,
    "repeats": 3,
    "workers": 2,
    "backends": list(BACKENDS),
    "require": [],
    "experiment": "configs/experiments/crr_tiny.yaml",
    "set": {
        "train.epochs": 1,
        "crr.epochs": 1,
        "data.size": 41,
        "model.hidden": 4,
        "crr.hidden": 4,
        "deq.f_max_iter": 3,
        "deq.b_max_iter": 3,
    },
    "submitit_config": "configs/launchers/local_slurm.yaml",
    "ray_config": "configs/launchers/ray_local.yaml",
    "workdir": None,
}


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _merge(cfg: Dict[str, Any]) -> Dict[str, Any]:
    """Defaults overlaid with ``cfg``; unknown keys and bad values refused.

    Raises:
        ValueError: an unknown key, a count below 1, an unknown backend, a
            ``require`` entry not among ``backends``, ``direct`` missing.
        TypeError: a value of the wrong type.
    """
    if not isinstance(cfg, dict):
        raise TypeError(f"bench orchestration: the config must be a mapping, got {type(cfg).__name__}")
    unknown = sorted(set(cfg) - set(DEFAULTS))
    if unknown:
        raise ValueError(f"bench orchestration: unknown key(s) {unknown}; valid: {sorted(DEFAULTS)}")
    out = {**DEFAULTS, **cfg}
    for key in ("cells", "repeats", "workers"):
        if not _is_int(out[key]) or out[key] < 1:
            raise ValueError(f"bench orchestration: {key} must be an integer >= 1, got {out[key]!r}")
    for key in ("backends", "require"):
        value = out[key]
        if not isinstance(value, list) or not all(isinstance(b, str) for b in value):
            raise TypeError(f"bench orchestration: {key} must be a list of names from {list(BACKENDS)}, got {value!r}")
        bad = [b for b in value if b not in BACKENDS]
        if bad:
            raise ValueError(f"bench orchestration: unknown backend(s) {bad} in {key}; choices: {list(BACKENDS)}")
    if "direct" not in out["backends"]:
        raise ValueError(f"bench orchestration: backends must include 'direct' (the baseline), got {out['backends']}")
    outside = [b for b in out["require"] if b not in out["backends"]]
    if outside:
        raise ValueError(f"bench orchestration: require {outside} not in backends {out['backends']}")
    if not isinstance(out["set"], dict):
        raise TypeError(f"bench orchestration: set must be a mapping of dotted keys to values, got {out['set']!r}")
    for key in ("experiment", "submitit_config", "ray_config"):
        if not isinstance(out[key], str) or not out[key]:
            raise TypeError(f"bench orchestration: {key} must be a file path, got {out[key]!r}")
    if out["workdir"] is not None and not isinstance(out["workdir"], str):
        raise TypeError(f"bench orchestration: workdir must be a directory path or null, got {out['workdir']!r}")
    out["backends"] = [b for b in BACKENDS if b in out["backends"]]  # one each, fixed order
    return out


def _path(name: str) -> Path:
    """``name`` as given when it exists (relative to the working directory), else under the repository."""
    p = Path(name)
    if p.exists() or p.is_absolute():
        return p.absolute()
    return REPO / p


def _write_yaml(path: Path, data: Dict[str, Any]) -> Path:
    import yaml

    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


def _write_sweep(root: Path, cfg: Dict[str, Any]) -> Path:
    """The temporary sweep YAML: ``experiment`` + ``set``, seeds ``0 .. cells-1``."""
    spec = {"name": SWEEP_NAME, "base": str(_path(cfg["experiment"])), "set": dict(cfg["set"]),
            "seeds": list(range(cfg["cells"]))}
    return _write_yaml(root / "sweep.yaml", spec)


def _launcher_configs(root: Path, cfg: Dict[str, Any]) -> Dict[str, Path]:
    """Copies of the submitit and Ray launcher configs running ``workers`` cells at a time."""
    import yaml

    workers = cfg["workers"]
    out: Dict[str, Path] = {}
    if "submitit" in cfg["backends"]:
        sub = yaml.safe_load(_path(cfg["submitit_config"]).read_text()) or {}
        sub.pop("folder", None)  # a sweep's Slurm logs go under its runs dir anyway
        sub["slurm_array_parallelism"] = workers
        out["submitit"] = _write_yaml(root / "launchers" / "submitit.yaml", sub)
    if "ray" in cfg["backends"]:
        ray_cfg = yaml.safe_load(_path(cfg["ray_config"]).read_text()) or {}
        ray_cfg.update(num_cpus=workers, max_concurrent_trials=workers)
        out["ray"] = _write_yaml(root / "launchers" / "ray.yaml", ray_cfg)
    return out


def _availability(backend: str, launcher_cfg: Optional[Path]) -> Optional[str]:
    """Why ``backend`` cannot run here (None when it can), checked before anything is timed."""
    try:
        if backend == "submitit":
            from jobs.slurm_env import load_launcher_config

            load_launcher_config(launcher_cfg)  # Slurm on PATH, controller answers, partition exists
            import submitit  # noqa: F401
        elif backend == "ray":
            from jobs.launchers.ray_launcher import import_ray, validate_config

            import yaml

            validate_config(yaml.safe_load(launcher_cfg.read_text()), str(launcher_cfg))
            import_ray()
    except (RuntimeError, ImportError, OSError) as err:
        return f"{type(err).__name__}: {err}"
    return None


def _timed_import(module: str) -> Optional[float]:
    """Seconds this process took to import ``module`` (0 when imported already, None when it fails)."""
    import importlib

    if module in sys.modules:
        return 0.0
    start = time.perf_counter()
    try:
        importlib.import_module(module)
    except ImportError:
        return None  # reported by the availability check
    return time.perf_counter() - start


def _expand(sweep: Path, where: Path) -> Tuple[List[Any], str]:
    """The sweep's cells with runs under ``where/runs`` and a fresh store ``where/mlflow.db`` (created here)."""
    from jobs import tracking
    from jobs.cells import expand_sweep

    uri = f"sqlite:///{(where / 'mlflow.db').absolute()}"
    where.mkdir(parents=True, exist_ok=True)
    _, cells = expand_sweep(sweep, [], where / "runs", uri)
    tracking.experiment_id(uri, SWEEP_NAME)  # schema + experiment now, untimed, the same for every backend
    return cells, uri


def _run_direct(cells: List[Any], threads: int) -> List[Dict[str, Any]]:
    """``run_cell`` on each cell in turn, in this process with ``threads`` torch threads."""
    import torch

    from jobs.node import run_cell

    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        return [run_cell(c) for c in cells]
    finally:
        torch.set_num_threads(before)


def _runner(backend: str, cfg: Dict[str, Any], launcher_cfgs: Dict[str, Path]) -> Callable[[List[Any]], Any]:
    """A callable that runs a list of cells on ``backend`` and returns their outcomes."""
    if backend == "direct":
        threads = max(1, (os.cpu_count() or 1) // cfg["workers"])  # what each local worker gets
        return lambda cells: _run_direct(cells, threads)
    if backend == "local_fresh":
        from jobs.launchers.local import node_command, submit

        return lambda cells: submit(cells, workers=cfg["workers"], command=node_command)
    from jobs.launchers import get_launcher

    launcher = get_launcher(backend)
    args = argparse.Namespace(launcher=backend, launcher_config=launcher_cfgs.get(backend),
                              workers=cfg["workers"], no_wait=False, sweep=None)
    return lambda cells: launcher.launch(cells, args)


def _unfinished(uri: str, cells: List[Any]) -> List[str]:
    """Hashes of ``cells`` whose newest run in the store is not FINISHED."""
    from jobs import tracking

    done = tracking.finished_hashes(uri, SWEEP_NAME)
    return [c.hash for c in cells if c.hash not in done]


def _measure(backend: str, run: Callable[[List[Any]], Any], sweep: Path, where: Path) -> Tuple[float, List[str]]:
    """Wall seconds of ``run(cells)`` on fresh dirs under ``where``, and the cells that did not finish."""
    cells, uri = _expand(sweep, where)
    start = time.perf_counter()
    run(cells)
    seconds = time.perf_counter() - start
    return seconds, _unfinished(uri, cells)


def _summary(totals: Dict[str, List[float]], cfg: Dict[str, Any]) -> Tuple[List[str], Dict[str, float]]:
    """The result table's lines and each launcher's overhead per cell vs direct (seconds)."""
    n, w = cfg["cells"], cfg["workers"]
    t_direct = statistics.median(totals["direct"])
    header = ["backend", "at once", "median T s", "T/N s", "(T-T_direct)/N s", "worker-s/cell", "repeats T s"]
    rows, overhead = [], {}
    for backend, ts in totals.items():
        t = statistics.median(ts)
        par = 1 if backend == "direct" else w
        over = (t - t_direct) / n
        if backend != "direct":
            overhead[backend] = over
        rows.append([backend, str(par), f"{t:.2f}", f"{t / n:.3f}", "-" if backend == "direct" else f"{over:+.3f}",
                     "-" if backend == "direct" else f"{(par * t - t_direct) / n:+.3f}",
                     " ".join(f"{x:.1f}" for x in ts)])
    return table_lines(header, rows), overhead


def main(cfg: Dict[str, Any]) -> int:
    """Run the benchmark described by ``configs/bench/orchestration.yaml``.

    Args:
        cfg: Parsed YAML: ``cells`` (N, default 32), ``repeats`` (median over
            them, default 3), ``workers`` (cells at once per launcher, default 2),
            ``backends`` (from ``direct``, ``local``, ``submitit``, ``ray``;
            ``direct`` required), ``require`` (backends whose unavailability is
            an error instead of a skip), ``experiment`` and ``set`` (the trivial
            cell), ``submitit_config``, ``ray_config`` (launcher YAMLs),
            ``workdir`` (keep the runs and stores there; null: a temporary
            directory, removed at the end). Missing keys take :data:`DEFAULTS`.

    Returns:
        0 when every cell FINISHED on every backend that ran, 1 otherwise.

    Raises:
        ValueError, TypeError: a bad config (see :func:`_merge`).
        RuntimeError: a backend listed in ``require`` cannot run here.
    """
    cfg = _merge(cfg or {})
    keep = cfg["workdir"] is not None
    if keep:
        root = Path(cfg["workdir"]).absolute()
        root.mkdir(parents=True, exist_ok=True)
    else:
        root = Path(tempfile.mkdtemp(prefix="deqbench-orch-"))
    try:
        return _run(cfg, root)
    finally:
        if keep:
            print(f"runs and MLflow stores kept under {root}")
        else:
            shutil.rmtree(root, ignore_errors=True)


def _run(cfg: Dict[str, Any], root: Path) -> int:
    """The body of :func:`main` on a merged config, working under ``root``."""
    sweep = _write_sweep(root, cfg)
    launcher_cfgs = _launcher_configs(root, cfg)
    imports = {m: _timed_import(m) for m in ("mlflow", "submitit", "ray.tune") if _wanted(m, cfg["backends"])}
    backends: List[str] = []
    for b in cfg["backends"]:
        reason = _availability(b, launcher_cfgs.get(b))
        if reason is None:
            backends.append(b)
        elif b in cfg["require"]:
            raise RuntimeError(f"bench orchestration: backend {b!r} is required but cannot run here: {reason}")
        else:
            print(f"{b} skipped: {reason}", flush=True)
    warm, _ = _expand(sweep, root / "warmup")
    _run_direct(warm[:1], 1)  # untimed: first-call costs of this process (torch, MLflow, SQLAlchemy)

    n, reps = cfg["cells"], cfg["repeats"]
    print(f"{n} trivial cells ({cfg['experiment']} with {cfg['set']}), seeds 0..{n - 1}; backends "
          f"{', '.join(backends)}; launchers run {cfg['workers']} at a time, direct 1; median of {reps} repeat(s); "
          f"{os.cpu_count()} CPUs; load average {_load()}", flush=True)
    print("untimed first imports in this process: "
          + ", ".join(f"{m} {s:.1f} s" for m, s in imports.items() if s is not None), flush=True)
    runners = {b: _runner(b, cfg, launcher_cfgs) for b in backends}
    totals: Dict[str, List[float]] = {b: [] for b in backends}
    failed: List[str] = []
    for r in range(reps):
        order = backends if r % 2 == 0 else backends[::-1]
        for b in order:
            seconds, unfinished = _measure(b, runners[b], sweep, root / f"{b}-r{r}")
            totals[b].append(seconds)
            note = f"; NOT FINISHED: {len(unfinished)} cell(s) {unfinished[:3]}" if unfinished else ""
            print(f"repeat {r + 1}/{reps} {b}: {seconds:.2f} s for {n} cells{note}", flush=True)
            if unfinished:
                failed.append(f"{b} repeat {r + 1}")
    lines, overhead = _summary(totals, cfg)
    print("\n".join(lines))
    print(f"load average at the end {_load()}")
    print(f"all cells FINISHED in every store: {'yes' if not failed else 'NO, in ' + ', '.join(failed)}")
    parts = [f"{b} {overhead[b]:.2f}s" if b in overhead else f"{b} skipped"
             for b in BACKENDS[1:] if b in cfg["backends"]]
    print(f"overhead per cell vs direct: {', '.join(parts)}", flush=True)
    return 1 if failed else 0


def _wanted(module: str, backends: List[str]) -> bool:
    return module == "mlflow" or module.split(".")[0] in backends


def _load() -> str:
    try:
        return " ".join(f"{x:.2f}" for x in os.getloadavg())
    except OSError:
        return "n/a"
