"""load_runs (MLflow and export files) and export_runs, on a real sqlite MLflow store."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from analysis.export import export_runs
from analysis.runs import load_runs
from analysis.table import table_command


def test_load_runs_one_row_per_finished_run(store) -> None:
    df = load_runs(store.experiment, tracking_uri=store.uri)
    finished = [r for r in store.runs if r.status == "FINISHED"]
    assert sorted(df["run_id"]) == sorted(r.run_id for r in finished)
    assert set(df["status"]) == {"FINISHED"}
    for run in finished:
        row = df.set_index("run_id").loc[run.run_id]
        for metric, value in run.final.items():
            assert row[metric] == value  # the final (latest-step) value, not an earlier epoch
        assert row["tag.cell_hash"] == run.tags["cell_hash"]
        assert row["data.image"] == run.image and row["model.solver"] == run.solver
    # a metric only anderson runs logged is NaN elsewhere
    fixed = df[df["model.solver"] == "fixed_point"]
    assert fixed["noise/0.05/psnr"].isna().all()


def test_load_runs_types_params_back(store) -> None:
    df = load_runs(store.experiment, tracking_uri=store.uri)
    assert df["seed"].dtype == np.int64
    assert df["data.size"].dtype == np.int64
    assert df["crr.init_std"].dtype == np.float64 and (df["crr.init_std"] == 1e-05).all()
    assert df["train.ift"].dtype == bool and df["train.ift"].all()
    # "None" (a YAML null) is missing: camera runs 4, astronaut runs <NA>
    acc = df.set_index("data.image")["data.acceleration"]
    assert str(acc.dtype) == "Int64"
    assert (acc.loc["camera"] == 4).all() and acc.loc["astronaut"].isna().all()
    assert df.attrs["params"] and "psnr" in df.attrs["metrics"] and "seed" in df.attrs["params"]
    assert "tag.world_size" in df.attrs["tags"]


def test_include_unfinished_keeps_failed_run(store) -> None:
    df = load_runs(store.experiment, tracking_uri=store.uri, include_unfinished=True)
    assert len(df) == len(store.runs)
    failed = [r for r in store.runs if r.status == "FAILED"]
    assert list(df.loc[df["status"] == "FAILED", "run_id"]) == [r.run_id for r in failed]


def test_unknown_experiment_lists_existing_names(store) -> None:
    with pytest.raises(ValueError, match="nope") as err:
        load_runs("nope", tracking_uri=store.uri)
    assert store.experiment in str(err.value) and store.other_experiment in str(err.value)


def test_missing_sqlite_store_is_refused_not_created(tmp_path: Path) -> None:
    db = tmp_path / "absent.db"
    with pytest.raises(ValueError, match="no MLflow store"):
        load_runs("abl", tracking_uri=f"sqlite:///{db}")
    assert not db.exists()


def test_tracking_uri_from_environment(store, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MLFLOW_TRACKING_URI", store.uri)
    assert len(load_runs(store.other_experiment)) == 1


def test_export_long_format_content(store, tmp_path: Path) -> None:
    out = export_runs(store.experiment, tmp_path / "sub" / "runs.parquet", tracking_uri=store.uri)
    long = pd.read_parquet(out)
    # one row per run and metric, every status exported
    assert len(long) == sum(len(r.final) for r in store.runs)
    assert set(long["status"]) == {"FINISHED", "FAILED"}
    for col in ("run_id", "metric", "value", "step", "seed", "git_commit", "host",
                "cell_hash", "start_time", "status", "param.data.image", "param.model.solver"):
        assert col in long.columns, col
    run = store.runs[4]
    rows = long[(long["run_id"] == run.run_id)].set_index("metric")
    assert set(rows.index) == set(run.final)
    for metric, value in run.final.items():
        assert rows.loc[metric, "value"] == value
        assert rows.loc[metric, "step"] == run.final_step[metric]
    assert (rows["seed"] == run.seed).all()
    assert (rows["cell_hash"] == run.tags["cell_hash"]).all()
    assert (rows["git_commit"] == "0123abc").all() and (rows["host"] == "testhost").all()
    assert (rows["tag.world_size"] == "1").all()


@pytest.mark.parametrize("suffix", [".parquet", ".csv"])
@pytest.mark.parametrize("include_unfinished", [False, True])
def test_round_trip_gives_same_wide_table(
    store, tmp_path: Path, suffix: str, include_unfinished: bool
) -> None:
    out = export_runs(store.experiment, tmp_path / f"runs{suffix}", tracking_uri=store.uri)
    direct = load_runs(store.experiment, tracking_uri=store.uri, include_unfinished=include_unfinished)
    back = load_runs(store.experiment, source=out, include_unfinished=include_unfinished)
    pd.testing.assert_frame_equal(back, direct)
    assert back.attrs == direct.attrs


def test_table_from_export_equals_table_from_mlflow(store, tmp_path: Path) -> None:
    out = export_runs(store.experiment, tmp_path / "runs.csv", tracking_uri=store.uri)
    args = dict(rows=["data.image"], cols=["model.solver"], metrics=["psnr", "nmse"], fmt="latex")
    assert table_command(store.experiment, source=out, **args) == table_command(
        store.experiment, tracking_uri=store.uri, **args
    )


def test_export_bad_suffix_and_wrong_experiment(store, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"\.parquet"):
        export_runs(store.experiment, tmp_path / "runs.xlsx", tracking_uri=store.uri)
    out = export_runs(store.other_experiment, tmp_path / "other.parquet", tracking_uri=store.uri)
    with pytest.raises(ValueError, match=store.other_experiment):
        load_runs(store.experiment, source=out)
    with pytest.raises(ValueError, match="does not exist"):
        load_runs(store.experiment, source=tmp_path / "absent.csv")
