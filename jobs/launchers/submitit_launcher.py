"""submitit launcher: one Slurm job array per group of cells with equal resources.

Each array task runs :class:`jobs.node.NodeJob` on one cell -- the same node job
as every other launcher -- as ``resources.nodes × resources.tasks_per_node``
DDP ranks (one ``srun`` task each). Everything else comes from the launcher
config (``configs/launchers/*.yaml``, submitit's parameter names, validated by
:func:`jobs.slurm_env.load_launcher_config` before anything is submitted):
partition, account, QOS, constraint, time, memory, array parallelism, setup
lines, ``slurm_max_num_timeout``.

Resources: a cell's ``resources.*`` value wins when it differs from the
default (1 node, 1 task, 0 GPUs, 1 CPU per task); a cell left at a default
takes the launcher config's ``nodes``/``tasks_per_node``/``gpus_per_node``/
``cpus_per_task`` (so ``configs/launchers/slurm.yaml`` can give every cell 4 GPUs).

Files: logs, sbatch scripts and pickles under ``<runs>/<sweep>/slurm/<job id>/``;
each cell's work directory gets ``cell.json`` and ``submitted.json`` (job id,
array index), which ``deqbench status`` combines with ``sacct`` (or ``squeue``
without accounting) and ``deqbench cancel`` hands to ``scancel``.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any

from jobs.cells import Cell
from jobs.node import read_status, write_status

RESOURCE_KEYS = ("nodes", "tasks_per_node", "gpus_per_node", "cpus_per_task")
_DEFAULT_RESOURCES = {"nodes": 1, "tasks_per_node": 1, "gpus_per_node": 0, "cpus_per_task": 1}
SUBMITTED = "submitted.json"


def resources(cell: Cell, config: dict[str, Any]) -> dict[str, int]:
    """The Slurm resources of one cell (see the module docstring for precedence).

    Args:
        cell: the cell; its ``config["resources"]``.
        config: the validated launcher config.

    Returns:
        ``{"nodes", "tasks_per_node", "gpus_per_node", "cpus_per_task"}``.
    """
    res = cell.config.get("resources", {})
    out = {}
    for key in RESOURCE_KEYS:
        value = int(res.get(key, _DEFAULT_RESOURCES[key]))
        if value == _DEFAULT_RESOURCES[key] and config.get(key) is not None:
            value = int(config[key])
        out[key] = value
    return out


def group_cells(cells: list[Cell], config: dict[str, Any]) -> list[tuple[dict[str, int], list[Cell]]]:
    """Cells grouped by equal resources (one job array each), in first-seen order."""
    groups: dict[tuple[int, ...], tuple[dict[str, int], list[Cell]]] = {}
    for c in cells:
        res = resources(c, config)
        groups.setdefault(tuple(res.values()), (res, []))[1].append(c)
    return list(groups.values())


def sweep_dir(cells: list[Cell]) -> Path:
    """``<runs>/<sweep>``: the parent of the cells' work directories."""
    return Path(cells[0].workdir).parent


def load_config(args: argparse.Namespace, check_cluster: bool = True) -> dict[str, Any]:
    """The launcher config named by ``--launcher-config``, validated.

    Raises:
        ValueError: no ``--launcher-config``, an unknown key or partition.
        TypeError: a value of the wrong type.
        RuntimeError: Slurm or submitit is not installed, or the controller does not answer.
        FileNotFoundError: the file does not exist.
    """
    from jobs.slurm_env import load_launcher_config

    path = getattr(args, "launcher_config", None)
    if not path:
        raise ValueError("the submitit launcher needs --launcher-config FILE "
                         "(e.g. configs/launchers/local_slurm.yaml, or a copy of configs/launchers/slurm.yaml)")
    return load_launcher_config(path, check_cluster=check_cluster)


def make_executor(folder: Path, config: dict[str, Any], res: dict[str, int], name: str) -> Any:
    """A submitit Slurm executor for one group: the launcher config plus the group's resources.

    Args:
        folder: log folder, ``.../slurm/%j``.
        config: validated launcher config (its ``folder`` is not used here).
        res: see :func:`resources`.
        name: Slurm job name unless the config sets ``name``/``slurm_job_name``.
    """
    import submitit

    from jobs.slurm_env import submitit_arguments

    _, init_kwargs, params = submitit_arguments(config)
    params.update(res)
    if "name" not in params and "slurm_job_name" not in params:
        params["name"] = name
    executor = submitit.AutoExecutor(folder=str(folder), cluster="slurm", **init_kwargs)
    executor.update_parameters(**params)
    return executor


def sbatch_script(executor: Any, n: int) -> str:
    """The sbatch script submitit writes for an array of ``n`` tasks (a plain job when ``n`` is 1)."""
    from submitit.slurm.slurm import _make_sbatch_string

    slurm_ex = executor._executor
    params = dict(slurm_ex.parameters)
    if n > 1:
        params["map_count"] = n
    return _make_sbatch_string(command=slurm_ex._submitit_command_str, folder=slurm_ex.folder, **params)


def _prepare(cells: list[Cell], config: dict[str, Any]) -> tuple[Path, list[tuple[Any, list[Cell]]]]:
    folder = sweep_dir(cells) / "slurm" / "%j"
    name = f"deqbench-{cells[0].experiment}"
    return folder, [(make_executor(folder, config, res, name), group) for res, group in group_cells(cells, config)]


def _folder_note(config: dict[str, Any], folder: Path) -> None:
    if config.get("folder"):
        print(f"note: launcher config folder {config['folder']!r} is not used by sweeps: "
              f"a sweep's Slurm logs go to {folder}")


def dry_run(cells: list[Cell], args: argparse.Namespace) -> None:
    """Prints, per job array, its resources, cells and sbatch script; submits nothing, writes nothing."""
    from jobs.slurm_env import require_slurm

    config = load_config(args)
    require_slurm()
    folder, arrays = _prepare(cells, config)
    _folder_note(config, folder)
    for executor, group in arrays:
        res = resources(group[0], config)
        kind = f"job array of {len(group)} tasks" if len(group) > 1 else "one job"
        print(f"\nsubmitit: {kind} ({', '.join(f'{k}={v}' for k, v in res.items())}), logs in {folder}")
        for i, c in enumerate(group):
            print(f"  [{i}] {c.hash}  {c.label}")
        print("---- sbatch script " + "-" * 50)
        print(sbatch_script(executor, len(group)))


def _write_submitted(cell: Cell, job: Any, when: float) -> None:
    job_id = str(job.job_id)
    array_id, _, index = job_id.partition("_")
    info = {"job_id": job_id, "array_job_id": array_id, "array_index": int(index) if index else None,
            "submitted": when, "log_folder": str(job.paths.folder), "stdout": str(job.paths.stdout)}
    (Path(cell.workdir) / SUBMITTED).write_text(json.dumps(info, indent=2))


def read_submitted(workdir: str | Path) -> dict[str, Any]:
    """Contents of a cell's ``submitted.json`` (empty if it was never submitted to Slurm)."""
    try:
        return json.loads((Path(workdir) / SUBMITTED).read_text())
    except (OSError, ValueError):
        return {}


def submit(cells: list[Cell], config: dict[str, Any]) -> list[tuple[Cell, Any]]:
    """Submits ``cells`` as job arrays and returns ``(cell, submitit job)`` pairs."""
    from jobs.node import NodeJob
    from jobs.slurm_env import require_slurm, sacct_available, use_squeue_for_submitit

    require_slurm()
    if not sacct_available():
        use_squeue_for_submitit()  # else submitit waits forever on jobs that die without a result
    folder, arrays = _prepare(cells, config)
    _folder_note(config, folder)
    submitted: list[tuple[Cell, Any]] = []
    for executor, group in arrays:
        for c in group:
            c.save()
        when = time.time()
        jobs = executor.map_array(NodeJob(), group)
        for c, job in zip(group, jobs):
            _write_submitted(c, job, when)
            submitted.append((c, job))
        res = resources(group[0], config)
        print(f"submitted {len(group)} cell(s) as Slurm job {str(jobs[0].job_id).split('_')[0]} "
              f"({', '.join(f'{k}={v}' for k, v in res.items())}); logs: {jobs[0].paths.folder.parent}", flush=True)
    return submitted


def next_interval(current: float, changed: bool, first: float, longest: float) -> float:
    """The wait before the next poll: ``first`` after a change, else 1.5 times longer, at most ``longest``."""
    return first if changed else min(current * 1.5, longest)


def wait(submitted: list[tuple[Cell, Any]], poll_s: tuple[float, float] = (10.0, 120.0)) -> list[dict[str, Any]]:
    """Waits until every job has ended, then reads each cell's outcome.

    Job states come from ``sacct`` when accounting works, else ``squeue``
    (:func:`jobs.slurm_env.job_details`). The first poll waits ``poll_s[0]``;
    each poll that sees no change waits 1.5 times longer, up to ``poll_s[1]``,
    and a change starts again at ``poll_s[0]``. A requeued job (time limit,
    preemption) counts as running until its last attempt ends. Why a job ended
    badly (``TIMEOUT``, ``OUT_OF_MEMORY``, ``NODE_FAIL``, ``CANCELLED``, an exit
    code) goes into the cell's ``status.json`` (``reason``) and its MLflow run
    (tag ``deqbench.failure_reason``), see :func:`_outcome`.

    Returns:
        One outcome per cell, as the local launcher's.
    """
    from jobs.slurm_env import TERMINAL_STATES, UNKNOWN_STATE, JobState, job_details

    ids = {str(job.job_id) for _, job in submitted}
    final: dict[str, JobState] = {}
    start, last, interval = time.time(), None, poll_s[0]
    while len(final) < len(ids):
        # Each task by its own id: the accounting database may list an array's tasks a moment late.
        details = job_details(sorted(ids - set(final)))
        for i in ids - set(final):
            js = details.get(i, JobState(UNKNOWN_STATE))
            if js.state in TERMINAL_STATES or (js.state == UNKNOWN_STATE and time.time() - start > 30):
                final[i] = js
        counts = Counter(details.get(i, JobState(UNKNOWN_STATE)).state if i not in final else "DONE" for i in ids)
        line = ", ".join(f"{n} {s.lower()}" for s, n in sorted(counts.items()))
        sources = "/".join(sorted({js.source for js in details.values()} - {"none"})) or "none"
        interval = next_interval(interval, line != last, *poll_s)
        if line != last:
            print(f"  slurm [{time.time() - start:5.0f} s] ({sources}): {line}", file=sys.stderr, flush=True)
            last = line
        if len(final) < len(ids):
            time.sleep(interval)
    return [_outcome(c, job, final[str(job.job_id)]) for c, job in submitted]


def _outcome(cell: Cell, job: Any, js: Any) -> dict[str, Any]:
    """A cell's outcome once its job ended, with Slurm's reason recorded where it says more.

    The node job did not report (killed at the time limit, out of memory, node
    failure, cancelled before it could): the cell is KILLED -- resumable from
    its last checkpoint -- when the job was cancelled, timed out, preempted or
    lost its node, else FAILED. It did report but Slurm knows why it stopped
    (``TIMEOUT`` after the node job's graceful stop on SIGTERM, ``CANCELLED``):
    that reason replaces the node job's own word (``SIGTERM``).
    """
    from jobs.node import record_end
    from jobs.slurm_env import RESUMABLE_END_STATES, failure_reason

    status = read_status(cell.workdir)
    sub = read_submitted(cell.workdir)
    fresh = status.get("updated", 0) >= sub.get("submitted", 0)
    reported = status.get("state") if fresh else None
    why = failure_reason(js)
    if reported not in ("FINISHED", "FAILED", "KILLED"):
        state = "KILLED" if js.state in RESUMABLE_END_STATES else "FAILED"
        record_end(cell, state, why or f"no outcome ({js.state})",
                   f"Slurm job {job.job_id} ended {js.state}{f' ({why})' if why and why != js.state else ''} "
                   f"without the node job reporting an outcome; see {job.paths.stdout} and {job.paths.stderr}")
    elif why and reported != "FINISHED" and js.state != "FAILED" and status.get("reason") != why:
        record_end(cell, reported, why)
    status = read_status(cell.workdir)
    return {"hash": cell.hash, "label": cell.label, "state": status.get("state", "FAILED"),
            "run_id": status.get("run_id"), "error": status.get("error"), "results": status.get("results"),
            "reason": status.get("reason"), "slurm_job_id": str(job.job_id), "slurm_state": js.state}


def launch(cells: list[Cell], args: argparse.Namespace) -> list[dict[str, Any]] | None:
    """Validates the launcher config, submits, and (unless ``--no-wait``) waits for the outcomes."""
    from jobs.slurm_env import poll_intervals

    config = load_config(args)
    submitted = submit(cells, config)
    sweep = getattr(args, "sweep", "SWEEP.yaml")
    if getattr(args, "no_wait", False):
        print(f"not waiting (--no-wait): follow with `deqbench status {sweep}`, stop with `deqbench cancel {sweep}`")
        return None
    try:
        return wait(submitted, poll_intervals(config))
    except KeyboardInterrupt:
        print(f"\nstopped waiting; the Slurm jobs keep running (`deqbench status {sweep}` shows them, "
              f"`deqbench cancel {sweep}` stops them)", file=sys.stderr)
        raise
