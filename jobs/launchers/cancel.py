"""``deqbench cancel SWEEP``: stop a sweep on every launcher; its cells end KILLED and resumable.

What runs where is read from the sweep's folder ``<runs>/<sweep>/``:

- Slurm (submitit): each cell's ``submitted.json`` names its job or array task;
  those not ended yet are ``scancel``-ed. Slurm sends SIGTERM, and SIGKILL
  ``KillWait`` seconds later (5 s on the local cluster).
- local and Ray: ``launcher.json`` (written by :func:`record_launcher`) names the
  waiting ``deqbench sweep`` process; it gets SIGINT, exactly as a Ctrl-C: the
  local launcher starts no more cells and sends each running one SIGTERM; Tune
  stops its trials and keeps its experiment state.
- a node process still running on this host without its launcher (its pid is in
  ``status.json``) gets SIGTERM.

The node job stops gracefully on SIGTERM: at the next epoch end it saves a
checkpoint and ends KILLED (see :mod:`jobs.node`). Then every cell that was
running or queued is recorded KILLED with reason ``CANCELLED`` (``status.json``
and its MLflow run, tag ``deqbench.failure_reason``), and running the sweep
again resumes each from its newest checkpoint into the same MLflow run.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import time
from pathlib import Path
from typing import Any

from jobs.cells import Cell
from jobs.node import TERMINAL, read_status, record_end

LAUNCHER_FILE = "launcher.json"
CANCELLED = "CANCELLED"
_ACTIVE = ("RUNNING", "REQUEUED", "PENDING")


def record_launcher(cells: list[Cell], launcher: str) -> Path:
    """Writes ``<runs>/<sweep>/launcher.json``: this process runs the sweep (``deqbench cancel`` signals it)."""
    path = Path(cells[0].workdir).parent / LAUNCHER_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"launcher": launcher, "pid": os.getpid(), "host": socket.gethostname(),
                                "started": time.time()}, indent=2))
    return path


def our_process(pid: Any, *markers: str) -> bool:
    """Whether ``pid`` is alive on this host and its command line holds one of ``markers``."""
    try:
        cmdline = Path(f"/proc/{int(pid)}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except (OSError, TypeError, ValueError):
        return False
    return any(m in cmdline for m in markers)


def _launcher_process(sweep_dir: Path) -> dict[str, Any] | None:
    """The sweep's ``launcher.json`` when its process still runs on this host."""
    try:
        info = json.loads((sweep_dir / LAUNCHER_FILE).read_text())
    except (OSError, ValueError):
        return None
    if info.get("host") != socket.gethostname() or not our_process(info.get("pid"), "deqbench", "jobs.cli"):
        return None
    return info


def _slurm_jobs(cells: list[Cell]) -> dict[str, str]:
    """``{workdir: job id}`` of the cells submitted to Slurm whose job has not ended."""
    from jobs.launchers.submitit_launcher import read_submitted

    subs = {c.workdir: sub["job_id"] for c in cells if (sub := read_submitted(c.workdir)).get("job_id")}
    if not subs:
        return {}
    from jobs.slurm_env import TERMINAL_STATES, UNKNOWN_STATE, job_states

    states = job_states(sorted({j.split("_")[0] for j in subs.values()}))
    return {w: j for w, j in subs.items() if states.get(j, UNKNOWN_STATE) not in TERMINAL_STATES | {UNKNOWN_STATE}}


def _stopped(pids: list[int], slurm: dict[str, str], cells: list[Cell]) -> bool:
    """Whether every signalled process has exited and every cancelled Slurm job has ended."""
    if any(our_process(pid, "deqbench", "jobs.cli", "jobs.node") for pid in pids):
        return False
    return not slurm or not _slurm_jobs([c for c in cells if c.workdir in slurm])


def cancel_cells(cells: list[Cell], wait_s: float = 60.0) -> tuple[list[str], list[Cell]]:
    """Stops whatever runs ``cells`` and records them KILLED (reason ``CANCELLED``).

    Args:
        cells: the sweep's cells that have not FINISHED.
        wait_s: how long to wait for the node jobs to checkpoint and end.

    Returns:
        ``(what was signalled, one line each; the cells recorded KILLED)``.
    """
    actions: list[str] = []
    slurm = _slurm_jobs(cells)
    launcher = _launcher_process(Path(cells[0].workdir).parent)
    # Which cells run or wait, read before any signal: a stopped cell soon says KILLED itself.
    active = [c for c in cells if c.workdir in slurm or read_status(c.workdir).get("state") in _ACTIVE
              or (launcher is not None and read_status(c.workdir).get("state") not in TERMINAL)]
    if slurm:
        from jobs.slurm_env import cancel_jobs

        cancel_jobs(sorted(set(slurm.values())))
        actions.append(f"scancel of Slurm job(s) {', '.join(sorted(set(slurm.values())))}")
    if launcher is not None:
        os.kill(int(launcher["pid"]), signal.SIGINT)
        actions.append(f"SIGINT to the {launcher.get('launcher', '?')} launcher (pid {launcher['pid']})")
    pids = [int(launcher["pid"])] if launcher is not None else []
    for c in active:
        st = read_status(c.workdir)
        if st.get("host") == socket.gethostname() and our_process(st.get("pid"), "jobs.node"):
            pids.append(int(st["pid"]))
            if launcher is None:  # a node job whose launcher is gone
                os.kill(int(st["pid"]), signal.SIGTERM)
                actions.append(f"SIGTERM to the node job of {c.hash} (pid {st['pid']})")
    deadline = time.monotonic() + wait_s
    while not _stopped(pids, slurm, active) and time.monotonic() < deadline:
        time.sleep(0.5)
    killed = []
    for c in active:
        st = read_status(c.workdir)
        if st.get("state") == "FINISHED" or (st.get("state") == "FAILED" and st.get("updated", 0) > _launched(c, launcher)):
            continue  # this attempt ended on its own
        record_end(c, "KILLED", CANCELLED, "cancelled by `deqbench cancel`; running the sweep again resumes it")
        killed.append(c)
    return actions, killed


def _launched(cell: Cell, launcher: dict[str, Any] | None) -> float:
    """When the cell's current attempt was submitted or its launcher started (0 when unknown)."""
    from jobs.launchers.submitit_launcher import read_submitted

    return float(read_submitted(cell.workdir).get("submitted") or (launcher or {}).get("started") or 0)


def cancel_command(sweep: str | Path, runs_dir: str | Path | None, uri: str, wait_s: float = 60.0) -> str:
    """``deqbench cancel``: what was stopped, one line per cell now KILLED, and how to resume."""
    from jobs import tracking
    from jobs.cells import expand_sweep

    name, cells = expand_sweep(sweep, runs_dir=runs_dir, tracking_uri=uri)
    finished = tracking.finished_hashes(uri, name)
    todo = [c for c in cells if c.hash not in finished]
    if not todo:
        return f"nothing to cancel: every cell of sweep {name!r} has FINISHED"
    actions, killed = cancel_cells(todo, wait_s)
    if not killed:
        return f"nothing to cancel: no cell of sweep {name!r} is running or queued"
    lines = [f"sweep {name!r}: " + "; ".join(actions or ["no process or job was still running"])]
    lines += [f"  KILLED    {c.hash}  {c.label}  {read_status(c.workdir).get('reason', '')}" for c in killed]
    lines.append(f"{len(killed)} cell(s) KILLED; `deqbench sweep {sweep}` resumes them from their checkpoints")
    return "\n".join(lines)
