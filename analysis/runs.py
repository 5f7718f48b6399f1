"""Load the runs of one sweep (one MLflow experiment) into a wide table.

One row per run. Columns, in this order:

- ``run_id``, ``experiment``, ``run_name``, ``status``, ``start_time``
  (``datetime64[ms, UTC]``): the run's identity and provenance.
- One column per param, named by its dotted config key (``data.image``,
  ``model.solver``). MLflow stores params as strings; they are typed back per
  column (see :func:`type_param_column`). A param whose name collides with a
  metric or one of the columns above is renamed ``param.<key>``.
- One ``float64`` column per metric, named by its key (``psnr``,
  ``solver/fwd_nstep``): the final value (the latest step), NaN where a run
  did not log it.
- One string column per tag, prefixed ``tag.`` (``tag.cell_hash``,
  ``tag.git_commit``). MLflow's own ``mlflow.*`` tags are left out
  (``mlflow.runName`` is the ``run_name`` column).

``DataFrame.attrs`` holds ``{"experiment", "params", "metrics", "tags"}``, the
column names of each kind; :mod:`analysis.table` uses it to tell params from
metrics.

:func:`load_histories` reads each run's logged series of some metrics (one
value per step, the epoch), for tables that take the best of a series.

Runs come either from MLflow or from a file written by
:func:`analysis.export.export_runs`; both give the same table. mlflow and pandas
are imported inside the functions so that the CLI starts fast.
"""

from __future__ import annotations

import math
import re
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterable

from analysis.records import EXPORT_SUFFIXES, RunRecord, read_export, sort_records  # noqa: F401  (re-exported)
from jobs.tracking import resolve_tracking_uri  # the one resolver of the tracking store, for every command

if TYPE_CHECKING:  # pragma: no cover
    import pandas as pd

BASE_COLUMNS = ("run_id", "experiment", "run_name", "status", "start_time")
"""Identity columns that come first in the wide table."""

FINISHED = "FINISHED"

_INT_RE = re.compile(r"[+-]?\d+")
_BOOL_STRINGS = {"true": True, "false": False}
_NONE_STRINGS = {"None", "null", "~"}


def _check_sqlite_store(uri: str) -> None:
    """Refuse a ``sqlite:///`` URI whose database file does not exist.

    MLflow would silently create an empty database, and the user would then see
    "experiment not found" instead of "wrong store".
    """
    if not uri.startswith("sqlite:///"):
        return
    path = Path(uri[len("sqlite:///") :].split("?", 1)[0])
    if str(path) not in ("", ":memory:") and not path.exists():
        raise ValueError(
            f"no MLflow store at {path} (tracking URI {uri!r}); set MLFLOW_TRACKING_URI, "
            "pass --tracking-uri, or run from the directory that holds mlflow.db"
        )


def fetch_records(experiment: str, tracking_uri: str | None = None) -> list[RunRecord]:
    """Read every active (not deleted) run of an experiment from MLflow, whatever its status.

    Args:
        experiment: experiment (sweep) name.
        tracking_uri: MLflow tracking URI; see :func:`resolve_tracking_uri`.

    Returns:
        The runs, sorted by start time then run id.

    Raises:
        ValueError: the store does not exist, or has no experiment of that name
            (the message lists the existing ones).
    """
    from mlflow.entities import ViewType
    from mlflow.tracking import MlflowClient

    uri = resolve_tracking_uri(tracking_uri)
    _check_sqlite_store(uri)
    client = MlflowClient(tracking_uri=uri)
    exp = client.get_experiment_by_name(experiment)
    if exp is None:
        names = sorted(e.name for e in client.search_experiments(view_type=ViewType.ALL))
        raise ValueError(
            f"unknown experiment {experiment!r} in {uri}; existing experiments: {names}"
        )
    records: list[RunRecord] = []
    token: str | None = None
    while True:
        page = client.search_runs(
            [exp.experiment_id],
            run_view_type=ViewType.ACTIVE_ONLY,
            max_results=1000,
            page_token=token,
        )
        for run in page:
            proto_metrics = run.data.to_proto().metrics
            records.append(
                RunRecord(
                    run_id=run.info.run_id,
                    experiment=experiment,
                    run_name=run.info.run_name,
                    status=run.info.status,
                    start_time=run.info.start_time,
                    params=dict(run.data.params),
                    metrics={m.key: (float(m.value), int(m.step)) for m in proto_metrics},
                    tags={k: v for k, v in run.data.tags.items() if not k.startswith("mlflow.")},
                )
            )
        token = page.token
        if not token:
            break
    return sort_records(records)


def load_histories(
    experiment: str,
    run_ids: Iterable[str],
    metrics: Iterable[str],
    tracking_uri: str | None = None,
    source: str | Path | None = None,
) -> dict[tuple[str, str], list[float]]:
    """Each run's logged series of some metrics (one value per step; the step is the epoch).

    Args:
        experiment: the MLflow experiment (sweep) name.
        run_ids: the runs to read.
        metrics: metric keys.
        tracking_uri: MLflow tracking URI; see :func:`resolve_tracking_uri`.
            Ignored with ``source``.
        source: an export file to read instead of MLflow; it must hold one row
            per step (more than one row for some run and metric).

    Returns:
        ``(run_id, metric) -> values`` in step order (ties: logging order);
        pairs that were never logged are absent.

    Raises:
        ValueError: missing store or file, or an export holding only final
            values (one row per run and metric).
    """
    run_ids, metrics = list(run_ids), list(metrics)
    if not run_ids or not metrics:
        return {}
    if source is not None:
        return _export_histories(Path(source), experiment, run_ids, metrics)
    from mlflow.tracking import MlflowClient

    uri = resolve_tracking_uri(tracking_uri)
    _check_sqlite_store(uri)
    client = MlflowClient(tracking_uri=uri)
    out: dict[tuple[str, str], list[float]] = {}
    for run_id in run_ids:
        for key in metrics:
            history = sorted(client.get_metric_history(run_id, key), key=lambda m: (m.step, m.timestamp))
            if history:
                out[(run_id, key)] = [float(m.value) for m in history]
    return out


def _export_histories(
    path: Path, experiment: str, run_ids: list[str], metrics: list[str]
) -> dict[tuple[str, str], list[float]]:
    """Series from the per-step rows of a long-format export (see :func:`load_histories`)."""
    import pandas as pd

    if path.suffix.lower() not in EXPORT_SUFFIXES or not path.is_file():
        raise ValueError(
            f"export file {str(path)!r} does not exist or does not end in one of {list(EXPORT_SUFFIXES)}"
        )
    cols = ["experiment", "run_id", "metric", "value", "step"]
    if path.suffix.lower() == ".parquet":
        long = pd.read_parquet(path, columns=cols)
    else:
        long = pd.read_csv(path, usecols=cols, dtype=str, keep_default_na=False, na_values=[""])
    long = long[(long["experiment"] == experiment) & long["metric"].notna()]
    if not long.duplicated(["run_id", "metric"]).any():
        raise ValueError(
            f"{str(path)!r} holds one value per run and metric (the final one), not the logged "
            "series that agg 'best' needs; read the runs from MLflow instead (no --source)"
        )
    long = long[long["run_id"].astype(str).isin(run_ids) & long["metric"].astype(str).isin(metrics)]
    long = long.assign(step=pd.to_numeric(long["step"]), value=pd.to_numeric(long["value"]))
    long = long.sort_values("step", kind="stable")
    return {
        (str(run_id), str(key)): [float(v) for v in rows["value"]]
        for (run_id, key), rows in long.groupby(["run_id", "metric"], sort=False)
    }


def _parse_scalar(text: str) -> Any:
    """Parse one param string: bool, int, float, or the string itself (None if it spells null)."""
    if text in _NONE_STRINGS:
        return None
    if text.lower() in _BOOL_STRINGS:
        return _BOOL_STRINGS[text.lower()]
    if _INT_RE.fullmatch(text):
        return int(text)
    try:
        return float(text)
    except ValueError:
        return text


def type_param_column(values: list[str | None]) -> "pd.Series":
    """Type back one param column from MLflow's strings.

    Rules, applied to the whole column so that it has one type:
    ``"None"``/``"null"``/``"~"`` (how a YAML null is logged) and absent params
    are missing; if every present value is ``True``/``False`` (any case) the
    column is ``bool`` (``boolean`` when some are missing); if every value is an
    integer literal it is ``int64`` (``Int64`` when some are missing); if every
    value parses as a float it is ``float64``; otherwise the values stay strings.

    Args:
        values: one entry per run; None where the run has no such param.

    Returns:
        The typed column.
    """
    import pandas as pd

    parsed = [None if v is None else _parse_scalar(v) for v in values]
    present = [p for p in parsed if p is not None and not (isinstance(p, float) and math.isnan(p))]
    missing = len(present) < len(parsed)
    if present and all(isinstance(p, bool) for p in present):
        return pd.Series(parsed, dtype="boolean" if missing else bool)
    if present and all(isinstance(p, int) and not isinstance(p, bool) for p in present):
        return pd.Series(parsed, dtype="Int64" if missing else "int64")
    if present and all(isinstance(p, (int, float)) and not isinstance(p, bool) for p in present):
        return pd.Series([math.nan if p is None else float(p) for p in parsed], dtype="float64")
    # strings (or mixed): keep the original text, missing stays missing
    return pd.Series(
        [None if (v is None or p is None) else v for v, p in zip(values, parsed)],
    )


def build_wide(
    records: list[RunRecord],
    param_keys: Iterable[str] = (),
    metric_keys: Iterable[str] = (),
) -> "pd.DataFrame":
    """Assemble the wide table (one row per run) from run records.

    Args:
        records: the runs, in the order the rows should have.
        param_keys: params to include even when no run has a value for them.
        metric_keys: metrics to include even when no run logged them.

    Returns:
        The wide table described in the module docstring, with ``attrs``.
    """
    import pandas as pd

    experiment = records[0].experiment if records else None
    params = sorted(set(param_keys).union(*(r.params for r in records)))
    metrics = sorted(set(metric_keys).union(*(r.metrics for r in records)))
    tags = sorted(set().union(*(r.tags for r in records)))

    taken = set(BASE_COLUMNS) | set(metrics)
    param_names = {k: (f"param.{k}" if k in taken else k) for k in params}
    metric_names = {k: (f"metric.{k}" if k in BASE_COLUMNS else k) for k in metrics}

    columns: dict[str, Any] = {
        "run_id": pd.Series([r.run_id for r in records], dtype=object),
        "experiment": pd.Series([r.experiment for r in records], dtype=object),
        "run_name": pd.Series([r.run_name for r in records], dtype=object),
        "status": pd.Series([r.status for r in records], dtype=object),
        "start_time": pd.Series(
            pd.to_datetime([r.start_time for r in records], unit="ms", utc=True)
        ).astype("datetime64[ms, UTC]"),
    }
    for key in params:
        columns[param_names[key]] = type_param_column([r.params.get(key) for r in records])
    for key in metrics:
        columns[metric_names[key]] = pd.Series(
            [r.metrics[key][0] if key in r.metrics else math.nan for r in records],
            dtype="float64",
        )
    for key in tags:
        columns[f"tag.{key}"] = pd.Series([r.tags.get(key) for r in records], dtype=object)
    df = pd.DataFrame({name: col.reset_index(drop=True) for name, col in columns.items()})
    df.attrs = {
        "experiment": experiment,
        "params": [param_names[k] for k in params],
        "metrics": [metric_names[k] for k in metrics],
        "tags": [f"tag.{k}" for k in tags],
    }
    return df


def load_runs(
    experiment: str,
    tracking_uri: str | None = None,
    source: str | Path | None = None,
    include_unfinished: bool = False,
) -> "pd.DataFrame":
    """Load the runs of one sweep as a wide table, one row per run.

    Args:
        experiment: the MLflow experiment (sweep) name.
        tracking_uri: MLflow tracking URI; default ``MLFLOW_TRACKING_URI``, else
            ``sqlite:///mlflow.db`` in the working directory. Ignored with ``source``.
        source: a ``.parquet`` or ``.csv`` file written by
            :func:`analysis.export.export_runs`, read instead of MLflow.
        include_unfinished: keep runs whose status is not ``FINISHED``
            (failed, killed, running).

    Returns:
        The wide table (see the module docstring); columns of every run of the
        experiment are present even when the kept runs lack them.

    Raises:
        ValueError: unknown experiment (lists the existing ones), missing store
            or file, or a source that is not ``.parquet``/``.csv``.
    """
    if source is not None:
        records, param_keys, metric_keys = read_export(source, experiment)
    else:
        records = fetch_records(experiment, tracking_uri)
        param_keys, metric_keys = (), ()
    df = build_wide(records, param_keys, metric_keys)
    df.attrs["experiment"] = experiment
    if not include_unfinished:
        attrs = dict(df.attrs)
        df = df[df["status"] == FINISHED].reset_index(drop=True)
        df.attrs = attrs
    return df
