"""``--agg``, ``--ci`` and ``--bold tied`` against values computed by hand.

The runs are a hand-written long-format export with one row per epoch
(``step``), read through ``--source`` like a file from ``deqbench export``. Every
expectation below is worked out from the numbers in ``SERIES`` with closed
forms, not by calling the code under test:

- Student t quantiles: ``t_{0.975, 1} = tan(0.475·π)``; for two degrees of
  freedom the CDF is ``1/2 + t / (2·sqrt(2 + t²))``, so
  ``t_{0.975, 2} = 0.95·sqrt(2 / (1 − 0.95²)) = 4.3027``.
- Welch's test between two cells of three seeds with the same s has
  ``se = s·sqrt(2/3)`` and Welch–Satterthwaite degrees of freedom
  ``(2s²/3)² / (2·(s²/3)²/2) = 4``; with four degrees of freedom
  ``P(T > t) = 1/2 − 3x/4 + x³/4`` where ``x = t / sqrt(4 + t²)``
  (:func:`upper_tail_df4`).
"""

from __future__ import annotations

import io
import math
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from scipy import stats as sps

from analysis.stats import (
    Cell,
    bold_rows,
    ci_half_width,
    parse_agg,
    series_best,
    welch_p,
)
from analysis.runs import load_histories
from analysis.table import ablation_table, table_command
from jobs.cli import main

EXPERIMENT = "hand"
# (image, seed) -> metric -> series over epochs 0, 1, 2 (the last is the final value)
SERIES: dict[tuple[str, int], dict[str, list[float]]] = {}
for s in (0, 1, 2):
    SERIES[("a", s)] = {"psnr": [28.0 + s, 30.5 + s, 30.0 + s], "loss": [1.0, 0.1 + 0.1 * s, 0.6 + 0.1 * s]}
    SERIES[("b", s)] = {"psnr": [28.0 + s, 32.0 + s, 29.0 + s], "loss": [0.9, 0.8, 0.3 + 0.1 * s]}
    SERIES[("c", s)] = {"psnr": [24.0 + s, 24.5 + s, 25.0 + s], "loss": [2.0, 1.5, 1.0 + 0.1 * s]}
SERIES[("d", 0)] = {"psnr": [30.0, 30.9, 30.9], "loss": [1.0, 0.9, 0.8]}
# by hand, psnr (higher is better), mean and s over seeds:
#   last: a 31 (s=1), b 30 (s=1), c 26 (s=1), d 30.9 (n=1)
#   best: a 31.5 (30.5, 31.5, 32.5), b 33 (32, 33, 34), c 26, d 30.9
# loss (lower is better):
#   last: a 0.7 (s=0.1), b 0.4 (s=0.1), c 1.1 (s=0.1), d 0.8
#   best: a 0.2 (0.1, 0.2, 0.3), b 0.4, c 1.1, d 0.8

T975_DF2 = 0.95 * math.sqrt(2 / (1 - 0.95**2))  # 4.302652...
T975_DF1 = math.tan(0.475 * math.pi)  # 12.706204...


def upper_tail_df4(t: float) -> float:
    """P(T > t) for Student's t with 4 degrees of freedom (closed form of its CDF)."""
    x = t / math.sqrt(4 + t * t)
    return 0.5 - 0.75 * x + 0.25 * x**3


def write_export(path: Path, per_step: bool = True) -> Path:
    """A long-format export of SERIES: one row per run, metric and epoch (or the final only)."""
    rows = []
    for k, ((image, seed), metrics) in enumerate(SERIES.items()):
        for metric, series in metrics.items():
            steps = list(enumerate(series)) if per_step else [(len(series) - 1, series[-1])]
            for step, value in steps:
                rows.append({
                    "experiment": EXPERIMENT, "run_id": f"r-{image}-{seed}", "run_name": f"{image}-{seed}",
                    "status": "FINISHED", "start_time": f"2024-01-01T00:00:{k:02d}+00:00",
                    "git_commit": "abc", "host": "h", "cell_hash": f"{image}{seed}", "seed": seed,
                    "metric": metric, "value": value, "step": step,
                    "param.seed": seed, "param.data.image": image,
                })
    long = pd.DataFrame(rows)
    if path.suffix == ".parquet":
        long.to_parquet(path, index=False)
    else:
        long.to_csv(path, index=False)
    return path


@pytest.fixture(params=[".csv", ".parquet"])
def export(request, tmp_path: Path) -> Path:
    return write_export(tmp_path / f"hand{request.param}")


def parse_md(text: str) -> dict[tuple[str, str], str]:
    lines = [ln for ln in text.splitlines() if ln.startswith("|")]
    split = [[c.strip() for c in ln.strip("|").split(" | ")] for ln in lines]
    header, body = split[0], split[2:]
    return {(r[0], h): c for r in body for h, c in zip(header, r)}


def table(export: Path, **kw) -> str:
    return table_command(EXPERIMENT, "data.image", None, "psnr,loss", source=export, **kw)


def bold(cells: dict[tuple[str, str], str], header: str) -> set[str]:
    return {row for (row, h), c in cells.items() if h == header and c.startswith("**")}


# --- the statistics, by hand --------------------------------------------------------------


def test_t_quantiles_by_hand_match_the_ci_half_width() -> None:
    assert T975_DF2 == pytest.approx(4.302653, abs=1e-6)  # a t table's 4.303
    # three seeds 30, 31, 32: s = 1, half-width = 4.3027 / sqrt(3) = 2.4841
    assert ci_half_width(1.0, 3) == pytest.approx(T975_DF2 / math.sqrt(3), rel=1e-12)
    assert ci_half_width(1.0, 3) == pytest.approx(2.484138, abs=1e-6)
    # two seeds 1, 3: s = sqrt(2), half-width = 12.7062 · sqrt(2) / sqrt(2)
    assert ci_half_width(math.sqrt(2), 2) == pytest.approx(T975_DF1, rel=1e-12)
    assert math.isnan(ci_half_width(math.nan, 1)) and math.isnan(ci_half_width(0.0, 1))


def test_welch_p_by_hand() -> None:
    # a = (30, 31, 32), b = (29, 30, 31): t = 1 / sqrt(1/3 + 1/3) = 1.2247, df = 4
    a, b = Cell(3, 31.0, 1.0), Cell(3, 30.0, 1.0)
    p = upper_tail_df4(1 / math.sqrt(2 / 3))
    assert p == pytest.approx(0.143932, abs=1e-6)
    assert welch_p(a, b, "max") == pytest.approx(p, rel=1e-9)
    # lower is better: (0.3, 0.4, 0.5) against (0.5, 0.6, 0.7): t = 0.2 / (0.1·sqrt(2/3)) = 2.4495
    lo, hi = Cell(3, 0.4, 0.1), Cell(3, 0.6, 0.1)
    p = upper_tail_df4(0.2 / (0.1 * math.sqrt(2 / 3)))
    assert p == pytest.approx(0.035241, abs=1e-6)
    assert welch_p(lo, hi, "min") == pytest.approx(p, rel=1e-9)
    # the wrong way round the one-sided p-value is the other tail
    assert welch_p(b, a, "max") == pytest.approx(1 - upper_tail_df4(1 / math.sqrt(2 / 3)), rel=1e-9)


def test_welch_p_equals_ttest_ind_on_the_values_and_edge_cases() -> None:
    x, y = np.array([3.0, 5.0, 4.5, 6.0]), np.array([2.0, 4.0, 1.0])  # unequal n and variance
    expected = sps.ttest_ind(x, y, equal_var=False, alternative="greater").pvalue
    cx, cy = Cell(4, x.mean(), x.std(ddof=1)), Cell(3, y.mean(), y.std(ddof=1))
    assert welch_p(cx, cy, "max") == pytest.approx(expected, rel=1e-12)
    assert math.isnan(welch_p(Cell(1, 5.0, math.nan), cy, "max"))
    assert welch_p(Cell(3, 5.0, 0.0), Cell(3, 4.0, 0.0), "max") == 0.0  # no spread, strictly better
    assert welch_p(Cell(3, 5.0, 0.0), Cell(3, 5.0, 0.0), "max") == 1.0
    with pytest.raises(ValueError, match="'none'"):
        welch_p(cx, cy, "none")


def test_bold_rows_rules() -> None:
    cells = {0: Cell(3, 31.0, 1.0), 1: Cell(3, 30.0, 1.0), 2: Cell(3, 26.0, 1.0), 3: Cell(1, 30.9, math.nan)}
    shown = {ri: c.mean for ri, c in cells.items()}
    assert bold_rows(cells, shown, "max") == {0}
    # row 1: p = 0.144 >= 0.05; row 2: t = 5/0.8165, p = 0.0018; row 3: one seed
    assert upper_tail_df4(5 / math.sqrt(2 / 3)) < 0.05
    assert bold_rows(cells, shown, "max", "tied") == {0, 1}
    assert bold_rows(cells, shown, "max", "tied", alpha=0.2) == {0}  # 0.144 < 0.2
    assert bold_rows(cells, shown, "none", "tied") == set()
    same = {0: 1.0, 1: 1.0}
    assert bold_rows({0: cells[0], 1: cells[1]}, same, "max", "tied") == set()
    # the best has one seed: only it is bold
    assert bold_rows({0: Cell(1, 40.0, math.nan), 1: cells[0]}, {0: 40.0, 1: 31.0}, "max", "tied") == {0}
    with pytest.raises(ValueError, match="'best', 'tied'"):
        bold_rows(cells, shown, "max", "all")


def test_series_best_and_parse_agg() -> None:
    assert series_best([28.0, 30.5, 30.0], "max") == 30.5
    assert series_best([1.0, 0.1, math.nan, 0.6], "min") == 0.1
    assert math.isnan(series_best([math.nan], "max"))
    with pytest.raises(ValueError, match="'none'"):
        series_best([1.0], "none")
    assert parse_agg(None, ["psnr", "loss"]) == {"psnr": "last", "loss": "last"}
    assert parse_agg("best", ["psnr", "loss"]) == {"psnr": "best", "loss": "best"}
    assert parse_agg("psnr=best", ["psnr", "loss"]) == {"psnr": "best", "loss": "last"}
    assert parse_agg("best, loss=last", ["psnr", "loss"]) == {"psnr": "best", "loss": "last"}
    assert parse_agg({"loss": "best"}, ["psnr", "loss"]) == {"psnr": "last", "loss": "best"}
    with pytest.raises(ValueError, match=r"'mean'.*'last', 'best'"):
        parse_agg("mean", ["psnr"])
    with pytest.raises(ValueError, match=r"'ssim'.*\['psnr'\]"):
        parse_agg("ssim=best", ["psnr"])
    with pytest.raises(ValueError, match="more than one default"):
        parse_agg("best,last", ["psnr"])


# --- tables from the export ---------------------------------------------------------------


def test_default_table_is_last_value_mean_std_best_bold(export: Path) -> None:
    text = table(export)
    cells = parse_md(text)
    assert cells[("a", "psnr ↑")] == "**31.00 ± 1.00**"
    assert cells[("b", "psnr ↑")] == "30.00 ± 1.00"
    assert cells[("c", "psnr ↑")] == "26.00 ± 1.00"
    assert cells[("d", "psnr ↑")] == "30.90 (n=1)"
    assert cells[("b", "loss ↓")] == "**0.40 ± 0.10**" and cells[("a", "loss ↓")] == "0.70 ± 0.10"
    assert "Mean ± sample std (ddof=1) over seeds" in text
    assert "Bold: best per column (↑ higher, ↓ lower is better)." in text
    assert "Welch" not in text and "best logged value" not in text


def test_ci_shows_t_interval_half_width(export: Path) -> None:
    text = table(export, ci=True)
    cells = parse_md(text)
    hw = T975_DF2 * 1.0 / math.sqrt(3)  # 2.4841
    assert cells[("a", "psnr ↑")] == f"**31.00 ± {hw:.2f}**" == "**31.00 ± 2.48**"
    assert cells[("b", "loss ↓")] == f"**0.40 ± {T975_DF2 * 0.1 / math.sqrt(3):.2f}**" == "**0.40 ± 0.25**"
    assert cells[("d", "psnr ↑")] == "30.90 (n=1)"  # one seed: no interval
    assert "Mean ± half-width of the 95% confidence interval (Student's t, n−1 degrees" in text
    csv = pd.read_csv(io.StringIO(table(export, ci=True, fmt="csv"))).set_index("data.image")
    assert csv.loc["a", "psnr ci95"] == pytest.approx(2.48)
    assert csv.loc["a", "psnr std"] == pytest.approx(1.00)
    assert np.isnan(csv.loc["d", "psnr ci95"])
    assert "psnr ci95" not in table(export, fmt="csv")


def test_bold_tied_by_welch(export: Path) -> None:
    text = table(export, bold="tied")
    cells = parse_md(text)
    # psnr: a best; b not significantly worse (p = 0.144); c is (p = 0.0018); d has one seed
    assert bold(cells, "psnr ↑") == {"a", "b"}
    # loss: b best (0.4); a (0.7) and c (1.1) significantly worse: t = 0.3/0.0816, p < 0.05
    assert upper_tail_df4(0.3 / (0.1 * math.sqrt(2 / 3))) < 0.05
    assert bold(cells, "loss ↓") == {"b"}
    assert ("Bold: best per column (↑ higher, ↓ lower is better), and every value not significantly "
            "worse than it (one-sided Welch's t-test over seeds, α = 0.05; with fewer than 2 seeds "
            "only the best).") in text


def test_agg_best_takes_the_best_of_each_series(export: Path) -> None:
    cells = parse_md(table(export, agg="best"))
    # psnr, max over epochs: a 30.5, 31.5, 32.5; b 32, 33, 34 (b now wins); c is its last
    assert cells[("a", "psnr ↑")] == "31.50 ± 1.00"
    assert cells[("b", "psnr ↑")] == "**33.00 ± 1.00**"
    assert cells[("c", "psnr ↑")] == "26.00 ± 1.00"
    # loss, min over epochs: a 0.1, 0.2, 0.3 (a now wins); b, c their last
    assert cells[("a", "loss ↓")] == "**0.20 ± 0.10**"
    assert cells[("b", "loss ↓")] == "0.40 ± 0.10"
    # per metric: psnr best, loss last
    text = table(export, agg="psnr=best,loss=last")
    cells = parse_md(text)
    assert cells[("b", "psnr ↑")] == "**33.00 ± 1.00**" and cells[("a", "loss ↓")] == "0.70 ± 0.10"
    assert "`psnr`: each run's best logged value (↑ max, ↓ min over its series), not its last." in text


def test_agg_best_with_tied_and_ci_together(export: Path) -> None:
    cells = parse_md(table(export, agg="best", bold="tied", ci=True))
    # psnr best: a 31.5 vs b 33: t = 1.5 / sqrt(2/3) = 1.8371, p = 0.0700 >= 0.05: a is tied
    assert upper_tail_df4(1.5 / math.sqrt(2 / 3)) == pytest.approx(0.070033, abs=1e-6)
    assert bold(cells, "psnr ↑") == {"a", "b"}
    assert cells[("a", "psnr ↑")] == "**31.50 ± 2.48**"
    # loss best: a 0.2 vs b 0.4: t = 2.4495, p = 0.0352 < 0.05: b is significantly worse
    assert bold(cells, "loss ↓") == {"a"}


def test_latex_note_is_valid_latex_text(export: Path) -> None:
    text = table(export, agg="psnr=best", bold="tied", ci=True, fmt="latex")
    note = next(ln for ln in text.splitlines() if ln.startswith(r"{\footnotesize"))
    assert r"95\,\% confidence interval" in note and r"$\alpha = 0.05$" in note
    assert r"\texttt{psnr}: each run's best logged value ($\uparrow$ max" in note
    for raw in ("α", "±", "√", "−", "↑", "95%", "95 %"):
        assert raw not in note, raw


def test_load_histories_from_export(export: Path) -> None:
    hist = load_histories(EXPERIMENT, ["r-a-1", "r-d-0"], ["psnr"], source=export)
    assert hist == {("r-a-1", "psnr"): [29.0, 31.5, 31.0], ("r-d-0", "psnr"): [30.0, 30.9, 30.9]}
    assert load_histories(EXPERIMENT, [], ["psnr"], source=export) == {}


def test_agg_best_refuses_an_export_of_final_values(tmp_path: Path) -> None:
    finals = write_export(tmp_path / "finals.csv", per_step=False)
    assert parse_md(table(finals))[("a", "psnr ↑")] == "**31.00 ± 1.00**"  # last still works
    with pytest.raises(ValueError, match="one value per run and metric.*no --source"):
        table(finals, agg="best")


def test_agg_best_errors() -> None:
    runs = pd.DataFrame({
        "run_id": ["x", "y"], "seed": [0, 0], "data.image": ["a", "b"], "hfe": [1.0, 2.0],
    })
    with pytest.raises(ValueError, match=r"\['hfe'\] has none"):
        ablation_table(runs, ["data.image"], [], ["hfe"], agg="best", histories={})
    runs["psnr"] = [1.0, 2.0]
    with pytest.raises(ValueError, match="histories"):
        ablation_table(runs, ["data.image"], [], ["psnr"], agg="best")
    with pytest.raises(ValueError, match=r"'all'.*'best', 'tied'"):
        ablation_table(runs, ["data.image"], [], ["psnr"], bold="all")
    # a run without a stored series keeps its final value
    text = ablation_table(runs, ["data.image"], [], ["psnr"], agg="best", histories={("x", "psnr"): [5.0, 1.0]})
    assert "| a | **5.00** |" in text and "| b | 2.00 |" in text


def test_cli_agg_ci_bold(export: Path, capsys: pytest.CaptureFixture[str]) -> None:
    rc = main(["table", "--experiment", EXPERIMENT, "--rows", "data.image", "--metrics", "psnr,loss",
               "--source", str(export), "--agg", "psnr=best", "--ci", "--bold", "tied"])
    assert rc == 0
    cells = parse_md(capsys.readouterr().out)
    assert cells[("b", "psnr ↑")] == "**33.00 ± 2.48**" and cells[("a", "psnr ↑")] == "**31.50 ± 2.48**"
    assert cells[("b", "loss ↓")] == "**0.40 ± 0.25**"  # loss stays last
    rc = main(["table", "--experiment", EXPERIMENT, "--rows", "data.image", "--metrics", "psnr",
               "--source", str(export), "--agg", "psnr=mean"])
    assert rc == 2 and "'mean'" in capsys.readouterr().err
