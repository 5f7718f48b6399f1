"""``deqbench bench paper``: the paper-scale experiments, one after the other, on one GPU.

Each entry of ``runs`` names an experiment YAML and ``--set``-style overrides;
it is trained through the same code as ``deqbench run`` (``load_config`` →
``build_model`` → ``load_data`` → ``suite.training.fit``) but reports to an
in-memory tracker instead of MLflow, so it also runs where MLflow is not
installed (the lent GPU machine has no registry to install it from). The
final metrics, the median wall time per epoch of each stage, the peak memory
and the device go to stdout and, after every run, to ``out`` (JSON), so a run
that times out keeps what finished. A failing run is reported and the next
one starts.

To log the same experiments to MLflow instead, run their cells with
``deqbench run configs/experiments/crr.yaml --set data.image=camera``.
"""

from __future__ import annotations

import json
import platform
import statistics
import tempfile
import time
import traceback
from pathlib import Path
from typing import Any, Dict, List

import torch

DEFAULTS: Dict[str, Any] = {"out": "bench_paper.json", "runs": []}
_RUN_KEYS = {"name", "experiment", "set"}


def _merge(cfg: Dict[str, Any]) -> Dict[str, Any]:
    unknown = sorted(set(cfg) - set(DEFAULTS))
    if unknown:
        raise ValueError(f"bench paper: unknown key(s) {unknown}; allowed: {sorted(DEFAULTS)}")
    out = {**DEFAULTS, **cfg}
    if not isinstance(out["runs"], list) or not out["runs"]:
        raise ValueError("bench paper: 'runs' must be a non-empty list of {name, experiment, set}")
    for i, run in enumerate(out["runs"]):
        if not isinstance(run, dict) or not {"name", "experiment"} <= set(run) or set(run) - _RUN_KEYS:
            raise ValueError(f"bench paper: runs[{i}] must have 'name' and 'experiment' (and optional 'set'), "
                             f"got {run!r}")
    return out


def _stage_epoch_times(tracker: Any) -> Dict[str, float]:
    """Median ``time/epoch_s`` per stage (``stage`` is logged with every epoch row)."""
    stages = dict(tracker.history.get("stage", []))
    per: Dict[int, List[float]] = {}
    for step, value in tracker.history.get("time/epoch_s", []):
        per.setdefault(int(stages.get(step, 0)), []).append(value)
    return {f"time/stage{s}_epoch_s": statistics.median(v) for s, v in sorted(per.items())}


def run_one(run: Dict[str, Any]) -> Dict[str, Any]:
    """Trains one experiment; returns its final metrics with timing and device."""
    from suite.config import load_config
    from suite.data import load_data
    from suite.models import build_model
    from suite.training import MemoryTracker, fit

    cfg = load_config(run["experiment"], run.get("set") or {})
    tracker = MemoryTracker()
    t0 = time.perf_counter()
    model = build_model(cfg)
    data = load_data(cfg)
    t_data = time.perf_counter() - t0
    with tempfile.TemporaryDirectory() as outdir:
        results = fit(cfg, model, data, tracker, outdir=outdir)
    return {**{k: float(v) for k, v in results.items()}, **_stage_epoch_times(tracker),
            "time/setup_s": t_data, "time/wall_s": time.perf_counter() - t0}


def _environment() -> Dict[str, Any]:
    cuda = torch.cuda.is_available()
    return {"device": torch.cuda.get_device_name(0) if cuda else platform.processor() or "cpu",
            "torch": torch.__version__, "python": platform.python_version(), "host": platform.node()}


def main(cfg: Dict[str, Any]) -> int:
    cfg = _merge(cfg)
    env = _environment()
    print(f"bench paper on {env['device']} (torch {env['torch']})", flush=True)
    out = Path(cfg["out"])
    report: Dict[str, Any] = {"environment": env, "runs": {}}
    failed = 0
    for run in cfg["runs"]:
        print(f"== {run['name']}: {run['experiment']} {run.get('set') or ''}", flush=True)
        try:
            res = run_one(run)
            report["runs"][run["name"]] = {"spec": run, "results": res}
            keys = ["stage1/psnr", "psnr", "crr/gain_db", "ssim", "time/stage1_epoch_s", "time/stage2_epoch_s",
                    "time/total_s", "mem/peak_mb", "mem/train_peak_mb", "mem/infer_peak_mb"]
            print("   " + "  ".join(f"{k}={res[k]:.4g}" for k in keys if k in res), flush=True)
        except Exception as err:  # one failing run must not lose the others
            failed += 1
            report["runs"][run["name"]] = {"spec": run, "error": f"{type(err).__name__}: {err}",
                                           "traceback": traceback.format_exc()}
            print(f"   FAILED: {type(err).__name__}: {err}", flush=True)
        out.write_text(json.dumps(report, indent=1))
    print(f"results: {out}")
    return 1 if failed else 0
