"""Slurm environment helpers: is Slurm there, which partitions exist, is a
launcher config valid, what state are my jobs in.

Launcher configs (``configs/launchers/*.yaml``) are flat mappings whose keys are
submitit's parameter names -- the generic ``AutoExecutor`` ones (``timeout_min``,
``mem_gb``, ``nodes``, ``tasks_per_node``, ``cpus_per_task``, ``gpus_per_node``,
...) and the Slurm ones prefixed ``slurm_`` (``slurm_partition``,
``slurm_account``, ``slurm_qos``, ``slurm_constraint``,
``slurm_array_parallelism``, ``slurm_setup``, ...) -- plus ``folder``, the log
folder (submitit expands ``%j`` to the job id)::

    cfg = load_launcher_config("configs/launchers/local_slurm.yaml")
    folder, init_kwargs, params = submitit_arguments(cfg)
    executor = submitit.AutoExecutor(folder=folder, cluster="slurm", **init_kwargs)
    executor.update_parameters(**params)

Every check raises before anything is submitted: ``ValueError`` for an unknown
key or partition, ``TypeError`` for a value of the wrong type, ``RuntimeError``
when Slurm is not installed or its controller does not answer.

Job states (:func:`job_states`, :func:`job_details`) come from ``sacct`` when
the cluster has job accounting -- it remembers a job's end state, exit code
and reason for good -- and from ``squeue``/``scontrol`` otherwise, which keep
finished jobs only for the controller's ``MinJobAge`` (an hour on the local
cluster). :func:`failure_reason` says in a word why a job ended badly
(``TIMEOUT``, ``OUT_OF_MEMORY``, ``NODE_FAIL``, ``CANCELLED``, ``exit code 3``).
submitit polls ``sacct``: without accounting it sees every job as ``UNKNOWN``
forever, so ``job.result()`` of a job that died without a result (cancelled,
killed at its time limit, out of memory) would wait forever;
:func:`use_squeue_for_submitit` makes it poll ``squeue`` instead.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, Iterable, List, Mapping, Optional, Tuple

SLURM_PACKAGES: Tuple[str, ...] = ("slurmctld", "slurmd", "slurm-client", "munge")
"""Debian packages of the local one-node cluster."""

CLIENT_COMMANDS: Tuple[str, ...] = ("sbatch", "squeue", "sinfo", "scontrol")
"""Slurm client commands the launchers need on ``PATH``."""

TERMINAL_STATES = frozenset(
    {
        "BOOT_FAIL",
        "CANCELLED",
        "COMPLETED",
        "DEADLINE",
        "FAILED",
        "NODE_FAIL",
        "OUT_OF_MEMORY",
        "PREEMPTED",
        "REVOKED",
        "SPECIAL_EXIT",
        "TIMEOUT",
    }
)
"""Job states after which a job never runs again (unless requeued by hand)."""

UNKNOWN_STATE = "UNKNOWN"
"""State reported for a job id the controller does not know (never submitted,
or finished longer ago than ``MinJobAge``)."""

FOLDER_KEY = "folder"
INIT_KEYS: Tuple[str, ...] = ("slurm_max_num_timeout", "slurm_python")
"""Keys passed to the ``AutoExecutor`` constructor, not ``update_parameters``."""
POLL_KEYS: Dict[str, float] = {"poll_interval_s": 10.0, "poll_max_interval_s": 120.0}
"""deqbench's own keys (not submitit's) and their defaults: how often a waiting
sweep asks Slurm for its jobs' states, first and at most (the interval grows
1.5x after each poll that saw no change, and starts again after one that did)."""

_LIST_OF_STR_KEYS = ("slurm_setup", "slurm_teardown", "slurm_srun_args")
_POSITIVE_INT_KEYS = (
    "timeout_min",
    "nodes",
    "tasks_per_node",
    "cpus_per_task",
    "slurm_array_parallelism",
)
_NON_NEGATIVE_INT_KEYS = ("gpus_per_node", "slurm_max_num_timeout")
_STR_KEYS = (
    FOLDER_KEY,
    "name",
    "slurm_partition",
    "slurm_account",
    "slurm_qos",
    "slurm_constraint",
    "slurm_gres",
    "slurm_exclude",
    "slurm_nodelist",
    "slurm_comment",
    "slurm_job_name",
    "slurm_python",
    "slurm_mem",
)
_TIMEOUT_S = 60.0
_JOB_ID = re.compile(r"^\d+(_\d+)?$")
_INSTALL_HINT = (
    "install the Debian packages {pkgs} and start the local one-node cluster with "
    "`slurm/local_cluster.sh start` (it installs them), or run on a machine with Slurm"
)


# --- Slurm presence and partitions -------------------------------------------
def slurm_installed() -> bool:
    """Returns whether every Slurm client command is on ``PATH``."""
    return all(shutil.which(cmd) for cmd in CLIENT_COMMANDS)


def require_slurm() -> None:
    """Raises unless the Slurm client commands are on ``PATH``.

    Raises:
        RuntimeError: a command is missing; names it, the packages to install
            and ``slurm/local_cluster.sh start``.
    """
    missing = [cmd for cmd in CLIENT_COMMANDS if shutil.which(cmd) is None]
    if missing:
        raise RuntimeError(
            f"Slurm is not installed: {', '.join(missing)} not found on PATH; "
            + _INSTALL_HINT.format(pkgs=" ".join(SLURM_PACKAGES))
        )


_TRANSIENT = ("Unable to contact slurm controller", "Socket timed out", "Connection refused",
              "Problem talking to the database")
"""Errors of a controller or slurmdbd that is restarting: retried for a few seconds."""


def _run(args: List[str], retries: int = 5) -> subprocess.CompletedProcess:
    """Runs a Slurm client command, capturing text output (never raises on rc).

    A transient error (:data:`_TRANSIENT`: the daemon is restarting) is retried
    ``retries`` times, 1 s, 2 s, ... apart.
    """
    require_slurm()
    for attempt in range(retries + 1):
        try:
            proc = subprocess.run(args, capture_output=True, text=True, timeout=_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            raise RuntimeError(
                f"`{' '.join(args)}` did not answer in {_TIMEOUT_S:.0f} s; "
                "is slurmctld hung? check `slurm/local_cluster.sh status`"
            ) from None
        if proc.returncode == 0 or attempt == retries or not any(t in proc.stderr for t in _TRANSIENT):
            return proc
        time.sleep(1.0 + attempt)
    return proc


def _controller_error(args: List[str], proc: subprocess.CompletedProcess) -> RuntimeError:
    msg = (proc.stderr or proc.stdout).strip()
    return RuntimeError(
        f"`{' '.join(args)}` failed (exit {proc.returncode}): {msg}; is the Slurm "
        "controller up? `slurm/local_cluster.sh status` tells, `... start` starts it"
    )


def partitions() -> List[str]:
    """Names of the partitions this cluster has, from ``sinfo -h -o %P``.

    The default partition is listed without sinfo's trailing ``*``.

    Raises:
        RuntimeError: Slurm is not installed or the controller does not answer.
    """
    args = ["sinfo", "-h", "-o", "%P"]
    proc = _run(args)
    if proc.returncode != 0:
        raise _controller_error(args, proc)
    names = [line.strip().rstrip("*") for line in proc.stdout.splitlines() if line.strip()]
    return list(dict.fromkeys(names))


def default_partition() -> Optional[str]:
    """The partition jobs go to without ``--partition``, or ``None`` if none is default."""
    args = ["sinfo", "-h", "-o", "%P"]
    proc = _run(args)
    if proc.returncode != 0:
        raise _controller_error(args, proc)
    for line in proc.stdout.split():
        if line.endswith("*"):
            return line[:-1]
    return None


def partition_gpus(partition: str) -> int:
    """Most GPUs one node of ``partition`` offers (its ``gpu`` GRES), 0 if none.

    Args:
        partition: an existing partition name.
    """
    args = ["sinfo", "-h", "-p", partition, "-o", "%G"]
    proc = _run(args)
    if proc.returncode != 0:
        raise _controller_error(args, proc)
    best = 0
    for gres in proc.stdout.split():
        # e.g. "gpu:4", "gpu:a100:4(S:0-1)", "gpu:a100:4,shard:8", "(null)"
        for item in gres.split(","):
            if item.startswith("gpu"):
                fields = item.split("(")[0].split(":")
                count = fields[-1] if len(fields) > 1 else "1"
                best = max(best, int(count) if count.isdigit() else 1)
    return best


# --- launcher configs -------------------------------------------------------
def _submitit_parameters() -> Tuple[Dict[str, Any], Tuple[str, ...]]:
    """submitit's generic parameters with their types, and its Slurm parameter names."""
    try:
        from submitit.auto.auto import AutoExecutor
        from submitit.slurm.slurm import SlurmExecutor
    except ImportError:
        raise RuntimeError(
            "submitit is not installed; install the cluster extra: pip install 'deqbench[cluster]'"
        ) from None
    generic = dict(AutoExecutor._typed_parameters())
    slurm = tuple(sorted(SlurmExecutor._valid_parameters()))
    return generic, slurm


def valid_launcher_keys() -> List[str]:
    """Every key a launcher config may have, sorted.

    The generic submitit parameters, the Slurm ones prefixed ``slurm_``,
    :data:`INIT_KEYS`, ``folder`` and :data:`POLL_KEYS`.
    """
    generic, slurm = _submitit_parameters()
    keys = set(generic) | {f"slurm_{name}" for name in slurm} | set(INIT_KEYS) | {FOLDER_KEY} | set(POLL_KEYS)
    return sorted(keys)


def _check_types(config: Mapping[str, Any], generic_types: Mapping[str, Any]) -> None:
    """Raises ``TypeError``/``ValueError`` for a value of the wrong type or range."""

    def is_int(v: Any) -> bool:
        return isinstance(v, int) and not isinstance(v, bool)

    for key, value in config.items():
        if value is None:
            continue  # submitit treats None as "not set"
        if key in _POSITIVE_INT_KEYS or key in _NON_NEGATIVE_INT_KEYS:
            if not is_int(value):
                raise TypeError(f"launcher key {key!r} must be an integer, got {value!r}")
            low = 1 if key in _POSITIVE_INT_KEYS else 0
            if value < low:
                raise ValueError(f"launcher key {key!r} must be >= {low}, got {value!r}")
        elif key in POLL_KEYS:
            if not (is_int(value) or isinstance(value, float)):
                raise TypeError(f"launcher key {key!r} must be a number of seconds, got {value!r}")
            if value <= 0:
                raise ValueError(f"launcher key {key!r} must be > 0 seconds, got {value!r}")
        elif key == "mem_gb":
            if not (is_int(value) or isinstance(value, float)):
                raise TypeError(f"launcher key 'mem_gb' must be a number (GB), got {value!r}")
            if value <= 0:
                raise ValueError(f"launcher key 'mem_gb' must be > 0, got {value!r}")
        elif key in _STR_KEYS:
            if not isinstance(value, str) or not value:
                raise TypeError(f"launcher key {key!r} must be a non-empty string, got {value!r}")
        elif key in _LIST_OF_STR_KEYS:
            if not isinstance(value, (list, tuple)) or not all(isinstance(v, str) for v in value):
                raise TypeError(
                    f"launcher key {key!r} must be a list of strings (one shell line or "
                    f"argument each), got {value!r}"
                )
        elif key == "slurm_additional_parameters":
            if not isinstance(value, Mapping):
                raise TypeError(
                    "launcher key 'slurm_additional_parameters' must be a mapping of sbatch "
                    f"options (e.g. {{'mail_type': 'END'}}), got {value!r}"
                )
        elif key in generic_types:
            expected = generic_types[key]
            if expected is float:
                expected = (int, float)
            if not isinstance(value, expected):
                raise TypeError(
                    f"launcher key {key!r} must be {generic_types[key].__name__}, got {value!r}"
                )


def validate_launcher_config(
    config: Mapping[str, Any], *, check_cluster: bool = True
) -> Dict[str, Any]:
    """Checks a launcher config before anything is submitted.

    Args:
        config: flat mapping of submitit parameter names (see the module
            docstring) to values; ``None`` means "not set".
        check_cluster: also ask the running cluster: Slurm is installed, the
            partition exists and, when ``gpus_per_node`` > 0, has GPU nodes.

    Returns:
        A plain ``dict`` copy of ``config``.

    Raises:
        TypeError: ``config`` is not a mapping, or a value has the wrong type.
        ValueError: an unknown key (the message lists the valid ones), a value
            out of range, a partition that does not exist (lists those that
            do), or GPUs asked of a partition without any.
        RuntimeError: Slurm is not installed or its controller does not answer.
    """
    if not isinstance(config, Mapping):
        raise TypeError(
            f"a launcher config must be a mapping of submitit parameters, got {type(config).__name__}"
        )
    generic, _ = _submitit_parameters()
    valid = valid_launcher_keys()
    unknown = sorted(str(k) for k in config if k not in valid)
    if unknown:
        raise ValueError(
            f"unknown launcher key(s) {', '.join(map(repr, unknown))}; valid keys: {', '.join(valid)}"
        )
    _check_types(config, generic)
    if check_cluster:
        require_slurm()
        partition = config.get("slurm_partition")
        existing = partitions()
        if partition is not None and partition not in existing:
            raise ValueError(
                f"Slurm partition {partition!r} does not exist on this cluster; "
                f"partitions: {', '.join(existing) or '(none)'}"
            )
        gpus = config.get("gpus_per_node") or 0
        target = partition if partition is not None else default_partition()
        if gpus > 0 and target is not None and partition_gpus(target) < gpus:
            raise ValueError(
                f"gpus_per_node={gpus} but partition {target!r} offers at most "
                f"{partition_gpus(target)} GPU(s) per node"
            )
    return dict(config)


def load_launcher_config(path: "str | Path", *, check_cluster: bool = True) -> Dict[str, Any]:
    """Reads and validates a launcher YAML file.

    Args:
        path: a YAML file holding one flat mapping.
        check_cluster: see :func:`validate_launcher_config`.

    Returns:
        The validated config.

    Raises:
        FileNotFoundError: ``path`` does not exist.
        TypeError, ValueError, RuntimeError: see :func:`validate_launcher_config`;
            the message names the file.
    """
    from suite.config import read_yaml

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"launcher config not found: {path}")
    config = read_yaml(path)  # a malformed file or a non-mapping: one line naming file, line and column
    try:
        return validate_launcher_config(config, check_cluster=check_cluster)
    except (TypeError, ValueError, RuntimeError) as err:
        raise type(err)(f"{path}: {err}") from None


def submitit_arguments(config: Mapping[str, Any]) -> Tuple[str, Dict[str, Any], Dict[str, Any]]:
    """Splits a validated launcher config into what submitit takes.

    Args:
        config: a config accepted by :func:`validate_launcher_config`.

    Returns:
        ``(folder, init_kwargs, parameters)``: the log folder (``"submitit/%j"``
        when unset), the ``AutoExecutor`` constructor keywords and the
        ``update_parameters`` keywords; ``None`` values and :data:`POLL_KEYS` are dropped.
    """
    folder = config.get(FOLDER_KEY) or "submitit/%j"
    init_kwargs = {k: v for k, v in config.items() if k in INIT_KEYS and v is not None}
    params = {
        k: (list(v) if isinstance(v, tuple) else v)
        for k, v in config.items()
        if k != FOLDER_KEY and k not in INIT_KEYS and k not in POLL_KEYS and v is not None
    }
    return str(folder), init_kwargs, params


def poll_intervals(config: Mapping[str, Any]) -> Tuple[float, float]:
    """``(first, longest)`` seconds between two polls of a waiting sweep (see :data:`POLL_KEYS`)."""
    first = float(config.get("poll_interval_s") or POLL_KEYS["poll_interval_s"])
    longest = float(config.get("poll_max_interval_s") or max(first, POLL_KEYS["poll_max_interval_s"]))
    return first, max(first, longest)


# --- job state ----------------------------------------------------------------
@dataclass(frozen=True)
class JobState:
    """What Slurm says of one job or array task.

    Attributes:
        state: Slurm's state name (``PENDING``, ``RUNNING``, ``COMPLETED``,
            ``FAILED``, ``TIMEOUT``, ``OUT_OF_MEMORY``, ``NODE_FAIL``,
            ``CANCELLED``, ...; ``CANCELLED by 0`` is ``CANCELLED``).
        exit_code: the batch script's exit code, when known (``None`` otherwise).
        signal: the signal that ended it (0: none), when known.
        reason: Slurm's ``Reason`` field (why pending, or why it ended), may be empty.
        source: ``sacct``, ``squeue`` or ``none`` (neither knows the id).
    """

    state: str
    exit_code: Optional[int] = None
    signal: Optional[int] = None
    reason: str = ""
    source: str = "none"


ACCOUNTING_ENV = "DEQBENCH_SLURM_ACCOUNTING"
"""``0`` forces ``squeue``/``scontrol`` even where ``sacct`` works, ``1`` forces ``sacct``."""

_ACCOUNTING_TTL_S = 60.0
_accounting_seen: Dict[str, float] = {}


def _check_ids(job_ids: Iterable["str | int"]) -> List[str]:
    ids = [str(j) for j in job_ids]
    bad = [j for j in ids if not _JOB_ID.match(j)]
    if bad:
        raise ValueError(f"invalid Slurm job id(s) {bad}; expected '123' or '123_4'")
    return ids


def accounting_enabled() -> bool:
    """Whether job states come from ``sacct``: :data:`ACCOUNTING_ENV`, else :func:`sacct_available`.

    The answer is kept for a minute (one ``sacct`` call per poll is enough).
    """
    forced = os.environ.get(ACCOUNTING_ENV, "").strip()
    if forced in ("0", "1"):
        return forced == "1"
    now = time.monotonic()
    if now - _accounting_seen.get("checked", -1e9) > _ACCOUNTING_TTL_S:
        _accounting_seen.update(checked=now, enabled=float(sacct_available()))
    return bool(_accounting_seen["enabled"])


def _exit_code(text: str) -> Tuple[Optional[int], Optional[int]]:
    """``"1:0"`` (Slurm's exit code and signal) as ``(1, 0)``; ``(None, None)`` when not numeric."""
    code, _, sig = text.strip().partition(":")
    if not code.isdigit():
        return None, None
    return int(code), int(sig) if sig.isdigit() else 0


def _expand_array(shown: str) -> List[str]:
    """``123_[2-4,7%2]`` (sacct's not-yet-started tasks) as ``123_2 123_3 123_4 123_7``; other ids as is."""
    m = re.match(r"^(\d+)_\[([\d,\-]+)(?:%\d+)?\]$", shown)
    if not m:
        return [shown]
    out = []
    for part in m.group(2).split(","):
        lo, _, hi = part.partition("-")
        out += [f"{m.group(1)}_{i}" for i in range(int(lo), int(hi or lo) + 1)]
    return out


def _sacct_details(ids: List[str]) -> Tuple[Dict[str, JobState], set]:
    """``sacct -X`` records of ``ids`` keyed as Slurm prints them (array ids expand to their tasks),
    and the ids they cover (an array id, a task's own job id)."""
    args = ["sacct", "-n", "-P", "-X", "-o", "JobID,JobIDRaw,State,ExitCode,Reason", "-j", ",".join(ids)]
    proc = _run(args)
    if proc.returncode != 0:  # accounting went away (slurmdbd down, cluster restarted without it): ask squeue
        _accounting_seen.clear()
        return {}, set()
    found: Dict[str, JobState] = {}
    raw_ids: Dict[str, str] = {}
    for line in proc.stdout.splitlines():
        parts = line.strip().split("|")
        if len(parts) != 5:
            continue
        shown, raw, state, exit_text, reason = parts
        code, sig = _exit_code(exit_text)
        js = JobState(state.split()[0] if state else UNKNOWN_STATE, code, sig,
                      "" if reason in ("None", "") else reason, "sacct")
        for one in _expand_array(shown):
            found[one] = js  # a requeued job: its latest attempt
            raw_ids[one] = raw
    covered = set(found) | {k.split("_")[0] for k in found} | set(raw_ids.values())
    return found, covered


def _squeue_details(ids: List[str]) -> Tuple[Dict[str, JobState], set]:
    """As :func:`_sacct_details`, from ``squeue -t all`` (exit codes of ended jobs from ``scontrol``)."""
    args = ["squeue", "-h", "-r", "-t", "all", "-o", "%i|%T|%A|%F|%r", "-j", ",".join(ids)]
    proc = _run(args)
    if proc.returncode != 0:
        if "Invalid job id" in proc.stderr:  # one id asked, unknown to the controller
            return {}, set()
        raise _controller_error(args, proc)
    found: Dict[str, JobState] = {}
    covered: set = set()
    for line in proc.stdout.splitlines():
        parts = line.strip().split("|")
        if len(parts) != 5:
            continue
        shown, state, own_id, array_id, reason = parts
        code = sig = None
        if state in TERMINAL_STATES and state != "COMPLETED":
            record = next(iter(job_info(shown)), {})
            code, sig = _exit_code(record.get("ExitCode", ""))
        found[shown] = JobState(state, code, sig, "" if reason == "None" else reason, "squeue")
        covered.update({shown, own_id, array_id})
    return found, covered


def job_details(job_ids: Iterable["str | int"], use_sacct: Optional[bool] = None) -> Dict[str, JobState]:
    """What Slurm says of each job: state, exit code, signal and reason.

    With accounting, ``sacct`` is the record: it remembers a job's end, exit
    code and reason for good. It learns of each change a moment after the
    controller, so ``squeue`` is asked too about what it cannot settle -- an id
    it does not know yet, a job or array id (an array's tasks reach the
    database one by one), a task it has not seen end -- and the controller's
    newer word wins. Without
    accounting ``squeue``/``scontrol`` alone answer; they forget a job
    ``MinJobAge`` after it ended.

    Args:
        job_ids: as :func:`job_states`.
        use_sacct: ``True``/``False`` forces a path; ``None``: :func:`accounting_enabled`.

    Returns:
        ``{id: JobState}`` keyed as :func:`job_states`; an id neither command
        knows maps to ``JobState(UNKNOWN_STATE)``.

    Raises:
        ValueError: an id is not of the form ``123`` or ``123_4``.
        RuntimeError: Slurm is not installed or the controller does not answer.
    """
    ids = _check_ids(job_ids)
    if not ids:
        return {}
    sacct = accounting_enabled() if use_sacct is None else use_sacct
    found, covered = _sacct_details(ids) if sacct else ({}, set())
    # an end Slurm may undo by requeueing the job (node failure, preemption, time limit with --requeue)
    revivable = RESUMABLE_END_STATES - {"CANCELLED"}
    unsettled = [j for j in ids if "_" not in j or j not in covered  # a job id may be an array's
                 or found.get(j, JobState(UNKNOWN_STATE)).state not in TERMINAL_STATES - revivable]
    if unsettled:
        live, live_covered = _squeue_details(unsettled)
        for k, js in live.items():  # the controller's word is newer; an ended job's record stays richer
            old = found.get(k)
            requeued = old is not None and old.state in revivable and js.state not in TERMINAL_STATES | {"COMPLETING"}
            if old is None or requeued or (old.state not in TERMINAL_STATES and old.state != js.state):
                found[k] = js
        covered |= live_covered
        for j in set(unsettled) & set(found):  # the database's record of an array not yet split into tasks
            if any(k.startswith(f"{j}_") for k in found):
                del found[j]
    tasks = [j for j in ids if j not in covered and "_" in j]
    if tasks:  # tasks of an array that never started are listed under the array's id
        arrays = sorted({j.split("_")[0] for j in tasks})
        more = {**_squeue_details(arrays)[0], **(_sacct_details(arrays)[0] if sacct else {})}
        found.update({j: more[j] for j in tasks if j in more})
        covered |= set(found) & set(tasks)
    for j in ids:
        if j not in covered:
            found[j] = JobState(UNKNOWN_STATE)
    return found


def job_states(job_ids: Iterable["str | int"]) -> Dict[str, str]:
    """States of Slurm jobs: ``sacct`` when accounting works, else ``squeue`` (see :func:`job_details`).

    Args:
        job_ids: plain job ids (``"123"``), array task ids (``"123_4"``, as
            submitit's ``job.job_id``) or array job ids (``"123"`` covers all its tasks).

    Returns:
        ``{id: state}`` with Slurm's state names (``PENDING``, ``RUNNING``,
        ``COMPLETED``, ``FAILED``, ``CANCELLED``, ``TIMEOUT``, ...). Keys are
        the ids Slurm prints: a plain job as ``"123"``, each array task as
        ``"123_4"`` (an array id expands to all its tasks, pending ones
        included). An id Slurm does not know -- never submitted, or (without
        accounting) finished longer than ``MinJobAge`` ago -- maps to
        :data:`UNKNOWN_STATE`.

    Raises:
        ValueError: an id is not of the form ``123`` or ``123_4``.
        RuntimeError: Slurm is not installed or the controller does not answer.
    """
    return {j: js.state for j, js in job_details(job_ids).items()}


RESUMABLE_END_STATES = frozenset({"CANCELLED", "TIMEOUT", "NODE_FAIL", "PREEMPTED"})
"""Ends that say nothing against the cell itself: its checkpoint is resumed on a rerun (cell KILLED)."""


def failure_reason(js: JobState) -> Optional[str]:
    """Why a job ended unsuccessfully, in a word: ``TIMEOUT``, ``OUT_OF_MEMORY``,
    ``NODE_FAIL``, ``CANCELLED``, ``exit code 3``, ``signal SIGKILL``, ...; ``None``
    for a job that completed or has not ended."""
    if js.state not in TERMINAL_STATES or js.state == "COMPLETED":
        return None
    if js.state != "FAILED":
        return js.state
    if js.signal:
        try:
            return f"signal {signal.Signals(js.signal).name}"
        except ValueError:
            return f"signal {js.signal}"
    return f"exit code {js.exit_code}" if js.exit_code is not None else "FAILED"


_SCONTROL_FIELD = re.compile(r"(?:^|\s)([A-Za-z][\w/:]*)=")


def job_info(job_id: "str | int") -> List[Dict[str, str]]:
    """What ``scontrol show job -o`` knows of one job: one dict per job or array task.

    Args:
        job_id: ``"123"`` or ``"123_4"``.

    Returns:
        One ``{field: value}`` per record (``JobId``, ``JobState``,
        ``ExitCode``, ``Reason``, ``NodeList``, ``StdOut``, ``StdErr``, ...);
        an empty list when the controller does not know the job.

    Raises:
        ValueError: ``job_id`` is not of the form ``123`` or ``123_4``.
        RuntimeError: Slurm is not installed or the controller does not answer.
    """
    job_id = str(job_id)
    if not _JOB_ID.match(job_id):
        raise ValueError(f"invalid Slurm job id {job_id!r}; expected '123' or '123_4'")
    args = ["scontrol", "show", "job", "-o", job_id]
    proc = _run(args)
    if proc.returncode != 0:
        if "Invalid job id" in proc.stderr:
            return []
        raise _controller_error(args, proc)
    records = []
    for line in proc.stdout.splitlines():
        line = line.strip()
        if not line:
            continue
        matches = list(_SCONTROL_FIELD.finditer(line))
        record = {}
        for m, nxt in zip(matches, matches[1:] + [None]):
            end = nxt.start() if nxt is not None else len(line)
            record[m.group(1)] = line[m.end() : end].strip()
        records.append(record)
    return records


def cancel_jobs(job_ids: Iterable["str | int"]) -> None:
    """``scancel`` of jobs or array tasks (ids as :func:`job_states`); their tasks get SIGTERM, then SIGKILL.

    Raises:
        ValueError: an invalid id.
        RuntimeError: Slurm is not installed or ``scancel`` failed.
    """
    ids = _check_ids(job_ids)
    if not ids:
        return
    args = ["scancel", *ids]
    proc = _run(args)
    if proc.returncode != 0 and "already completing or completed" not in proc.stderr:
        raise _controller_error(args, proc)


# --- submitit without accounting ------------------------------------------------
def sacct_available() -> bool:
    """Whether ``sacct`` answers, i.e. the cluster has job accounting."""
    proc = _run(["sacct", "-n", "-X", "-o", "JobID", "-j", "1"], retries=0)
    return proc.returncode == 0


def use_squeue_for_submitit(delay_s: float = 60.0) -> None:
    """Makes submitit's Slurm jobs poll ``squeue`` instead of ``sacct``.

    Process-wide and idempotent: it replaces the watcher shared by every
    ``submitit`` Slurm job of this process. Call it before submitting when
    :func:`sacct_available` is false. Then a job that ends without a result
    (``CANCELLED``, ``TIMEOUT``, ``OUT_OF_MEMORY``, ``NODE_FAIL``) is seen as
    done, and ``job.result()`` raises submitit's ``UncompletedJobError`` with
    the job's log instead of waiting forever.

    Args:
        delay_s: longest interval between two polls (submitit polls more
            often right after a submission).
    """
    require_slurm()
    try:
        from submitit.slurm import slurm as submitit_slurm
    except ImportError:
        raise RuntimeError(
            "submitit is not installed; install the cluster extra: pip install 'deqbench[cluster]'"
        ) from None
    if getattr(submitit_slurm.SlurmJob.watcher, "_deqbench_squeue", False):
        return

    class SqueueInfoWatcher(submitit_slurm.SlurmInfoWatcher):
        """submitit's Slurm watcher, fed by ``squeue -t all`` (no accounting needed)."""

        _deqbench_squeue = True

        def _make_command(self) -> Optional[List[str]]:
            to_check = sorted({x.split("_")[0] for x in self._registered - self._finished})
            if not to_check:
                return None
            return ["squeue", "-h", "-r", "-t", "all", "-o", "%i|%T|%N", "-j", ",".join(to_check)]

        def read_info(self, string: "bytes | str") -> Dict[str, Dict[str, str]]:
            text = string.decode() if isinstance(string, bytes) else string
            # The header sacct would print; submitit's parser does the rest.
            return super().read_info("JobID|State|NodeList\n" + text)

    submitit_slurm.SlurmJob.watcher = SqueueInfoWatcher(delay_s=delay_s)
