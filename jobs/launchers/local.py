"""Local launcher: each cell is a ``python -m jobs.node`` process, ``workers`` at a time.

A separate process per cell isolates crashes (a segfault or OOM kill marks that
cell FAILED; the others go on), gives each cell its own peak-memory reading, and
is exactly what a Slurm task runs. Torch threads are split between workers,
and a DDP cell's share between its ranks.
"""

from __future__ import annotations

import os
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor, as_completed
from pathlib import Path
from typing import Any

from jobs.cells import Cell
from jobs.node import read_status, write_status


def _run_one(cell: Cell, threads: int) -> dict[str, Any]:
    path = cell.save()
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads),
           "DEQBENCH_TORCH_THREADS": str(threads), "PYTHONUNBUFFERED": "1"}
    cmd = [sys.executable, "-m", "jobs.node", str(path)]
    if cell.world_size > 1:  # DDP on this machine: one process per rank (gloo on CPU), see jobs.distributed
        cmd[1:2] = ["-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={cell.world_size}", "-m"]
    with open(Path(cell.workdir) / "log.txt", "ab") as log:
        proc = subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=os.getcwd())
    status = read_status(cell.workdir)
    if proc.returncode != 0 and status.get("state") not in ("FAILED", "KILLED"):
        # The process died without reporting (killed, segfault): record it here.
        reason = f"node process exited with code {proc.returncode}; see {cell.workdir}/log.txt"
        write_status(cell.workdir, state="FAILED", error=reason)
        status = read_status(cell.workdir)
    return {"hash": cell.hash, "label": cell.label, "state": status.get("state", "FAILED"),
            "run_id": status.get("run_id"), "error": status.get("error"), "results": status.get("results")}


def submit(cells: list[Cell], workers: int | None = None, progress: bool = True) -> list[dict[str, Any]]:
    """Runs ``cells`` in parallel local processes and waits for all of them.

    Args:
        cells: cells to run.
        workers: concurrent processes (default: one per CPU core, each single-threaded:
            small DEQ cells scale better across processes than across threads).
        progress: show a tqdm progress bar on stderr.

    Returns:
        One outcome dict per cell (``state`` FINISHED/FAILED/KILLED, ``error``, ``results``).
    """
    from tqdm import tqdm

    ncpu = os.cpu_count() or 1
    workers = max(1, min(workers or ncpu, len(cells) or 1))
    threads = max(1, ncpu // workers)
    outcomes: list[dict[str, Any]] = []
    with ThreadPoolExecutor(max_workers=workers) as pool:
        # A worker's share of the cores is split between a DDP cell's ranks: 2 ranks x 2 threads
        # on 2 cores ran 2.8x slower per epoch than 2 x 1 (deqbench bench ddp).
        futures = {pool.submit(_run_one, c, max(1, threads // c.world_size)): c for c in cells}
        bar = tqdm(total=len(cells), desc="cells", unit="cell", disable=not progress, file=sys.stderr)
        for fut in as_completed(futures):
            res = fut.result()
            outcomes.append(res)
            bar.set_postfix_str(f"{res['label']}: {res['state']}")
            bar.update(1)
        bar.close()
    return outcomes
