"""Local launcher: each cell is a ``python -m jobs.node`` process, ``workers`` at a time.

A separate process per cell isolates crashes (a segfault or OOM kill marks that
cell FAILED; the others go on), gives each cell its own peak-memory reading, and
is exactly what a Slurm task runs. Torch threads are split between workers,
and a DDP cell's share between its ranks.

GPUs (:mod:`jobs.launchers.gpus`): the devices of this machine are found from
``CUDA_VISIBLE_DEVICES``, else torch. A cell that trains on GPUs (``train.device``
``cuda``, or ``auto`` when GPUs exist) takes ``world_size`` of them, one per rank,
and its process sees only those through ``CUDA_VISIBLE_DEVICES``; it starts only
once they are free, so no GPU is ever shared. A cell that needs more than exist
fails at once, the others go on. A ``train.device: cpu`` cell on a GPU machine
sees no GPU (``CUDA_VISIBLE_DEVICES=""``).
"""

from __future__ import annotations

import os
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor, as_completed
from pathlib import Path
from typing import Any, Callable

from jobs.cells import Cell
from jobs.launchers.gpus import DevicePool, discover_devices, wants_gpus
from jobs.node import read_status, write_status

Command = Callable[[Cell, Path], list[str]]


def node_command(cell: Cell, path: Path) -> list[str]:
    """The command line that runs ``cell`` (saved at ``path``): the node job, under torchrun for DDP."""
    cmd = [sys.executable, "-m", "jobs.node", str(path)]
    if cell.world_size > 1:  # DDP on this machine: one process per rank (gloo on CPU), see jobs.distributed
        cmd[1:2] = ["-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={cell.world_size}", "-m"]
    return cmd


def _outcome(cell: Cell, status: dict[str, Any]) -> dict[str, Any]:
    return {"hash": cell.hash, "label": cell.label, "state": status.get("state", "FAILED"),
            "run_id": status.get("run_id"), "error": status.get("error"), "results": status.get("results")}


def _fail(cell: Cell, reason: str) -> dict[str, Any]:
    """Marks ``cell`` FAILED before it started (its ``log.txt`` says why too)."""
    with open(Path(cell.workdir) / "log.txt", "a") as log:
        log.write(f"deqbench: {reason}\n")
    write_status(cell.workdir, state="FAILED", error=reason)
    return _outcome(cell, read_status(cell.workdir))


def _run_one(cell: Cell, threads: int, pool: DevicePool | None = None, hide_gpus: bool = False,
             command: Command = node_command) -> dict[str, Any]:
    """Runs one cell's process and returns its outcome.

    Args:
        cell: the cell.
        threads: torch/OpenMP threads per rank.
        pool: GPUs to take ``cell.world_size`` of (waiting until they are free); None: a CPU cell.
        hide_gpus: a CPU cell on a machine with GPUs: its process sees none.
        command: builds the command line (default :func:`node_command`).
    """
    path = cell.save()
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads),
           "DEQBENCH_TORCH_THREADS": str(threads), "PYTHONUNBUFFERED": "1"}
    devices: list[str] = []
    if pool is not None:
        try:
            devices = pool.acquire(cell.world_size)
        except ValueError as err:
            return _fail(cell, f"local launcher: cell {cell.label!r} {err}")
        env["CUDA_VISIBLE_DEVICES"] = ",".join(devices)
    elif hide_gpus:
        env["CUDA_VISIBLE_DEVICES"] = ""
    try:
        with open(Path(cell.workdir) / "log.txt", "ab") as log:
            proc = subprocess.run(command(cell, path), stdout=log, stderr=subprocess.STDOUT, env=env, cwd=os.getcwd())
    finally:
        if pool is not None:
            pool.release(devices)
    status = read_status(cell.workdir)
    if proc.returncode != 0 and status.get("state") not in ("FAILED", "KILLED"):
        # The process died without reporting (killed, segfault): record it here.
        reason = f"node process exited with code {proc.returncode}; see {cell.workdir}/log.txt"
        write_status(cell.workdir, state="FAILED", error=reason)
        status = read_status(cell.workdir)
    return _outcome(cell, status)


def default_workers(workers: int | None, n_cells: int, n_gpus: int, gpu_cells: int) -> int:
    """Concurrent cells: ``workers`` when given, else one per GPU when cells want GPUs, else one per core.

    Capped at the number of cells. Whatever the number, GPU cells also wait for
    their devices, so no more run at once than the GPUs allow.
    """
    if workers is None:
        workers = n_gpus if gpu_cells and n_gpus else (os.cpu_count() or 1)
    return max(1, min(workers, n_cells or 1))


def plan(cells: list[Cell], workers: int | None = None) -> tuple[list[str], dict[str, bool], int, str]:
    """What :func:`submit` would do with this machine's GPUs.

    Returns:
        ``(device ids, {cell hash: trains on GPUs}, workers, one line saying so)``.
    """
    ids, source = discover_devices()
    on_gpu = {c.hash: wants_gpus(c.config, bool(ids)) for c in cells}
    gpu_cells = sum(on_gpu[c.hash] for c in cells)
    workers = default_workers(workers, len(cells), len(ids), gpu_cells)
    found = f"{len(ids)} GPU{'s' if len(ids) != 1 else ''} found via {source}" + (f" ({','.join(ids)})" if ids else "")
    if not gpu_cells:
        how = f"{len(cells)} cell(s) on CPU" + (" (CUDA_VISIBLE_DEVICES='')" if ids else "")
    elif not ids:
        how = f"{gpu_cells} of {len(cells)} cell(s) ask for train.device=cuda and fail: no GPU here"
    else:
        how = (f"{gpu_cells} of {len(cells)} cell(s) on GPUs, each on world_size GPUs of its own "
               f"(at most {len(ids)} GPUs busy at once)")
    return ids, on_gpu, workers, f"local launcher: {found}; {how}; {workers} worker(s)"


def submit(cells: list[Cell], workers: int | None = None, progress: bool = True,
           command: Command | None = None) -> list[dict[str, Any]]:
    """Runs ``cells`` in parallel local processes and waits for all of them.

    Args:
        cells: cells to run.
        workers: concurrent processes (default: one per GPU when cells train on
            GPUs, else one per CPU core, each single-threaded: small DEQ cells
            scale better across processes than across threads).
        progress: show a tqdm progress bar on stderr.
        command: builds a cell's command line from the cell and its saved
            ``cell.json`` (default :func:`node_command`; tests run a stand-in).

    Returns:
        One outcome dict per cell (``state`` FINISHED/FAILED/KILLED, ``error``, ``results``).
    """
    from tqdm import tqdm

    ids, on_gpu, workers, line = plan(cells, workers)
    print(line, flush=True)
    pool = DevicePool(ids)
    threads = max(1, (os.cpu_count() or 1) // workers)
    outcomes: list[dict[str, Any]] = []
    with ThreadPoolExecutor(max_workers=workers) as executor:
        # A worker's share of the cores is split between a DDP cell's ranks: 2 ranks x 2 threads
        # on 2 cores ran 2.8x slower per epoch than 2 x 1 (deqbench bench ddp).
        futures = {executor.submit(_run_one, c, max(1, threads // c.world_size), pool if on_gpu[c.hash] else None,
                                   bool(ids), command or node_command): c for c in cells}
        bar = tqdm(total=len(cells), desc="cells", unit="cell", disable=not progress, file=sys.stderr)
        for fut in as_completed(futures):
            res = fut.result()
            outcomes.append(res)
            bar.set_postfix_str(f"{res['label']}: {res['state']}")
            bar.update(1)
        bar.close()
    return outcomes
