"""Export the runs of one sweep to a long-format parquet or CSV file, and read it back.

Format: one row per run and metric. Columns, in this order:

- ``experiment``, ``run_id``, ``run_name``, ``status``, ``start_time`` (UTC):
  the run's identity; every run of the experiment is exported, whatever its
  status (filter on ``status``; :func:`analysis.runs.load_runs` keeps
  ``FINISHED`` by default).
- ``git_commit``, ``host``, ``cell_hash``: provenance tags (empty where a run
  lacks one).
- ``seed``: the run's ``seed`` param (empty where absent).
- ``metric``, ``value``, ``step``: the metric key, its final value (latest
  step) and that step. A run that logged no metric has one row with these three
  empty, so that no run is lost.
- ``param.<key>``: every param, typed as in :func:`analysis.runs.type_param_column`.
- ``tag.<key>``: every other tag, as strings (MLflow's ``mlflow.*`` tags left out).

``load_runs(experiment, source=file)`` turns the file back into the same wide
table that ``load_runs(experiment)`` reads from MLflow. In CSV an empty string
and a missing value are the same thing; parquet keeps every type.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import TYPE_CHECKING, Any

from analysis.records import (  # noqa: F401  (the file format; read_export re-exported)
    PROVENANCE_TAGS, RunRecord, check_suffix, read_export, sort_records,
)
from analysis.runs import fetch_records, type_param_column

if TYPE_CHECKING:  # pragma: no cover
    import pandas as pd

def records_to_long(records: list[RunRecord]) -> "pd.DataFrame":
    """Long-format table (one row per run and metric) from run records.

    Args:
        records: the runs.

    Returns:
        The table described in the module docstring.
    """
    import pandas as pd

    records = sort_records(records)
    param_keys = sorted(set().union(*(r.params for r in records)))
    tag_keys = sorted(set().union(*(r.tags for r in records)) - set(PROVENANCE_TAGS))
    typed = {k: type_param_column([r.params.get(k) for r in records]) for k in param_keys}
    seed = typed.get("seed", pd.Series([None] * len(records), dtype="float64"))

    run_index: list[int] = []
    metric: list[str | None] = []
    value: list[float] = []
    step: list[int | None] = []
    for i, rec in enumerate(records):
        keys = sorted(rec.metrics) or [None]
        for key in keys:
            run_index.append(i)
            metric.append(key)
            value.append(rec.metrics[key][0] if key is not None else math.nan)
            step.append(rec.metrics[key][1] if key is not None else None)

    def per_run(values: list[Any], dtype: Any = object) -> "pd.Series":
        return pd.Series([values[i] for i in run_index], dtype=dtype)

    start = pd.Series(
        pd.to_datetime([r.start_time for r in records], unit="ms", utc=True)
    ).astype("datetime64[ms, UTC]")
    cols: dict[str, Any] = {
        "experiment": per_run([r.experiment for r in records]),
        "run_id": per_run([r.run_id for r in records]),
        "run_name": per_run([r.run_name for r in records]),
        "status": per_run([r.status for r in records]),
        "start_time": start.iloc[run_index].reset_index(drop=True),
    }
    for key in PROVENANCE_TAGS:
        cols[key] = per_run([r.tags.get(key) for r in records])
    cols["seed"] = seed.iloc[run_index].reset_index(drop=True)
    cols["metric"] = pd.Series(metric, dtype=object)
    cols["value"] = pd.Series(value, dtype="float64")
    cols["step"] = pd.Series(step, dtype="Int64")
    for key in param_keys:
        cols[f"param.{key}"] = typed[key].iloc[run_index].reset_index(drop=True)
    for key in tag_keys:
        cols[f"tag.{key}"] = per_run([r.tags.get(key) for r in records])
    return pd.DataFrame(cols)


def export_runs(experiment: str, out: Path, tracking_uri: str | None = None) -> Path:
    """Write every run of an experiment to one long-format parquet or CSV file.

    Args:
        experiment: the MLflow experiment (sweep) name.
        out: output file; ``.parquet`` or ``.csv`` (chosen by suffix); parent
            directories are created.
        tracking_uri: MLflow tracking URI; default ``MLFLOW_TRACKING_URI``, else
            ``sqlite:///mlflow.db``.

    Returns:
        The path written.

    Raises:
        ValueError: unknown suffix, missing store, or unknown experiment.
    """
    out = Path(out)
    suffix = check_suffix(out)
    long = records_to_long(fetch_records(experiment, tracking_uri))
    out.parent.mkdir(parents=True, exist_ok=True)
    if suffix == ".parquet":
        long.to_parquet(out, index=False)
    else:
        long.to_csv(out, index=False)
    return out
