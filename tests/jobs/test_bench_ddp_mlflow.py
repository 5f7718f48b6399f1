"""``deqbench bench ddp`` and ``deqbench bench mlflow_overhead`` at tiny scale.

ddp: a 1-rank and a 2-rank run of the same tiny DEQ-INR cell through the local
launcher's runner (torchrun for 2 ranks), both with the same epochs logged.
mlflow_overhead: after the bench, the MLflow store holds exactly what each
tracker received -- no step lost, none duplicated.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
TINY_INR = str(REPO / "configs/experiments/deq_inr_tiny.yaml")


# ---------------------------------------------------------------------- ddp


def test_ddp_config_errors():
    from jobs.bench import ddp

    with pytest.raises(ValueError, match="unknown key.*'ranks'"):
        ddp.merge_config({"ranks": 2})
    with pytest.raises(ValueError, match="'2ranks'.*RxT"):
        ddp.merge_config({"experiment": TINY_INR, "variants": ["1x1", "2ranks"]})
    with pytest.raises(ValueError, match="0x1"):
        ddp.parse_variant("0x1")
    with pytest.raises(ValueError, match="repeats"):
        ddp.merge_config({"experiment": TINY_INR, "repeats": 0})
    with pytest.raises(ValueError, match="warmup_epochs"):  # nothing left to time
        ddp.merge_config({"experiment": TINY_INR, "set": {"train.epochs": 1}, "warmup_epochs": 1})
    with pytest.raises(ValueError, match="deprox"):
        ddp.merge_config({"experiment": str(REPO / "configs/experiments/deprox_tiny.yaml")})
    with pytest.raises(ValueError, match="train.epochs"):  # the experiment config is validated too
        ddp.merge_config({"experiment": TINY_INR, "set": {"train.epochs": "many"}})
    assert ddp.parse_variant("2x1") == (2, 1)


def test_ddp_summary_and_speedups_from_runs():
    """The summary's arithmetic on hand-made runs: per-run medians after warm-up, then medians, ratios."""
    from jobs.bench import ddp

    runs = {"1x1": [{"epoch_s": [9.0, 2.0, 2.2, 2.1], "fwd_nstep": 16.0, "final_loss": 0.5, "wall_s": 10.0},
                    {"epoch_s": [9.0, 2.4, 2.6, 2.5], "fwd_nstep": 16.0, "final_loss": 0.5, "wall_s": 11.0}],
            "2x1": [{"epoch_s": [9.0, 1.0, 1.1, 1.05], "fwd_nstep": 16.0, "final_loss": 0.5, "wall_s": 12.0},
                    {"epoch_s": [9.0, 1.0, 1.0, 1.0], "fwd_nstep": 16.0, "final_loss": 0.5, "wall_s": 13.0}]}
    s = ddp.summarise(runs, warmup=1, pixels=100)
    assert s["1x1"]["epoch_s_runs"] == [2.1, 2.5] and s["1x1"]["epoch_s"] == pytest.approx(2.3)
    assert s["2x1"]["epoch_s"] == pytest.approx(1.025)
    assert s["2x1"]["px_per_s"] == pytest.approx(100 / 1.025)
    sp = ddp.speedups(s, runs, warmup=1)
    assert set(sp) == {"1x1"} and sp["1x1"]["ratio"] == pytest.approx(2.3 / 1.025)
    assert sp["1x1"]["paired_min"] == pytest.approx(2.1 / 1.05) and sp["1x1"]["paired_max"] == pytest.approx(2.5)


@pytest.mark.slow
def test_ddp_bench_runs_one_and_two_ranks(tmp_path):
    """Both variants finish through the real launcher path with the same logged epochs; 2 ranks = 2 ranks."""
    from jobs.bench import ddp

    cfg = {"experiment": TINY_INR, "set": {"train.epochs": 3, "train.batch_size": 500},
           "variants": ["1x1", "2x1"], "repeats": 1, "workdir": str(tmp_path / "w"), "out": str(tmp_path / "o.json")}
    res = ddp.run_bench(cfg)
    one, two = res["runs"]["1x1"][0], res["runs"]["2x1"][0]
    assert one["state"] == two["state"] == "FINISHED"
    assert one["epochs"] == two["epochs"] == [0, 1, 2]
    assert len(one["epoch_s"]) == len(two["epoch_s"]) == 3 and min(one["epoch_s"] + two["epoch_s"]) > 0
    assert (one["world_size"], two["world_size"]) == (1, 2)
    # same global batches: the 2-rank run trains the same model up to float rounding
    assert two["final_loss"] == pytest.approx(one["final_loss"], rel=1e-4)
    assert res["pixels_per_epoch"] == 45 * 45
    assert set(res["speedup_2x1"]) == {"1x1"}
    # each variant wrote its own work directory (the runs were not resumed from one another)
    assert one["run_id"] != two["run_id"]
    assert all((tmp_path / "w" / tag / "status.json").is_file() for tag in ("1x1_r0", "2x1_r0"))


# ------------------------------------------------------------ mlflow_overhead


def test_mlflow_overhead_config_errors():
    from jobs.bench import mlflow_overhead as mo

    with pytest.raises(ValueError, match="unknown key.*'step'"):
        mo.merge_config({"step": 1})
    with pytest.raises(ValueError, match="'wandb'"):
        mo.merge_config({"experiment": TINY_INR, "trackers": ["none", "wandb"]})
    with pytest.raises(ValueError, match="must include 'none'"):
        mo.merge_config({"experiment": TINY_INR, "trackers": ["none", "memory"]})
    with pytest.raises(ValueError, match="flush_epochs"):
        mo.merge_config({"experiment": TINY_INR, "flush_epochs": [0]})
    with pytest.raises(ValueError, match="data.size"):
        mo.merge_config({"experiment": TINY_INR, "set": {"data.size": 1}})


def test_timed_tracker_counts_and_copies():
    from jobs.bench.mlflow_overhead import TimedTracker
    from suite.training import MemoryTracker

    inner = MemoryTracker()
    t = TimedTracker(inner)
    t.log_metrics({"loss": 1.5, "psnr": 20}, step=3)
    t.log_metrics({"loss": 1.25}, step=4)
    t.flush()  # MemoryTracker has no flush: nothing timed
    assert t.log_calls == 2 and t.log_s > 0 and (t.flushes, t.flush_s) == (0, 0.0)
    assert t.logged == {"loss": [(3, 1.5), (4, 1.25)], "psnr": [(3, 20.0)]}
    assert inner.history["loss"] == [(3, 1.5), (4, 1.25)]


def _history(client, run_id, key):
    return sorted((m.step, m.value) for m in client.get_metric_history(run_id, key))


def test_mlflow_overhead_store_holds_exactly_what_was_logged(tmp_path, monkeypatch):
    from mlflow.tracking import MlflowClient

    from jobs.bench import mlflow_overhead as mo

    cfg = {"experiment": TINY_INR, "set": {"train.epochs": 5, "train.ckpt_every": 2, "data.size": 41},
           "repeats": 1, "warmup_fits": 0, "flush_epochs": [3, 2], "flush_repeats": 2, "unbuffered_steps": 4,
           "paper_ckpt_every": 2, "store": str(tmp_path / "store"), "out": str(tmp_path / "o.json")}
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    res = mo.run_bench(cfg)
    # the fluent API's global URI does not leak into later processes (a sweep's cells would log there)
    assert "MLFLOW_TRACKING_URI" not in os.environ
    client = MlflowClient(res["uri"])
    (fit,) = res["fits"]["mlflow"]
    # flushed before the checkpoints after epochs 2 and 4, and once at the end
    assert fit["flushes"] == 3 and fit["epochs"] == 5
    run = client.get_run(fit["run_id"])
    assert run.info.status == "FINISHED"
    assert set(run.data.metrics) == set(fit["logged"])
    for key, logged in fit["logged"].items():
        assert _history(client, fit["run_id"], key) == sorted(logged), key
    assert [s for s, _ in _history(client, fit["run_id"], "loss")] == [0, 1, 2, 3, 4]
    # The flush run: 2 x 3 + 2 x 2 buffered epochs, each step once, every key of an epoch row.
    row_keys = set(mo._epoch_row(res["fits"]["mlflow"]))
    assert res["keys_per_epoch"] == len(row_keys) >= 5
    flush_run = client.get_run(res["flush"]["run_id"])
    assert set(flush_run.data.metrics) == row_keys and res["flush"]["steps"] == 10
    for key in row_keys:
        assert [s for s, _ in _history(client, res["flush"]["run_id"], key)] == list(range(10)), key
    for rid in (res["unbuffered"]["fluent_run_id"], res["unbuffered"]["log_batch_run_id"]):
        assert [s for s, _ in _history(client, rid, "loss")] == [0, 1, 2, 3]
    # the overhead is MLflow's tracker time minus the null tracker's, per step
    s = res["summary"]
    assert s["overhead_ms"] == pytest.approx(s["trackers"]["mlflow"]["tracker_ms_per_step"]
                                             - s["trackers"]["none"]["tracker_ms_per_step"])
    assert s["trackers"]["none"]["flushes"] == 0 and s["trackers"]["mlflow"]["flushes"] == 3
