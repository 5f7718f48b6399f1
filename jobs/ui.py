"""``deqbench ui``: MLflow's web UI, opened on a sweep's training runs.

MLflow 3 opens on a GenAI overview (traces, an assistant). The URL printed by
``deqbench ui`` opens the runs table of the sweep's experiment instead, in
MLflow's "Model training" mode, with the headline metrics as columns:

- the experiment is tagged as a model-training experiment (:data:`EXPERIMENT_TAGS`);
- a saved view, the experiment tag ``mlflow.sharedViewState.deqbench`` (listed in
  MLflow's own "Views" menu), selects the columns: ``psnr``, ``ssim``, ``vif``, the
  family's own metrics (``<family>/...``, e.g. ``crr/gain_db``) and the params that
  vary across the runs (the sweep's axes and the seed), sorted by PSNR;
- the URL names the runs tab, the table view, the model-training mode and that view.
"""

from __future__ import annotations

import json
import socket
import time
from typing import Any, Iterable

from jobs import tracking

EXPERIMENT_TAGS = {"mlflow.experimentKind": "custom_model_development"}
"""MLflow 3's experiment kind "Machine learning" (the other is "genai_development")."""
HEADLINE_METRICS = ("psnr", "ssim", "vif")
"""Metric columns every view shows (when a run logged them)."""
MAX_PARAM_COLUMNS = 8
VIEW_ID = "deqbench"
VIEW_TAG = f"mlflow.sharedViewState.{VIEW_ID}"
VIEW_NAME = "deqbench: headline metrics"


def _column(kind: str, key: str) -> str:
    """MLflow's column key, e.g. ``metrics.`psnr```."""
    return f"{kind}.`{key}`"


def view_columns(runs: Iterable[Any]) -> tuple[list[str], list[str]]:
    """The metric and param keys a sweep's runs table shows.

    Args:
        runs: MLflow runs (``run.data.metrics``, ``run.data.params``, ``run.data.tags``).

    Returns:
        ``(metrics, params)``: the headline metrics, then the metrics in a run's own
        family namespace (``crr/gain_db`` for a run tagged ``family=crr``); the params
        whose value differs between runs (at most :data:`MAX_PARAM_COLUMNS`).
    """
    runs = list(runs)
    logged = {k for r in runs for k in r.data.metrics}
    prefixes = tuple(f"{r.data.tags['family']}/" for r in runs if r.data.tags.get("family"))
    own = sorted(k for k in logged if prefixes and k.startswith(prefixes))
    metrics = [m for m in HEADLINE_METRICS if m in logged or not logged] + own
    keys = sorted({k for r in runs for k in r.data.params})
    varying = [k for k in keys if len({r.data.params.get(k) for r in runs}) > 1]
    return metrics, varying[:MAX_PARAM_COLUMNS]


def view_tag_value(metrics: list[str], params: list[str]) -> str:
    """The saved view as MLflow's UI stores it: ``{name, createdAt, state}``, ``state`` a JSON text
    of the page's UI state (``selectedColumns``) and search facets (the sort)."""
    state: dict[str, Any] = {"selectedColumns": [_column("metrics", m) for m in metrics]
                             + [_column("params", p) for p in params]}
    if "psnr" in metrics:
        state.update(orderByKey=_column("metrics", "psnr"), orderByAsc=False)
    return json.dumps({"name": VIEW_NAME, "createdAt": int(time.time() * 1000), "state": json.dumps(state)})


def runs_url(base: str, experiment_id: str) -> str:
    """Direct URL of an experiment's runs table with the deqbench view."""
    return (f"{base}/#/experiments/{experiment_id}/runs"
            f"?workflowType=machine_learning&compareRunsMode=TABLE&viewStateShareKey={VIEW_ID}")


def base_url(host: str, port: int) -> str:
    """``http://HOST:PORT``; a wildcard bind address is shown as this machine's name."""
    shown = socket.gethostname() if host in ("0.0.0.0", "::", "") else host
    return f"http://{shown}:{port}"


def prepare(uri: str, experiment: str | None = None) -> list[tuple[str, str, int]]:
    """Tags experiments for the UI: model-training kind and the deqbench saved view.

    Args:
        uri: tracking URI.
        experiment: one experiment (a sweep's name); None: every experiment with runs.

    Returns:
        ``(name, experiment_id, number of runs)``, most recently updated first.

    Raises:
        ValueError: ``experiment`` is not in the store (the message lists those that are).
    """
    c = tracking.client(uri)
    exps = tracking._retry(lambda: c.search_experiments(max_results=1000))
    if experiment is not None:
        chosen = [e for e in exps if e.name == experiment]
        if not chosen:
            names = ", ".join(sorted(e.name for e in exps)) or "none"
            raise ValueError(f"--experiment {experiment!r}: no such experiment in {uri} (experiments: {names})")
        exps = chosen
    out = []
    for exp in sorted(exps, key=lambda e: e.last_update_time or 0, reverse=True):
        runs = tracking._retry(lambda: c.search_runs([exp.experiment_id], max_results=1000))
        if not runs and experiment is None:
            continue
        for key, value in {**EXPERIMENT_TAGS, VIEW_TAG: view_tag_value(*view_columns(runs))}.items():
            tracking._retry(lambda: c.set_experiment_tag(exp.experiment_id, key, value))
        out.append((exp.name, exp.experiment_id, len(runs)))
    return out
