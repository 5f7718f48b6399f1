"""``deqbench status``: cell states from work directories and MLflow (no Slurm accounting needed)."""

from __future__ import annotations

import json
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any, Callable

from jobs.cells import expand_sweep, read_status  # not jobs.node: status imports neither torch nor mlflow
from jobs.progress import describe

STORE_PATIENCE_S = 5.0  # how long status waits for an unreachable MLflow store before going on without it


def cell_states(sweep: str | Path, runs_dir: str | Path | None, uri: str) -> tuple[str, list[dict[str, Any]]]:
    """The sweep's name and one record per cell.

    State: FINISHED/FAILED/KILLED/RUNNING from ``status.json`` (MLflow FINISHED
    wins: the store is the record; when it is unreachable, a line on stderr says
    so and ``status.json`` alone decides); for a cell submitted to Slurm
    (``submitted.json``) PENDING/RUNNING from ``squeue`` when ``status.json``
    is absent or older than the submission, or the job waits after a requeue
    (works with accounting disabled); else NOT_STARTED.

    Returns:
        ``(name, cells)``; each cell ``{"hash", "label", "state", "detail",
        "reason", "run_id", "workdir", "progress"}``: ``detail`` is the error or
        the Slurm view, ``reason`` the failure's word from ``status.json`` (OOM,
        TIMEOUT, ...; None when it has none), ``progress`` the running cell's
        ``{"epoch", "total", "loss", "psnr", "eta_s", "at"}`` (None unless RUNNING).
    """
    from jobs import store_query, tracking

    name, cells = expand_sweep(sweep, runs_dir=runs_dir, tracking_uri=uri)
    # Every cell's status.json says it ended, none went to Slurm (whose status.json may be stale): the store
    # adds nothing (a node job and a launcher record an end in both), and mlflow (seconds to import) stays out.
    statuses = {c.hash: read_status(c.workdir) for c in cells}  # each status.json read once
    ended = all(statuses[c.hash].get("state") in ("FINISHED", "FAILED", "KILLED")
                and not (Path(c.workdir) / "submitted.json").exists() for c in cells)
    try:
        finished = set() if ended else store_query.finished_hashes(uri, name, patience_s=STORE_PATIENCE_S)
    except tracking.TrackingUnavailable as err:  # an outage is when one wants to look: say so, go on
        print(f"deqbench status: {err}; states from the cells' status.json only", file=sys.stderr, flush=True)
        finished = set()
    slurm = _slurm_states([c.workdir for c in cells if c.hash not in finished])
    rows = []
    for c in cells:
        st = statuses[c.hash]
        state, detail = st.get("state"), st.get("error") or ""
        if c.hash in finished:
            state, detail = "FINISHED", ""
        elif c.workdir in slurm:
            state, detail = _combine(st, *slurm[c.workdir])
        elif state is None:
            state = "PENDING" if (Path(c.workdir) / "submitted.json").exists() else "NOT_STARTED"
        rows.append({"hash": c.hash, "label": c.label, "state": state, "detail": detail,
                     "reason": st.get("reason") if state in ("FAILED", "KILLED") else None,
                     "run_id": st.get("run_id"), "workdir": c.workdir,
                     "progress": st.get("progress") if state == "RUNNING" else None})
    return name, rows


def _slurm_states(workdirs: list[str]) -> dict[str, tuple[dict, str]]:
    """``{workdir: (submitted.json, Slurm state)}`` for cells submitted to Slurm, from one ``squeue`` call.

    Empty when nothing was submitted or Slurm cannot be asked (not installed,
    controller down): the work directories alone then tell the state.
    """
    if not any((Path(w) / "submitted.json").exists() for w in workdirs):
        return {}  # a local sweep: no Slurm to ask (and no jobs.node, torch, to import)
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


def sweep_status(sweep: str | Path, runs_dir: str | Path | None, uri: str,
                 as_json: bool = False) -> tuple[str, Counter[str]]:
    """The sweep's status as text (a table with a summary line) or JSON, and how many cells are in each state.

    JSON: ``{"sweep", "cells": [...] (see :func:`cell_states`), "counts": {state: n}, "failed"}``.
    """
    name, rows = cell_states(sweep, runs_dir, uri)
    counts = Counter(r["state"] for r in rows)
    if as_json:
        return json.dumps({"sweep": name, "cells": rows, "counts": dict(counts),
                           "failed": counts.get("FAILED", 0)}), counts
    lines = [f"  {r['state']:<11} {r['hash']}  {r['label']}  {_detail(r)}".rstrip() for r in rows]
    summary = ", ".join(f"{n} {s.lower()}" for s, n in sorted(counts.items()))
    return "\n".join(lines + [f"{len(rows)} cells: {summary}"]), counts


def _detail(row: dict[str, Any]) -> str:
    """What the table shows after a cell's label: its progress, and the reason and error of a failure."""
    parts = [describe(row["progress"]), row["detail"]]
    if row["reason"] and row["reason"] not in row["detail"]:
        parts[1] = f"[{row['reason']}] {row['detail']}".rstrip()
    return "  ".join(p for p in parts if p)


def watch(show: Callable[[], tuple[str, Counter[str]]], every_s: float, clear: bool) -> int:
    """Prints ``show()`` every ``every_s`` seconds until every cell has ended (FINISHED, FAILED, KILLED), or Ctrl-C.

    Args:
        show: :func:`sweep_status` with its arguments bound.
        every_s: refresh period.
        clear: clear the terminal before each refresh (a human watching); else append (a script).

    Returns:
        The exit code of the last refresh: 1 when a cell FAILED, else 0.
    """
    counts: Counter[str] = Counter()
    try:
        while True:
            text, counts = show()
            if clear:
                print("\033[H\033[2J" + text + f"\n({time.strftime('%H:%M:%S')}, every {every_s:g} s; Ctrl-C to stop)",
                      flush=True)
            else:
                print(text, flush=True)
            if set(counts) <= {"FINISHED", "FAILED", "KILLED"}:
                break
            time.sleep(every_s)
    except KeyboardInterrupt:
        pass
    return 1 if counts.get("FAILED") else 0
