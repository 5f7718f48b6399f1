"""Preemption and time-outs on the real local Slurm: checkpoint, requeue, resume into the same MLflow run.

A cell is submitted with the submitit launcher; once its first checkpoint
exists the job is interrupted -- as submitit's ``job._interrupt()`` does
(preemption: SIGTERM + SIGUSR2; time-out: SIGUSR2 alone) or by Slurm's own
``scontrol requeue`` (SIGTERM, then SIGKILL after ``KillWait``). Slurm holds a
requeued job for ~2 minutes (``BeginTime``); the test releases it after a
few seconds with ``scontrol update StartTime=now``. Checked: one MLflow run, FINISHED, every
epoch step logged exactly once, and final metrics equal to those of the same
cell run without interruption.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from mlflow.tracking import MlflowClient

REPO = Path(__file__).resolve().parents[2]
TINY = REPO / "configs/experiments/crr_tiny.yaml"
LOCAL = REPO / "configs/launchers/local_slurm.yaml"
OVER = {"train.epochs": 40, "crr.epochs": 4, "train.ckpt_every": 5, "data.size": 64}
EPOCHS = 44

pytestmark = pytest.mark.slurm


def _submit(tmp: Path, name: str, extra: dict | None = None, launcher: dict | None = None) -> tuple[Path, dict]:
    spec = {"name": name, "base": str(TINY), "set": {**OVER, **(extra or {})}, "seeds": [0]}
    (tmp / "s.yaml").write_text(yaml.safe_dump(spec))
    cfg = {**yaml.safe_load(LOCAL.read_text()), **(launcher or {})}
    (tmp / "l.yaml").write_text(yaml.safe_dump(cfg))
    out = subprocess.run([sys.executable, "-m", "jobs.cli", "sweep", "s.yaml", "--launcher", "submitit",
                          "--launcher-config", "l.yaml", "--no-wait"], cwd=tmp, capture_output=True, text=True)
    assert out.returncode == 0, out.stdout + out.stderr
    (sub,) = (tmp / "runs" / name).glob("*/submitted.json")
    return sub.parent, json.loads(sub.read_text())


def _wait(cond, what: str, timeout: float = 240, job: str | None = None):
    deadline = time.monotonic() + timeout
    while not (value := cond()):
        if time.monotonic() > deadline:
            if job:
                subprocess.run(["scancel", job], check=False)
            pytest.fail(f"timed out waiting for {what}")
        time.sleep(0.2)
    return value


def _release_when_requeued(job: str, workdir: Path) -> None:
    """Waits for the requeued job to be PENDING again, then lets it start now."""
    from jobs.slurm_env import job_states

    _wait(lambda: job_states([job])[job] == "PENDING", "the job to be requeued", job=job)
    from jobs.status import _combine, _slurm_states

    (sub, state), = _slurm_states([str(workdir)]).values()
    from jobs.node import read_status

    assert _combine(read_status(workdir), sub, state)[0] == "PENDING"  # what `deqbench status` shows
    # slurmd refuses a job credential created in the second its old one was
    # revoked ("Job credential revoked"): Slurm's own hold avoids that, so must we.
    time.sleep(2.5)
    subprocess.run(["scontrol", "update", f"JobId={job}", "StartTime=now"], check=True)


def _finished(job: str):
    from jobs.slurm_env import TERMINAL_STATES, job_states

    state = job_states([job])[job]
    return state if state in TERMINAL_STATES else None


def _reference(tmp: Path, name: str, extra: dict | None = None) -> dict:
    """The same cell run locally without interruption, single-threaded as the Slurm task (cpus_per_task=1)."""
    import os

    from jobs.cells import expand_sweep

    spec = {"name": name, "base": str(TINY), "set": {**OVER, **(extra or {})}, "seeds": [0]}
    ref = tmp / "ref"
    ref.mkdir()
    (ref / "s.yaml").write_text(yaml.safe_dump(spec))
    _, (cell,) = expand_sweep(ref / "s.yaml", runs_dir=ref / "runs", tracking_uri=f"sqlite:///{ref}/mlflow.db")
    env = {**os.environ, "DEQBENCH_TORCH_THREADS": "1", "OMP_NUM_THREADS": "1"}
    out = subprocess.run([sys.executable, "-m", "jobs.node", str(cell.save())], cwd=ref, capture_output=True,
                         text=True, env=env)
    assert out.returncode == 0, out.stdout + out.stderr
    return json.loads((Path(cell.workdir) / "status.json").read_text())["results"]


def _check_one_resumed_run(tmp: Path, name: str, job: str, reference: dict) -> None:
    client = MlflowClient(f"sqlite:///{tmp}/mlflow.db")
    (run,) = client.search_runs([client.get_experiment_by_name(name).experiment_id])
    assert run.info.status == "FINISHED"
    assert run.data.tags["resumed"] == "true" and run.data.tags["slurm_job_id"] == job
    for key in ("loss", "psnr", "time/epoch_s", "solver/fwd_nstep"):
        steps = [m.step for m in client.get_metric_history(run.info.run_id, key)]
        assert len(steps) == len(set(steps)), f"{key}: an epoch logged twice"
        if key in ("loss", "time/epoch_s"):
            assert sorted(steps) == list(range(EPOCHS)), key
    for key in ("psnr", "ssim", "stage1/psnr", "crr/gain_db", "solver/eval_nstep"):
        assert run.data.metrics[key] == pytest.approx(reference[key], rel=1e-6, abs=1e-9), key


@pytest.mark.parametrize("timeout", [False, pytest.param(True, marks=pytest.mark.slow)], ids=["preempted", "timed_out"])
def test_interrupted_job_checkpoints_requeues_and_resumes(slurm_cluster, tmp_path, timeout):
    import submitit

    name = f"t_requeue_{int(timeout)}"
    workdir, sub = _submit(tmp_path, name)
    job = sub["job_id"]
    _wait(lambda: list((workdir / "ckpt").glob("ckpt_*.pt")), "the first checkpoint", job=job)
    submitit.SlurmJob(folder=Path(sub["log_folder"]).parent / "%j", job_id=job)._interrupt(timeout=timeout)
    _release_when_requeued(job, workdir)
    assert _wait(lambda: _finished(job), "the requeued job to end", job=job) == "COMPLETED"
    log = Path(sub["stdout"]).read_text() + Path(sub["stdout"]).with_suffix(".err").read_text()
    assert "SIGUSR2 received; stopping after the current epoch (checkpoint, then requeue)" in log
    assert "Requeued job" in log  # submitit's own requeue, after our checkpoint
    status = json.loads((workdir / "status.json").read_text())
    assert status["state"] == "FINISHED" and status["resumed_from"] is True
    _check_one_resumed_run(tmp_path, name, job, _reference(tmp_path, name))


@pytest.mark.slow
def test_scontrol_requeue_resumes_a_ddp_cell(slurm_cluster, tmp_path):
    """Slurm's own requeue (SIGTERM to both ranks): they agree on a stop, rank 0 checkpoints; the job resumes."""
    name = "t_requeue_ddp"
    extra = {"resources.tasks_per_node": 2}
    workdir, sub = _submit(tmp_path, name, extra)
    job = sub["job_id"]
    _wait(lambda: list((workdir / "ckpt").glob("ckpt_*.pt")), "the first checkpoint", job=job)
    subprocess.run(["scontrol", "requeue", job], check=True)
    _release_when_requeued(job, workdir)
    assert _wait(lambda: _finished(job), "the requeued job to end", job=job) == "COMPLETED"
    log = Path(sub["stdout"]).with_suffix(".err").read_text()
    assert "SIGTERM received; stopping after the current epoch (checkpoint)" in log
    client = MlflowClient(f"sqlite:///{tmp_path}/mlflow.db")
    (run,) = client.search_runs([client.get_experiment_by_name(name).experiment_id])
    assert run.info.status == "FINISHED" and run.data.tags["world_size"] == "2"
    steps = [m.step for m in client.get_metric_history(run.info.run_id, "loss")]
    assert sorted(steps) == list(range(EPOCHS))
