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
import numbers
from pathlib import Path
from typing import TYPE_CHECKING, Any

from analysis.runs import (
    EXPORT_SUFFIXES,
    RunRecord,
    fetch_records,
    sort_records,
    type_param_column,
)

if TYPE_CHECKING:  # pragma: no cover
    import pandas as pd

PROVENANCE_TAGS = ("git_commit", "host", "cell_hash")
"""Tags exported as plain columns rather than ``tag.<key>``."""

ID_COLUMNS = ("experiment", "run_id", "run_name", "status", "start_time")
METRIC_COLUMNS = ("metric", "value", "step")
REQUIRED_COLUMNS = ID_COLUMNS + PROVENANCE_TAGS + ("seed",) + METRIC_COLUMNS


def _check_suffix(path: Path) -> str:
    """The file format named by the suffix, ``.parquet`` or ``.csv``; ValueError otherwise."""
    suffix = path.suffix.lower()
    if suffix not in EXPORT_SUFFIXES:
        raise ValueError(
            f"cannot tell the format of {str(path)!r} from its suffix {suffix!r}; "
            f"use one of {list(EXPORT_SUFFIXES)}"
        )
    return suffix


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
    suffix = _check_suffix(out)
    long = records_to_long(fetch_records(experiment, tracking_uri))
    out.parent.mkdir(parents=True, exist_ok=True)
    if suffix == ".parquet":
        long.to_parquet(out, index=False)
    else:
        long.to_csv(out, index=False)
    return out


def _to_str(value: Any) -> str | None:
    """A typed exported value back to the string MLflow would hold (None if missing)."""
    import pandas as pd

    if value is None or (not isinstance(value, str) and pd.isna(value)):
        return None
    if isinstance(value, str):
        return value
    if isinstance(value, (bool,)) or type(value).__name__ == "bool_":
        return "True" if value else "False"
    if isinstance(value, numbers.Integral):
        return str(int(value))
    if isinstance(value, numbers.Real):
        return repr(float(value))
    return str(value)


def read_export(
    source: str | Path, experiment: str
) -> tuple[list[RunRecord], list[str], list[str]]:
    """Read a file written by :func:`export_runs` back into run records.

    Args:
        source: the ``.parquet`` or ``.csv`` file.
        experiment: the experiment to keep; must be in the file.

    Returns:
        ``(records, param_keys, metric_keys)``: the runs (all statuses), and the
        param and metric keys present in the file.

    Raises:
        ValueError: unknown suffix, missing file, not an export (missing
            columns), or the experiment is not in the file (lists those that are).
    """
    import pandas as pd

    path = Path(source)
    suffix = _check_suffix(path)
    if not path.is_file():
        raise ValueError(f"export file {str(path)!r} does not exist")
    if suffix == ".parquet":
        long = pd.read_parquet(path)
    else:
        # every column as text: params are re-typed from their text exactly as
        # they are from MLflow's strings
        long = pd.read_csv(path, dtype=str, keep_default_na=False, na_values=[""])
    missing = [c for c in REQUIRED_COLUMNS if c not in long.columns]
    if missing:
        raise ValueError(f"{str(path)!r} is not a deqbench export: missing columns {missing}")
    present = sorted({str(e) for e in long["experiment"].dropna()})
    if experiment not in present:
        raise ValueError(
            f"experiment {experiment!r} is not in {str(path)!r}; it holds {present}"
        )
    long = long[long["experiment"] == experiment]
    param_cols = [c for c in long.columns if c.startswith("param.")]
    tag_cols = [c for c in long.columns if c.startswith("tag.")]
    start_ms = pd.to_datetime(long["start_time"], utc=True).astype("datetime64[ms, UTC]")

    records: list[RunRecord] = []
    for run_id, rows in long.groupby("run_id", sort=False):
        first = rows.iloc[0]
        start = start_ms.loc[rows.index[0]]
        tags = {k: _to_str(first[k]) for k in PROVENANCE_TAGS}
        tags.update({c[len("tag.") :]: _to_str(first[c]) for c in tag_cols})
        params = {c[len("param.") :]: _to_str(first[c]) for c in param_cols}
        metrics: dict[str, tuple[float, int]] = {}
        for key, val, stp in zip(rows["metric"], rows["value"], rows["step"]):
            if _to_str(key) is None:
                continue
            metrics[str(key)] = (
                float(val) if _to_str(val) is not None else math.nan,
                int(stp),
            )
        records.append(
            RunRecord(
                run_id=str(run_id),
                experiment=experiment,
                run_name=_to_str(first["run_name"]),
                status=str(first["status"]),
                start_time=None if pd.isna(start) else int(start.value // 1_000_000),
                params={k: v for k, v in params.items() if v is not None},
                metrics=metrics,
                tags={k: v for k, v in tags.items() if v is not None},
            )
        )
    metric_keys = sorted({str(m) for m in long["metric"].dropna()})
    return sort_records(records), [c[len("param.") :] for c in param_cols], metric_keys
