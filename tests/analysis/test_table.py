"""Ablation tables from a real sqlite MLflow store (fixture ``store`` in conftest.py).

Expected means and stds are computed here with numpy from the numbers the
fixture logged, never from the code under test.
"""

from __future__ import annotations

import io
import re
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from analysis.runs import load_runs
from analysis.table import ablation_table, metric_direction, table_command

IMAGES = ("astronaut", "camera")
SOLVERS = ("anderson", "fixed_point")
ARROW = {"psnr": " ↑", "nmse": " ↓", "hfe": "", "solver/fwd_nstep": " ↓"}


@pytest.fixture(scope="module")
def runs(store) -> pd.DataFrame:
    return load_runs(store.experiment, tracking_uri=store.uri)


def parse_md(text: str) -> dict[tuple[str, str], str]:
    """Markdown table -> {(first column value, header): cell text}."""
    lines = [ln for ln in text.splitlines() if ln.startswith("|")]
    split = [[c.strip() for c in ln.strip("|").split(" | ")] for ln in lines]
    header, body = split[0], split[2:]
    assert all(len(r) == len(header) for r in body), text
    return {(r[0], h): c for r in body for h, c in zip(header, r)}


def md_header(metric: str, solver: str) -> str:
    return f"{metric}{ARROW[metric]} (model.solver={solver})"


def expected_text(values: np.ndarray, d: int = 2) -> str:
    mean, std = np.mean(values), np.std(values, ddof=1)
    return f"{mean:.{d}f} ± {std:.{d}f}"


def strip(cell: str) -> str:
    """Cell text without bold markers and n mark."""
    return re.sub(r"\s*\(n=\d+\)$", "", cell).replace("**", "")


def test_md_cells_are_mean_std_over_seeds_with_n(store, runs: pd.DataFrame) -> None:
    metrics = ["psnr", "nmse", "hfe", "solver/fwd_nstep"]
    text = ablation_table(runs, ["data.image"], ["model.solver"], metrics, decimals=3)
    cells = parse_md(text)
    for image in IMAGES:
        for solver in SOLVERS:
            if (image, solver) == store.missing:
                continue
            for m in metrics:
                vals = store.finals(image, solver, m)
                cell = cells[(image, md_header(m, solver))]
                assert strip(cell) == expected_text(vals, 3), (image, solver, m, cell)
                # n is shown only where it differs from the usual 3 (the FAILED seed)
                if len(vals) == 3:
                    assert "(n=" not in cell
                else:
                    assert cell.endswith(f"(n={len(vals)})"), cell
    assert "n = 3 seeds per cell" in text


def test_failed_run_is_excluded_unless_asked(store) -> None:
    # astronaut×anderson has a FAILED seed with PSNR 99 that would be best if counted
    kept = load_runs(store.experiment, tracking_uri=store.uri)
    with_failed = load_runs(store.experiment, tracking_uri=store.uri, include_unfinished=True)
    head = md_header("psnr", "anderson")
    cell = parse_md(ablation_table(kept, ["data.image"], ["model.solver"], ["psnr"]))[("astronaut", head)]
    assert strip(cell) == expected_text(store.finals("astronaut", "anderson", "psnr"))
    assert cell.endswith("(n=2)") and "**" not in cell
    cell = parse_md(ablation_table(with_failed, ["data.image"], ["model.solver"], ["psnr"]))[("astronaut", head)]
    assert strip(cell) == expected_text(store.finals("astronaut", "anderson", "psnr", include_failed=True))
    assert cell.startswith("**") and "(n=" not in cell


@pytest.mark.parametrize(
    ("metric", "pick"),
    [("psnr", np.argmax), ("nmse", np.argmin), ("solver/fwd_nstep", np.argmin)],
)
def test_md_bold_is_best_in_the_metric_direction(store, runs: pd.DataFrame, metric: str, pick) -> None:
    cells = parse_md(ablation_table(runs, ["data.image"], ["model.solver"], [metric]))
    means = [store.finals(image, "anderson", metric).mean() for image in IMAGES]
    best = IMAGES[int(pick(means))]
    for image in IMAGES:
        bold = cells[(image, md_header(metric, "anderson"))].startswith("**")
        assert bold == (image == best), (metric, image, means)


def test_hfe_has_no_bold_unless_overridden(store, runs: pd.DataFrame) -> None:
    assert metric_direction("hfe") == "none"
    cells = parse_md(ablation_table(runs, ["data.image"], ["model.solver"], ["hfe"]))
    assert not any("**" in c for c in cells.values())
    cells = parse_md(
        ablation_table(runs, ["data.image"], ["model.solver"], ["hfe"], directions={"hfe": "max"})
    )
    means = [store.finals(image, "anderson", "hfe").mean() for image in IMAGES]
    best = IMAGES[int(np.argmax(means))]
    assert cells[(best, "hfe ↑ (model.solver=anderson)")].startswith("**")


def test_no_bold_when_all_values_are_equal(runs: pd.DataFrame) -> None:
    same = runs.copy()
    same["psnr"] = 30.0
    cells = parse_md(ablation_table(same, ["data.image"], ["model.solver"], ["psnr"]))
    assert cells[("camera", md_header("psnr", "anderson"))] == "30.00 ± 0.00"
    assert not any("**" in c for c in cells.values())


def test_default_directions_table() -> None:
    assert metric_direction("psnr") == "max" and metric_direction("ssim") == "max"
    assert metric_direction("stage1/psnr") == "max" and metric_direction("crr/gain_db") == "max"
    for m in ("nmse", "loss", "sr", "solver/rel_lowest", "mem/peak_mb", "time/total_s",
              "noise/0.1/nmse"):
        assert metric_direction(m) == "min", m
    assert metric_direction("psnr", {"psnr": "min"}) == "min"
    assert metric_direction("noise/0.1/psnr", {"noise/*": "none"}) == "none"


def test_missing_combination_shows_dash_and_keeps_row(runs: pd.DataFrame) -> None:
    cells = parse_md(ablation_table(runs, ["data.image"], ["model.solver"], ["psnr", "nmse"]))
    assert cells[("camera", md_header("psnr", "fixed_point"))] == "—"
    assert cells[("camera", md_header("nmse", "fixed_point"))] == "—"
    assert cells[("camera", md_header("psnr", "anderson"))] != "—"
    assert "—: no runs." in ablation_table(runs, ["data.image"], ["model.solver"], ["psnr"])
    full = runs[runs["model.solver"] == "anderson"]
    assert "—" not in ablation_table(full, ["data.image"], ["model.solver"], ["psnr"])


def test_decimals_per_metric(store, runs: pd.DataFrame) -> None:
    text = ablation_table(runs, ["data.image"], ["model.solver"], ["psnr", "nmse"],
                          decimals={"psnr": 1, "nmse": 4})
    cells = parse_md(text)
    vals = store.finals("camera", "anderson", "psnr")
    assert strip(cells[("camera", md_header("psnr", "anderson"))]) == expected_text(vals, 1)
    vals = store.finals("camera", "anderson", "nmse")
    assert strip(cells[("camera", md_header("nmse", "anderson"))]) == expected_text(vals, 4)
    with pytest.raises(ValueError, match="ssim"):
        ablation_table(runs, ["data.image"], [], ["psnr"], decimals={"ssim": 3})


def test_no_cols_gives_one_column_per_metric(store, runs: pd.DataFrame) -> None:
    text = ablation_table(runs, ["data.image", "model.solver"], [], ["psnr", "nmse"])
    lines = [ln for ln in text.splitlines() if ln.startswith("|")]
    assert [c.strip() for c in lines[0].strip("|").split("|")] == [
        "data.image", "model.solver", "psnr ↑", "nmse ↓",
    ]
    # only observed combinations become rows: 3, not 2 × 2
    assert len(lines) == 2 + 3
    row = next(ln for ln in lines if "| camera | anderson |" in ln)
    assert expected_text(store.finals("camera", "anderson", "psnr")) in row


def test_single_seed_shows_mean_only(store, runs: pd.DataFrame) -> None:
    one = runs[runs["seed"] == 0]
    cells = parse_md(ablation_table(one, ["data.image"], ["model.solver"], ["psnr"]))
    value = store.finals("camera", "anderson", "psnr")[0]  # seed 0 was logged first
    assert strip(cells[("camera", md_header("psnr", "anderson"))]) == f"{value:.2f}"
    text = ablation_table(one, ["data.image"], ["model.solver"], ["psnr"])
    assert "n = 1 seed per cell." in text and "A single seed shows its mean only." in text


def test_mixing_configurations_is_refused(runs: pd.DataFrame) -> None:
    # without model.solver as a key, each image cell would average two solvers
    with pytest.raises(ValueError, match="model.solver"):
        ablation_table(runs, ["data.image"], [], ["psnr"])


def test_reruns_of_one_configuration_count_once(store, runs: pd.DataFrame) -> None:
    rerun = runs[(runs["data.image"] == "camera") & (runs["seed"] == 1)].copy()
    rerun["run_id"] = "rerun"
    rerun["start_time"] = rerun["start_time"] + pd.Timedelta(hours=1)
    rerun["psnr"] = 50.0
    both = pd.concat([runs, rerun], ignore_index=True)
    both.attrs = runs.attrs
    cells = parse_md(ablation_table(both, ["data.image"], ["model.solver"], ["psnr"]))
    vals = store.finals("camera", "anderson", "psnr")
    vals[1] = 50.0  # the newest run of seed 1 replaces the older one
    assert strip(cells[("camera", md_header("psnr", "anderson"))]) == expected_text(vals)
    # a run that differs in a key used for the table is not a re-run
    rerun["tag.world_size"] = "2"
    both = pd.concat([runs, rerun], ignore_index=True)
    both.attrs = runs.attrs
    text = ablation_table(both, ["data.image", "tag.world_size"], ["model.solver"], ["psnr"])
    assert "| camera | 2 | **50.00** (n=1) | — |" in text
    assert f"| camera | 1 | {expected_text(store.finals('camera', 'anderson', 'psnr'))} | — |" in text


def test_without_attrs_the_table_is_the_same(runs: pd.DataFrame) -> None:
    # a frame built elsewhere (e.g. concatenated) has no attrs: params/metrics are guessed
    plain = runs.copy()
    plain.attrs = {}
    args = (["data.image"], ["model.solver"], ["psnr", "nmse"])
    assert ablation_table(plain, *args) == ablation_table(runs, *args)


def test_csv_parses_back_with_pandas(store, runs: pd.DataFrame) -> None:
    text = ablation_table(runs, ["data.image"], ["model.solver"], ["psnr", "nmse"], fmt="csv",
                          decimals=3)
    table = pd.read_csv(io.StringIO(text)).set_index("data.image")
    for image in IMAGES:
        for solver in SOLVERS:
            for m in ("psnr", "nmse"):
                name = f"{m} (model.solver={solver})"
                vals = store.finals(image, solver, m)
                assert table.loc[image, f"{name} n"] == len(vals)
                if (image, solver) == store.missing:
                    assert np.isnan(table.loc[image, f"{name} mean"])
                    continue
                assert table.loc[image, f"{name} mean"] == pytest.approx(round(vals.mean(), 3))
                assert table.loc[image, f"{name} std"] == pytest.approx(round(vals.std(ddof=1), 3))


def latex_row(text: str, first: str) -> list[str]:
    line = next(ln for ln in text.splitlines() if ln.startswith(first + " &"))
    return [c.strip() for c in line.removesuffix(r"\\").strip().split(" & ")]


def test_latex_booktabs_bold_escaping_caption(store, runs: pd.DataFrame) -> None:
    text = ablation_table(runs, ["data.image"], ["model.solver"], ["psnr", "nmse"], fmt="latex",
                          caption="PSNR & NMSE, 100% of seeds", label="tab:abl")
    for token in (r"\toprule", r"\midrule", r"\bottomrule", r"\label{tab:abl}",
                  r"\caption{PSNR \& NMSE, 100\% of seeds}", r"model.solver=fixed\_point",
                  r"\cmidrule(lr){2-3}", r"\cmidrule(lr){4-5}"):
        assert token in text, token
    assert "fixed_point" not in text.replace(r"fixed\_point", "")
    psnr_means = [store.finals(i, "anderson", "psnr").mean() for i in IMAGES]
    nmse_means = [store.finals(i, "anderson", "nmse").mean() for i in IMAGES]
    for k, image in enumerate(IMAGES):
        cells = latex_row(text, image)
        assert len(cells) == 5
        assert cells[1].startswith(r"\bfseries") == (k == int(np.argmax(psnr_means)))
        assert cells[2].startswith(r"\bfseries") == (k == int(np.argmin(nmse_means)))
    assert latex_row(text, "camera")[3:] == ["---", "---"]
    vals = store.finals("camera", "anderson", "psnr")
    assert f"{vals.mean():.2f} $\\pm$ {vals.std(ddof=1):.2f}" in latex_row(text, "camera")[1]


@pytest.mark.latex
@pytest.mark.skipif(
    shutil.which("pdflatex") is None,
    reason="pdflatex not installed (scripts/install_tools.sh, or apt-get install texlive-latex-base "
           "texlive-latex-recommended)",
)
def test_latex_compiles(runs: pd.DataFrame, tmp_path: Path) -> None:
    table = ablation_table(runs, ["data.image"], ["model.solver"], ["psnr", "nmse", "hfe"],
                           fmt="latex", caption="DEQ-INR: solver_ablation 100% & more #1",
                           label="tab:solver_ablation")
    doc = (
        "\\documentclass{article}\n\\usepackage{booktabs}\n\\begin{document}\n"
        + table + "\\end{document}\n"
    )
    (tmp_path / "t.tex").write_text(doc, encoding="utf-8")
    proc = subprocess.run(
        ["pdflatex", "-interaction=nonstopmode", "-halt-on-error", "t.tex"],
        cwd=tmp_path, capture_output=True, text=True, timeout=120,
    )
    assert proc.returncode == 0, proc.stdout[-3000:]
    assert (tmp_path / "t.pdf").stat().st_size > 0


def test_unknown_keys_name_the_key_and_the_choices(runs: pd.DataFrame) -> None:
    with pytest.raises(ValueError, match=r"'data\.imag'.*data\.image"):
        ablation_table(runs, ["data.imag"], [], ["psnr"])
    with pytest.raises(ValueError, match=r"'model\.solv'.*model\.solver"):
        ablation_table(runs, ["data.image"], ["model.solv"], ["psnr"])
    with pytest.raises(ValueError, match=r"'psnrr'.*'psnr'"):
        ablation_table(runs, ["data.image"], ["model.solver"], ["psnrr"])
    with pytest.raises(ValueError, match=r"'seed'.*metrics.*'psnr'"):  # a param is not a metric
        ablation_table(runs, ["data.image"], ["model.solver"], ["seed"])
    with pytest.raises(ValueError, match=r"'html'.*md.*latex.*csv"):
        ablation_table(runs, ["data.image"], ["model.solver"], ["psnr"], fmt="html")
    with pytest.raises(ValueError, match="both rows and cols"):
        ablation_table(runs, ["data.image"], ["data.image"], ["psnr"])
    with pytest.raises(TypeError, match="list of keys"):
        ablation_table(runs, "data.image", [], ["psnr"])


def test_table_command_writes_file_and_accepts_comma_lists(store, tmp_path: Path) -> None:
    out = tmp_path / "tables" / "abl.md"
    text = table_command(store.experiment, "data.image", "model.solver", "psnr,nmse", "md",
                         out=out, tracking_uri=store.uri)
    assert out.read_text(encoding="utf-8") == text
    direct = ablation_table(load_runs(store.experiment, tracking_uri=store.uri),
                            ["data.image"], ["model.solver"], ["psnr", "nmse"])
    assert text == direct


def test_agg_best_reads_mlflow_histories(store) -> None:
    # the fixture logs each metric over 3 epochs: v - 3·0.7, v - 2·0.7, v (the final).
    # PSNR (higher is better) is best at its last epoch, NMSE (lower is better) at its first.
    text = table_command(store.experiment, "data.image", "model.solver", "psnr,nmse", "md",
                         tracking_uri=store.uri, decimals=3, agg="best")
    cells = parse_md(text)
    for image in IMAGES:
        for solver in SOLVERS:
            if (image, solver) == store.missing:
                continue
            psnr = store.finals(image, solver, "psnr")
            nmse = store.finals(image, solver, "nmse") - 3 * 0.7
            assert strip(cells[(image, md_header("psnr", solver))]) == expected_text(psnr, 3)
            assert strip(cells[(image, md_header("nmse", solver))]) == expected_text(nmse, 3)
    assert "`psnr`, `nmse`: each run's best logged value (↑ max, ↓ min over its series)" in text
    per_metric = table_command(store.experiment, "data.image", "model.solver", "psnr,nmse", "md",
                               tracking_uri=store.uri, decimals=3, agg="nmse=best")
    assert parse_md(per_metric) == cells
    assert table_command(store.experiment, "data.image", "model.solver", "psnr,nmse", "md",
                         tracking_uri=store.uri, agg="last") == table_command(
        store.experiment, "data.image", "model.solver", "psnr,nmse", "md", tracking_uri=store.uri)


def test_ci_cells_are_t_interval_half_widths(store, runs: pd.DataFrame) -> None:
    from scipy.stats import t

    text = ablation_table(runs, ["data.image"], ["model.solver"], ["psnr", "nmse"], decimals=3, ci=True)
    cells = parse_md(text)
    for image in IMAGES:
        for solver in SOLVERS:
            if (image, solver) == store.missing:
                continue
            for m in ("psnr", "nmse"):
                vals = store.finals(image, solver, m)  # n = 2 for the cell with the FAILED seed
                half = t.ppf(0.975, len(vals) - 1) * np.std(vals, ddof=1) / np.sqrt(len(vals))
                assert strip(cells[(image, md_header(m, solver))]) == f"{np.mean(vals):.3f} ± {half:.3f}"
    assert "Mean ± half-width of the 95% confidence interval" in text and "sample std" not in text


@pytest.mark.filterwarnings("ignore:Precision loss occurred:RuntimeWarning")  # equal step counts
@pytest.mark.parametrize("include_failed", [False, True])
@pytest.mark.parametrize(("metric", "alternative"),
                         [("psnr", "greater"), ("nmse", "less"), ("solver/fwd_nstep", "less")])
def test_bold_tied_is_best_plus_rows_not_significantly_worse(
    store, metric: str, alternative: str, include_failed: bool
) -> None:
    from scipy.stats import ttest_ind

    df = load_runs(store.experiment, tracking_uri=store.uri, include_unfinished=include_failed)
    header = md_header(metric, "anderson")  # the one column with two rows
    plain = parse_md(ablation_table(df, ["data.image"], ["model.solver"], [metric]))
    text = ablation_table(df, ["data.image"], ["model.solver"], [metric], bold="tied")
    tied = parse_md(text)
    best = [i for i in IMAGES if plain[(i, header)].startswith("**")]
    assert len(best) == 1
    for image in IMAGES:
        if image in best:
            assert tied[(image, header)].startswith("**")
            continue
        p = ttest_ind(store.finals(best[0], "anderson", metric, include_failed),
                      store.finals(image, "anderson", metric, include_failed),
                      equal_var=False, alternative=alternative).pvalue
        assert tied[(image, header)].startswith("**") == (p >= 0.05), (image, p)
    assert "one-sided Welch's t-test over seeds, α = 0.05" in text


def test_bold_tied_with_an_outlier_seed_bolds_both(store) -> None:
    # with the FAILED seed's PSNR of 99, astronaut×anderson is best but so spread out
    # (n = 3) that camera×anderson is not significantly worse
    from scipy.stats import ttest_ind

    df = load_runs(store.experiment, tracking_uri=store.uri, include_unfinished=True)
    astro = store.finals("astronaut", "anderson", "psnr", include_failed=True)
    camera = store.finals("camera", "anderson", "psnr")
    assert ttest_ind(astro, camera, equal_var=False, alternative="greater").pvalue >= 0.05
    cells = parse_md(ablation_table(df, ["data.image"], ["model.solver"], ["psnr"], bold="tied"))
    assert cells[("astronaut", md_header("psnr", "anderson"))].startswith("**")
    assert cells[("camera", md_header("psnr", "anderson"))].startswith("**")
