"""Ablation tables: mean ± std over seeds, one row per config choice, in Markdown, LaTeX or CSV.

A table is defined by config keys for its rows (``data.image``), config keys for
its column groups (``model.solver``, may be empty) and metric names
(``psnr``, ``solver/fwd_nstep``). Each cell aggregates the runs that share the
row and column values:

- run value: a run's final (last logged) value of the metric; with
  ``agg="best"`` (per metric: ``"psnr=best"``) the best of its logged series,
  max or min by direction (:mod:`analysis.stats`).
- value: mean ± sample standard deviation (``ddof=1``) over seeds; with
  ``ci=True`` mean ± the half-width of the 95 % Student-t interval,
  ``t_{0.975, n-1} · s / sqrt(n)``. A cell with a single seed shows its mean
  only (no "± 0"), and its n marks it.
- n: the number of seeds with a value. The note under the table states the
  usual n; a cell with a different n carries ``(n=…)``.
- missing: a row × column combination without runs (or whose runs did not log
  the metric) shows ``—`` (``---`` in LaTeX); the row is kept.
- best: per column, the best displayed mean is bold (``**x**`` in Markdown,
  ``\\bfseries`` in LaTeX), compared as displayed; ties are all bold; a column
  whose values are all equal, has fewer than two values, or whose metric has no
  direction has no bold. Directions: :data:`DIRECTIONS`. With ``bold="tied"``
  every cell not significantly worse than a best one is bold too: one-sided
  Welch t-test over seeds, p >= 0.05, at least two seeds on both sides.
  The note under the table states which spread, rule and agg were used.

Runs of the same configuration and seed (re-runs) count once: the newest is kept.
Runs that share a seed but differ in a param that is neither a row nor a
column key would be averaged across configurations; that is refused with a
ValueError naming the params that differ.

CSV is for machines: one row per row combination, and per column and metric
three numeric columns ``<metric> mean``, ``<metric> std``, ``<metric> n``
(``<metric> (<key>=<value>) mean`` with column keys), rounded like the other
formats; a missing cell has n = 0 and empty mean and std; no bold. With
``ci=True`` a ``<metric> ci95`` column (the half-width) follows the std.
"""

from __future__ import annotations

import csv
import io
import numbers
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Mapping, Sequence

from analysis.stats import (  # noqa: F401  (DIRECTIONS, DEFAULT_DIRECTION: re-exported)
    ALPHA,
    BOLD_CHOICES,
    CI_LEVEL,
    DEFAULT_DIRECTION,
    DIRECTION_CHOICES,
    DIRECTIONS,
    Cell,
    aggregate,
    apply_agg,
    bold_rows,
    ci_half_width,
    column_kinds,
    format_key_value,
    metric_direction,
    parse_agg,
)

if TYPE_CHECKING:  # pragma: no cover
    import pandas as pd

FORMATS = ("md", "latex", "csv")
DEFAULT_DECIMALS = 2
MISSING_MD = "—"
MISSING_LATEX = "---"

_CI_TEXT = {  # by tex
    False: f"half-width of the {CI_LEVEL:.0%} confidence interval (Student's t, n−1 degrees of "
           "freedom: t·s/√n)",
    True: rf"half-width of the {CI_LEVEL * 100:g}\,\% confidence interval (Student's $t$, $n-1$ "
          r"degrees of freedom: $t\,s/\sqrt{n}$)",
}
_TIED_TEXT = {  # by tex
    False: ", and every value not significantly worse than it (one-sided Welch's t-test over "
           f"seeds, α = {ALPHA:g}; with fewer than 2 seeds only the best)",
    True: ", and every value not significantly worse than it (one-sided Welch's $t$-test over "
          rf"seeds, $\alpha = {ALPHA:g}$; with fewer than 2 seeds only the best)",
}
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


def latex_escape(text: str) -> str:
    """Escape LaTeX's special characters (``_ % & $ # { } ~ ^ \\ < > |``) in plain text."""
    return "".join(_LATEX_SPECIAL.get(ch, ch) for ch in text)


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


def _fmt(x: float, d: int) -> str:
    text = f"{x:.{d}f}"
    return text.lstrip("-") if float(text) == 0 else text


def _best_rows(
    cells: dict[tuple[int, int, str], Cell],
    n_rows: int,
    ci: int,
    metric: str,
    d: int,
    direction: str,
    rule: str = "best",
) -> set[int]:
    """Rows to bold in column (ci, metric): see :func:`analysis.stats.bold_rows`."""
    column = {ri: cells[(ri, ci, metric)] for ri in range(n_rows) if cells[(ri, ci, metric)].n > 0}
    shown = {ri: float(_fmt(cell.mean, d)) for ri, cell in column.items()}
    return bold_rows(column, shown, direction, rule)


def _take_best(
    df: "pd.DataFrame",
    aggs: Mapping[str, str],
    dirs: Mapping[str, str],
    histories: Mapping[tuple[str, str], Sequence[float]] | None,
) -> "pd.DataFrame":
    """The run table with each ``best`` metric replaced by the best of each run's series."""
    best = [m for m, a in aggs.items() if a == "best"]
    if not best:
        return df
    undirected = [m for m in best if dirs[m] == "none"]
    if undirected:
        raise ValueError(
            f"agg 'best' needs a direction, but {undirected} has none (neither higher nor lower "
            "is better); use 'last' for it or give it a direction"
        )
    if histories is None:
        raise ValueError(
            "agg 'best' needs each run's logged series: pass "
            "histories=analysis.runs.load_histories(...) (table_command does)"
        )
    return apply_agg(df, best, histories, dirs)


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
    agg: str | Mapping[str, str] | None = "last",
    histories: Mapping[tuple[str, str], Sequence[float]] | None = None,
    ci: bool = False,
    bold: str = "best",
) -> str:
    """Render an ablation table of mean ± std (or ± 95 % CI) over seeds.

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
        agg: a run's value of a metric: ``last`` (final value) or ``best``
            (best of its logged series), for all metrics or per metric
            (``"psnr=best,loss=last"`` or a dict); see :func:`analysis.stats.parse_agg`.
        histories: ``(run_id, metric) -> series`` needed by ``best``, from
            :func:`analysis.runs.load_histories`.
        ci: show ± the half-width of the 95 % t-interval instead of ± std.
        bold: ``best`` (the best mean per column) or ``tied`` (also every cell
            not significantly worse than it, one-sided Welch test at 0.05).

    Returns:
        The table text.

    Raises:
        ValueError: unknown format, key, metric, direction, agg or bold rule
            (naming the choices); ``best`` without histories or for a metric
            without direction; no runs; a cell that would mix configurations.
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
    if bold not in BOLD_CHOICES:
        raise ValueError(f"unknown bold rule {bold!r}; choose one of {list(BOLD_CHOICES)}")
    given = metrics
    params, metric_cols = column_kinds(df)
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
    aggs = dict(zip(metrics, parse_agg(agg, given).values()))
    df = _take_best(df, aggs, dirs, histories)
    row_combos, col_combos, cells = aggregate(df, rows, cols, metrics, seed_key)
    table = _Table(rows, cols, metrics, row_combos, col_combos, cells, digits, dirs, seed_key,
                   ci=ci, bold=bold, aggs=aggs)
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
    ci: bool = False
    bold: str = "best"
    aggs: dict[str, str] = field(default_factory=dict)

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
            (ci, m): _best_rows(self.cells, len(self.row_combos), ci, m, self.digits[m],
                                self.dirs[m], self.bold)
            for ci, m in self.columns()
        }

    def cell_text(self, ri: int, ci: int, m: str, pm: str, missing: str) -> tuple[str, str]:
        """(value text, n mark) of one cell; the mark is empty when n is the usual n."""
        cell = self.cells[(ri, ci, m)]
        if cell.n == 0:
            return missing, ""
        d = self.digits[m]
        spread = ci_half_width(cell.std, cell.n) if self.ci else cell.std
        text = _fmt(cell.mean, d) if cell.n == 1 else f"{_fmt(cell.mean, d)}{pm}{_fmt(spread, d)}"
        mark = f"(n={cell.n})" if cell.n != self.usual_n() else ""
        return text, mark

    def note(self, pm: str, code: str, missing: str, up: str, down: str, tex: bool = False) -> str:
        """The line under the table: what a cell is, the usual n, and the marks and rules used."""
        n = self.usual_n()
        seeds = "seed" if n == 1 else "seeds"
        spread = _CI_TEXT[tex] if self.ci else "sample std (ddof=1)"
        parts = [f"Mean{pm}{spread} over seeds ({code}); n = {n} {seeds} per cell"]
        if any(self.cell_text(ri, ci, m, "", "")[1] for ri in range(len(self.row_combos))
               for ci, m in self.columns()):
            parts[0] += " unless marked (n=…)"
        parts[0] += "."
        if any(c.n == 1 for c in self.cells.values()):
            parts.append("A single seed shows its mean only.")
        if any(self.best().values()):
            tied = _TIED_TEXT[tex] if self.bold == "tied" else ""
            parts.append(f"Bold: best per column ({up} higher, {down} lower is better){tied}.")
        best = [m for m in self.metrics if self.aggs.get(m) == "best"]
        if best:
            names = ", ".join(rf"\texttt{{{latex_escape(m)}}}" if tex else f"`{m}`" for m in best)
            parts.append(f"{names}: each run's best logged value ({up} max, {down} min over its "
                         "series), not its last.")
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
            r"$\uparrow$", r"$\downarrow$", tex=True,
        ).replace("n=…", r"n=\ldots")
        lines += [r"\par\smallskip", rf"{{\footnotesize {note}\par}}", r"\end{table}"]
        return "\n".join(lines) + "\n"

    def csv(self) -> str:
        buf = io.StringIO()
        writer = csv.writer(buf, lineterminator="\n")
        header = list(self.rows)
        for ci, m in self.columns():
            name = f"{m} ({self.group_label(ci)})" if self.cols else m
            header += [f"{name} mean", f"{name} std"] + ([f"{name} ci95"] if self.ci else [])
            header.append(f"{name} n")
        writer.writerow(header)
        for ri, rc in enumerate(self.row_combos):
            out = [format_key_value(v) for v in rc]
            for ci, m in self.columns():
                cell, d = self.cells[(ri, ci, m)], self.digits[m]
                out += [_fmt(cell.mean, d) if cell.n else "", _fmt(cell.std, d) if cell.n > 1 else ""]
                if self.ci:
                    out.append(_fmt(ci_half_width(cell.std, cell.n), d) if cell.n > 1 else "")
                out.append(str(cell.n))
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
    agg: str | Mapping[str, str] | None = "last",
    ci: bool = False,
    bold: str = "best",
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
        agg: ``last``, ``best`` or per metric ``"psnr=best,loss=last"``; ``best``
            reads each run's logged series (MLflow metric history, or per-step
            rows of an export).
        ci: ± 95 % confidence interval instead of ± std.
        bold: ``best`` or ``tied``; see :func:`ablation_table`.

    Returns:
        The table text (also written to ``out`` when given).
    """
    if fmt not in FORMATS:
        raise ValueError(f"unknown table format {fmt!r}; choose one of {list(FORMATS)}")
    from analysis.runs import load_histories, load_runs

    df = load_runs(experiment, tracking_uri=tracking_uri, source=source,
                   include_unfinished=include_unfinished)
    names = _split_keys(metrics)
    best = [m.removeprefix("metrics.") for m, a in parse_agg(agg, names).items() if a == "best"]
    histories = (
        load_histories(experiment, list(df["run_id"]), best, tracking_uri=tracking_uri, source=source)
        if best else None
    )
    text = ablation_table(
        df, _split_keys(rows), _split_keys(cols), names, fmt=fmt, decimals=decimals,
        caption=caption, label=label, agg=agg, histories=histories, ci=ci, bold=bold,
    )
    if out is not None:
        path = Path(out)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text, encoding="utf-8")
    return text
