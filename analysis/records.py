"""Run records and the export file format: what :mod:`analysis.runs` and :mod:`analysis.export` share.

A :class:`RunRecord` is one run as a store holds it (params as strings, final
metric values with their steps, tags). :func:`read_export` reads a file
written by :func:`analysis.export.export_runs` back into records, so that
:func:`analysis.runs.load_runs` can read MLflow and export files alike.
pandas is imported inside the functions that need it.
"""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable

EXPORT_SUFFIXES = (".parquet", ".csv")

PROVENANCE_TAGS = ("git_commit", "host", "cell_hash")
"""Tags exported as plain columns rather than ``tag.<key>``."""

ID_COLUMNS = ("experiment", "run_id", "run_name", "status", "start_time")
METRIC_COLUMNS = ("metric", "value", "step")
REQUIRED_COLUMNS = ID_COLUMNS + PROVENANCE_TAGS + ("seed",) + METRIC_COLUMNS


def check_suffix(path: Path) -> str:
    """The file format named by the suffix, ``.parquet`` or ``.csv``; ValueError otherwise."""
    suffix = path.suffix.lower()
    if suffix not in EXPORT_SUFFIXES:
        raise ValueError(
            f"cannot tell the format of {str(path)!r} from its suffix {suffix!r}; "
            f"use one of {list(EXPORT_SUFFIXES)}"
        )
    return suffix


@dataclass
class RunRecord:
    """One run as read from a store, before typing.

    Attributes:
        run_id: MLflow run id.
        experiment: experiment (sweep) name.
        run_name: MLflow run name, or None.
        status: MLflow status (``FINISHED``, ``FAILED``, ``RUNNING``, ``KILLED``, ...).
        start_time: start time in milliseconds since the Unix epoch, or None.
        params: param key -> value as MLflow stores it (a string).
        metrics: metric key -> (final value, step of that value).
        tags: tag key -> value (without MLflow's ``mlflow.*`` tags).
    """

    run_id: str
    experiment: str
    run_name: str | None
    status: str
    start_time: int | None
    params: dict[str, str] = field(default_factory=dict)
    metrics: dict[str, tuple[float, int]] = field(default_factory=dict)
    tags: dict[str, str] = field(default_factory=dict)


def sort_records(records: Iterable[RunRecord]) -> list[RunRecord]:
    """Runs in a stable order: start time (missing last), then run id."""
    return sorted(
        records,
        key=lambda r: (r.start_time is None, r.start_time or 0, r.run_id),
    )


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
    suffix = check_suffix(path)
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
