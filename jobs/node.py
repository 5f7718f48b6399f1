"""The node job: what every backend runs for one cell.

``run_cell(cell)`` validates the config, resumes from the cell's newest
checkpoint (and its MLflow run, whose id the checkpoint keeps), trains, and
records the outcome both in MLflow and in ``<workdir>/status.json`` — the
latter is how ``deqbench status`` works without Slurm accounting. A failure is
caught, logged with its reason (run FAILED, ``status.json`` ``FAILED``) and
returned, never raised, so one cell cannot take a sweep down.

Command line (what Slurm and the local launcher execute)::

    python -m jobs.node RUNS/SWEEP/HASH/cell.json
"""

from __future__ import annotations

import json
import os
import signal
import socket
import sys
import time
import traceback
from pathlib import Path
from typing import Any

import yaml

from jobs.cells import Cell

TERMINAL = ("FINISHED", "FAILED", "KILLED")


class Interrupted(Exception):
    """SIGTERM/SIGINT reached the node job (timeout, preemption, Ctrl-C)."""


def write_status(workdir: str | Path, **fields: Any) -> None:
    """Merges ``fields`` into ``status.json`` atomically."""
    path = Path(workdir) / "status.json"
    current = read_status(workdir)
    current.update(fields, updated=time.time())
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(current, indent=2, default=str))
    os.replace(tmp, path)


def read_status(workdir: str | Path) -> dict[str, Any]:
    """Contents of ``status.json`` (empty when the cell never started)."""
    path = Path(workdir) / "status.json"
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return {}


def _raise_interrupt(signum: int, _frame: Any) -> None:
    raise Interrupted(f"received signal {signal.Signals(signum).name}")


def run_cell(cell: Cell) -> dict[str, Any]:
    """Runs one cell to completion (or failure) and reports the outcome.

    Args:
        cell: the cell (see :class:`jobs.cells.Cell`).

    Returns:
        ``{"hash", "label", "state", "run_id", "results" | "error"}``.
    """
    from suite.config import flatten, load_config
    from suite.data import load_data
    from suite.models import build_model
    from suite.training import Checkpointer, fit
    from jobs import tracking

    workdir = Path(cell.workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    out: dict[str, Any] = {"hash": cell.hash, "label": cell.label}
    tracker = None
    try:
        cfg = load_config(cell.config)
        (workdir / "config.yaml").write_text(yaml.safe_dump(cell.config, sort_keys=False))
        ckpt = Checkpointer(workdir / "ckpt", cfg.train.ckpt_every)
        if read_status(workdir).get("state") == "FAILED":
            ckpt.clear()  # a failure is usually deterministic: start afresh, in a new run
        latest = ckpt.latest()
        uri = cell.tracking_uri or tracking.resolve_tracking_uri()
        resume = (latest or {}).get("extra", {}).get("run_id")
        if resume and not tracking.run_exists(uri, resume):
            resume = None
        tracker = tracking.start_run(
            uri, cell.experiment, cell.label, flatten(cfg),
            tracking.run_tags(cell.hash, cfg.family, cell.world_size), resume_run_id=resume,
        )
        ckpt.extra["run_id"] = tracker.run_id
        ckpt.before_save.append(tracker.flush)
        out["run_id"] = tracker.run_id
        write_status(workdir, state="RUNNING", run_id=tracker.run_id, host=socket.gethostname(), pid=os.getpid(),
                     started=time.time(), resumed_from=bool(latest), error=None,
                     slurm_job_id=os.environ.get("SLURM_JOB_ID"))
        tracker.log_artifact(workdir / "config.yaml")
        model = build_model(cfg)
        data = load_data(cfg)
        results = fit(cfg, model, data, tracker, ckpt=ckpt, outdir=workdir / "artifacts")
        tracker.flush()
        tracker.terminate("FINISHED")
        write_status(workdir, state="FINISHED", results=results, ended=time.time())
        out.update(state="FINISHED", results=results)
    except (Interrupted, KeyboardInterrupt) as err:
        reason = str(err) or type(err).__name__
        _record_failure(workdir, tracker, "KILLED", reason)
        out.update(state="KILLED", error=reason)
    except Exception as err:  # noqa: BLE001 - a cell's failure is data, not a crash
        reason = f"{type(err).__name__}: {err}"
        _record_failure(workdir, tracker, "FAILED", reason, traceback.format_exc())
        out.update(state="FAILED", error=reason)
    return out


def _record_failure(workdir: Path, tracker: Any, state: str, reason: str, tb: str = "") -> None:
    write_status(workdir, state=state, error=reason, traceback=tb, ended=time.time())
    if tracker is not None:
        try:
            # KILLED resumes from its checkpoint and replays the buffered epochs;
            # FAILED starts afresh, so its curve up to the failure is kept.
            tracker.flush() if state == "FAILED" else tracker.discard()
            tracker.set_tags({"failure_reason": reason[:5000]})
            tracker.terminate(state)
        except Exception as err:  # noqa: BLE001 - the store itself may be the failure
            print(f"deqbench: could not record {state} in MLflow: {err}", file=sys.stderr)


def main(argv: list[str] | None = None) -> int:
    """``python -m jobs.node CELL_JSON``: exit 0 when the cell FINISHED, else 1."""
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 1:
        print("usage: python -m jobs.node RUNS/SWEEP/HASH/cell.json", file=sys.stderr)
        return 2
    signal.signal(signal.SIGTERM, _raise_interrupt)
    threads = os.environ.get("DEQBENCH_TORCH_THREADS")
    if threads:
        import torch

        torch.set_num_threads(int(threads))
    result = run_cell(Cell.load(argv[0]))
    print(json.dumps({k: v for k, v in result.items() if k != "results"}))
    return 0 if result.get("state") == "FINISHED" else 1


if __name__ == "__main__":
    sys.exit(main())
