"""``deqbench status``: cell states from work directories and MLflow (no Slurm accounting needed)."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

from jobs.cells import expand_sweep
from jobs.node import read_status


def cell_states(sweep: str | Path, runs_dir: str | Path | None, uri: str) -> list[tuple[str, str, str, str]]:
    """``(hash, label, state, detail)`` per cell.

    State: FINISHED/FAILED/KILLED/RUNNING from ``status.json`` (MLflow FINISHED
    wins: the store is the record), PENDING when submitted but not started
    (a ``submitted.json`` exists), else NOT_STARTED.
    """
    from jobs import tracking

    name, cells = expand_sweep(sweep, runs_dir=runs_dir, tracking_uri=uri)
    finished = tracking.finished_hashes(uri, name)
    rows = []
    for c in cells:
        st = read_status(c.workdir)
        state = st.get("state")
        if c.hash in finished:
            state = "FINISHED"
        elif state is None:
            state = "PENDING" if (Path(c.workdir) / "submitted.json").exists() else "NOT_STARTED"
        rows.append((c.hash, c.label, state, st.get("error") or ""))
    return rows


def sweep_status(sweep: str | Path, runs_dir: str | Path | None, uri: str) -> str:
    """Human-readable status table of a sweep with a summary line."""
    rows = cell_states(sweep, runs_dir, uri)
    lines = [f"  {state:<11} {h}  {label}  {detail}".rstrip() for h, label, state, detail in rows]
    counts = Counter(r[2] for r in rows)
    summary = ", ".join(f"{n} {s.lower()}" for s, n in sorted(counts.items()))
    return "\n".join(lines + [f"{len(rows)} cells: {summary}"])
