"""MLflow: the one place that knows it. Rank 0 only.

Store: ``--tracking-uri`` when given, else ``$MLFLOW_TRACKING_URI``, else
``sqlite:///mlflow.db`` in the working directory — made absolute, so that
worker processes, Slurm jobs and Ray trials started elsewhere write to the
same store. SQLite is fine for a laptop; many concurrent writers should use
an ``mlflow server`` (see ``slurm/mlflow_server.sh``). Transient errors
("database is locked", a refused connection, a 5xx from a restarting server)
are retried with back-off.

The node job's tracker (:class:`MlflowTracker`) buffers metrics, writes them
at least every ``$DEQBENCH_FLUSH_EVERY_S`` seconds (30) and rides out a store
outage of up to ``$DEQBENCH_TRACKING_MAX_OUTAGE_S`` seconds (900); past that
limit the cell fails with :class:`TrackingUnavailable`.
"""

from __future__ import annotations

import os
import platform
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping, TypeVar

T = TypeVar("T")

DEFAULT_URI = "sqlite:///mlflow.db"
FLUSH_EVERY_ENV, FLUSH_EVERY_DEFAULT = "DEQBENCH_FLUSH_EVERY_S", 30.0
MAX_OUTAGE_ENV, MAX_OUTAGE_DEFAULT = "DEQBENCH_TRACKING_MAX_OUTAGE_S", 900.0
COMMAND_PATIENCE_S = 50.0  # how long a command (status, table, cancel) waits for a busy or restarting store
_MAX_BACKOFF_S = 15.0
_TRANSIENT = ("database is locked", "connection", "temporarily", "timed out", "timeout", "max retries",
              "error code 5")  # the last: an HTTP 5xx from a (re)starting server


class TrackingUnavailable(RuntimeError):
    """The tracking store stayed unreachable longer than we wait for it."""


def resolve_tracking_uri(explicit: str | None = None) -> str:
    """The tracking URI to use, with relative SQLite/file paths made absolute."""
    uri = explicit or os.environ.get("MLFLOW_TRACKING_URI") or DEFAULT_URI
    if uri.startswith("sqlite:///") and not uri.startswith("sqlite:////"):
        uri = "sqlite:///" + str(Path(uri[len("sqlite:///") :]).absolute())
    return uri


def env_seconds(name: str, default: float) -> float:
    """A non-negative number of seconds from environment variable ``name`` (``default`` when unset).

    Raises:
        ValueError: the value is not a number >= 0.
    """
    raw = os.environ.get(name, "").strip()
    if not raw:
        return default
    try:
        value = float(raw)
    except ValueError:
        value = -1.0
    if not value >= 0:
        raise ValueError(f"${name}={raw!r}: expected a number of seconds >= 0")
    return value


def _transient(err: BaseException) -> bool:
    text = str(err).lower()
    return any(word in text for word in _TRANSIENT)


def _short(err: BaseException) -> str:
    return f"{type(err).__name__}: {str(err).splitlines()[0][:300] if str(err) else ''}"


def _retry(fn: Callable[[], T], patience_s: float = COMMAND_PATIENCE_S, since: float | None = None, limit_from: str = "") -> T:
    """Runs ``fn``, retrying transient errors with exponential back-off (0.2 s doubling, at most 15 s).

    Args:
        fn: the store call.
        patience_s: how long the store may stay unreachable, counted from ``since``
            (``time.monotonic()``; default: the first failure).
        limit_from: the setting ``patience_s`` comes from, named in the error.

    Raises:
        TrackingUnavailable: still failing transiently after ``patience_s``.
    """
    delay = 0.2
    while True:
        try:
            return fn()
        except Exception as err:  # mlflow wraps sqlalchemy and HTTP errors in MlflowException
            if not _transient(err):
                raise
            since = time.monotonic() if since is None else since
            down = time.monotonic() - since
            if down >= patience_s:
                where = f", ${limit_from}" if limit_from else ""
                raise TrackingUnavailable(f"tracking store unreachable for {down:.0f} s "
                                          f"(limit {patience_s:g} s{where}): {_short(err)}") from err
            time.sleep(min(delay, patience_s - down))
            delay = min(2 * delay, _MAX_BACKOFF_S)


def _fail_fast_http() -> None:
    """One HTTP attempt per call, 30 s timeout, unless the user set otherwise: our own retries
    (:func:`_retry`, with its patience) replace MLflow's, which block each call for minutes."""
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "30")


def client(uri: str) -> Any:
    """An ``MlflowClient`` for ``uri`` (imports mlflow lazily); HTTP calls fail fast (see :func:`_fail_fast_http`)."""
    from mlflow.tracking import MlflowClient

    _fail_fast_http()

    return MlflowClient(tracking_uri=uri)


def experiment_id(uri: str, name: str, patience_s: float = COMMAND_PATIENCE_S) -> str:
    """Id of experiment ``name``, created if missing (race-safe)."""
    c = client(uri)
    exp = _retry(lambda: c.get_experiment_by_name(name), patience_s)
    if exp is not None:
        return exp.experiment_id
    try:
        return _retry(lambda: c.create_experiment(name), patience_s)
    except TrackingUnavailable:
        raise
    except Exception:
        exp = c.get_experiment_by_name(name)
        if exp is None:
            raise
        return exp.experiment_id


def runs_by_hash(uri: str, name: str, patience_s: float = COMMAND_PATIENCE_S) -> dict[str, Any]:
    """Newest run per ``cell_hash`` tag in experiment ``name`` (empty if it does not exist)."""
    c = client(uri)
    exp = _retry(lambda: c.get_experiment_by_name(name), patience_s)
    if exp is None:
        return {}
    out: dict[str, Any] = {}
    token = None
    while True:
        page = _retry(lambda: c.search_runs([exp.experiment_id], max_results=1000, page_token=token, order_by=["attributes.start_time ASC"]), patience_s)
        for run in page:
            h = run.data.tags.get("cell_hash")
            if h:
                out[h] = run
        token = page.token
        if not token:
            return out


def finished_hashes(uri: str, name: str, patience_s: float = COMMAND_PATIENCE_S) -> set[str]:
    """Cell hashes whose newest run in ``name`` FINISHED."""
    return {h for h, run in runs_by_hash(uri, name, patience_s).items() if run.info.status == "FINISHED"}


SOURCE_DIR = Path(__file__).resolve().parent  # whose git state runs record


def _git(*args: str) -> str | None:
    """Output of ``git ARGS`` in the package's checkout; None outside one (or without git)."""
    try:
        out = subprocess.run(["git", *args], capture_output=True, text=True, timeout=10, cwd=SOURCE_DIR)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout if out.returncode == 0 else None


def _git_commit() -> str:
    return (_git("rev-parse", "HEAD") or "").strip() or "unknown"


def git_diff() -> str | None:
    """The uncommitted changes to tracked files (``git diff HEAD``); None when the tree is clean or unknown."""
    diff = _git("diff", "HEAD")
    return diff if diff else None


def run_tags(cell_hash: str, family: str, world_size: int) -> dict[str, str]:
    """Provenance tags: git commit, package versions, host, Slurm ids, world size, torch threads, cell hash."""
    from importlib.metadata import PackageNotFoundError, version

    import torch

    tags = {
        "cell_hash": cell_hash,
        "family": family,
        "world_size": str(world_size),
        "torch_threads": str(torch.get_num_threads()),  # per rank: timings depend on it
        "git_commit": _git_commit(),
        "git_dirty": {None: "unknown", "": "false"}.get(_git("status", "--porcelain", "--untracked-files=no"), "true"),
        "host": socket.gethostname(),
        "python": platform.python_version(),
    }
    for pkg in ("deqbench", "torch", "torchdeq", "mlflow", "scikit-image", "fastmri"):
        try:
            tags[f"version.{pkg}"] = version(pkg)
        except PackageNotFoundError:
            pass
    for env, tag in (("SLURM_JOB_ID", "slurm_job_id"), ("SLURM_ARRAY_JOB_ID", "slurm_array_job_id"),
                     ("SLURM_ARRAY_TASK_ID", "slurm_array_task_id"), ("SLURM_JOB_PARTITION", "slurm_partition")):
        if os.environ.get(env):
            tags[tag] = os.environ[env]
    return tags


class MlflowTracker:
    """Implements :class:`suite.training.tracker.Tracker` on one MLflow run.

    Metrics are buffered and written in batches at least every
    ``flush_every_s`` seconds (checked at each ``log_metrics``), before each
    checkpoint (the node job's hook) and at the end. The store is the record of
    what arrived: per metric key the tracker knows the highest step the store
    holds (:meth:`sync`, read when a run is resumed and after any failed write)
    and never writes a step at or below it. So a resume that replays epochs the
    store already has logs none of them twice, and a batch whose reply was lost
    is not written again.

    When the store is unreachable, training goes on: the buffer is kept, the
    write is retried with back-off (1 s doubling, at most 15 s) and the node job
    puts the unwritten values in each checkpoint (:meth:`pending`). Once the
    store has been unreachable for ``max_outage_s``, :meth:`log_metrics` raises
    :class:`TrackingUnavailable`.

    Args:
        uri: tracking URI.
        run_id: an existing run (see :func:`start_run`).
        flush_every_s: default ``$DEQBENCH_FLUSH_EVERY_S`` or 30.
        max_outage_s: default ``$DEQBENCH_TRACKING_MAX_OUTAGE_S`` or 900.
    """

    def __init__(self, uri: str, run_id: str, flush_every_s: float | None = None,
                 max_outage_s: float | None = None) -> None:
        self.uri, self.run_id = uri, run_id
        self.flush_every_s = env_seconds(FLUSH_EVERY_ENV, FLUSH_EVERY_DEFAULT) if flush_every_s is None else flush_every_s
        self.max_outage_s = env_seconds(MAX_OUTAGE_ENV, MAX_OUTAGE_DEFAULT) if max_outage_s is None else max_outage_s
        self._client = client(uri)
        self._buffer: list[Any] = []
        self._stored: dict[str, int] = {}  # per key, the highest step the store holds
        self._seen: dict[str, int] = {}  # per key, the highest step stored or buffered
        self._unsure = False  # a write failed: what reached the store is unknown until re-read
        self._last_flush = time.monotonic()
        self._down_since: float | None = None
        self._next_try = 0.0
        self._backoff = 1.0
        self._last_error = ""

    def log_metrics(self, metrics: Mapping[str, float], step: int | None = None) -> None:
        """Buffers the metrics not yet in the store; flushes when ``flush_every_s`` has passed.

        Raises:
            TrackingUnavailable: the store has been unreachable for over ``max_outage_s``.
        """
        from mlflow.entities import Metric

        now, step = int(time.time() * 1000), step or 0
        self._accept(Metric(k, float(v), now, step) for k, v in metrics.items())
        if time.monotonic() - self._last_flush >= self.flush_every_s:
            self.try_flush()
        if self._down_since is not None and time.monotonic() - self._down_since > self.max_outage_s:
            self._next_try = 0.0
            if not self.try_flush():  # a last attempt before giving up
                raise TrackingUnavailable(self.outage_message())

    def outage_message(self) -> str:
        """Why the store counts as unavailable, for the failure reason."""
        down = time.monotonic() - (self._down_since or time.monotonic())
        return (f"MLflow tracking store {self.uri} unreachable for {down:.0f} s, over the limit of "
                f"{self.max_outage_s:g} s (${MAX_OUTAGE_ENV}); last error: {self._last_error}; "
                f"{len(self._buffer)} metric values not yet logged")

    def sync(self) -> None:
        """Reads which step the store holds per key and drops those steps from the buffer (with retries)."""
        self._call(self._sync)

    def _sync(self) -> None:
        run = self._client.get_run(self.run_id)
        self._stored = {m.key: m.step for m in run.data.to_proto().metrics}  # latest = highest step
        buffered, self._buffer, self._seen = self._buffer, [], dict(self._stored)
        self._accept(buffered)
        self._unsure = False

    def _accept(self, metrics: Iterable[Any]) -> None:
        """Buffers each metric whose step is above every step of its key stored or buffered."""
        for m in metrics:
            if m.step > self._seen.get(m.key, -1):
                self._seen[m.key] = m.step
                self._buffer.append(m)

    def _write(self) -> None:
        """Writes the buffer (MLflow takes at most 1000 metrics per batch); one attempt."""
        if self._unsure:
            self._sync()
        while self._buffer:
            batch = self._buffer[:1000]
            self._unsure = True  # until the store answers
            self._client.log_batch(self.run_id, metrics=batch)
            self._unsure = False
            for m in batch:
                self._stored[m.key] = max(self._stored.get(m.key, -1), m.step)
            del self._buffer[: len(batch)]
        self._last_flush = time.monotonic()

    def try_flush(self) -> bool:
        """One attempt to write the buffer (none while backing off); False when the store is unreachable."""
        now = time.monotonic()
        if not self._buffer and not self._unsure:
            self._last_flush = now
            return True
        if now < self._next_try:
            return False
        try:
            self._write()
        except Exception as err:  # noqa: BLE001 - transient ones are the outage; others are raised
            if not _transient(err):
                raise
            self._last_error = _short(err)
            if self._down_since is None:
                self._down_since, self._backoff = now, 1.0
                print(f"deqbench: MLflow store {self.uri} unreachable ({self._last_error}); keeping "
                      f"{len(self._buffer)} metric values and retrying with back-off for up to "
                      f"{self.max_outage_s:g} s", file=sys.stderr, flush=True)
            self._next_try = now + self._backoff
            self._backoff = min(2 * self._backoff, _MAX_BACKOFF_S)
            return False
        self._up(now)
        return True

    def _up(self, now: float) -> None:
        if self._down_since is not None:
            print(f"deqbench: MLflow store {self.uri} reachable again after {now - self._down_since:.0f} s; "
                  "buffered metrics written", file=sys.stderr, flush=True)
        self._down_since, self._next_try = None, 0.0

    def _call(self, fn: Callable[[], T]) -> T:
        """``fn`` retried through an outage until ``max_outage_s`` after it began."""
        out = _retry(fn, self.max_outage_s, since=self._down_since, limit_from=MAX_OUTAGE_ENV)
        self._up(time.monotonic())
        return out

    def flush(self) -> None:
        """Writes every buffered metric, waiting through an outage (see :class:`MlflowTracker`)."""
        self._call(self._write)

    def pending(self) -> list[tuple[str, float, int, int]]:
        """The buffered values not yet written, ``(key, value, timestamp_ms, step)`` (kept in checkpoints)."""
        return [(m.key, m.value, m.timestamp, m.step) for m in self._buffer]

    def restore(self, pending: Iterable[tuple[str, float, int, int]]) -> None:
        """Buffers values a checkpoint kept (see :meth:`pending`); steps the store holds are skipped."""
        from mlflow.entities import Metric

        self._accept(Metric(k, v, t, s) for k, v, t, s in pending)

    def discard(self) -> None:
        """Drops buffered metrics (an interrupted run replays them after resuming)."""
        self._buffer.clear()
        self._seen = dict(self._stored)

    def log_artifact(self, path: str | Path, subdir: str | None = None) -> None:
        self._call(lambda: self._client.log_artifact(self.run_id, str(path), subdir))

    def set_tags(self, tags: Mapping[str, str]) -> None:
        """Adds tags to the run."""
        from mlflow.entities import RunTag

        self._call(lambda: self._client.log_batch(self.run_id, tags=[RunTag(k, str(v)) for k, v in tags.items()]))

    def terminate(self, status: str) -> None:
        """Marks the run FINISHED, FAILED or KILLED."""
        self._call(lambda: self._client.set_terminated(self.run_id, status))


def start_run(uri: str, experiment: str, run_name: str, params: Mapping[str, Any], tags: Mapping[str, str],
              resume_run_id: str | None = None) -> MlflowTracker:
    """Creates a run (params + tags), or reopens ``resume_run_id`` as RUNNING.

    Params are logged once, at creation; a resumed run keeps its own, and its
    tracker knows which steps the store already holds (:meth:`MlflowTracker.sync`).
    Waits for an unreachable store up to ``$DEQBENCH_TRACKING_MAX_OUTAGE_S``.
    """
    from mlflow.entities import Param, RunStatus, RunTag

    c, patience = client(uri), env_seconds(MAX_OUTAGE_ENV, MAX_OUTAGE_DEFAULT)
    if resume_run_id:
        _retry(lambda: c.update_run(resume_run_id, status=RunStatus.to_string(RunStatus.RUNNING)), patience)
        tracker = MlflowTracker(uri, resume_run_id)
        tracker.sync()
        tracker.set_tags({**tags, "resumed": "true"})
        return tracker
    exp_id = experiment_id(uri, experiment, patience)
    run = _retry(lambda: c.create_run(exp_id, run_name=run_name, tags=dict(tags)), patience)
    items = [Param(k, str(v)[:6000]) for k, v in params.items()]
    for i in range(0, len(items), 100):
        _retry(lambda: c.log_batch(run.info.run_id, params=items[i : i + 100]), patience)
    return MlflowTracker(uri, run.info.run_id)


def run_exists(uri: str, run_id: str) -> bool:
    """Whether ``run_id`` exists in the store (a checkpoint may outlive a deleted store).

    Raises:
        TrackingUnavailable: the store stayed unreachable past ``$DEQBENCH_TRACKING_MAX_OUTAGE_S``
            (an unreachable store is not a missing run: that would start a second run).
    """
    try:
        _retry(lambda: client(uri).get_run(run_id), env_seconds(MAX_OUTAGE_ENV, MAX_OUTAGE_DEFAULT))
        return True
    except TrackingUnavailable:
        raise
    except Exception:  # noqa: BLE001 - not found, deleted store
        return False


def iter_metric(uri: str, run_id: str, key: str) -> Iterable[tuple[int, float]]:
    """``(step, value)`` history of one metric, ordered by step."""
    hist = _retry(lambda: client(uri).get_metric_history(run_id, key))
    return sorted((m.step, m.value) for m in hist)
