"""Ablation tables: mean ± std over seeds, one row per config choice, in Markdown, LaTeX or CSV.

A table is defined by config keys for its rows (``data.image``), config keys for
its column groups (``model.solver``, may be empty) and metric names
(``psnr``, ``solver/fwd_nstep``). Each cell aggregates the runs that share the
row and column values:

- value: mean ± sample standard deviation (``ddof=1``) over seeds. A cell with a
  single seed shows its mean only (no "± 0"), and its n marks it.
- n: the number of seeds with a value. The note under the table states the
  usual n; a cell with a different n carries ``(n=…)``.
- missing: a row × column combination without runs (or whose runs did not log
  the metric) shows ``—`` (``---`` in LaTeX); the row is kept.
- best: per column, the best displayed mean is bold (``**x**`` in Markdown,
  ``\\bfseries`` in LaTeX), compared as displayed; ties are all bold; a column
  whose values are all equal, has fewer than two values, or whose metric has no
  direction has no bold. Directions: :data:`DIRECTIONS`.

Runs of the same configuration and seed (re-runs) count once: the newest is kept.
Runs that share a seed but differ in a param that is neither a row nor a
column key would be averaged across configurations; that is refused with a
ValueError naming the params that differ.

CSV is for machines: one row per row combination, and per column and metric
three numeric columns ``<metric> mean``, ``<metric> std``, ``<metric> n``
(``<metric> (<key>=<value>) mean`` with column keys), rounded like the other
formats; a missing cell has n = 0 and empty mean and std; no bold.
"""

from __future__ import annotations

import csv
import io
import math
import numbers
from collections import Counter
from dataclasses import dataclass
from fnmatch import fnmatchcase
from pathlib import Path
from typing import TYPE_CHECKING, Any, Mapping, Sequence

if TYPE_CHECKING:  # pragma: no cover
    import pandas as pd

FORMATS = ("md", "latex", "csv")
DIRECTION_CHOICES = ("max", "min", "none")

DIRECTIONS: dict[str, str] = {
    "nmse": "min",
    "loss": "min",
    "sr": "min",
    "solver/*": "min",
    "mem/*": "min",
    "time/*": "min",
    "hfe": "none",
}
"""Which way is better, by metric key or ``fnmatch`` pattern: ``max`` (higher is
better), ``min`` (lower is better) or ``none`` (no best is marked: HFE is a
property of the output, not a score). Looked up on the full key, then on its
last ``/`` segment (so ``noise/0.1/nmse`` is ``min``); anything else is
:data:`DEFAULT_DIRECTION`. Callers override with ``directions=``."""

DEFAULT_DIRECTION = "max"
DEFAULT_DECIMALS = 2
MISSING_MD = "—"
MISSING_LATEX = "---"

_RESERVED = ("run_id", "experiment", "run_name", "status", "start_time")
_ARROWS_MD = {"max": " ↑", "min": " ↓", "none": ""}
_ARROWS_LATEX = {"max": r" $\uparrow$", "min": r" $\downarrow$", "none": ""}
_LATEX_SPECIAL = {
    "\\": r"\textbackslash{}",
    "&": r"\&",
    "%": r"\%",
    "$": r"\$",
    "#": r"\#",
    "_": r"\_",
    "{": r"\{",
    "}": r"\}",
    "~": r"\textasciitilde{}",
    "^": r"\textasciicircum{}",
    "<": r"\textless{}",
    ">": r"\textgreater{}",
    "|": r"\textbar{}",
}


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
            :data:`DIRECTIONS`.

    Returns:
        ``"max"``, ``"min"`` or ``"none"``.
    """
    tables = [dict(overrides or {}), DIRECTIONS]
    for table in tables:
        if metric in table:
            return table[metric]
        for pattern, direction in table.items():
            if fnmatchcase(metric, pattern):
                return direction
    last = metric.rsplit("/", 1)[-1]
    for table in tables:
        if last in table:
            return table[last]
    return DEFAULT_DIRECTION


def latex_escape(text: str) -> str:
    """Escape LaTeX's special characters (``_ % & $ # { } ~ ^ \\ < > |``) in plain text."""
    return "".join(_LATEX_SPECIAL.get(ch, ch) for ch in text)


def _kinds(df: "pd.DataFrame") -> tuple[list[str], list[str]]:
    """(params, metrics) column names: from ``df.attrs`` (set by load_runs) when valid, else guessed."""
    import pandas as pd

    params, metrics = df.attrs.get("params"), df.attrs.get("metrics")
    if isinstance(params, list) and isinstance(metrics, list):
        if all(c in df.columns for c in params + metrics):
            return list(params), list(metrics)
    free = [c for c in df.columns if c not in _RESERVED and not str(c).startswith("tag.")]
    numeric = [c for c in free if pd.api.types.is_numeric_dtype(df[c])]
    return free, numeric


def _resolve(key: str, columns: Sequence[str], allowed: Sequence[str], what: str, hint: str) -> str:
    """Map a user key to a column (``params.x``/``metrics.x``/``tags.x`` accepted), or ValueError."""
    if not isinstance(key, str):
        raise TypeError(f"{what} keys must be strings, got {key!r}")
    candidates = [key]
    for prefix, repl in (("params.", ""), ("metrics.", ""), ("tags.", "tag.")):
        if key.startswith(prefix):
            candidates.append(repl + key[len(prefix) :])
    for cand in candidates:
        if cand in allowed:
            return cand
    raise ValueError(f"unknown {what} key {key!r}; {hint}")


def _check_list(name: str, value: Any) -> list[str]:
    """A list of keys (None is the empty list); TypeError for a bare string, ValueError for repeats."""
    if value is None:
        return []
    if isinstance(value, str) or not isinstance(value, (list, tuple)):
        raise TypeError(f"{name} must be a list of keys, got {value!r}")
    if len(set(value)) != len(value):
        raise ValueError(f"{name} repeats a key: {list(value)}")
    return list(value)


def _decimals_for(metrics: list[str], decimals: int | Mapping[str, int]) -> dict[str, int]:
    """Per-metric decimals from an int or a {metric: int} dict (others get the default)."""

    def check(name: str, d: Any) -> int:
        if isinstance(d, bool) or not isinstance(d, numbers.Integral) or d < 0:
            raise ValueError(f"decimals for {name} must be an int >= 0, got {d!r}")
        return int(d)

    if isinstance(decimals, Mapping):
        unknown = [k for k in decimals if k not in metrics]
        if unknown:
            raise ValueError(f"decimals names metrics {unknown} that are not in the table {metrics}")
        return {m: check(m, decimals.get(m, DEFAULT_DECIMALS)) for m in metrics}
    return {m: check("all metrics", decimals) for m in metrics}


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


def _fmt(x: float, d: int) -> str:
    text = f"{x:.{d}f}"
    return text.lstrip("-") if float(text) == 0 else text


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

    params, _ = _kinds(df)
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


def _best_rows(
    cells: dict[tuple[int, int, str], Cell],
    n_rows: int,
    ci: int,
    metric: str,
    d: int,
    direction: str,
) -> set[int]:
    """Rows whose displayed mean is the best of column (ci, metric)."""
    shown = {ri: float(_fmt(cells[(ri, ci, metric)].mean, d))
             for ri in range(n_rows) if cells[(ri, ci, metric)].n > 0}
    if direction == "none" or len(shown) < 2:
        return set()
    best = max(shown.values()) if direction == "max" else min(shown.values())
    rows = {ri for ri, v in shown.items() if v == best}
    return rows if len(rows) < len(shown) else set()  # all equal: nothing stands out


def ablation_table(
    df: "pd.DataFrame",
    rows: list[str],
    cols: list[str] | None,
    metrics: list[str],
    fmt: str = "md",
    decimals: int | Mapping[str, int] = DEFAULT_DECIMALS,
    seed_key: str = "seed",
    caption: str | None = None,
    label: str | None = None,
    directions: Mapping[str, str] | None = None,
) -> str:
    """Render an ablation table of mean ± std over seeds.

    Args:
        df: wide run table from :func:`analysis.runs.load_runs` (one row per run).
        rows: config keys whose values make the rows, e.g. ``["data.image"]``;
            several keys give one row per observed combination.
        cols: config keys whose values make column groups, e.g.
            ``["model.solver"]``; empty for one column per metric.
        metrics: metric keys, e.g. ``["psnr", "nmse"]``.
        fmt: ``"md"``, ``"latex"`` (booktabs) or ``"csv"``.
        decimals: digits after the point, for all metrics or per metric
            (``{"ssim": 4}``; unnamed metrics get 2).
        seed_key: the param that numbers seeds.
        caption: plain-text caption (LaTeX ``\\caption``, escaped; Markdown
            ``Table:`` line; ignored by CSV).
        label: LaTeX ``\\label`` (ignored by Markdown and CSV).
        directions: metric key or pattern -> ``max``/``min``/``none``,
            overriding :data:`DIRECTIONS`.

    Returns:
        The table text.

    Raises:
        ValueError: unknown format, key, metric or direction (naming the
            choices); no runs; a cell that would mix configurations.
        TypeError: rows/cols/metrics not lists of strings.
    """
    if fmt not in FORMATS:
        raise ValueError(f"unknown table format {fmt!r}; choose one of {list(FORMATS)}")
    rows, cols, metrics = (
        _check_list("rows", rows), _check_list("cols", cols), _check_list("metrics", metrics)
    )
    if not rows:
        raise ValueError("rows must name at least one config key, e.g. ['data.image']")
    if not metrics:
        raise ValueError("metrics must name at least one metric, e.g. ['psnr']")
    for key, direction in (directions or {}).items():
        if direction not in DIRECTION_CHOICES:
            raise ValueError(
                f"direction {direction!r} for {key!r} is not one of {list(DIRECTION_CHOICES)}"
            )
    params, metric_cols = _kinds(df)
    tags = [c for c in df.columns if str(c).startswith("tag.")]
    key_hint = f"available params: {sorted(params)}; tags: {sorted(tags)}"
    rows = [_resolve(k, df.columns, params + tags, "row", key_hint) for k in rows]
    cols = [_resolve(k, df.columns, params + tags, "column", key_hint) for k in cols]
    both = sorted(set(rows) & set(cols))
    if both:
        raise ValueError(f"keys {both} are both rows and cols; use each key once")
    metrics = [
        _resolve(m, df.columns, metric_cols, "metric", f"available metrics: {sorted(metric_cols)}")
        for m in metrics
    ]
    if seed_key not in df.columns:
        raise ValueError(f"seed key {seed_key!r} is not a column; {key_hint}")
    if df.empty:
        raise ValueError(
            "no runs to tabulate (only FINISHED runs are loaded by default; "
            "see load_runs(include_unfinished=True))"
        )
    digits = _decimals_for(metrics, decimals)
    dirs = {m: metric_direction(m, directions) for m in metrics}
    row_combos, col_combos, cells = aggregate(df, rows, cols, metrics, seed_key)
    table = _Table(rows, cols, metrics, row_combos, col_combos, cells, digits, dirs, seed_key)
    if fmt == "md":
        return table.markdown(caption)
    if fmt == "latex":
        return table.latex(caption, label)
    return table.csv()


@dataclass
class _Table:
    """Aggregated cells plus what is needed to render them."""

    rows: list[str]
    cols: list[str]
    metrics: list[str]
    row_combos: list[tuple]
    col_combos: list[tuple]
    cells: dict[tuple[int, int, str], Cell]
    digits: dict[str, int]
    dirs: dict[str, str]
    seed_key: str

    def columns(self) -> list[tuple[int, str]]:
        """Value columns in order: column groups outside, metrics inside."""
        return [(ci, m) for ci in range(len(self.col_combos)) for m in self.metrics]

    def group_label(self, ci: int) -> str:
        return ", ".join(f"{k}={format_key_value(v)}" for k, v in zip(self.cols, self.col_combos[ci]))

    def usual_n(self) -> int:
        """Most common n among non-missing cells (ties: the larger)."""
        counts = Counter(c.n for c in self.cells.values() if c.n > 0)
        return max(counts, key=lambda n: (counts[n], n)) if counts else 0

    def best(self) -> dict[tuple[int, str], set[int]]:
        return {
            (ci, m): _best_rows(self.cells, len(self.row_combos), ci, m, self.digits[m], self.dirs[m])
            for ci, m in self.columns()
        }

    def cell_text(self, ri: int, ci: int, m: str, pm: str, missing: str) -> tuple[str, str]:
        """(value text, n mark) of one cell; the mark is empty when n is the usual n."""
        cell = self.cells[(ri, ci, m)]
        if cell.n == 0:
            return missing, ""
        d = self.digits[m]
        text = _fmt(cell.mean, d) if cell.n == 1 else f"{_fmt(cell.mean, d)}{pm}{_fmt(cell.std, d)}"
        mark = f"(n={cell.n})" if cell.n != self.usual_n() else ""
        return text, mark

    def note(self, pm: str, code: str, missing: str, up: str, down: str) -> str:
        """The line under the table: what a cell is, the usual n, and the marks actually used."""
        n = self.usual_n()
        seeds = "seed" if n == 1 else "seeds"
        parts = [f"Mean{pm}sample std (ddof=1) over seeds ({code}); n = {n} {seeds} per cell"]
        if any(self.cell_text(ri, ci, m, "", "")[1] for ri in range(len(self.row_combos))
               for ci, m in self.columns()):
            parts[0] += " unless marked (n=…)"
        parts[0] += "."
        if any(c.n == 1 for c in self.cells.values()):
            parts.append("A single seed shows its mean only.")
        if any(self.best().values()):
            parts.append(f"Bold: best per column ({up} higher, {down} lower is better).")
        if any(c.n == 0 for c in self.cells.values()):
            parts.append(f"{missing}: no runs.")
        return " ".join(parts)

    def markdown(self, caption: str | None) -> str:
        def esc(text: str) -> str:
            return text.replace("|", r"\|")

        best = self.best()
        header = [esc(k) for k in self.rows]
        for ci, m in self.columns():
            name = f"{m}{_ARROWS_MD[self.dirs[m]]}"
            header.append(esc(f"{name} ({self.group_label(ci)})" if self.cols else name))
        lines = []
        if caption:
            lines += [f"Table: {caption}", ""]
        lines.append("| " + " | ".join(header) + " |")
        lines.append("|" + "|".join([":---"] * len(self.rows) + ["---:"] * len(self.columns())) + "|")
        for ri, rc in enumerate(self.row_combos):
            out = [esc(format_key_value(v)) for v in rc]
            for ci, m in self.columns():
                text, mark = self.cell_text(ri, ci, m, " ± ", MISSING_MD)
                if ri in best[(ci, m)]:
                    text = f"**{text}**"
                out.append(f"{text} {mark}".strip())
            lines.append("| " + " | ".join(out) + " |")
        lines += ["", self.note(" ± ", f"`{self.seed_key}`", MISSING_MD, "↑", "↓")]
        return "\n".join(lines) + "\n"

    def latex(self, caption: str | None, label: str | None) -> str:
        best = self.best()
        n_key, n_metric = len(self.rows), len(self.metrics)
        spec = "l" * n_key + " " + " ".join(["r" * n_metric] * len(self.col_combos))
        lines = [r"\begin{table}[t]", r"\centering"]
        if caption:
            lines.append(rf"\caption{{{latex_escape(caption)}}}")
        if label:
            lines.append(rf"\label{{{label}}}")
        lines += [rf"\begin{{tabular}}{{{spec}}}", r"\toprule"]
        if self.cols:
            groups = [
                rf"\multicolumn{{{n_metric}}}{{c}}{{{latex_escape(self.group_label(ci))}}}"
                for ci in range(len(self.col_combos))
            ]
            lines.append(" & ".join([""] * n_key + groups) + r" \\")
            rules = [
                rf"\cmidrule(lr){{{n_key + 1 + ci * n_metric}-{n_key + (ci + 1) * n_metric}}}"
                for ci in range(len(self.col_combos))
            ]
            lines.append("".join(rules))
        header = [latex_escape(k) for k in self.rows]
        header += [latex_escape(m) + _ARROWS_LATEX[self.dirs[m]] for _, m in self.columns()]
        lines += [" & ".join(header) + r" \\", r"\midrule"]
        for ri, rc in enumerate(self.row_combos):
            out = [latex_escape(format_key_value(v)) for v in rc]
            for ci, m in self.columns():
                text, mark = self.cell_text(ri, ci, m, r" $\pm$ ", MISSING_LATEX)
                if ri in best[(ci, m)]:
                    text = rf"\bfseries {text}"
                out.append(text + (rf" {{\scriptsize {mark}}}" if mark else ""))
            lines.append(" & ".join(out) + r" \\")
        lines += [r"\bottomrule", r"\end{tabular}"]
        note = self.note(
            r" $\pm$ ", rf"\texttt{{{latex_escape(self.seed_key)}}}", MISSING_LATEX,
            r"$\uparrow$", r"$\downarrow$",
        ).replace("n=…", r"n=\ldots")
        lines += [r"\par\smallskip", rf"{{\footnotesize {note}\par}}", r"\end{table}"]
        return "\n".join(lines) + "\n"

    def csv(self) -> str:
        buf = io.StringIO()
        writer = csv.writer(buf, lineterminator="\n")
        header = list(self.rows)
        for ci, m in self.columns():
            name = f"{m} ({self.group_label(ci)})" if self.cols else m
            header += [f"{name} mean", f"{name} std", f"{name} n"]
        writer.writerow(header)
        for ri, rc in enumerate(self.row_combos):
            out = [format_key_value(v) for v in rc]
            for ci, m in self.columns():
                cell, d = self.cells[(ri, ci, m)], self.digits[m]
                out += [
                    _fmt(cell.mean, d) if cell.n else "",
                    _fmt(cell.std, d) if cell.n > 1 else "",
                    str(cell.n),
                ]
            writer.writerow(out)
        return buf.getvalue()


def _split_keys(value: str | Sequence[str] | None) -> list[str]:
    """Keys from ``"a,b"`` or ``["a", "b,c"]`` (commas split, blanks dropped)."""
    if value is None:
        return []
    items = [value] if isinstance(value, str) else list(value)
    return [k.strip() for item in items for k in str(item).split(",") if k.strip()]


def table_command(
    experiment: str,
    rows: str | Sequence[str],
    cols: str | Sequence[str] | None,
    metrics: str | Sequence[str],
    fmt: str = "md",
    out: str | Path | None = None,
    tracking_uri: str | None = None,
    source: str | Path | None = None,
    decimals: int | Mapping[str, int] = DEFAULT_DECIMALS,
    include_unfinished: bool = False,
    caption: str | None = None,
    label: str | None = None,
) -> str:
    """``deqbench table``: load a sweep's runs and render an ablation table.

    Args:
        experiment: MLflow experiment (sweep) name.
        rows: row keys, a list or a comma-separated string (``"data.image,model.solver"``).
        cols: column keys, likewise; None or empty for one column per metric.
        metrics: metric keys, likewise.
        fmt: ``md``, ``latex`` or ``csv``.
        out: file to write (parents created); None to only return the text.
        tracking_uri: MLflow tracking URI (default ``MLFLOW_TRACKING_URI``, else
            ``sqlite:///mlflow.db``).
        source: read an export (``.parquet``/``.csv``) instead of MLflow.
        decimals: see :func:`ablation_table`.
        include_unfinished: also tabulate runs that are not FINISHED.
        caption: table caption.
        label: LaTeX label.

    Returns:
        The table text (also written to ``out`` when given).
    """
    if fmt not in FORMATS:
        raise ValueError(f"unknown table format {fmt!r}; choose one of {list(FORMATS)}")
    from analysis.runs import load_runs

    df = load_runs(experiment, tracking_uri=tracking_uri, source=source,
                   include_unfinished=include_unfinished)
    text = ablation_table(
        df, _split_keys(rows), _split_keys(cols), _split_keys(metrics), fmt=fmt,
        decimals=decimals, caption=caption, label=label,
    )
    if out is not None:
        path = Path(out)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text, encoding="utf-8")
    return text
