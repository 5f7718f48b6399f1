"""What runs inside a Ray Tune trial (see :mod:`jobs.launchers.ray_launcher`): one cell, in a process of its own.

The trial (a Tune actor, reused across trials) forks one child per cell from
its warm fork server (:func:`jobs.launchers.local.fork_context`, started once
per actor). The child runs the node job and never touches Ray: each per-epoch
row goes over a pipe to the trial (:class:`RelayTracker`), which calls
``tune.report`` and answers go or stop (:func:`_relay`). A DDP cell runs under
``torchrun`` instead, and reports once, at its end.
"""

from __future__ import annotations

import contextlib
import functools
import os
import signal
import subprocess
import sys
import types
from pathlib import Path
from typing import Any, Iterator, Mapping

from jobs.cells import Cell, read_status

EARLY_STOP_MARKER = "early_stopped"
"""The file the ASHA scheduler leaves in a cell's work directory before stopping its trial."""


class RelayTracker:
    """In a cell's process: the node job's tracker, each per-epoch row also sent to the trial for ``tune.report``.

    Every row carries the latest value of every metric seen so far (Tune wants
    the scheduler's metric in each one) plus ``epoch``; the trial (:func:`_relay`)
    answers ``go`` or, when ``tune.report`` stopped the trial, ``stop``. The
    scheduler left an ``early_stopped`` file in the work directory when it was
    its decision (``ray_launcher._marking_asha``): the buffered epochs are
    flushed and the cell ends as :class:`jobs.node.EarlyStopped` (final:
    running it again starts afresh in a new MLflow run). Otherwise Tune is stopping every trial (Ctrl-C
    on the driver, ``deqbench cancel``), as it is when the trial's process is
    gone: the cell ends as :class:`jobs.node.Interrupted`, to be resumed. The
    final metrics (``time/total_s``) end training whatever the answer.
    """

    def __init__(self, inner: Any, workdir: str | Path, conn: Any) -> None:
        self.inner = inner
        self.workdir = Path(workdir)
        self.conn = conn
        self.latest: dict[str, float] = {}

    def log_metrics(self, metrics: Mapping[str, float], step: int | None = None) -> None:
        from jobs.node import EarlyStopped, Interrupted

        self.inner.log_metrics(metrics, step)
        self.latest.update({k: float(v) for k, v in metrics.items()})
        try:
            self.conn.send({**self.latest, "epoch": int(step or 0)})
            answer = self.conn.recv()
        except (OSError, EOFError):
            answer = None
        if answer == "go" or "time/total_s" in metrics:  # the final metrics (DESIGN: logged once, at the end)
            return
        if answer is None:
            raise Interrupted("its Ray trial ended (the sweep was stopped, or Ray ended the actor); running it again resumes")
        if not (self.workdir / EARLY_STOP_MARKER).exists():
            raise Interrupted("stopped by Ray Tune (the sweep was interrupted); running it again resumes")
        try:
            self.inner.flush()
        except Exception:  # noqa: BLE001 - best effort; the driver records the stop anyway
            pass
        raise EarlyStopped(f"stopped early by the Tune scheduler after epoch {step}")

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)


STOP_WAIT_S = 30.0
"""How long a trial that Tune stopped waits for its cell's process to record the stop and end."""


def _relay(conn: Any) -> bool:
    """In the trial: ``tune.report`` of each row the cell's process sends, answered; True when Tune stopped it.

    Returns when the cell's process has closed the pipe (it ended). Never
    called again after ``tune.report`` said stop (its ``SystemExit``): later
    rows are answered ``stop``.
    """
    from ray import tune

    stopped = False
    while True:
        try:
            row = conn.recv()
        except (OSError, EOFError):
            return stopped
        if not stopped:
            try:
                tune.report(row)
            except SystemExit:  # the scheduler's decision, or the sweep is being stopped
                stopped = True
        try:
            conn.send("stop" if stopped else "go")
        except OSError:
            return stopped


@contextlib.contextmanager
def _without_main() -> Iterator[None]:
    """While starting a child: ``multiprocessing`` runs the parent's ``__main__`` again in each child of a
    fork server (as ``__mp_main__``); a Ray worker's is Ray's worker script, which imports ray. Hidden."""
    main = sys.modules["__main__"]
    sys.modules["__main__"] = types.ModuleType("__main__")
    try:
        yield
    finally:
        sys.modules["__main__"] = main


def _relayed_node(path: str, env: dict[str, str], log: str, cwd: str, conn: Any) -> None:
    """A cell's process under Ray, forked from the actor's warm server: the node job, rows relayed to the trial.

    It gets SIGTERM when its parent (the fork server) ends, as it does with the
    actor when Ray ends it: the node job then stops at its next epoch end with
    a checkpoint, as on ``scancel`` (Linux; elsewhere its next row finds the
    pipe closed).
    """
    if sys.platform.startswith("linux"):
        import ctypes

        ctypes.CDLL(None).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    from jobs.launchers.local import forked_node

    forked_node(path, env, log, cwd, wrap_tracker=functools.partial(RelayTracker, workdir=Path(path).parent, conn=conn))


def _run_forked(cell: Cell, path: str, cpus: int) -> None:
    """Runs a one-rank cell in a child of this actor's warm fork server, relaying its rows to Tune.

    Raises:
        RuntimeError: the cell FAILED, or its process died without reporting (then recorded FAILED here).
    """
    from jobs.launchers.local import Forked, fork_context, record_unreported, thread_env

    # Tune's actor reuse waits this long for the trial's thread (default 2 s, else the next trial fails).
    os.environ.setdefault("TUNE_FUNCTION_THREAD_TIMEOUT_S", str(int(STOP_WAIT_S) + 30))
    here, there = fork_context().Pipe()
    with _without_main():
        proc = Forked(Path(path), thread_env(cpus), Path(cell.workdir) / "log.txt", _relayed_node, (there,))
    there.close()  # the child holds the other end: its exit closes the pipe
    try:
        stopped = _relay(here)
    finally:
        here.close()  # on an error here, the child's next row finds the pipe closed and it stops
    code = proc.wait(STOP_WAIT_S if stopped else None)
    status = read_status(cell.workdir)
    if code not in (0, None) and status.get("state") not in ("FAILED", "KILLED"):
        raise RuntimeError(f"cell {cell.hash}: {record_unreported(cell, code)}")
    if status.get("state") == "FAILED":
        raise RuntimeError(f"cell {cell.hash} failed: {status.get('error')}")


def trial(config: dict[str, Any]) -> None:
    """One Tune trial: the node job on one cell, in a process of its own (under torchrun for DDP)."""
    from ray import tune

    from jobs.launchers.local import node_command, thread_env

    cell = Cell.load(config["cell"])
    cpus = int(max(1, tune.get_context().get_trial_resources().required_resources.get("CPU", 1) // cell.world_size))
    if cell.world_size == 1:
        _run_forked(cell, config["cell"], cpus)
        return
    with open(Path(cell.workdir) / "log.txt", "ab") as log:
        subprocess.run(node_command(cell, Path(config["cell"])), stdout=log, stderr=subprocess.STDOUT,
                       env=thread_env(cpus))
    status = read_status(cell.workdir)
    tune.report({**(status.get("results") or {}), "state": status.get("state", "FAILED")})
