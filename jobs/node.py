"""The node job: what every backend runs for one cell.

``run_cell(cell)`` validates the config, resumes from the cell's newest
checkpoint (and its MLflow run, whose id the checkpoint keeps), trains, and
records the outcome both in MLflow and in ``<workdir>/status.json`` — the
latter is how ``deqbench status`` works without Slurm accounting. A failure is
caught, logged with its reason (run FAILED, ``status.json`` ``FAILED``) and
returned, never raised, so one cell cannot take a sweep down.

Command line (what Slurm and the local launcher execute)::

    python -m jobs.node RUNS/SWEEP/HASH/cell.json

Data parallel: when the process belongs to a DDP job (``torchrun``, an
``srun`` step, a submitit task; see :mod:`jobs.distributed`), every rank runs
``run_cell``; only rank 0 creates or resumes the MLflow run, logs, writes
``status.json`` and checkpoints; the other ranks train with a
:class:`~suite.training.NullTracker`. The run's ``world_size`` tag is the real
number of ranks.

Stopping gracefully: SIGTERM (Slurm's kill, scancel, ``scontrol requeue``,
preemption) and submitit's SIGUSR2 (time limit ahead) ask for a stop; at the
next epoch end every rank agrees on it, rank 0 saves a checkpoint (metrics
flushed first) and the node job ends as ``KILLED`` -- resubmitting resumes
there, into the same MLflow run, no epoch logged twice or missing. If no epoch
ends within ``$DEQBENCH_STOP_GRACE_S`` (30 s) it stops at once and the resume
starts from the previous checkpoint. Under submitit, SIGUSR2 also requeues the
job (:class:`NodeJob`, submitit's checkpointable protocol; at most
``slurm_max_num_timeout`` times after time-outs).
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
from typing import Any, Callable

import yaml

from jobs.cells import Cell, read_status, write_status  # noqa: F401 (re-exported: status.json lives with the cell)
from suite.training.checkpoint import Checkpointer

TERMINAL = ("FINISHED", "FAILED", "KILLED")


class Interrupted(Exception):
    """The node job was stopped without a fresh checkpoint (Ctrl-C, no epoch end within the grace period)."""


class StopRequested(Exception):
    """A graceful stop: the checkpoint of the epoch that just ended is saved."""


class EarlyStopped(Exception):
    """A scheduler (Ray Tune's ASHA) ended the cell for good before its last epoch."""


# What the signal handlers saw: the signal that asked for a stop, and whether
# the job must be requeued (submitit's SIGUSR2) rather than simply end.
_STOP: dict[str, Any] = {"signum": None, "requeue": False}


def stop_grace_s() -> float:
    """Seconds a stopped node job may take to reach its next epoch end (``$DEQBENCH_STOP_GRACE_S``, 30)."""
    return float(os.environ.get("DEQBENCH_STOP_GRACE_S", "30"))


def _request_stop(signum: int, _frame: Any) -> None:
    first = _STOP["signum"] is None
    _STOP["signum"] = signum
    _STOP["requeue"] = _STOP["requeue"] or signum == getattr(signal, "SIGUSR2", None)
    if first and hasattr(signal, "SIGALRM"):
        signal.signal(signal.SIGALRM, _raise_interrupt)
        signal.alarm(max(1, int(stop_grace_s())))
    print(f"deqbench: {signal.Signals(signum).name} received; stopping after the current epoch "
          f"(checkpoint{', then requeue' if _STOP['requeue'] else ''})", file=sys.stderr, flush=True)


def install_stop_handlers(signals: tuple[int, ...] = (signal.SIGTERM,)) -> None:
    """Makes ``signals`` request a graceful stop (main thread only; see the module docstring)."""
    _STOP.update(signum=None, requeue=False)
    for sig in signals:
        signal.signal(sig, _request_stop)


class NodeCheckpointer(Checkpointer):
    """The node job's checkpointer: rank 0 writes, every rank stops together on request.

    ``collective``: the fit loops call :meth:`save` on every rank (see
    :func:`suite.training.distributed.save_checkpoint`). :meth:`due` is where
    the ranks agree on a stop (one all-reduce per epoch under DDP): when any
    rank saw a stop signal, the checkpoint is due now and :meth:`save` raises
    :class:`StopRequested` on every rank once rank 0 has written it.

    Args:
        directory, every: as :class:`~suite.training.checkpoint.Checkpointer`.
        writer: whether this process writes (rank 0).
    """

    collective = True

    def __init__(self, directory: str | Path, every: int, writer: bool = True) -> None:
        super().__init__(directory, every)
        self.writer = writer
        self._stopping = False

    def due(self, epochs_done: int) -> bool:
        from suite.training import distributed as D

        if D.any_rank(_STOP["signum"] is not None):
            if hasattr(signal, "SIGALRM"):
                signal.alarm(0)  # an epoch ended in time: the checkpoint is written now
            self._stopping = True
            return True
        return super().due(epochs_done)

    def save(self, state: dict[str, Any], step: int) -> Path:
        path = super().save(state, step) if self.writer else self.directory / f"ckpt_{step:08d}.pt"
        if self._stopping:
            name = signal.Signals(_STOP["signum"]).name if _STOP["signum"] else "a stop request"
            raise StopRequested(f"stopped by {name} after saving checkpoint {step}")
        return path


def _raise_interrupt(signum: int, _frame: Any) -> None:
    if signum == getattr(signal, "SIGALRM", None):
        raise Interrupted(f"no epoch ended within the stop grace period after {signal.Signals(_STOP['signum'] or signum).name}")
    raise Interrupted(f"received signal {signal.Signals(signum).name}")


def _wants_cuda(device: str) -> bool:
    import torch

    return device == "cuda" or (device == "auto" and torch.cuda.is_available())


def run_cell(cell: Cell, wrap_tracker: Callable[[Any], Any] | None = None) -> dict[str, Any]:
    """Runs one cell to completion (or failure) and reports the outcome.

    Every rank of a DDP job calls it (see the module docstring).

    Args:
        cell: the cell (see :class:`jobs.cells.Cell`).
        wrap_tracker: rank 0 trains with ``wrap_tracker(mlflow_tracker)`` (the
            Ray launcher adds per-epoch ``tune.report`` this way).

    Returns:
        ``{"hash", "label", "state", "run_id", "results" | "error"}``; ``state``
        FINISHED, FAILED, KILLED (stopped; resubmitting resumes) or REQUEUED
        (stopped by submitit's SIGUSR2; the caller requeues).
    """
    from suite.config import flatten, load_config
    from suite.data import load_data
    from suite.models import build_model
    from suite.training import NullTracker, fit
    from suite.training import distributed as D
    from jobs import distributed, tracking
    from jobs.progress import ProgressTracker, total_epochs

    workdir = Path(cell.workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    out: dict[str, Any] = {"hash": cell.hash, "label": cell.label}
    tracker = None
    ctx = distributed.DistContext()
    try:
        cfg = load_config(cell.config)
        ctx = distributed.setup(use_cuda=_wants_cuda(cfg.train.device))
        ckpt = NodeCheckpointer(workdir / "ckpt", cfg.train.ckpt_every, writer=ctx.is_main)
        if ctx.is_main:
            (workdir / "config.yaml").write_text(yaml.safe_dump(cell.config, sort_keys=False))
            previous = read_status(workdir)
            if (previous.get("state") == "FAILED" and not previous.get("resumable")) or previous.get("early_stopped"):
                # A failure is usually deterministic, an early stop final: start afresh, in a new run.
                # (Not a tracking outage: its checkpoints keep the metrics MLflow has not received.)
                ckpt.clear()
                previous = {}
            latest = ckpt.latest()
            uri = cell.tracking_uri or tracking.resolve_tracking_uri()
            resume = (latest or {}).get("extra", {}).get("run_id")
            if latest is None and (previous.get("state") in ("RUNNING", "KILLED", "REQUEUED") or previous.get("resumable")):
                resume = previous.get("run_id")  # stopped before its first checkpoint: nothing was logged yet
            if resume and not tracking.run_exists(uri, resume):
                resume = None
            tracker = tracking.start_run(
                uri, cell.experiment, cell.label, flatten(cfg),
                tracking.run_tags(cell.hash, cfg.family, ctx.world_size), resume_run_id=resume,
            )
            ckpt.extra["run_id"] = tracker.run_id
            tracker.restore((latest or {}).get("extra", {}).get("pending_metrics", ()))
            ckpt.before_save.append(lambda: _flush_or_keep(tracker, ckpt))
            out["run_id"] = tracker.run_id
            write_status(workdir, state="RUNNING", run_id=tracker.run_id, host=socket.gethostname(), pid=os.getpid(),
                         started=time.time(), resumed_from=bool(latest), error=None, reason=None, world_size=ctx.world_size,
                         early_stopped=False,
                         slurm_job_id=_slurm_job_id(), resumable=False, progress=None)
            tracker.log_artifact(workdir / "config.yaml")
            diff = tracking.git_diff()
            if diff:  # the run's code is not a commit: keep what differed from it
                (workdir / "git_diff.patch").write_text(diff)
                tracker.log_artifact(workdir / "git_diff.patch")
        D.barrier()  # the other ranks resume from the checkpoint rank 0 kept (or cleared)
        model = build_model(cfg)
        data = load_data(cfg)
        fit_tracker: Any = tracker if ctx.is_main else NullTracker()
        if ctx.is_main:
            fit_tracker = ProgressTracker(fit_tracker, total_epochs(cell.config),
                                          lambda progress: write_status(workdir, progress=progress))
        if wrap_tracker is not None and ctx.is_main:
            fit_tracker = wrap_tracker(fit_tracker)
        results = fit(cfg, model, data, fit_tracker, ckpt=ckpt, outdir=workdir / "artifacts")
        if ctx.is_main:
            tracker.flush()
            tracker.terminate("FINISHED")
            write_status(workdir, state="FINISHED", results=results, ended=time.time())
        out.update(state="FINISHED", results=results)
    except StopRequested as err:
        state = "REQUEUED" if _STOP["requeue"] else "KILLED"
        if ctx.is_main:
            _record_failure(workdir, tracker, "KILLED", str(err), status_state=state)
        out.update(state=state, error=str(err))
    except EarlyStopped as err:
        if ctx.is_main:  # final: keep the curve up to the stop; quick, the trial's process may end any moment
            write_status(workdir, state="KILLED", error=str(err), ended=time.time(), early_stopped=True)
            try:
                tracker.set_tags({"failure_reason": str(err), "early_stopped": "true"})
                tracker.terminate("KILLED")
            except Exception as store_err:  # noqa: BLE001
                print(f"deqbench: could not record the early stop in MLflow: {store_err}", file=sys.stderr)
        out.update(state="KILLED", error=str(err))
    except (Interrupted, KeyboardInterrupt) as err:
        reason = str(err) or type(err).__name__
        if ctx.is_main:
            _record_failure(workdir, tracker, "KILLED", reason)
        out.update(state="KILLED", error=reason)
    except tracking.TrackingUnavailable as err:  # the store is gone: nothing can be recorded there
        reason = (f"TrackingUnavailable: {err}; the checkpoints in {workdir / 'ckpt'} keep every value not "
                  "logged: run the cell again to resume and log them")
        if ctx.is_main:
            write_status(workdir, state="FAILED", error=reason, reason="TRACKING_UNAVAILABLE", resumable=True,
                         ended=time.time())
        out.update(state="FAILED", error=reason)
    except Exception as err:  # noqa: BLE001 - a cell's failure is data, not a crash
        reason = f"{type(err).__name__}: {err}" + _disk_problem(err, workdir)
        if ctx.is_main:
            _record_failure(workdir, tracker, "FAILED", reason, traceback.format_exc())
        else:
            print(f"deqbench: rank {ctx.rank} failed: {traceback.format_exc()}", file=sys.stderr, flush=True)
        out.update(state="FAILED", error=reason)
    finally:
        distributed.teardown(ctx)
    out["rank"] = ctx.rank
    return out


def _flush_or_keep(tracker: Any, ckpt: Checkpointer) -> None:
    """Before a checkpoint: writes the buffered metrics, or, the store being unreachable, keeps them in it."""
    tracker.try_flush()
    ckpt.extra["pending_metrics"] = tracker.pending()


def _slurm_job_id() -> str | None:
    """``123_4`` for an array task, else ``SLURM_JOB_ID`` (None outside Slurm)."""
    env = os.environ
    if env.get("SLURM_ARRAY_JOB_ID") and env.get("SLURM_ARRAY_TASK_ID"):
        return f"{env['SLURM_ARRAY_JOB_ID']}_{env['SLURM_ARRAY_TASK_ID']}"
    return env.get("SLURM_JOB_ID")


REASON_TAG = "deqbench.failure_reason"
"""MLflow tag holding a failed or killed cell's reason in a word (``status.json`` field ``reason``)."""


def _reason_code(state: str, error: str) -> str:
    """The node job's own word for a failure: the exception's type, or the signal that stopped it."""
    if state == "FAILED":
        return error.split(":", 1)[0] or "FAILED"
    return signal.Signals(_STOP["signum"]).name if _STOP["signum"] else "interrupted"


def _disk_problem(err: BaseException, workdir: Path) -> str:
    """For an OSError that names no path: `` (WORKDIR: no space left, N KiB free)`` or read-only, when so."""
    if not isinstance(err, OSError) or err.filename or str(workdir) in str(err):
        return ""
    try:
        fs = os.statvfs(workdir)
    except OSError:
        return ""
    if fs.f_flag & os.ST_RDONLY:
        return f" ({workdir}: read-only file system)"
    free = fs.f_bavail * fs.f_frsize
    return f" ({workdir}: no space left, {free // 1024} KiB free)" if free < 1 << 20 else ""


def _record_failure(workdir: Path, tracker: Any, state: str, reason: str, tb: str = "",
                    status_state: str | None = None) -> None:
    code = _reason_code(state, reason)
    try:
        write_status(workdir, state=status_state or state, error=reason, reason=code, traceback=tb, ended=time.time())
    except OSError as err:  # disk full or read-only: MLflow (elsewhere) still gets the reason
        _say(f"deqbench: {err}; cell {state}: {reason}")
    if tracker is not None:
        try:
            # KILLED resumes from its checkpoint and replays the buffered epochs;
            # FAILED starts afresh, so its curve up to the failure is kept.
            tracker.flush() if state == "FAILED" else tracker.discard()
            tracker.set_tags({"failure_reason": reason[:5000], REASON_TAG: code})
            tracker.terminate(state)
        except Exception as err:  # noqa: BLE001 - the store itself may be the failure
            _say(f"deqbench: could not record {state} in MLflow: {err}")


def _say(line: str) -> None:
    """One line on stderr, which may be a log file on a full disk: then it is lost, not raised."""
    try:
        print(line, file=sys.stderr, flush=True)
    except OSError:
        pass


def record_end(cell: Cell, state: str, reason: str, error: str | None = None) -> None:
    """Records from outside the node job why a cell ended: a launcher or ``deqbench cancel`` knows better.

    ``status.json`` gets ``state``, ``reason`` (and ``error`` when given); the
    cell's MLflow run gets the :data:`REASON_TAG` tag and, when it is still
    RUNNING (the node job was killed before it could say so), ``failure_reason``
    and the end ``state`` (KILLED or FAILED).

    Args:
        cell: the cell.
        state: ``KILLED`` (resumable) or ``FAILED``.
        reason: a word: ``CANCELLED``, ``TIMEOUT``, ``OUT_OF_MEMORY``, ``exit code 3``, ...
        error: the sentence for ``status.json``'s ``error`` and the run's ``failure_reason``.

    Raises:
        OSError: ``status.json`` cannot be written (disk full, read-only), after MLflow was told.
    """
    fields: dict[str, Any] = {"state": state, "reason": reason, "ended": time.time()}
    if error:
        fields["error"] = error
    unwritable = None
    try:
        write_status(cell.workdir, **fields)
    except OSError as err:
        unwritable = err
        error = f"{error or reason}; {err}"
    run_id = read_status(cell.workdir).get("run_id")
    if run_id:
        _record_end_in_mlflow(cell, run_id, state, reason, error)
    if unwritable is not None:
        raise unwritable


def _record_end_in_mlflow(cell: Cell, run_id: str, state: str, reason: str, error: str | None) -> None:
    """:func:`record_end`'s MLflow part: the reason tag, and the end state of a run still RUNNING."""
    from jobs import tracking

    try:
        # a command's patience, not a training cell's outage limit: cancel must not hang on a dead store
        tracker = tracking.MlflowTracker(cell.tracking_uri or tracking.resolve_tracking_uri(), run_id,
                                         max_outage_s=tracking.COMMAND_PATIENCE_S)
        tracker.set_tags({REASON_TAG: reason})
        if tracking.client(tracker.uri).get_run(run_id).info.status == "RUNNING":
            tracker.set_tags({"failure_reason": (error or reason)[:5000]})
            tracker.terminate(state)
    except Exception as err:  # noqa: BLE001 - a deleted run or an unreachable store must not stop the others
        _say(f"deqbench: could not record {state} ({reason}) of cell {cell.hash} in MLflow: {err}")


class NodeJob:
    """What a submitit array task runs: ``NodeJob()(cell)``.

    It follows submitit's checkpointable protocol (what
    ``submitit.helpers.Checkpointable`` provides; duck-typed here so that
    importing this module does not need submitit): on SIGUSR2 -- the time limit
    is ``slurm_signal_delay_s`` away, or ``job._interrupt()`` -- the cell stops
    at the next epoch end with a fresh checkpoint, then submitit calls
    :meth:`checkpoint`, pickles the :class:`DelayedSubmission` it returns,
    requeues the job (``scontrol requeue``) and the requeued job resumes from
    that checkpoint into the same MLflow run. After ``slurm_max_num_timeout``
    time-outs it is not requeued and the cell is FAILED. SIGTERM (scancel,
    preemption, ``scontrol requeue``) stops the same way without requeueing
    itself (Slurm requeues or not).
    """

    def __call__(self, cell: Cell) -> dict[str, Any]:
        """Runs the cell; never returns when it was stopped (no result: the job is requeued or cancelled)."""
        requeue_handler = signal.getsignal(signal.SIGUSR2)  # submitit's checkpoint-and-requeue
        install_stop_handlers((signal.SIGTERM, signal.SIGUSR2))
        threads = os.environ.get("SLURM_CPUS_PER_TASK")
        if threads:
            import torch

            torch.set_num_threads(int(threads))
        out = run_cell(cell)
        if out["state"] == "KILLED" and _STOP["signum"] is not None:
            # Preemption is SIGTERM then SIGUSR2 (submitit's convention): give the
            # second a moment to arrive before ending without a requeue.
            deadline = time.time() + float(os.environ.get("DEQBENCH_REQUEUE_WAIT_S", "3"))
            while not _STOP["requeue"] and time.time() < deadline:
                time.sleep(0.1)
            if _STOP["requeue"]:
                out["state"] = "REQUEUED"
                write_status(cell.workdir, state="REQUEUED")
        if out["state"] == "REQUEUED" and callable(requeue_handler):
            try:
                requeue_handler(signal.SIGUSR2, None)  # rank 0: checkpoint(), requeue, sys.exit; others: returns
            except Exception as err:  # submitit's UncompletedJobError: timed out too often
                write_status(cell.workdir, state="FAILED", error=f"not requeued: {err}",
                             reason="TIMEOUT" if "timed-out" in str(err) else "not requeued")
                raise
        if out["state"] in ("REQUEUED", "KILLED") and _STOP["signum"] is not None:
            sys.exit(1)  # no result pickle: the (requeued or cancelled) job is not done
        return out

    def checkpoint(self, cell: Cell) -> Any:
        """The submission a requeued job runs: this callable again, on the same cell (it resumes)."""
        from submitit.helpers import DelayedSubmission

        return DelayedSubmission(NodeJob(), cell)


def main(argv: list[str] | None = None, wrap_tracker: Callable[[Any], Any] | None = None) -> int:
    """``python -m jobs.node CELL_JSON``: exit 0 when the cell FINISHED, else 1 (``wrap_tracker``: see run_cell)."""
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 1:
        print("usage: python -m jobs.node RUNS/SWEEP/HASH/cell.json", file=sys.stderr)
        return 2
    install_stop_handlers((signal.SIGTERM,))
    threads = os.environ.get("DEQBENCH_TORCH_THREADS")
    if threads:
        import torch

        torch.set_num_threads(int(threads))
    result = run_cell(Cell.load(argv[0]), wrap_tracker=wrap_tracker)
    print(json.dumps({k: v for k, v in result.items() if k != "results"}))
    return 0 if result.get("state") == "FINISHED" else 1


if __name__ == "__main__":
    sys.exit(main())
