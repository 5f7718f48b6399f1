"""``deqbench bench paper``: runs train through suite.training.fit, results survive a failing run."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from jobs.bench import paper
from suite.config import load_config

ROOT = Path(__file__).resolve().parents[2]


def test_paper_config_validates() -> None:
    cfg = yaml.safe_load((ROOT / "configs/bench/paper.yaml").read_text())
    runs = paper._merge(cfg)["runs"]
    assert {r["name"] for r in runs} >= {"crr_astronaut_s0", "crr_camera_s0", "deprox_deq_4x", "deprox_zf_4x"}
    for run in runs:  # every experiment and override is valid before a GPU hour is spent on it
        load_config(ROOT / run["experiment"], run.get("set") or {})


def test_paper_runs_tiny_and_isolates_a_failing_run(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(ROOT)
    out = tmp_path / "paper.json"
    cfg = {"out": str(out), "runs": [
        {"name": "bad", "experiment": "configs/experiments/crr_tiny.yaml", "set": {"deq.solver": "nope"}},
        {"name": "crr", "experiment": "configs/experiments/crr_tiny.yaml",
         "set": {"train.epochs": 3, "crr.epochs": 2, "data.size": 48}},
    ]}
    assert paper.main(cfg) == 1
    report = json.loads(out.read_text())
    assert "deq.solver" in report["runs"]["bad"]["error"]
    res = report["runs"]["crr"]["results"]
    assert res["crr/gain_db"] == pytest.approx(res["psnr"] - res["stage1/psnr"])
    assert res["crr/gain_db"] >= 0.0  # keep-best: never below the frozen DEQ
    assert res["time/stage1_epoch_s"] > 0 and res["time/stage2_epoch_s"] > 0


def test_paper_rejects_bad_config() -> None:
    with pytest.raises(ValueError, match="unknown key"):
        paper._merge({"runs": [], "gpus": 1})
    with pytest.raises(ValueError, match="runs\\[0\\]"):
        paper._merge({"runs": [{"experiment": "x.yaml"}]})


def test_missing_bench_config_file_is_an_error(tmp_path: Path) -> None:
    """A mistyped --config must not silently run the defaults (a long benchmark)."""
    import subprocess
    import sys

    out = subprocess.run([sys.executable, "-m", "jobs.cli", "bench", "paper", "--config", str(tmp_path / "nope.yaml")],
                         cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert out.returncode == 2 and "nope.yaml" in out.stderr and "no such" in out.stderr
