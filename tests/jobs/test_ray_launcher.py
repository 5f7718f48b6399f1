"""The Ray Tune launcher against a real local Ray (started by the CLI: 2 CPUs, no dashboard).

One trial per cell, MLflow logged by the node job inside each trial, ASHA
stopping a poor cell early from the per-epoch reports, an interrupted sweep
resumed with ``Tuner.restore``, and bad input refused before Ray starts.
"""

from __future__ import annotations

import json
import os
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
RAY_LOCAL = REPO / "configs/launchers/ray_local.yaml"

pytest.importorskip("ray")


def deqbench(*args, cwd, env=None, timeout=600):
    return subprocess.run([sys.executable, "-m", "jobs.cli", *map(str, args)], cwd=cwd, capture_output=True,
                          text=True, timeout=timeout, env=env)


def _runs(tmp, name):
    client = MlflowClient(f"sqlite:///{tmp}/mlflow.db")
    exp = client.get_experiment_by_name(name)
    return client, ([] if exp is None else client.search_runs([exp.experiment_id]))


def test_asha_stops_the_poor_cell_and_trials_log_to_mlflow(tmp_path):
    """Two cells in sequence: the good one runs to the end, ASHA stops the one that barely learns."""
    spec = {"name": "t_ray", "base": str(TINY), "seeds": [0],
            "set": {"train.epochs": 8, "crr.epochs": 2},
            "axes": {"train.lr": [5.0e-3, 1.0e-6]}}
    (tmp_path / "s.yaml").write_text(yaml.safe_dump(spec))
    cfg = {**yaml.safe_load(RAY_LOCAL.read_text()), "max_concurrent_trials": 1, "scheduler": "asha",
           "metric": "loss", "mode": "min", "asha_grace_period": 2, "asha_reduction_factor": 2}
    (tmp_path / "l.yaml").write_text(yaml.safe_dump(cfg))
    proc = subprocess.Popen([sys.executable, "-m", "jobs.cli", "sweep", "s.yaml", "--launcher", "ray",
                             "--launcher-config", "l.yaml"], cwd=tmp_path, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    stdout, stderr = proc.communicate(timeout=600)
    assert "1 finished, 1 failed" in stdout, stdout + stderr[-3000:]
    client, found = _runs(tmp_path, "t_ray")
    by_lr = {r.data.params["train.lr"]: r for r in found}
    assert sorted(by_lr) == ["0.005", "1e-06"] and len(found) == 2
    good, poor = by_lr["0.005"], by_lr["1e-06"]
    assert good.info.status == "FINISHED"
    assert sorted(m.step for m in client.get_metric_history(good.info.run_id, "loss")) == list(range(10))
    assert poor.info.status == "KILLED", stdout
    assert "stopped" in poor.data.tags["failure_reason"] and "Tune" in poor.data.tags["failure_reason"]
    steps = [m.step for m in client.get_metric_history(poor.info.run_id, "loss")]
    # A prefix, each epoch once (Ray may end the stopped trial's process before its last epochs are written).
    assert sorted(steps) == list(range(len(steps))) and len(steps) < 10
    rows = {r.info.run_id: _tune_rows(tmp_path / "runs/t_ray", r.data.tags["cell_hash"]) for r in found}
    # Tune got every epoch's row, ASHA's metric in each: all of the good cell's, the poor one's up to its stop.
    assert [row["epoch"] for row in rows[good.info.run_id][:10]] == list(range(10))
    assert [row["epoch"] for row in rows[poor.info.run_id]] == sorted(steps)[:len(rows[poor.info.run_id])]
    assert all("loss" in row for rs in rows.values() for row in rs)
    actors = {row["pid"] for rs in rows.values() for row in rs}  # the trial's process (Tune's actor)
    assert len(actors) == 1  # one at a time: the actor (and its warm fork server) reused for the second cell
    cells = set()
    for r in found:  # the node job ran in a process of its own: neither the driver nor the actor
        status = json.loads((tmp_path / "runs/t_ray" / r.data.tags["cell_hash"] / "status.json").read_text())
        assert status["run_id"] == r.info.run_id and status["pid"] not in {proc.pid, *actors}
        cells.add(status["pid"])
        assert f'"run_id": "{r.info.run_id}"' in (tmp_path / "runs/t_ray" / r.data.tags["cell_hash"] / "log.txt").read_text()
    assert len(cells) == 2  # one process per cell
    assert (tmp_path / "runs/t_ray/ray/tune").is_dir()  # Tune's storage under the sweep folder


def _tune_rows(sweep_dir, cell_hash):
    """The rows Tune received from a cell's trial (its result.json; the trial's folder is named by the cell)."""
    return [json.loads(line) for line in (sweep_dir / "ray/tune" / cell_hash / "result.json").read_text().splitlines()]


@pytest.mark.slow  # a local Ray, a warm fork server and two tiny cells: ~1 min on 2 busy cores
def test_a_sigkilled_cell_fails_its_trial_alone(tmp_path):
    """A cell's process killed mid-run (as a crash or the OOM killer would): FAILED with the signal, the other runs."""
    small = {"data.size": 41, "model.hidden": 4, "crr.hidden": 4, "crr.epochs": 1}
    spec = {"name": "t_ray_kill", "base": str(TINY), "set": {**small, "train.epochs": 2}, "seeds": [0],
            "groups": [{}, {"seeds": [1], "set": {**small, "train.epochs": 100000}}]}  # seed 1 runs until killed
    (tmp_path / "s.yaml").write_text(yaml.safe_dump(spec))
    cfg = {**yaml.safe_load(RAY_LOCAL.read_text()), "max_concurrent_trials": 1}
    (tmp_path / "l.yaml").write_text(yaml.safe_dump(cfg))
    proc = subprocess.Popen([sys.executable, "-m", "jobs.cli", "sweep", "s.yaml", "--launcher", "ray",
                             "--launcher-config", "l.yaml"], cwd=tmp_path, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    deadline, long_dir = time.monotonic() + 400, None
    while long_dir is None:
        assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()[0][-3000:]
        time.sleep(0.2)
        for st in tmp_path.glob("runs/t_ray_kill/*/status.json"):
            cell = json.loads((st.parent / "cell.json").read_text())
            if cell["config"]["seed"] == 1 and json.loads(st.read_text() or "{}").get("state") == "RUNNING":
                long_dir = st.parent
    pid = json.loads((long_dir / "status.json").read_text())["pid"]
    assert "-m jobs.node" in Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
    assert os.getsid(pid) == pid  # a session of its own
    os.kill(pid, signal.SIGKILL)
    out, _ = proc.communicate(timeout=300)
    assert proc.returncode == 1 and "1 finished, 1 failed" in out, out[-3000:]
    killed = json.loads((long_dir / "status.json").read_text())
    assert (killed["state"], killed["reason"]) == ("FAILED", "signal SIGKILL"), killed
    assert "signal SIGKILL" in (tmp_path / "runs/t_ray_kill/ray/tune" / long_dir.name / "error.txt").read_text()
    client, found = _runs(tmp_path, "t_ray_kill")
    by_seed = {r.data.params["seed"]: r for r in found}
    assert by_seed["1"].info.status == "FAILED" and by_seed["0"].info.status == "FINISHED"
    assert by_seed["0"].data.metrics["psnr"] > 0


@pytest.mark.slow
def test_interrupted_ray_sweep_resumes_with_tuner_restore(tmp_path):
    spec = {"name": "t_ray_resume", "base": str(TINY), "seeds": [0, 1],
            "set": {"train.epochs": 30, "crr.epochs": 4, "train.ckpt_every": 5, "data.size": 64}}
    (tmp_path / "s.yaml").write_text(yaml.safe_dump(spec))
    cfg = {**yaml.safe_load(RAY_LOCAL.read_text()), "max_concurrent_trials": 1}
    (tmp_path / "l.yaml").write_text(yaml.safe_dump(cfg))
    args = [sys.executable, "-m", "jobs.cli", "sweep", "s.yaml", "--launcher", "ray", "--launcher-config", "l.yaml"]
    proc = subprocess.Popen(args, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.monotonic() + 400
    while not list(tmp_path.glob("runs/t_ray_resume/*/ckpt/ckpt_*.pt")):  # the first cell is under way
        assert time.monotonic() < deadline and proc.poll() is None, "no checkpoint appeared"
        time.sleep(0.3)
    proc.send_signal(signal.SIGINT)  # Ctrl-C: Tune saves its experiment state and stops
    first, _ = proc.communicate(timeout=300)
    again = deqbench(*args[3:], cwd=tmp_path)
    assert again.returncode == 0, first[-2000:] + again.stdout + again.stderr[-3000:]
    assert "resuming the Tune experiment" in again.stdout
    assert "2 finished, 0 failed" in again.stdout
    client, found = _runs(tmp_path, "t_ray_resume")
    assert len(found) == 2 and all(r.info.status == "FINISHED" for r in found)  # one run per cell
    for r in found:
        steps = [m.step for m in client.get_metric_history(r.info.run_id, "loss")]
        assert sorted(steps) == list(range(34))


# --- bad input: exit 2 before Ray starts -----------------------------------------------
@pytest.fixture
def one_cell(tmp_path):
    (tmp_path / "s.yaml").write_text(yaml.safe_dump({"name": "t_ray_bad", "base": str(TINY), "seeds": [0]}))
    return tmp_path


def test_unknown_ray_key_refused(one_cell):
    (one_cell / "l.yaml").write_text(yaml.safe_dump({"cpus_per_trial": 1, "max_concurent_trials": 2}))
    out = deqbench("sweep", "s.yaml", "--launcher", "ray", "--launcher-config", "l.yaml", cwd=one_cell)
    assert out.returncode == 2
    assert "unknown Ray launcher key(s) 'max_concurent_trials'" in out.stderr and "max_concurrent_trials" in out.stderr
    assert not (one_cell / "runs/t_ray_bad/ray").exists()


def test_bad_ray_value_refused(one_cell):
    (one_cell / "l.yaml").write_text(yaml.safe_dump({"scheduler": "hyperband"}))
    out = deqbench("sweep", "s.yaml", "--launcher", "ray", "--launcher-config", "l.yaml", cwd=one_cell)
    assert out.returncode == 2 and "scheduler must be fifo or asha, got 'hyperband'" in out.stderr


def test_ray_not_importable_refused(one_cell):
    """A `ray` package that fails to import (as a broken or missing install does)."""
    shim = one_cell / "shim" / "ray"
    shim.mkdir(parents=True)
    (shim / "__init__.py").write_text("raise ImportError('No module named ray (test shim)')\n")
    env = {**os.environ, "PYTHONPATH": f"{one_cell / 'shim'}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    for extra in ([], ["--dry-run"]):
        out = deqbench("sweep", "s.yaml", "--launcher", "ray", "--launcher-config", RAY_LOCAL, *extra,
                       cwd=one_cell, env=env)
        assert out.returncode == 2, out.stdout + out.stderr
        assert "Ray Tune is not importable" in out.stderr and "deqbench[cluster]" in out.stderr
        assert not list(one_cell.glob("runs/*/*/status.json"))
