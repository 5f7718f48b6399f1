"""MLflow: the one place that knows it. Rank 0 only.

Store: ``--tracking-uri`` when given, else ``$MLFLOW_TRACKING_URI``, else
``sqlite:///mlflow.db`` in the working directory — made absolute, so that
worker processes, Slurm jobs and Ray trials started elsewhere write to the
same store. SQLite is fine for a laptop; many concurrent writers should use
an ``mlflow server`` (see ``slurm/mlflow_server.sh``). Writes are retried on
transient "database is locked" errors.
"""

from __future__ import annotations

import os
import platform
import socket
import subprocess
import time
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping, TypeVar

T = TypeVar("T")

DEFAULT_URI = "sqlite:///mlflow.db"
_RETRIES = 8


def resolve_tracking_uri(explicit: str | None = None) -> str:
    """The tracking URI to use, with relative SQLite/file paths made absolute."""
    uri = explicit or os.environ.get("MLFLOW_TRACKING_URI") or DEFAULT_URI
    if uri.startswith("sqlite:///") and not uri.startswith("sqlite:////"):
        uri = "sqlite:///" + str(Path(uri[len("sqlite:///") :]).absolute())
    return uri


def _retry(fn: Callable[[], T]) -> T:
    """Runs ``fn``, retrying transient SQLite lock / connection errors with backoff."""
    for attempt in range(_RETRIES):
        try:
            return fn()
        except Exception as err:  # mlflow wraps sqlalchemy errors in MlflowException
            text = str(err).lower()
            transient = "database is locked" in text or "connection" in text or "temporarily" in text
            if not transient or attempt == _RETRIES - 1:
                raise
            time.sleep(0.2 * 2**attempt)
    raise AssertionError("unreachable")


def client(uri: str) -> Any:
    """An ``MlflowClient`` for ``uri`` (imports mlflow lazily)."""
    from mlflow.tracking import MlflowClient

    return MlflowClient(tracking_uri=uri)


def experiment_id(uri: str, name: str) -> str:
    """Id of experiment ``name``, created if missing (race-safe)."""
    c = client(uri)
    exp = c.get_experiment_by_name(name)
    if exp is not None:
        return exp.experiment_id
    try:
        return _retry(lambda: c.create_experiment(name))
    except Exception:
        exp = c.get_experiment_by_name(name)
        if exp is None:
            raise
        return exp.experiment_id


def runs_by_hash(uri: str, name: str) -> dict[str, Any]:
    """Newest run per ``cell_hash`` tag in experiment ``name`` (empty if it does not exist)."""
    c = client(uri)
    exp = _retry(lambda: c.get_experiment_by_name(name))
    if exp is None:
        return {}
    out: dict[str, Any] = {}
    token = None
    while True:
        page = _retry(lambda: c.search_runs([exp.experiment_id], max_results=1000, page_token=token, order_by=["attributes.start_time ASC"]))
        for run in page:
            h = run.data.tags.get("cell_hash")
            if h:
                out[h] = run
        token = page.token
        if not token:
            return out


def finished_hashes(uri: str, name: str) -> set[str]:
    """Cell hashes whose newest run in ``name`` FINISHED."""
    return {h for h, run in runs_by_hash(uri, name).items() if run.info.status == "FINISHED"}


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

    Metrics are buffered and written by :meth:`flush`, which the node job calls
    just before each checkpoint and at the end: the run then holds exactly the
    epochs a resume will not replay — none twice, none missing — and the store
    sees one batched write per checkpoint instead of one per epoch.

    Args:
        uri: tracking URI.
        run_id: an existing run (see :func:`start_run`).
    """

    def __init__(self, uri: str, run_id: str) -> None:
        self.uri, self.run_id = uri, run_id
        self._client = client(uri)
        self._buffer: list[Any] = []

    def log_metrics(self, metrics: Mapping[str, float], step: int | None = None) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        self._buffer.extend(Metric(k, float(v), now, step or 0) for k, v in metrics.items())

    def flush(self) -> None:
        """Writes the buffered metrics (MLflow takes at most 1000 per batch)."""
        while self._buffer:
            batch = self._buffer[:1000]
            _retry(lambda: self._client.log_batch(self.run_id, metrics=batch))
            del self._buffer[: len(batch)]

    def discard(self) -> None:
        """Drops buffered metrics (an interrupted run replays them after resuming)."""
        self._buffer.clear()

    def log_artifact(self, path: str | Path, subdir: str | None = None) -> None:
        _retry(lambda: self._client.log_artifact(self.run_id, str(path), subdir))

    def set_tags(self, tags: Mapping[str, str]) -> None:
        """Adds tags to the run."""
        from mlflow.entities import RunTag

        _retry(lambda: self._client.log_batch(self.run_id, tags=[RunTag(k, str(v)) for k, v in tags.items()]))

    def terminate(self, status: str) -> None:
        """Marks the run FINISHED, FAILED or KILLED."""
        _retry(lambda: self._client.set_terminated(self.run_id, status))


def start_run(uri: str, experiment: str, run_name: str, params: Mapping[str, Any], tags: Mapping[str, str],
              resume_run_id: str | None = None) -> MlflowTracker:
    """Creates a run (params + tags), or reopens ``resume_run_id`` as RUNNING.

    Params are logged once, at creation; a resumed run keeps its own.
    """
    from mlflow.entities import Param, RunStatus, RunTag

    c = client(uri)
    if resume_run_id:
        _retry(lambda: c.update_run(resume_run_id, status=RunStatus.to_string(RunStatus.RUNNING)))
        tracker = MlflowTracker(uri, resume_run_id)
        tracker.set_tags({**tags, "resumed": "true"})
        return tracker
    exp_id = experiment_id(uri, experiment)
    run = _retry(lambda: c.create_run(exp_id, run_name=run_name, tags=dict(tags)))
    items = [Param(k, str(v)[:6000]) for k, v in params.items()]
    for i in range(0, len(items), 100):
        _retry(lambda: c.log_batch(run.info.run_id, params=items[i : i + 100]))
    return MlflowTracker(uri, run.info.run_id)


def run_exists(uri: str, run_id: str) -> bool:
    """Whether ``run_id`` exists in the store (a checkpoint may outlive a deleted store)."""
    try:
        client(uri).get_run(run_id)
        return True
    except Exception:
        return False


def iter_metric(uri: str, run_id: str, key: str) -> Iterable[tuple[int, float]]:
    """``(step, value)`` history of one metric, ordered by step."""
    hist = _retry(lambda: client(uri).get_metric_history(run_id, key))
    return sorted((m.step, m.value) for m in hist)
