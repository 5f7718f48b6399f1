"""End to end through the CLI: config → local launcher → node job → MLflow (a real SQLite store)."""

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from mlflow.tracking import MlflowClient

REPO = Path(__file__).resolve().parents[2]
TINY = REPO / "configs/experiments/crr_tiny.yaml"


def deqbench(*args, cwd):
    return subprocess.run([sys.executable, "-m", "jobs.cli", *map(str, args)], cwd=cwd, capture_output=True, text=True, timeout=600)


def runs(tmp, experiment):
    c = MlflowClient(f"sqlite:///{tmp}/mlflow.db")
    exp = c.get_experiment_by_name(experiment)
    return c, ([] if exp is None else c.search_runs([exp.experiment_id]))


@pytest.fixture(scope="module")
def sweep_dir(tmp_path_factory):
    """A 3-cell sweep (2 seeds + one cell whose image file is missing), run once."""
    tmp = tmp_path_factory.mktemp("sweep")
    spec = {
        "name": "t_sweep",
        "base": str(TINY),
        "set": {"train.epochs": 2, "crr.epochs": 2},
        "seeds": [0, 1],
        "groups": [{}, {"seeds": [0], "set": {"data.image": str(tmp / "missing.png"), "train.epochs": 2, "crr.epochs": 2}}],
    }
    (tmp / "sweep.yaml").write_text(yaml.safe_dump(spec))
    first = deqbench("sweep", "sweep.yaml", "--workers", "2", cwd=tmp)
    return tmp, first


def test_sweep_runs_cells_and_isolates_the_failure(sweep_dir):
    tmp, first = sweep_dir
    assert first.returncode == 1, first.stderr
    assert "3 cells, 0 already finished, 3 to run" in first.stdout
    assert "2 finished, 1 failed" in first.stdout
    assert "neither a bundled sample" in first.stdout  # the reason reaches the user
    assert "deqbench ui" in first.stdout
    client, found = runs(tmp, "t_sweep")
    states = sorted(r.info.status for r in found)
    assert states == ["FAILED", "FINISHED", "FINISHED"]
    failed = next(r for r in found if r.info.status == "FAILED")
    assert "missing.png" in failed.data.tags["failure_reason"]
    status = [json.loads(p.read_text()) for p in (tmp / "runs/t_sweep").glob("*/status.json")]
    assert sorted(s["state"] for s in status) == ["FAILED", "FINISHED", "FINISHED"]
    done = [s for s in status if s["state"] == "FINISHED"]
    # --workers 2: the two cells ran in separate processes at the same time
    assert done[0]["pid"] != done[1]["pid"]
    assert max(s["started"] for s in done) < min(s["ended"] for s in done)


def test_finished_run_records_what_the_design_lists(sweep_dir):
    tmp, _ = sweep_dir
    client, found = runs(tmp, "t_sweep")
    run = next(r for r in found if r.info.status == "FINISHED")
    p, t, m = run.data.params, run.data.tags, run.data.metrics
    assert p["family"] == "crr" and p["deq.solver"] == "anderson" and p["data.image"] == "camera"
    assert p["seed"] in ("0", "1") and p["crr.init_std"] == "1e-05"
    for tag in ("cell_hash", "git_commit", "host", "world_size", "version.torch", "version.torchdeq"):
        assert t.get(tag), tag
    for key in ("psnr", "ssim", "nmse", "vif", "hfe", "sr", "loss", "solver/fwd_nstep", "solver/bwd_nstep",
                "solver/abs_lowest", "solver/rel_lowest", "mem/peak_mb", "time/epoch_s", "time/total_s",
                "stage1/psnr", "crr/gain_db"):
        assert key in m, key
    steps = [x.step for x in client.get_metric_history(run.info.run_id, "loss")]
    assert steps == [0, 1, 2, 3]  # 2 + 2 epochs, each once
    arts = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"config.yaml", "reconstruction.png", "stage1.png", "residual.png", "images.pt", "metrics.json", "solver_trace.json"} <= arts


def test_rerun_skips_finished_and_retries_failed(sweep_dir):
    tmp, _ = sweep_dir
    again = deqbench("sweep", "sweep.yaml", cwd=tmp)
    assert "3 cells, 2 already finished, 1 to run" in again.stdout
    _, found = runs(tmp, "t_sweep")
    assert sorted(r.info.status for r in found) == ["FAILED", "FAILED", "FINISHED", "FINISHED"]
    st = deqbench("status", "sweep.yaml", cwd=tmp)
    assert st.returncode == 1 and "3 cells: 1 failed, 2 finished" in st.stdout  # a FAILED cell: exit 1


def test_rerun_of_finished_sweep_runs_nothing(tmp_path):
    spec = {"name": "t_done", "base": str(TINY), "set": {"train.epochs": 1, "crr.epochs": 1}, "seeds": [3]}
    (tmp_path / "s.yaml").write_text(yaml.safe_dump(spec))
    assert deqbench("sweep", "s.yaml", cwd=tmp_path).returncode == 0
    again = deqbench("sweep", "s.yaml", cwd=tmp_path)
    assert again.returncode == 0 and "nothing to run" in again.stdout
    assert len(runs(tmp_path, "t_done")[1]) == 1


@pytest.mark.parametrize("bad, words", [
    (["--set", "deq.solver=newton"], ["deq.solver", "newton", "anderson, broyden, fixed_point_iter"]),
    (["--set", "model.width=3"], ["model.width", "valid keys"]),
])
def test_invalid_config_refused_before_anything_runs(tmp_path, bad, words):
    spec = {"name": "t_bad", "base": str(TINY), "seeds": [0, 1]}
    (tmp_path / "s.yaml").write_text(yaml.safe_dump(spec))
    out = deqbench("sweep", "s.yaml", *bad, cwd=tmp_path)
    assert out.returncode == 2
    for w in words:
        assert w in out.stderr
    assert not (tmp_path / "runs").exists()
    assert runs(tmp_path, "t_bad")[1] == []  # no MLflow run was created


def test_unknown_sweep_key_refused(tmp_path):
    (tmp_path / "s.yaml").write_text(yaml.safe_dump({"name": "x", "base": str(TINY), "axis": {"seed": [1]}}))
    out = deqbench("sweep", "s.yaml", cwd=tmp_path)
    assert out.returncode == 2 and "unknown sweep key 'axis'" in out.stderr


@pytest.mark.slow  # ~1-3 min; the same property is tested on Slurm in test_requeue.py
def test_killed_cell_resumes_into_the_same_run(tmp_path):
    """SIGTERM mid-training (as Slurm sends on timeout), then run again: same run, every epoch once."""
    over = ["--set", "train.epochs=40", "--set", "crr.epochs=4", "--set", "train.ckpt_every=5", "--set", "data.size=64"]
    dry = deqbench("sweep", _one_cell_sweep(tmp_path), "--dry-run", *over, cwd=tmp_path)
    workdir = Path(dry.stdout.split("→ ")[1].split()[0])
    from jobs.cells import Cell  # noqa: F401 - import check
    cmd = [sys.executable, "-m", "jobs.cli", "sweep", "s.yaml", *over]
    proc = subprocess.Popen(cmd, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 300
    while not list((workdir / "ckpt").glob("ckpt_*.pt")) and time.time() < deadline:
        time.sleep(0.2)
    node = _node_pid(workdir)
    import os
    os.kill(node, signal.SIGTERM)
    proc.communicate(timeout=120)
    status = json.loads((workdir / "status.json").read_text())
    assert status["state"] == "KILLED"
    run_id = status["run_id"]
    again = deqbench("sweep", "s.yaml", *over, cwd=tmp_path)
    assert again.returncode == 0, again.stdout + again.stderr
    client, found = runs(tmp_path, "t_kill")
    assert [r.info.run_id for r in found] == [run_id]
    assert found[0].info.status == "FINISHED" and found[0].data.tags.get("resumed") == "true"
    steps = [m.step for m in client.get_metric_history(run_id, "loss")]
    assert sorted(steps) == list(range(44))  # no epoch missing or duplicated


def _one_cell_sweep(tmp):
    (tmp / "s.yaml").write_text(yaml.safe_dump({"name": "t_kill", "base": str(TINY), "seeds": [0]}))
    return "s.yaml"


def _node_pid(workdir, timeout=60):
    deadline = time.time() + timeout
    while time.time() < deadline:
        try:
            return json.loads((workdir / "status.json").read_text())["pid"]
        except (OSError, KeyError, ValueError):
            time.sleep(0.1)
    raise AssertionError("node job never reported its pid")


def test_run_records_whether_the_tree_was_dirty_and_its_diff(sweep_dir):
    tmp, _ = sweep_dir
    client, found = runs(tmp, "t_sweep")
    run = next(r for r in found if r.info.status == "FINISHED")
    dirty = run.data.tags["git_dirty"]
    arts = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert dirty in ("true", "false")
    assert (dirty == "true") == ("git_diff.patch" in arts)
