"""``deqbench status``: cell states from work directories and MLflow (no Slurm accounting needed)."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

from jobs.cells import expand_sweep
from jobs.node import read_status


def cell_states(sweep: str | Path, runs_dir: str | Path | None, uri: str) -> list[tuple[str, str, str, str]]:
    """``(hash, label, state, detail)`` per cell.

    State: FINISHED/FAILED/KILLED/RUNNING from ``status.json`` (MLflow FINISHED
    wins: the store is the record); for a cell submitted to Slurm
    (``submitted.json``) PENDING/RUNNING from ``squeue`` when ``status.json``
    is absent or older than the submission, or the job waits after a requeue
    (works with accounting disabled); else NOT_STARTED.
    """
    from jobs import tracking

    name, cells = expand_sweep(sweep, runs_dir=runs_dir, tracking_uri=uri)
    finished = tracking.finished_hashes(uri, name)
    slurm = _slurm_states([c.workdir for c in cells if c.hash not in finished])
    rows = []
    for c in cells:
        st = read_status(c.workdir)
        state, detail = st.get("state"), st.get("error") or ""
        if c.hash in finished:
            state, detail = "FINISHED", ""
        elif c.workdir in slurm:
            state, detail = _combine(st, *slurm[c.workdir])
        elif state is None:
            state = "PENDING" if (Path(c.workdir) / "submitted.json").exists() else "NOT_STARTED"
        rows.append((c.hash, c.label, state, detail))
    return rows


def _slurm_states(workdirs: list[str]) -> dict[str, tuple[dict, str]]:
    """``{workdir: (submitted.json, Slurm state)}`` for cells submitted to Slurm, from one ``squeue`` call.

    Empty when nothing was submitted or Slurm cannot be asked (not installed,
    controller down): the work directories alone then tell the state.
    """
    from jobs.launchers.submitit_launcher import read_submitted

    subs = {w: sub for w in workdirs if (sub := read_submitted(w)).get("job_id")}
    if not subs:
        return {}
    try:
        from jobs.slurm_env import job_states

        states = job_states(sorted({sub["array_job_id"] for sub in subs.values()}))
    except (RuntimeError, ValueError):
        return {}
    return {w: (sub, states.get(sub["job_id"], "UNKNOWN")) for w, sub in subs.items()}


def _combine(status: dict, submitted: dict, slurm: str) -> tuple[str, str]:
    """A submitted cell's state from its ``status.json`` and Slurm's view of its job.

    ``status.json`` is *stale* when older than the submission (a previous
    attempt wrote it); then, and while a requeued job waits, Slurm's
    PENDING/RUNNING is the answer. A job Slurm reports ended while the node job
    never reported (killed, out of memory) is FAILED.
    """
    from jobs.slurm_env import TERMINAL_STATES

    job = submitted["job_id"]
    fresh = status.get("updated", 0) >= submitted.get("submitted", 0)
    state = status.get("state") if fresh else None
    if state in ("FINISHED", "FAILED"):
        return state, status.get("error") or ""
    if slurm in ("PENDING", "REQUEUED", "REQUEUE_HOLD", "CONFIGURING", "SUSPENDED"):
        return "PENDING", f"Slurm job {job} {slurm.lower()}" + (" (requeued)" if state in ("REQUEUED", "KILLED") else "")
    if slurm in ("RUNNING", "COMPLETING"):
        return "RUNNING", f"Slurm job {job}"
    if state is not None and (state != "RUNNING" or slurm == "UNKNOWN"):
        return state, status.get("error") or ""
    if slurm in TERMINAL_STATES:
        return "FAILED", f"Slurm job {job} ended {slurm} before the node job reported"
    return "FAILED", f"Slurm job {job} is unknown to squeue and the node job never reported"


def sweep_status(sweep: str | Path, runs_dir: str | Path | None, uri: str) -> tuple[str, int]:
    """Human-readable status table of a sweep with a summary line, and how many cells FAILED."""
    rows = cell_states(sweep, runs_dir, uri)
    lines = [f"  {state:<11} {h}  {label}  {detail}".rstrip() for h, label, state, detail in rows]
    counts = Counter(r[2] for r in rows)
    summary = ", ".join(f"{n} {s.lower()}" for s, n in sorted(counts.items()))
    return "\n".join(lines + [f"{len(rows)} cells: {summary}"]), counts.get("FAILED", 0)
