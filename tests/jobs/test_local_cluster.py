"""The real local Slurm cluster: sbatch, squeue/scontrol, submitit arrays and DDP.

Every test here runs jobs on the one-node cluster of ``slurm/local_cluster.sh``
(started by the ``slurm_cluster`` fixture). Nothing is mocked.
"""

from __future__ import annotations

import subprocess
import time
import uuid
from pathlib import Path
from typing import List

import pytest

from jobs.slurm_env import (
    TERMINAL_STATES,
    UNKNOWN_STATE,
    job_info,
    job_states,
    load_launcher_config,
    submitit_arguments,
    use_squeue_for_submitit,
)

REPO = Path(__file__).resolve().parents[2]
SCRIPT = REPO / "slurm" / "local_cluster.sh"
LOCAL_CONFIG = REPO / "configs" / "launchers" / "local_slurm.yaml"
WAIT_S = 180.0  # generous: other people's jobs may hold the 2 CPUs

pytestmark = pytest.mark.slurm


def _wait_terminal(job_ids: List[str], timeout: float = WAIT_S) -> dict:
    """Polls ``job_states`` until every job is in a terminal state."""
    deadline = time.monotonic() + timeout
    while True:
        states = job_states(job_ids)
        if all(s in TERMINAL_STATES for s in states.values()):
            return states
        if time.monotonic() > deadline:
            subprocess.run(["scancel", *job_ids], check=False)
            pytest.fail(f"jobs {job_ids} not finished after {timeout:.0f} s: {states}")
        time.sleep(0.3)


def _submitit_results(jobs: list, timeout: float = WAIT_S) -> list:
    """``job.results()`` for each job, failing (not hanging) if a job dies without a result.

    Accounting is off, so submitit's sacct polling never sees a job end; a job
    killed before writing its result would make ``job.result()`` wait forever.
    """
    ids = [job.job_id for job in jobs]
    deadline = time.monotonic() + timeout
    while not all(job.done() for job in jobs):
        states = job_states(ids)
        dead = {j: s for j, s in states.items() if s in TERMINAL_STATES and s != "COMPLETED"}
        if dead:
            pytest.fail(f"jobs ended without a result: {dead}\n{jobs[0].stderr()}")
        if time.monotonic() > deadline:
            subprocess.run(["scancel", *ids], check=False)
            pytest.fail(f"submitit jobs {ids} not done after {timeout:.0f} s: {states}")
        time.sleep(0.3)
    return [job.results() for job in jobs]


def _executor(folder: Path, **overrides):
    """A submitit Slurm executor configured from configs/launchers/local_slurm.yaml."""
    submitit = pytest.importorskip("submitit")
    config = load_launcher_config(LOCAL_CONFIG)
    _, init_kwargs, params = submitit_arguments(config)
    params.update(overrides)
    executor = submitit.AutoExecutor(folder=str(folder / "%j"), cluster="slurm", **init_kwargs)
    executor.update_parameters(**params)
    return executor


def test_start_is_idempotent_and_status_shows_the_node(slurm_cluster: str) -> None:
    start = subprocess.run(["bash", str(SCRIPT), "start"], capture_output=True, text=True, timeout=120)
    assert start.returncode == 0, start.stderr
    assert "already running" in start.stdout
    status = subprocess.run(["bash", str(SCRIPT), "status"], capture_output=True, text=True, timeout=60)
    assert status.returncode == 0, status.stdout + status.stderr
    line = next(ln for ln in status.stdout.splitlines() if ln.startswith(slurm_cluster))
    assert line.split()[4] in {"idle", "mix", "alloc", "comp"}, status.stdout


def _conf_value(key: str) -> str:
    line = next(ln for ln in Path("/etc/slurm/slurm.conf").read_text().splitlines() if ln.startswith(key + "="))
    return line.split("=", 1)[1].strip()


def _running_slurm_daemon(pid: int) -> bool:
    """A live (not zombie) slurmctld/slurmd with this pid."""
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return False
    return "slurm" in status.split("\n", 1)[0] and "zombie" not in status


def test_start_replaces_daemons_whose_pid_files_are_gone(slurm_cluster: str) -> None:
    """Daemons started from a checkout that was since deleted (pid files gone) are replaced, not fatal."""
    pidfiles = [Path(_conf_value(k)) for k in ("SlurmctldPidFile", "SlurmdPidFile")]
    old = [int(pf.read_text()) for pf in pidfiles]
    for pf in pidfiles:
        pf.unlink()
    start = subprocess.run(["bash", str(SCRIPT), "start"], capture_output=True, text=True, timeout=300)
    assert start.returncode == 0, start.stdout[-2000:] + start.stderr[-2000:]
    # the config (and so the pid files' place) is this checkout's now, whichever started the old daemons
    new = [int(Path(_conf_value(k)).read_text()) for k in ("SlurmctldPidFile", "SlurmdPidFile")]
    assert all(n != o for n, o in zip(new, old))
    assert not any(_running_slurm_daemon(o) for o in old)
    status = subprocess.run(["bash", str(SCRIPT), "status"], capture_output=True, text=True, timeout=60)
    assert status.returncode == 0, status.stdout + status.stderr


def test_sbatch_job_completes_and_writes_its_output(slurm_cluster: str, tmp_path: Path) -> None:
    token = uuid.uuid4().hex
    out = tmp_path / "out_%j.txt"
    job_id = subprocess.run(
        ["sbatch", "--parsable", "-p", slurm_cluster, "-o", str(out), "--wrap",
         f"echo {token} job=$SLURM_JOB_ID host=$(hostname -s)"],
        capture_output=True, text=True, check=True,
    ).stdout.strip()

    assert _wait_terminal([job_id]) == {job_id: "COMPLETED"}
    (info,) = job_info(job_id)
    assert info["JobState"] == "COMPLETED"
    assert info["ExitCode"] == "0:0"
    stdout = Path(info["StdOut"])
    assert stdout == tmp_path / f"out_{job_id}.txt"
    assert stdout.read_text().split() == [token, f"job={job_id}", f"host={info['NodeList']}"]


def test_failing_job_is_reported_failed_with_its_exit_code(slurm_cluster: str, tmp_path: Path) -> None:
    job_id = subprocess.run(
        ["sbatch", "--parsable", "-p", slurm_cluster, "-o", str(tmp_path / "%j.out"), "--wrap", "exit 3"],
        capture_output=True, text=True, check=True,
    ).stdout.strip()
    assert _wait_terminal([job_id]) == {job_id: "FAILED"}
    assert job_info(job_id)[0]["ExitCode"] == "3:0"


def test_job_states_expands_an_array_and_marks_unknown_ids(slurm_cluster: str, tmp_path: Path) -> None:
    array_id = subprocess.run(
        ["sbatch", "--parsable", "-p", slurm_cluster, "-a", "0-2", "-o", str(tmp_path / "%A_%a.out"),
         "--wrap", "test $SLURM_ARRAY_TASK_ID -ne 1"],
        capture_output=True, text=True, check=True,
    ).stdout.strip()
    states = _wait_terminal([array_id])
    assert states == {f"{array_id}_0": "COMPLETED", f"{array_id}_1": "FAILED", f"{array_id}_2": "COMPLETED"}
    assert job_states([f"{array_id}_1"]) == {f"{array_id}_1": "FAILED"}
    never = str(10**9 - 7)  # far above any id this cluster hands out
    assert job_states([never]) == {never: UNKNOWN_STATE}
    assert job_states([never, f"{array_id}_2"]) == {never: UNKNOWN_STATE, f"{array_id}_2": "COMPLETED"}


def test_submitit_array_returns_every_result(slurm_cluster: str, tmp_path: Path) -> None:
    def square(x: int) -> tuple:
        import os

        return x * x, os.environ["SLURM_ARRAY_TASK_ID"]

    inputs = [3, 5, 7]
    jobs = _executor(tmp_path).map_array(square, inputs)
    assert len(jobs) == 3
    results = [r[0] for r in _submitit_results(jobs)]  # one task per array job
    assert [r[0] for r in results] == [x * x for x in inputs]
    assert sorted(r[1] for r in results) == ["0", "1", "2"]
    # a task's result file appears just before Slurm ends the task: wait for the end, then check it
    assert set(_wait_terminal([j.job_id for j in jobs]).values()) == {"COMPLETED"}


def test_submitit_two_task_gloo_ddp_all_reduce(slurm_cluster: str, tmp_path: Path) -> None:
    pytest.importorskip("torch")

    def ddp_sum() -> tuple:
        import submitit
        import torch
        import torch.distributed as dist

        env = submitit.helpers.TorchDistributedEnvironment().export()
        dist.init_process_group("gloo")
        try:
            value = torch.tensor([float(env.rank + 1)])
            dist.all_reduce(value)
            return dist.get_world_size(), env.rank, env.local_rank, value.item()
        finally:
            dist.destroy_process_group()

    job = _executor(tmp_path, tasks_per_node=2, cpus_per_task=1).submit(ddp_sum)
    (per_task,) = _submitit_results([job])
    world = 2
    expected_sum = float(sum(rank + 1 for rank in range(world)))
    assert sorted(r[1] for r in per_task) == list(range(world))
    assert sorted(r[2] for r in per_task) == list(range(world))
    assert all(r[0] == world and r[3] == expected_sum for r in per_task), per_task


def test_squeue_watcher_sees_a_cancelled_submitit_job(slurm_cluster: str, tmp_path: Path, monkeypatch) -> None:
    """Without accounting, submitit alone would wait forever for a cancelled job; its squeue watcher does not.

    (It polls squeue whether or not the cluster has accounting: the launcher installs it only without.)
    """
    submitit = pytest.importorskip("submitit")
    from submitit.slurm.slurm import SlurmJob

    monkeypatch.setattr(SlurmJob, "watcher", SlurmJob.watcher)  # restored after the test
    use_squeue_for_submitit(delay_s=5)
    use_squeue_for_submitit(delay_s=5)  # idempotent
    job = _executor(tmp_path).submit(time.sleep, 600)
    deadline = time.monotonic() + WAIT_S
    while job.state != "RUNNING":
        assert job.state == "PENDING" and time.monotonic() < deadline, job.state
        time.sleep(0.3)
    job.cancel(check=True)
    deadline = time.monotonic() + 60
    while not job.done():
        assert time.monotonic() < deadline, f"cancelled job not seen as done: {job.state}"
        time.sleep(0.3)
    assert job.state == "CANCELLED"
    job._results_timeout_s = 1  # submitit waits 15 s for a late result file (slow NFS); not here
    with pytest.raises(submitit.core.utils.UncompletedJobError, match="CANCELLED"):
        job.result()


# --- the sbatch templates, run as a user would on the local cluster ------------------
TEMPLATES = REPO / "slurm" / "templates"
LOCAL_OVERRIDES = ["--gpus-per-node=0", "--mem=2G", "--time=10"]


def _sbatch(args: List[str], cwd: Path, env_extra: dict) -> str:
    import os
    import sys

    env = {**os.environ, "DEQBENCH_PYTHON": sys.executable, **env_extra}
    proc = subprocess.run(
        ["sbatch", "--parsable", *args], capture_output=True, text=True, cwd=cwd, env=env
    )
    assert proc.returncode == 0, proc.stderr
    return proc.stdout.strip()


DDP_PROBE = '''
import json, sys
import torch, torch.distributed as dist
dist.init_process_group("gloo")  # env:// from the template's MASTER_ADDR/PORT, RANK, WORLD_SIZE
value = torch.tensor([float(dist.get_rank() + 1)])
dist.all_reduce(value)
with open(f"{sys.argv[1]}.rank{dist.get_rank()}", "w") as fh:
    json.dump({"world": dist.get_world_size(), "sum": value.item()}, fh)
dist.destroy_process_group()
'''


def test_ddp_template_runs_two_ranks(slurm_cluster: str, tmp_path: Path) -> None:
    """ddp_train.sbatch with the node job swapped for a probe module (DEQBENCH_ENTRY)."""
    pytest.importorskip("torch")
    (tmp_path / "ddp_probe.py").write_text(DDP_PROBE)
    cell = tmp_path / "cell.json"
    job_id = _sbatch(
        ["-p", slurm_cluster, *LOCAL_OVERRIDES, "--ntasks-per-node=2", "--cpus-per-task=1",
         "-o", str(tmp_path / "%j.out"), str(TEMPLATES / "ddp_train.sbatch"), str(cell)],
        cwd=tmp_path, env_extra={"DEQBENCH_ENTRY": "ddp_probe", "PYTHONPATH": str(tmp_path)},
    )
    states = _wait_terminal([job_id])
    log = (tmp_path / f"{job_id}.out").read_text()
    assert states == {job_id: "COMPLETED"}, log
    assert f"master {job_info(job_id)[0]['NodeList']}:{20000 + int(job_id) % 20000}" in log
    import json

    outs = [json.loads((tmp_path / f"cell.json.rank{r}").read_text()) for r in range(2)]
    assert outs == [{"world": 2, "sum": 3.0}] * 2


RAY_DRIVER = '''
import os, sys, ray
ray.init()
@ray.remote
def square(x):
    return x * x
with open(sys.argv[1], "w") as fh:
    fh.write(f"{os.environ['RAY_ADDRESS']} {ray.cluster_resources()['CPU']} "
             f"{sum(ray.get([square.remote(i) for i in range(5)]))} "
             f"{os.environ.get('RAY_AUTH_MODE')} {len(os.environ.get('RAY_AUTH_TOKEN', ''))}")
'''


@pytest.mark.slow
def test_ray_template_runs_a_driver_on_a_per_job_port(slurm_cluster: str, tmp_path: Path) -> None:
    pytest.importorskip("ray")
    (tmp_path / "driver.py").write_text(RAY_DRIVER)
    import sys

    result = tmp_path / "result.txt"
    job_id = _sbatch(
        ["-p", slurm_cluster, *LOCAL_OVERRIDES, "--nodes=1", "--cpus-per-task=2",
         "-o", str(tmp_path / "%j.out"), str(TEMPLATES / "ray_cluster.sbatch"),
         sys.executable, str(tmp_path / "driver.py"), str(result)],
        cwd=tmp_path, env_extra={"DEQBENCH_RAY": str(Path(sys.executable).with_name("ray"))},
    )
    states = _wait_terminal([job_id], timeout=300)
    log = (tmp_path / f"{job_id}.out").read_text()
    assert states == {job_id: "COMPLETED"}, log[-3000:]
    address, cpus, total, auth_mode, token_len = result.read_text().split()
    assert (auth_mode, token_len) == ("token", "64")  # a per-job token, not a shared or absent one
    assert address.endswith(f":{20000 + (int(job_id) % 400) * 100}")
    assert float(cpus) == 2.0
    assert int(total) == sum(i * i for i in range(5))
    assert not Path(f"/tmp/ray_{job_id}").exists()  # the template removes its temp dir


@pytest.mark.slow
def test_mlflow_template_serves_a_tracking_store(slurm_cluster: str, tmp_path: Path) -> None:
    import socket
    import urllib.request

    mlflow = pytest.importorskip("mlflow")
    with socket.socket() as sock:  # a free port, so a server someone runs on 5000 does not matter
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    job_id = _sbatch(
        ["-p", slurm_cluster, "--time=10", "-o", str(tmp_path / "%j.out"),
         str(TEMPLATES / "mlflow_server.sbatch")],
        cwd=tmp_path, env_extra={"MLFLOW_PORT": str(port), "MLFLOW_WORKERS": "1", "DEQBENCH_REPO": str(REPO)},
    )
    uri = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 240
        while True:
            try:
                with urllib.request.urlopen(f"{uri}/health", timeout=2) as resp:
                    if resp.status == 200:
                        break
            except OSError:
                pass
            state = job_states([job_id])[job_id]
            assert state in {"PENDING", "RUNNING"}, (tmp_path / f"{job_id}.out").read_text()
            assert time.monotonic() < deadline, "mlflow server not up after 240 s"
            time.sleep(1)
        client = mlflow.MlflowClient(tracking_uri=uri)
        run = client.create_run(client.create_experiment(f"slurm-template-{uuid.uuid4().hex[:8]}"))
        client.log_metric(run.info.run_id, "psnr", 31.5)
        assert client.get_run(run.info.run_id).data.metrics == {"psnr": 31.5}
    finally:
        subprocess.run(["scancel", job_id], check=False)
    assert _wait_terminal([job_id]) == {job_id: "CANCELLED"}
    # The run went to the SQLite store in the submit directory.
    import sqlite3

    with sqlite3.connect(tmp_path / "mlflow.db") as db:
        assert db.execute("select count(*) from runs").fetchone() == (1,)
