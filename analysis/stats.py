"""Statistics over seeds for ablation tables: directions, cells, intervals, tests, bold.

- Direction: whether higher (``max``) or lower (``min``) is better for a
  metric, or neither (``none``): :func:`metric_direction`.
- Cells: :func:`aggregate` groups runs by row and column keys and reduces each
  metric over seeds to a :class:`Cell` (n, mean, sample std with ddof=1).
- Series: with ``agg="best"`` a run's value of a metric is the best of its
  logged series (one value per epoch): the max when higher is better, the min
  when lower is better (:func:`series_best`, :func:`apply_agg`); ``last`` (the
  default) keeps the final logged value.
- Intervals: :func:`ci_half_width` is the half-width of the two-sided 95 %
  Student-t interval of a mean, ``t_{0.975, n-1} · s / sqrt(n)``.
- Tests: :func:`welch_p` is the one-sided p-value of Welch's unequal-variance
  t-test (Welch–Satterthwaite degrees of freedom) that one cell's mean is
  better than another's.
- Bold: :func:`bold_rows` marks a column's best cell (rule ``best``) and, with
  rule ``tied``, every cell that is not significantly worse than it
  (``welch_p >= alpha``, both cells with at least two seeds).

scipy and pandas are imported inside the functions that need them.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Mapping, Sequence

from suite.metrics.registry import DEFAULT_DIRECTION, DIRECTION_CHOICES, METRICS  # noqa: F401  (re-exported)
from suite.metrics.registry import metric_direction as _registry_direction

if TYPE_CHECKING:  # pragma: no cover
    import pandas as pd

DIRECTIONS: dict[str, str] = {name: m.direction for name, m in METRICS.items()}
"""Which way is better, by metric key or ``fnmatch`` pattern, as registered in
:mod:`suite.metrics.registry` (one registration per metric): ``max`` (higher is
better), ``min`` (lower is better) or ``none`` (no best is marked: HFE is a
property of the output, not a score). Looked up on the full key, then on its
last ``/`` segment (so ``noise/0.1/nmse`` is ``min``); anything else is
:data:`DEFAULT_DIRECTION`. Callers override with ``directions=``."""

AGG_CHOICES = ("last", "best")
"""How a run's series of one metric becomes its value: the last logged value or the best."""
BOLD_CHOICES = ("best", "tied")
"""Bold rule: the best cell only, or also every cell not significantly worse than it."""
ALPHA = 0.05
"""Significance level of the one-sided Welch test behind the ``tied`` bold rule."""
CI_LEVEL = 0.95
"""Coverage of the confidence interval shown with ``ci=True``."""

_RESERVED = ("run_id", "experiment", "run_name", "status", "start_time")


@dataclass(frozen=True)
class Cell:
    """Aggregate of one metric over the seeds of one row × column combination.

    Attributes:
        n: number of seeds with a value (0: missing cell).
        mean: mean over seeds (NaN when n = 0).
        std: sample standard deviation, ddof=1 (NaN when n < 2).
    """

    n: int
    mean: float
    std: float


def metric_direction(metric: str, overrides: Mapping[str, str] | None = None) -> str:
    """Whether higher (``max``) or lower (``min``) is better for a metric, or ``none``.

    Args:
        metric: metric key, e.g. ``psnr`` or ``solver/fwd_nstep``.
        overrides: key or ``fnmatch`` pattern -> direction, consulted before
            the metric registry (:func:`suite.metrics.registry.metric_direction`).

    Returns:
        ``"max"``, ``"min"`` or ``"none"``.
    """
    return _registry_direction(metric, overrides)


def column_kinds(df: "pd.DataFrame") -> tuple[list[str], list[str]]:
    """(params, metrics) column names: from ``df.attrs`` (set by load_runs) when valid, else guessed."""
    import pandas as pd

    params, metrics = df.attrs.get("params"), df.attrs.get("metrics")
    if isinstance(params, list) and isinstance(metrics, list):
        if all(c in df.columns for c in params + metrics):
            return list(params), list(metrics)
    free = [c for c in df.columns if c not in _RESERVED and not str(c).startswith("tag.")]
    numeric = [c for c in free if pd.api.types.is_numeric_dtype(df[c])]
    return free, numeric


def _norm(value: Any) -> Any:
    """A hashable, comparable python scalar for a key value (None when missing)."""
    import pandas as pd

    if value is None or (not isinstance(value, str) and pd.isna(value)):
        return None
    return value.item() if hasattr(value, "item") else value


def _sorted_combos(combos: set[tuple]) -> list[tuple]:
    def key(combo: tuple) -> tuple:
        return tuple((v is None, v if v is not None else 0) for v in combo)

    try:
        return sorted(combos, key=key)
    except TypeError:  # mixed types in one key: order by text
        return sorted(combos, key=lambda c: tuple(str(v) for v in c))


def format_key_value(value: Any) -> str:
    """A row/column key value as text: ints plain, floats shortest exact, missing as ``None``."""
    if value is None:
        return "None"
    if isinstance(value, float):
        short = f"{value:g}"
        return short if float(short) == value else repr(value)
    return str(value)


def _dedupe_reruns(df: "pd.DataFrame", identity: list[str]) -> "pd.DataFrame":
    """Keep the newest run of each configuration (same values in every identity column).

    Args:
        df: wide run table.
        identity: the params, the row and column keys (tags may be keys) and
            the seed key.
    """
    if not identity or df.empty:
        return df
    order = df.sort_values("start_time", kind="stable") if "start_time" in df.columns else df
    keep = ~order[identity].astype(str).duplicated(keep="last")
    return order[keep].sort_index()


def _check_seeds(
    sub: "pd.DataFrame", seed_key: str, params: list[str], fixed: list[str], where: str
) -> None:
    """Refuse a cell in which a seed appears more than once (an unlisted param varies)."""
    dup = sub[seed_key].duplicated(keep=False)
    if not dup.any():
        return
    runs = sub[dup]
    seed = _norm(runs[seed_key].iloc[0])
    others = [p for p in params if p not in fixed and p != seed_key]
    differing = [p for p in others if runs[p].astype(str).nunique() > 1]
    raise ValueError(
        f"cell {where} has {int(dup.sum())} runs that share {seed_key}={seed} "
        f"(run ids {list(runs['run_id']) if 'run_id' in runs else '?'}): averaging them would mix "
        f"configurations; params that differ between them: {differing or 'none found'}. "
        "Add those keys to rows/cols or filter the runs first."
    )


def aggregate(
    df: "pd.DataFrame",
    rows: list[str],
    cols: list[str],
    metrics: list[str],
    seed_key: str = "seed",
) -> tuple[list[tuple], list[tuple], dict[tuple[int, int, str], Cell]]:
    """Group runs into cells and compute mean, std and n over seeds.

    Args:
        df: wide run table (resolved column names).
        rows: row key columns.
        cols: column key columns (may be empty).
        metrics: metric columns.
        seed_key: the seed column.

    Returns:
        ``(row_combos, col_combos, cells)``: the observed value tuples of the
        row and column keys, sorted, and ``cells[(row_index, col_index,
        metric)]``.
    """
    import numpy as np

    params, _ = column_kinds(df)
    present = [p for p in params if p in df.columns]
    identity = list(dict.fromkeys(present + rows + cols + [seed_key]))
    df = _dedupe_reruns(df, identity)
    row_of = [tuple(_norm(v) for v in vals) for vals in df[rows].itertuples(index=False)]
    col_of = (
        [tuple(_norm(v) for v in vals) for vals in df[cols].itertuples(index=False)]
        if cols
        else [()] * len(df)
    )
    row_combos = _sorted_combos(set(row_of))
    col_combos = _sorted_combos(set(col_of))
    members: dict[tuple[tuple, tuple], list[int]] = {}
    for pos, key in enumerate(zip(row_of, col_of)):
        members.setdefault(key, []).append(pos)

    cells: dict[tuple[int, int, str], Cell] = {}
    for ri, rc in enumerate(row_combos):
        for ci, cc in enumerate(col_combos):
            sub = df.iloc[members.get((rc, cc), [])]
            where = ", ".join(f"{k}={format_key_value(v)}" for k, v in zip(rows + cols, rc + cc))
            _check_seeds(sub, seed_key, present, rows + cols, where)
            for m in metrics:
                vals = sub[m].to_numpy(dtype=float)
                vals = vals[~np.isnan(vals)]
                n = int(vals.size)
                mean = float(vals.mean()) if n else math.nan
                std = float(vals.std(ddof=1)) if n > 1 else math.nan
                cells[(ri, ci, m)] = Cell(n=n, mean=mean, std=std)
    return row_combos, col_combos, cells


def ci_half_width(std: float, n: int, level: float = CI_LEVEL) -> float:
    """Half-width of the two-sided Student-t confidence interval of a mean over n seeds.

    ``t_{(1+level)/2, n-1} · std / sqrt(n)``, e.g. for three seeds at 95 %:
    ``4.3027 · s / sqrt(3)``.

    Args:
        std: sample standard deviation (ddof=1) of the seeds' values.
        n: number of seeds.
        level: coverage, in (0, 1).

    Returns:
        The half-width; NaN when n < 2 (one seed gives no interval).
    """
    if n < 2 or math.isnan(std):
        return math.nan
    from scipy.stats import t

    return float(t.ppf((1 + level) / 2, n - 1) * std / math.sqrt(n))


def welch_p(best: Cell, other: Cell, direction: str) -> float:
    """One-sided p-value of Welch's t-test that ``best`` is better than ``other``.

    H0: equal means; H1: ``best.mean > other.mean`` (direction ``max``) or
    ``<`` (``min``). Computed from each cell's mean, sample std (ddof=1) and n
    with ``scipy.stats.ttest_ind_from_stats(equal_var=False)``, which equals
    ``scipy.stats.ttest_ind(equal_var=False)`` on the seeds' values. When both
    stds are 0 the t statistic is undefined; the p-value is then 0 if ``best``
    is strictly better, else 1.

    Args:
        best: the reference cell.
        other: the cell compared with it.
        direction: ``max`` or ``min``.

    Returns:
        The p-value; NaN when either cell has fewer than two seeds.
    """
    if direction not in ("max", "min"):
        raise ValueError(f"a one-sided test needs direction 'max' or 'min', got {direction!r}")
    if best.n < 2 or other.n < 2:
        return math.nan
    better = best.mean > other.mean if direction == "max" else best.mean < other.mean
    if best.std == 0 and other.std == 0:
        return 0.0 if better else 1.0
    from scipy.stats import ttest_ind_from_stats

    result = ttest_ind_from_stats(
        best.mean, best.std, best.n, other.mean, other.std, other.n,
        equal_var=False, alternative="greater" if direction == "max" else "less",
    )
    return float(result.pvalue)


def bold_rows(
    cells: Mapping[int, Cell],
    shown: Mapping[int, float],
    direction: str,
    rule: str = "best",
    alpha: float = ALPHA,
) -> set[int]:
    """Rows to bold in one column of a table.

    The best rows are those whose displayed mean is the best (ties all count).
    Rule ``best`` bolds them; rule ``tied`` also bolds every row that is not
    significantly worse than each best row: ``welch_p(best, row) >= alpha``,
    which needs at least two seeds on both sides (otherwise only the best is
    bold). A column whose displayed means are all equal, that has fewer than
    two values, or whose direction is ``none`` has no bold.

    Args:
        cells: row index -> cell, for the column's non-missing cells.
        shown: row index -> mean as displayed (rounded), same keys as ``cells``.
        direction: ``max``, ``min`` or ``none``.
        rule: ``best`` or ``tied``.
        alpha: significance level of the test.

    Returns:
        The row indices to bold.
    """
    if rule not in BOLD_CHOICES:
        raise ValueError(f"unknown bold rule {rule!r}; choose one of {list(BOLD_CHOICES)}")
    if direction == "none" or len(shown) < 2:
        return set()
    top = max(shown.values()) if direction == "max" else min(shown.values())
    best = {ri for ri, v in shown.items() if v == top}
    if len(best) == len(shown):  # all equal: nothing stands out
        return set()
    if rule == "best":
        return best
    tied = {
        ri for ri in shown
        if ri not in best and all(welch_p(cells[b], cells[ri], direction) >= alpha for b in best)
    }
    return best | tied


def series_best(values: Sequence[float], direction: str) -> float:
    """Best value of one run's logged series of a metric (NaN values ignored).

    Args:
        values: the series, e.g. one value per epoch, shape ``(T,)``.
        direction: ``max`` (the maximum is best) or ``min``.

    Returns:
        The best value; NaN when the series has no number.
    """
    if direction not in ("max", "min"):
        raise ValueError(f"the best of a series needs direction 'max' or 'min', got {direction!r}")
    finite = [float(v) for v in values if not math.isnan(float(v))]
    if not finite:
        return math.nan
    return max(finite) if direction == "max" else min(finite)


def parse_agg(spec: str | Mapping[str, str] | None, metrics: Sequence[str]) -> dict[str, str]:
    """Per-metric aggregation of each run's series, from ``--agg``'s text or a mapping.

    ``None``, ``"last"`` or ``"best"`` apply to every metric; ``"psnr=best,loss=last"``
    names metrics (the others stay ``last``); a bare choice among named ones
    sets the default for the rest (``"best,loss=last"``).

    Args:
        spec: the text, a ``{metric: choice}`` mapping, or None.
        metrics: the table's metric keys, as the user named them.

    Returns:
        ``{metric: "last" | "best"}`` for every metric.

    Raises:
        ValueError: an unknown choice or metric (naming the valid ones), or two
            defaults.
    """
    if spec is None:
        spec = "last"
    items: list[tuple[str | None, str]] = []
    if isinstance(spec, Mapping):
        items = [(str(k), str(v)) for k, v in spec.items()]
    else:
        for item in (s.strip() for s in str(spec).split(",") if s.strip()):
            key, _, choice = item.rpartition("=")
            items.append((key.strip() or None, choice.strip()))
    defaults = [v for k, v in items if k is None]
    if len(defaults) > 1:
        raise ValueError(f"agg {spec!r} gives more than one default ({defaults}); give one")
    for key, choice in items:
        if choice not in AGG_CHOICES:
            raise ValueError(
                f"agg {choice!r} for {key or 'all metrics'} is not one of {list(AGG_CHOICES)}"
            )
        if key is not None and key not in metrics:
            raise ValueError(f"agg names metric {key!r} that is not in the table {list(metrics)}")
    default = defaults[0] if defaults else "last"
    named = {k: v for k, v in items if k is not None}
    return {m: named.get(m, default) for m in metrics}


def apply_agg(
    df: "pd.DataFrame",
    best: Sequence[str],
    histories: Mapping[tuple[str, str], Sequence[float]],
    directions: Mapping[str, str],
) -> "pd.DataFrame":
    """Replace each run's final value of some metrics by the best of its logged series.

    Args:
        df: wide run table with a ``run_id`` column (one row per run).
        best: metric columns to replace.
        histories: ``(run_id, metric) -> series`` in step order, from
            :func:`analysis.runs.load_histories`. A run without a series keeps
            its final value.
        directions: metric -> ``max`` or ``min``.

    Returns:
        A copy of ``df`` (``attrs`` kept) with those columns replaced.
    """
    out = df.copy()
    for m in best:
        out[m] = [
            series_best(histories[(rid, m)], directions[m]) if (rid, m) in histories else val
            for rid, val in zip(out["run_id"], out[m])
        ]
    return out
