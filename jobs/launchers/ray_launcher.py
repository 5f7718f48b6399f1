"""Ray Tune launcher: one trial per cell, the node job inside each trial.

The sweep's cells are the grid (``tune.grid_search`` over their ``cell.json``
files); each trial runs :func:`jobs.node.run_cell`, so MLflow logging,
checkpoints and resuming happen inside the trial exactly as on a laptop or a
Slurm node. Each epoch's metrics also go to ``tune.report`` (with the epoch as
``epoch``), so a scheduler such as ASHA can stop poor cells early; a stopped
cell's MLflow run ends KILLED with ``failure_reason`` saying so.

Warm start, one process per cell: Tune reuses its actors across trials
(``reuse_actors``), and each actor starts the local launcher's warm fork server
once (:func:`jobs.launchers.local.fork_context`, torch and mlflow imported
once). Each trial forks one child from it that runs the node job, as the local
launcher does: its own pid and session, its own peak memory, its output in the
cell's ``log.txt``. The child never touches Ray: its per-epoch rows go over a
pipe to the trial, which calls ``tune.report`` and answers go or stop
(:mod:`jobs.launchers.ray_trial`). A child that dies without reporting
(SIGKILL, a crash) is FAILED with the signal or exit code, and only its trial
fails; one whose actor Ray ended gets SIGTERM and stops at its next epoch end.

Launcher config (``configs/launchers/ray_local.yaml``), a flat mapping:

=========================  ====================================================
``address``                Ray cluster to join (``auto``, ``HOST:PORT``); unset: a local Ray
``num_cpus``/``num_gpus``  local Ray only: what it may use (default: the machine)
``cpus_per_trial``         CPUs per rank of a cell (float, fractions allowed; default 1)
``gpus_per_trial``         GPUs per rank (float, e.g. 0.25: four cells share one GPU; default 0)
``max_concurrent_trials``  cells running at once (default: as resources allow)
``scheduler``              ``fifo`` (default) or ``asha``
``metric``/``mode``        what ASHA compares (a per-epoch metric, default ``loss``/``min``)
``asha_grace_period``      epochs before a cell can be stopped (default 1)
``asha_reduction_factor``  ASHA's halving rate (default 2)
``asha_max_t``             reports at the top rung (default: the longest cell's epochs + 2)
``storage``                Tune's experiment storage (default ``<runs>/<sweep>/ray``)
=========================  ====================================================

A cell with ``world_size`` > 1 runs as ``torchrun --nproc_per_node`` inside its
trial (``world_size × cpus_per_trial`` CPUs) and reports once, at its end.

Resuming: the Tune experiment lives in ``<storage>/tune``; launching a sweep
whose unfinished cells were all in that experiment restores it
(``Tuner.restore``: finished trials stay finished, interrupted ones start
again and their node jobs resume from their checkpoints into the same MLflow
runs). Otherwise the old experiment is moved aside and a new one starts.
``deqbench cancel`` does what a Ctrl-C on the driver does (it sends SIGINT to
the process named in ``<runs>/<sweep>/launcher.json``).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any, Mapping

from jobs.cells import Cell, read_status, write_status
from jobs.launchers.ray_trial import EARLY_STOP_MARKER, STOP_WAIT_S, trial

_NUMBER = (int, float)
KEYS: dict[str, tuple[type | tuple[type, ...], str]] = {
    "address": (str, "Ray cluster address, e.g. auto or 10.0.0.1:6379"),
    "num_cpus": (int, "CPUs of the local Ray"),
    "num_gpus": (int, "GPUs of the local Ray"),
    "cpus_per_trial": (_NUMBER, "CPUs per rank"),
    "gpus_per_trial": (_NUMBER, "GPUs per rank"),
    "max_concurrent_trials": (int, "cells at once"),
    "scheduler": (str, "fifo or asha"),
    "metric": (str, "per-epoch metric for ASHA"),
    "mode": (str, "min or max"),
    "asha_grace_period": (int, "epochs"),
    "asha_reduction_factor": (int, ">= 2"),
    "asha_max_t": (int, "epochs"),
    "storage": (str, "directory"),
}
EXPERIMENT = "tune"


def validate_config(config: Any, where: str = "launcher config") -> dict[str, Any]:
    """Checks a Ray launcher config; returns a plain dict.

    Raises:
        TypeError: not a mapping, or a value of the wrong type.
        ValueError: an unknown key (valid ones listed), a bad scheduler/mode, a negative resource.
    """
    if config is None:
        return {}
    if not isinstance(config, Mapping):
        raise TypeError(f"{where}: a Ray launcher config is a mapping, got {type(config).__name__}")
    unknown = sorted(str(k) for k in config if k not in KEYS)
    if unknown:
        raise ValueError(f"{where}: unknown Ray launcher key(s) {', '.join(map(repr, unknown))}; "
                         f"valid keys: {', '.join(KEYS)}")
    for key, value in config.items():
        kind, what = KEYS[key]
        if value is None:
            continue
        if isinstance(value, bool) or not isinstance(value, kind):
            names = kind.__name__ if isinstance(kind, type) else "number"
            raise TypeError(f"{where}: {key} must be {names} ({what}), got {value!r}")
        if isinstance(value, _NUMBER) and value < 0:
            raise ValueError(f"{where}: {key} must be >= 0, got {value!r}")
    if config.get("scheduler", "fifo") not in (None, "fifo", "asha"):
        raise ValueError(f"{where}: scheduler must be fifo or asha, got {config['scheduler']!r}")
    if config.get("mode", "min") not in (None, "min", "max"):
        raise ValueError(f"{where}: mode must be min or max, got {config['mode']!r}")
    if (config.get("asha_reduction_factor") or 2) < 2:
        raise ValueError(f"{where}: asha_reduction_factor must be >= 2, got {config['asha_reduction_factor']!r}")
    for key in ("max_concurrent_trials", "asha_grace_period", "asha_max_t"):
        if config.get(key) is not None and config[key] < 1:
            raise ValueError(f"{where}: {key} must be >= 1, got {config[key]!r}")
    return dict(config)


def load_config(args: argparse.Namespace) -> dict[str, Any]:
    """The ``--launcher-config`` file, validated (an empty config without one: a local Ray)."""
    from suite.config import read_yaml

    path = getattr(args, "launcher_config", None)
    if not path:
        return {}
    return validate_config(read_yaml(path), str(path))


def import_ray() -> Any:
    """``ray`` with Tune, or a RuntimeError naming the extra to install."""
    try:
        import ray
        from ray import tune  # noqa: F401
    except ImportError as err:
        raise RuntimeError(f"Ray Tune is not importable ({err}); install the cluster extra: "
                           "pip install 'deqbench[cluster]' (ray[tune])") from None
    return ray


def trial_resources(cell: Cell, config: Mapping[str, Any]) -> dict[str, float]:
    """Ray resources of one trial: ``{"cpu", "gpu"}`` per rank × the cell's world size."""
    w = cell.world_size
    return {"cpu": float(config.get("cpus_per_trial") or 1) * w, "gpu": float(config.get("gpus_per_trial") or 0) * w}


def _placement(cell: Cell, config: Mapping[str, Any]) -> Any:
    from ray.tune import PlacementGroupFactory

    res = trial_resources(cell, config)
    return PlacementGroupFactory([{"CPU": res["cpu"], **({"GPU": res["gpu"]} if res["gpu"] else {})}])


def _marking_asha() -> type:
    """ASHA that leaves ``early_stopped`` in a cell's work directory before stopping its trial.

    Defined on first use (ray is imported lazily) and registered in this module
    under its name, so Tune can pickle it with the experiment state.
    """
    cls = globals().get("MarkingASHA")
    if cls is not None:
        return cls
    from ray.tune.schedulers import ASHAScheduler, TrialScheduler

    class MarkingASHA(ASHAScheduler):
        def on_trial_result(self, tune_controller: Any, trial: Any, result: dict) -> str:
            decision = super().on_trial_result(tune_controller, trial, result)
            if decision == TrialScheduler.STOP and "time/total_s" not in result:
                (Path(trial.config["cell"]).parent / EARLY_STOP_MARKER).write_text(str(result.get("epoch")))
            return decision

    MarkingASHA.__module__ = __name__
    globals()["MarkingASHA"] = MarkingASHA
    return MarkingASHA


def _scheduler(config: Mapping[str, Any], cells: list[Cell]) -> Any:
    if (config.get("scheduler") or "fifo") != "asha":
        return None
    from jobs.progress import total_epochs

    epochs = max(total_epochs(c.config) for c in cells)
    return _marking_asha()(time_attr="training_iteration", metric=config.get("metric") or "loss",
                         mode=config.get("mode") or "min", max_t=config.get("asha_max_t") or epochs + 2,
                         grace_period=config.get("asha_grace_period") or 1,
                         reduction_factor=config.get("asha_reduction_factor") or 2)


def _storage(cells: list[Cell], config: Mapping[str, Any]) -> Path:
    return Path(config.get("storage") or Path(cells[0].workdir).parent / "ray").absolute()


def dry_run(cells: list[Cell], args: argparse.Namespace) -> None:
    """Prints the trials and their resources; starts no Ray."""
    config = load_config(args)
    import_ray()
    storage = _storage(cells, config)
    sched = config.get("scheduler") or "fifo"
    print(f"ray launcher: {len(cells)} trials, scheduler {sched}, "
          f"max {config.get('max_concurrent_trials') or 'unlimited'} at once, storage {storage / EXPERIMENT}")
    for c in cells:
        res = trial_resources(c, config)
        print(f"  {c.hash}  cpu={res['cpu']:g} gpu={res['gpu']:g}  ranks={c.world_size}  {c.label}")


def _tuner(cells: list[Cell], config: dict[str, Any], trainable: Any) -> Any:
    from ray import tune

    storage = _storage(cells, config)
    path = storage / EXPERIMENT
    wanted = {c.hash for c in cells}
    stored = path / "deqbench_cells.json"
    if tune.Tuner.can_restore(str(path)) and stored.is_file() and wanted <= set(json.loads(stored.read_text())):
        print(f"ray launcher: resuming the Tune experiment in {path}", flush=True)
        if (config.get("scheduler") or "fifo") == "asha":
            _marking_asha()  # the pickled scheduler's class
        return tune.Tuner.restore(str(path), trainable, resume_unfinished=True, resume_errored=True)
    for c in cells:  # a fresh experiment: earlier early stops are not this one's
        (Path(c.workdir) / EARLY_STOP_MARKER).unlink(missing_ok=True)
    if path.exists():
        old = path.with_name(f"{EXPERIMENT}-{time.strftime('%Y%m%d-%H%M%S')}")
        path.rename(old)
        print(f"ray launcher: earlier Tune experiment moved to {old}")
    tuner = tune.Tuner(
        trainable,
        param_space={"cell": tune.grid_search([str(c.save()) for c in cells])},
        tune_config=tune.TuneConfig(scheduler=_scheduler(config, cells),
                                    max_concurrent_trials=config.get("max_concurrent_trials"),
                                    reuse_actors=True,  # one actor (and warm fork server) for many cells
                                    trial_name_creator=lambda t: Path(t.config["cell"]).parent.name,
                                    trial_dirname_creator=lambda t: Path(t.config["cell"]).parent.name),
        run_config=tune.RunConfig(name=EXPERIMENT, storage_path=str(storage), verbose=0),
    )
    path.mkdir(parents=True, exist_ok=True)
    stored.write_text(json.dumps(sorted(wanted)))
    return tuner


def launch(cells: list[Cell], args: argparse.Namespace) -> list[dict[str, Any]]:
    """Runs ``cells`` as Ray Tune trials and returns their outcomes (as the local launcher's)."""
    config = load_config(args)
    ray = import_ray()
    from ray import tune

    from jobs.launchers.cancel import record_launcher

    for c in cells:
        c.save()
    record_launcher(cells, "ray")  # deqbench cancel sends this driver SIGINT: Tune stops every trial
    started = False
    if not ray.is_initialized():
        kwargs: dict[str, Any] = {"include_dashboard": False, "log_to_driver": False}
        if config.get("address"):
            kwargs["address"] = config["address"]
        else:
            kwargs.update({k: config[k] for k in ("num_cpus", "num_gpus") if config.get(k) is not None})
        ray.init(**kwargs)
        started = True
    try:
        by_path = {str(Path(c.workdir) / "cell.json"): c for c in cells}
        trainable = tune.with_resources(trial, lambda spec: _placement(by_path.get(spec["cell"]) or Cell.load(spec["cell"]), config))
        _tuner(cells, config, trainable).fit()
    finally:
        if started:
            ray.shutdown()
    return [_outcome(c) for c in cells]


def _wait_for_node(cell: Cell) -> None:
    """Waits while the cell's node process still runs on this host (a stopped trial's cell ending on its own).

    Its actor is gone, so it got SIGTERM (see :func:`_relayed_node`): it stops
    at its next epoch end, or at most ``$DEQBENCH_STOP_GRACE_S`` (30 s) later.
    """
    import socket

    from jobs.launchers.cancel import our_process
    from jobs.node import stop_grace_s

    status = read_status(cell.workdir)
    if status.get("state") != "RUNNING" or status.get("host") != socket.gethostname():
        return
    deadline = time.monotonic() + stop_grace_s() + STOP_WAIT_S
    while our_process(status.get("pid"), "jobs.node") and time.monotonic() < deadline:
        time.sleep(0.2)


def _outcome(cell: Cell) -> dict[str, Any]:
    """A cell's outcome; a trial whose process ended before its node job could report is recorded KILLED here."""
    _wait_for_node(cell)
    status = read_status(cell.workdir)
    run = None
    if status.get("run_id"):
        from jobs import tracking

        try:
            run = tracking.client(cell.tracking_uri).get_run(status["run_id"])
        except Exception:  # noqa: BLE001 - a run deleted meanwhile
            run = None
    if status.get("state") not in ("FINISHED", "FAILED", "KILLED") or (run is not None and run.info.status == "RUNNING"):
        reason = (run.data.tags.get("failure_reason") if run is not None else None) or (
            "stopped by Ray Tune before its last epoch (early stopping, or the sweep was interrupted: "
            "run it again to resume)")
        write_status(cell.workdir, state="KILLED", error=reason)
        if run is not None and run.info.status == "RUNNING":
            from jobs.tracking import COMMAND_PATIENCE_S, MlflowTracker

            t = MlflowTracker(cell.tracking_uri, run.info.run_id, max_outage_s=COMMAND_PATIENCE_S)
            t.set_tags({"failure_reason": reason})
            t.terminate("KILLED")
        status = read_status(cell.workdir)
    return {"hash": cell.hash, "label": cell.label, "state": status.get("state", "FAILED"),
            "run_id": status.get("run_id"), "error": status.get("error"), "results": status.get("results"),
            "reason": status.get("reason")}
