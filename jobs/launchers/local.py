"""Local launcher: each cell is a process of its own running the node job, ``workers`` at a time.

A separate process per cell isolates crashes (a segfault or OOM kill marks that
cell FAILED; the others go on), gives each cell its own peak-memory reading, and
runs exactly what a Slurm task runs (:func:`jobs.node.main`). Torch threads are
split between workers, and a DDP cell's share between its ranks.

Warm start (:func:`fork_context`): a fresh interpreter spends seconds importing
torch, mlflow and ``torch._dynamo`` before a cell does any work, so a sweep
starts one fork server (``multiprocessing`` forkserver) that imports them once
(:mod:`jobs.launchers.warm`) and forks one child per cell. The child puts itself
in its own session, takes the cell's environment (threads, GPUs), writes to the
cell's ``log.txt`` and is titled ``python -m jobs.node <cell.json>`` (so ``ps`` and
``deqbench cancel`` see it as a node job). A DDP cell runs under ``torchrun`` in a
fresh interpreter (one process per rank), as before. As with any
``multiprocessing`` forkserver, a script that calls :func:`submit` itself must
do so under ``if __name__ == "__main__":`` (each child imports the script as
``__mp_main__``); ``deqbench sweep`` and pytest need nothing.

GPUs (:mod:`jobs.launchers.gpus`): the devices of this machine are found from
``CUDA_VISIBLE_DEVICES``, else torch. A cell that trains on GPUs (``train.device``
``cuda``, or ``auto`` when GPUs exist) takes ``world_size`` of them, one per rank,
and its process sees only those through ``CUDA_VISIBLE_DEVICES``; it starts only
once they are free, so no GPU is ever shared. A cell that needs more than exist
fails at once, the others go on. A ``train.device: cpu`` cell on a GPU machine
sees no GPU (``CUDA_VISIBLE_DEVICES=""``).

Stopping (:class:`Stopper`): Ctrl-C, SIGTERM or ``deqbench cancel`` (which
sends SIGINT to the process named in ``<runs>/<sweep>/launcher.json``) starts
no more cells and stops the running ones at their next epoch end with a
checkpoint; every unfinished cell ends KILLED (reason ``CANCELLED``) and a
rerun of the sweep resumes it. A cell process that dies on its own without
reporting is FAILED with its exit code or signal as the reason.
"""

from __future__ import annotations

import multiprocessing
import os
import signal
import subprocess
import sys
import threading
from concurrent.futures import ThreadPoolExecutor, as_completed
from pathlib import Path
from typing import Any, Callable

from jobs.cells import Cell
from jobs.launchers.gpus import DevicePool, discover_devices, wants_gpus
from jobs.launchers.cancel import record_launcher
from jobs.node import read_status, record_end, write_status
from suite.training.checkpoint import cannot_write

Command = Callable[[Cell, Path], list[str]]
_FORK: Any = None  # the fork server's multiprocessing context, made on first use


def node_command(cell: Cell, path: Path) -> list[str]:
    """The command line that runs ``cell`` (saved at ``path``): the node job, under torchrun for DDP."""
    cmd = [sys.executable, "-m", "jobs.node", str(path)]
    if cell.world_size > 1:  # DDP on this machine: one process per rank (gloo on CPU), see jobs.distributed
        cmd[1:2] = ["-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={cell.world_size}", "-m"]
    return cmd


def fork_context() -> Any:
    """The ``forkserver`` context whose server imports :mod:`jobs.launchers.warm` before its first fork.

    One server per launcher process, started by the first cell (its imports take
    as long as a fresh interpreter's, once); it ends with the launcher.
    """
    global _FORK
    if _FORK is None:
        ctx = multiprocessing.get_context("forkserver")
        ctx.set_forkserver_preload(["jobs.launchers.warm"])
        _FORK = ctx
    return _FORK


def forked_node(path: str, env: dict[str, str], log: str, cwd: str, wrap_tracker: Any = None) -> None:
    """A cell's process, forked from the warm server: ``python -m jobs.node PATH`` without the imports.

    ``wrap_tracker``: as :func:`jobs.node.run_cell`'s (picklable; the Ray launcher relays rows to Tune).
    """
    os.setsid()  # its own session, as start_new_session: no Ctrl-C from the terminal, killpg reaches it
    from setproctitle import setproctitle

    setproctitle(f"{sys.executable} -m jobs.node {path}")  # what ps and deqbench cancel look for
    os.chdir(cwd)
    os.environ.clear()
    os.environ.update(env)  # CUDA_VISIBLE_DEVICES before CUDA starts: the server never touched it
    fd = os.open(log, os.O_WRONLY | os.O_APPEND | os.O_CREAT)
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    os.close(fd)
    for stream in (sys.stdout, sys.stderr):
        stream.reconfigure(line_buffering=True)  # PYTHONUNBUFFERED is read at start-up only
    from jobs.node import main

    sys.exit(main([path], wrap_tracker=wrap_tracker))


class Forked:
    """A cell process from the fork server, with the ``pid`` and ``wait()`` of a ``subprocess.Popen``.

    ``target(str(path), env, str(log), cwd, *args)`` runs in it (default :func:`forked_node`).
    """

    def __init__(self, path: Path, env: dict[str, str], log: Path, target: Callable[..., None] | None = None,
                 args: tuple = ()) -> None:
        self._proc = fork_context().Process(target=target or forked_node,
                                            args=(str(path), env, str(log), os.getcwd(), *args),
                                            name=f"deqbench-cell-{path.parent.name}")
        self._proc.start()
        self.pid = self._proc.pid

    def wait(self, timeout: float | None = None) -> int | None:
        """Its exit code (negative: the signal), None when it still runs after ``timeout`` seconds."""
        self._proc.join(timeout)
        return self._proc.exitcode


def _outcome(cell: Cell, status: dict[str, Any]) -> dict[str, Any]:
    return {"hash": cell.hash, "label": cell.label, "state": status.get("state", "FAILED"),
            "run_id": status.get("run_id"), "error": status.get("error"), "results": status.get("results"),
            "reason": status.get("reason")}


def _fail(cell: Cell, reason: str) -> dict[str, Any]:
    """Marks ``cell`` FAILED before it started (its ``log.txt`` says why too)."""
    with open(Path(cell.workdir) / "log.txt", "a") as log:
        log.write(f"deqbench: {reason}\n")
    write_status(cell.workdir, state="FAILED", error=reason, reason="not enough GPUs")
    return _outcome(cell, read_status(cell.workdir))


def _unwritable(cell: Cell, error: str) -> dict[str, Any]:
    """A cell whose directory cannot be written (disk full, read-only): FAILED, reported from memory."""
    return {**_outcome(cell, read_status(cell.workdir)), "state": "FAILED", "error": error, "reason": "OSError"}


class Stopper:
    """The sweep's stop switch: SIGINT (Ctrl-C, ``deqbench cancel``) or SIGTERM to the launcher.

    The first signal starts no more cells and sends SIGTERM to each running
    one (its process group: torchrun and its ranks), which stops at its next
    epoch end with a checkpoint; a second signal sends SIGKILL. Cell processes
    run in their own session, so a Ctrl-C reaches them only through here.
    """

    def __init__(self) -> None:
        self.signals = 0
        self._procs: set[subprocess.Popen] = set()
        self._lock = threading.Lock()

    @property
    def stopping(self) -> bool:
        return self.signals > 0

    def handle(self, signum: int, _frame: Any) -> None:
        self.signals += 1
        sig = signal.SIGTERM if self.signals == 1 else signal.SIGKILL
        print(f"\ndeqbench: {signal.Signals(signum).name}: stopping the sweep; running cells get {sig.name}"
              + (" (checkpoint at the next epoch end; again to kill them now)" if self.signals == 1 else ""),
              file=sys.stderr, flush=True)
        with self._lock:
            for proc in self._procs:
                self._kill(proc, sig)

    @staticmethod
    def _kill(proc: Any, sig: int) -> None:
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            try:  # a forked cell that has not called setsid yet: it has no children either
                os.kill(proc.pid, sig)
            except ProcessLookupError:
                pass

    def run(self, cmd: list[str] | None = None, start: Callable[[], Any] | None = None, **kwargs: Any) -> int | None:
        """Runs ``cmd`` in its own session (or ``start()``: a process with ``pid``, ``wait()``, in its own
        session) until it ends; its return code, None if the sweep was stopped before."""
        with self._lock:
            if self.stopping:
                return None
        proc = start() if start is not None else subprocess.Popen(cmd, start_new_session=True, **kwargs)
        with self._lock:  # not held while starting: the first fork waits for the server's imports
            self._procs.add(proc)
            missed = self.stopping  # stopped while it was starting: the handler did not see it
        if missed:
            self._kill(proc, signal.SIGTERM if self.signals == 1 else signal.SIGKILL)
        try:
            return proc.wait()
        finally:
            with self._lock:
                self._procs.discard(proc)

    def __enter__(self) -> "Stopper":
        self._previous = {}
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                self._previous[sig] = signal.signal(sig, self.handle)
        return self

    def __exit__(self, *exc: Any) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


def exit_reason(code: int) -> str:
    """``exit code 3`` or ``signal SIGKILL`` for a process's return code."""
    if code >= 0:
        return f"exit code {code}"
    try:
        return f"signal {signal.Signals(-code).name}"
    except ValueError:
        return f"signal {-code}"


def thread_env(threads: int) -> dict[str, str]:
    """This process's environment for a cell's process with ``threads`` torch/OpenMP threads per rank."""
    return {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads),
            "DEQBENCH_TORCH_THREADS": str(threads), "PYTHONUNBUFFERED": "1"}


def record_unreported(cell: Cell, code: int) -> str:
    """Records FAILED for a cell whose process ended with ``code`` without reporting (killed, segfault,
    out of memory, a full disk); returns the error recorded."""
    error = f"node process ended with {exit_reason(code)}; see {cell.workdir}/log.txt"
    record_end(cell, "FAILED", exit_reason(code), error)
    return error


def _run_one(cell: Cell, threads: int, pool: DevicePool | None = None, hide_gpus: bool = False,
             command: Command | None = None, stopper: Stopper | None = None) -> dict[str, Any]:
    """Runs one cell's process and returns its outcome.

    Args:
        cell: the cell.
        threads: torch/OpenMP threads per rank.
        pool: GPUs to take ``cell.world_size`` of (waiting until they are free); None: a CPU cell.
        hide_gpus: a CPU cell on a machine with GPUs: its process sees none.
        command: builds the command line; None: a child of the warm fork server, or for a DDP
            cell :func:`node_command` (torchrun).
        stopper: the sweep's stop switch (a stopped sweep starts no more cells; they end KILLED).
    """
    stopper = stopper or Stopper()
    try:
        path = cell.save()
        open(Path(cell.workdir) / "log.txt", "ab").close()
    except OSError as err:  # disk full, read-only runs directory: this cell fails, the sweep goes on
        return _unwritable(cell, cannot_write(Path(cell.workdir) / "cell.json", err))
    env = thread_env(threads)
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
        if command is None and cell.world_size == 1:
            code = stopper.run(start=lambda: Forked(path, env, Path(cell.workdir) / "log.txt"))
        else:
            with open(Path(cell.workdir) / "log.txt", "ab") as log:
                code = stopper.run((command or node_command)(cell, path), stdout=log, stderr=subprocess.STDOUT,
                                   env=env, cwd=os.getcwd())
    finally:
        if pool is not None:
            pool.release(devices)
    status = read_status(cell.workdir)
    ended = status.get("state") in ("FINISHED", "FAILED")
    try:
        if code is None or (stopper.stopping and not ended and (code != 0 or status.get("state") == "KILLED")):
            # Stopped by the user (Ctrl-C, deqbench cancel): resumable, whether it had begun or not.
            record_end(cell, "KILLED", "CANCELLED", status.get("error") if status.get("state") == "KILLED" else
                       "the sweep was stopped (Ctrl-C or deqbench cancel); running it again resumes this cell")
        elif code != 0 and status.get("state") not in ("FAILED", "KILLED"):
            record_unreported(cell, code)
    except OSError as err:  # its status.json cannot be written: say why here
        return _unwritable(cell, f"node process ended with {exit_reason(code or 0)}; {err}")
    return _outcome(cell, read_status(cell.workdir))


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
            ``cell.json``, run in a fresh process (tests run a stand-in); default
            None: a child of the warm fork server (a DDP cell: :func:`node_command`).

    Returns:
        One outcome dict per cell (``state`` FINISHED/FAILED/KILLED, ``error``, ``results``).
    """
    from tqdm import tqdm

    ids, on_gpu, workers, line = plan(cells, workers)
    print(line, flush=True)
    pool = DevicePool(ids)
    threads = max(1, (os.cpu_count() or 1) // workers)
    outcomes: list[dict[str, Any]] = []
    if cells:
        record_launcher(cells, "local")
    with Stopper() as stopper, ThreadPoolExecutor(max_workers=workers) as executor:
        # A worker's share of the cores is split between a DDP cell's ranks: 2 ranks x 2 threads
        # on 2 cores ran 2.8x slower per epoch than 2 x 1 (deqbench bench ddp).
        futures = {executor.submit(_run_one, c, max(1, threads // c.world_size), pool if on_gpu[c.hash] else None,
                                   bool(ids), command, stopper): c for c in cells}
        bar = tqdm(total=len(cells), desc="cells", unit="cell", disable=not progress, file=sys.stderr)
        for fut in as_completed(futures):
            res = fut.result()
            outcomes.append(res)
            bar.set_postfix_str(f"{res['label']}: {res['state']}")
            bar.update(1)
        bar.close()
    if stopper.stopping:
        print(f"sweep stopped: {sum(o['state'] == 'KILLED' for o in outcomes)} cell(s) KILLED; "
              "running the sweep again resumes them from their checkpoints", file=sys.stderr, flush=True)
    return outcomes
