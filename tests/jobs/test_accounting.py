"""Slurm job state with and without accounting, on the real local cluster.

``slurm/local_cluster.sh start --accounting`` adds slurmdbd + MariaDB to the
running cluster (only slurmctld restarts; partition ``debug`` stays), so
``sacct`` works. Each test asks both paths -- ``sacct`` and
``squeue``/``scontrol`` -- about the same real jobs: a job that exits 3, a
cancelled job, and (slow) a sweep cell killed at its time limit, whose
``TIMEOUT`` ends up in the cell's ``status.json`` and its MLflow run.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from jobs.slurm_env import (
    ACCOUNTING_ENV,
    JobState,
    failure_reason,
    job_details,
    load_launcher_config,
    poll_intervals,
    sacct_available,
    validate_launcher_config,
)

REPO = Path(__file__).resolve().parents[2]
SCRIPT = REPO / "slurm" / "local_cluster.sh"
TINY = REPO / "configs/experiments/crr_tiny.yaml"
LOCAL = REPO / "configs/launchers/local_slurm.yaml"


# --- no cluster needed -----------------------------------------------------------
@pytest.mark.parametrize("js, reason", [
    (JobState("COMPLETED", 0, 0), None),
    (JobState("RUNNING"), None),
    (JobState("FAILED", 3, 0), "exit code 3"),
    (JobState("FAILED", 0, 9), "signal SIGKILL"),
    (JobState("TIMEOUT", 0, 15), "TIMEOUT"),
    (JobState("OUT_OF_MEMORY", 0, 9), "OUT_OF_MEMORY"),
    (JobState("NODE_FAIL"), "NODE_FAIL"),
    (JobState("CANCELLED", 0, 15), "CANCELLED"),
])
def test_failure_reason_in_a_word(js, reason):
    assert failure_reason(js) == reason


def test_poll_interval_is_configurable_with_a_10_s_default_and_back_off():
    from jobs.launchers.submitit_launcher import next_interval

    assert poll_intervals({}) == (10.0, 120.0)
    assert poll_intervals(load_launcher_config(LOCAL, check_cluster=False)) == (2.0, 10.0)
    waits, w = [], 10.0
    for changed in (False, False, False, True, False):
        w = next_interval(w, changed, 10.0, 30.0)
        waits.append(w)
    assert waits == [15.0, 22.5, 30.0, 10.0, 15.0]
    with pytest.raises(ValueError, match="poll_interval_s"):
        validate_launcher_config({"poll_interval_s": 0}, check_cluster=False)
    with pytest.raises(TypeError, match="poll_max_interval_s"):
        validate_launcher_config({"poll_max_interval_s": "1m"}, check_cluster=False)


# --- the real cluster, with accounting -----------------------------------------------
@pytest.fixture(scope="module")
def accounting(slurm_cluster):
    """The local cluster with slurmdbd + MariaDB (installed and started when missing)."""
    proc = subprocess.run(["bash", str(SCRIPT), "start", "--accounting"], capture_output=True, text=True, timeout=900)
    if proc.returncode != 0:
        tail = "\n".join((proc.stdout + proc.stderr).strip().splitlines()[-5:])
        pytest.skip(f"local Slurm cluster could not start with accounting (exit {proc.returncode}): {tail}")
    return proc.stdout


def _sbatch(tmp_path: Path, *args: str) -> str:
    out = subprocess.run(["sbatch", "--parsable", "-p", "debug", "-o", str(tmp_path / "%j.out"), *args],
                         capture_output=True, text=True, check=True)
    return out.stdout.strip().split(";")[0]


def _wait_ended(ids, use_sacct, timeout=120.0):
    deadline = time.monotonic() + timeout
    while True:
        details = job_details(ids, use_sacct=use_sacct)
        # With sacct, wait for the accounting database too: until it records a job's end, squeue
        # fills in (right, and tested below), so a busy machine can see the end there first.
        if all((failure_reason(js) or js.state == "COMPLETED") and (not use_sacct or js.source == "sacct")
               for js in details.values()):
            return details
        assert time.monotonic() < deadline, details
        time.sleep(0.5)


@pytest.mark.slurm
def test_start_accounting_is_idempotent_and_keeps_the_partition(accounting):
    assert "accounting on (sacct works)" in accounting
    assert sacct_available()
    again = subprocess.run(["bash", str(SCRIPT), "start", "--accounting"], capture_output=True, text=True)
    assert again.returncode == 0 and "already running" in again.stdout and "accounting on" in again.stdout
    plain = subprocess.run(["bash", str(SCRIPT), "start"], capture_output=True, text=True)  # the default start
    assert plain.returncode == 0 and "already running" in plain.stdout and "accounting on" in plain.stdout
    sinfo = subprocess.run(["sinfo", "-h", "-o", "%P %a"], capture_output=True, text=True).stdout.splitlines()
    assert "debug* up" in sinfo, sinfo


@pytest.mark.slurm
def test_sacct_and_squeue_agree_on_exit_code_and_cancel(accounting, tmp_path):
    failing = _sbatch(tmp_path, "--wrap", "exit 3")
    cancelled = _sbatch(tmp_path, "--wrap", "sleep 300")
    time.sleep(1)
    subprocess.run(["scancel", cancelled], check=True)
    by_sacct = _wait_ended([failing, cancelled], use_sacct=True)
    by_squeue = _wait_ended([failing, cancelled], use_sacct=False)
    for details, source in ((by_sacct, "sacct"), (by_squeue, "squeue")):
        assert details[failing].state == "FAILED" and details[failing].exit_code == 3, (source, details)
        assert failure_reason(details[failing]) == "exit code 3"
        assert details[cancelled].state == "CANCELLED", (source, details)
        assert {js.source for js in details.values()} == {source}


@pytest.mark.slurm
def test_a_job_sacct_does_not_know_yet_comes_from_squeue(accounting, tmp_path):
    """Right after sbatch the job may not be in the accounting database: squeue fills in, never UNKNOWN."""
    job = _sbatch(tmp_path, "--begin", "now+1hour", "--wrap", "true")
    try:
        js = job_details([job])[job]
        assert js.state == "PENDING" and js.source in ("sacct", "squeue")
        assert job_details([job], use_sacct=False)[job].state == "PENDING"
    finally:
        subprocess.run(["scancel", job], check=False)


def _timeout_sweep(tmp: Path, name: str) -> Path:
    cfg = {**yaml.safe_load(LOCAL.read_text()), "timeout_min": 1, "slurm_max_num_timeout": 0,
           # submitit's SIGUSR2 would checkpoint and requeue before the limit; SIGURG is ignored,
           # so Slurm itself kills the job at its time limit.
           "slurm_additional_parameters": {"signal": "URG@5"}}
    (tmp / "l.yaml").write_text(yaml.safe_dump(cfg))
    spec = {"name": name, "base": str(TINY), "seeds": [0],
            "set": {"train.epochs": 100000, "train.ckpt_every": 5, "crr.epochs": 1}}
    (tmp / "s.yaml").write_text(yaml.safe_dump(spec))
    return tmp


@pytest.mark.slurm
@pytest.mark.slow  # the job runs to its 1-minute limit; slurmctld notices within 30 s
def test_a_cell_past_its_time_limit_is_recorded_timeout_on_both_paths(accounting, tmp_path):
    """With accounting (sacct) and without (squeue, forced): the cell is KILLED, reason TIMEOUT, in MLflow too."""
    from mlflow.tracking import MlflowClient

    procs = {}
    for path, forced in (("sacct", None), ("squeue", "0")):
        (tmp_path / path).mkdir()
        tmp = _timeout_sweep(tmp_path / path, f"t_timeout_{path}")
        env = {**os.environ, **({ACCOUNTING_ENV: forced} if forced else {})}
        procs[path] = (tmp, subprocess.Popen(
            [sys.executable, "-m", "jobs.cli", "sweep", "s.yaml", "--launcher", "submitit",
             "--launcher-config", "l.yaml"], cwd=tmp, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
            text=True))
    for path, (tmp, proc) in procs.items():
        out, err = proc.communicate(timeout=400)
        assert proc.returncode == 1, out + err
        assert ("sacct" in err) == (path == "sacct"), err  # the sources the waiting sweep's progress lines name
        assert "[TIMEOUT]" in out and "KILLED" in out, out
        (status_file,) = tmp.glob("runs/*/*/status.json")
        status = json.loads(status_file.read_text())
        assert status["state"] == "KILLED" and status["reason"] == "TIMEOUT", status
        job = json.loads((status_file.parent / "submitted.json").read_text())["job_id"]
        assert job_details([job], use_sacct=path == "sacct")[job].state == "TIMEOUT"
        client = MlflowClient(f"sqlite:///{tmp}/mlflow.db")
        (run,) = client.search_runs([client.get_experiment_by_name(f"t_timeout_{path}").experiment_id])
        assert run.info.status == "KILLED" and run.data.tags["deqbench.failure_reason"] == "TIMEOUT"
