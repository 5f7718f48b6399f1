"""``deqbench cancel`` of a submitit sweep on the real local Slurm cluster, then a rerun that resumes it."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from mlflow.tracking import MlflowClient

from jobs.slurm_env import job_states

REPO = Path(__file__).resolve().parents[2]
TINY = REPO / "configs/experiments/crr_tiny.yaml"
LOCAL = REPO / "configs/launchers/local_slurm.yaml"
EPOCHS, CRR_EPOCHS = 200, 2  # long enough to be under way when the cancel lands

pytestmark = pytest.mark.slurm


def deqbench(*args, cwd, timeout=600):
    return subprocess.run([sys.executable, "-m", "jobs.cli", *map(str, args)], cwd=cwd, capture_output=True,
                          text=True, timeout=timeout)


@pytest.mark.slow  # two array tasks stopped mid-training, then resumed to the end: ~3-4 min
def test_cancel_scancels_the_array_and_a_rerun_resumes_it(slurm_cluster, tmp_path):
    spec = {"name": "t_cancel_slurm", "base": str(TINY), "seeds": [0, 1],
            "set": {"train.epochs": EPOCHS, "train.ckpt_every": 3, "crr.epochs": CRR_EPOCHS}}
    (tmp_path / "s.yaml").write_text(yaml.safe_dump(spec))
    sweep = ["sweep", "s.yaml", "--launcher", "submitit", "--launcher-config", LOCAL]
    out = deqbench(*sweep, "--no-wait", cwd=tmp_path)
    assert out.returncode == 0 and "deqbench cancel s.yaml" in out.stdout, out.stdout + out.stderr
    subs = [json.loads(p.read_text()) for p in tmp_path.glob("runs/t_cancel_slurm/*/submitted.json")]
    jobs = sorted(s["job_id"] for s in subs)
    deadline = time.monotonic() + 300
    while not list(tmp_path.glob("runs/t_cancel_slurm/*/ckpt/ckpt_*.pt")):
        if time.monotonic() > deadline:
            subprocess.run(["scancel", *jobs], check=False)
            pytest.fail("no checkpoint after 300 s")
        time.sleep(0.3)

    cancel = deqbench("cancel", "s.yaml", cwd=tmp_path)
    assert cancel.returncode == 0, cancel.stdout + cancel.stderr
    assert f"scancel of Slurm job(s) {', '.join(jobs)}" in cancel.stdout, cancel.stdout
    assert "2 cell(s) KILLED" in cancel.stdout
    assert set(job_states(jobs).values()) == {"CANCELLED"}
    statuses = [json.loads(p.read_text()) for p in tmp_path.glob("runs/t_cancel_slurm/*/status.json")]
    assert len(statuses) == 2 and all((s["state"], s["reason"]) == ("KILLED", "CANCELLED") for s in statuses)
    client = MlflowClient(f"sqlite:///{tmp_path}/mlflow.db")
    exp = client.get_experiment_by_name("t_cancel_slurm").experiment_id
    before = {r.data.tags["cell_hash"]: r.info.run_id for r in client.search_runs([exp])}
    assert before and all(r.info.status == "KILLED" and r.data.tags["deqbench.failure_reason"] == "CANCELLED"
                          for r in client.search_runs([exp]))
    status = deqbench("status", "s.yaml", cwd=tmp_path)
    assert "2 cells: 2 killed" in status.stdout and "CANCELLED" in status.stdout, status.stdout

    again = deqbench(*sweep, cwd=tmp_path)
    assert again.returncode == 0, again.stdout + again.stderr
    assert "2 to run" in again.stdout and "2 finished, 0 failed" in again.stdout
    runs = client.search_runs([exp])
    assert len(runs) == 2 and all(r.info.status == "FINISHED" for r in runs)
    for r in runs:
        if r.data.tags["cell_hash"] in before:  # resumed into the run it began
            assert r.info.run_id == before[r.data.tags["cell_hash"]]
        steps = [m.step for m in client.get_metric_history(r.info.run_id, "loss")]
        assert sorted(steps) == list(range(EPOCHS + CRR_EPOCHS))


def test_cancel_of_pending_array_tasks(slurm_cluster, tmp_path):
    """Held jobs (begin in an hour): scancel-ed, and their cells KILLED/CANCELLED though they never ran."""
    cfg = {**yaml.safe_load(LOCAL.read_text()), "slurm_additional_parameters": {"begin": "now+1hour"}}
    (tmp_path / "later.yaml").write_text(yaml.safe_dump(cfg))
    (tmp_path / "s.yaml").write_text(yaml.safe_dump({"name": "t_cancel_pending", "base": str(TINY), "seeds": [0, 1]}))
    out = deqbench("sweep", "s.yaml", "--launcher", "submitit", "--launcher-config", "later.yaml", "--no-wait",
                   cwd=tmp_path)
    assert out.returncode == 0, out.stdout + out.stderr
    jobs = sorted(json.loads(p.read_text())["job_id"] for p in tmp_path.glob("runs/*/*/submitted.json"))
    try:
        assert set(job_states(jobs).values()) == {"PENDING"}
        cancel = deqbench("cancel", "s.yaml", cwd=tmp_path)
    finally:
        subprocess.run(["scancel", *jobs], check=False)
    assert cancel.returncode == 0 and f"scancel of Slurm job(s) {', '.join(jobs)}" in cancel.stdout, cancel.stdout
    assert set(job_states(jobs).values()) == {"CANCELLED"}
    statuses = [json.loads(p.read_text()) for p in tmp_path.glob("runs/t_cancel_pending/*/status.json")]
    assert [(s["state"], s["reason"]) for s in statuses] == [("KILLED", "CANCELLED")] * 2
