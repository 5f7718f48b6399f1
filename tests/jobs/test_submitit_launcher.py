"""The submitit launcher on the real local Slurm cluster, through the CLI.

Job arrays per resource group, the generated sbatch script (golden file),
``submitted.json`` + ``squeue`` in ``deqbench status``, resuming a sweep
submits only unfinished cells, and bad launcher input refused with exit 2
before anything is submitted.
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
from mlflow.tracking import MlflowClient

REPO = Path(__file__).resolve().parents[2]
TINY = REPO / "configs/experiments/crr_tiny.yaml"
LOCAL = REPO / "configs/launchers/local_slurm.yaml"
GOLDEN = Path(__file__).parent / "golden" / "submitit_array.sbatch"

pytestmark = pytest.mark.slurm


def deqbench(*args, cwd, env=None, timeout=600):
    return subprocess.run([sys.executable, "-m", "jobs.cli", *map(str, args)], cwd=cwd, capture_output=True,
                          text=True, timeout=timeout, env=env)


def runs(tmp, experiment):
    c = MlflowClient(f"sqlite:///{tmp}/mlflow.db")
    exp = c.get_experiment_by_name(experiment)
    return c, ([] if exp is None else c.search_runs([exp.experiment_id]))


def wait_jobs(ids, timeout=300):
    from jobs.slurm_env import TERMINAL_STATES, job_states

    deadline = time.monotonic() + timeout
    while True:
        states = job_states(ids)
        if all(s in TERMINAL_STATES for s in states.values()):
            return states
        if time.monotonic() > deadline:
            subprocess.run(["scancel", *ids], check=False)
            pytest.fail(f"jobs {ids} not done after {timeout} s: {states}")
        time.sleep(0.5)


def test_smoke_sweep_finishes_on_slurm(slurm_cluster, tmp_path):
    """Acceptance 1: the smoke sweep through the submitit launcher, waiting for the outcomes."""
    out = deqbench("sweep", REPO / "configs/sweeps/smoke.yaml", "--launcher", "submitit",
                   "--launcher-config", LOCAL, cwd=tmp_path)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "3 finished, 0 failed" in out.stdout
    # two resource groups: the 1-rank CRR and DE-Prox cells in one array, the 2-rank cell alone
    assert "submitted 2 cell(s) as Slurm job" in out.stdout and "submitted 1 cell(s) as Slurm job" in out.stdout
    client, found = runs(tmp_path, "smoke")
    assert sorted(r.info.status for r in found) == ["FINISHED"] * 3
    assert sorted((r.data.tags["family"], r.data.tags["world_size"]) for r in found) == [
        ("crr", "1"), ("crr", "2"), ("deprox", "1")]
    for r in found:
        sub = json.loads((tmp_path / "runs/smoke" / r.data.tags["cell_hash"] / "submitted.json").read_text())
        if sub["array_index"] is None:
            assert r.data.tags["slurm_job_id"] == sub["job_id"]
        else:  # an array task: its own SLURM_JOB_ID differs; the array id and index are tagged
            assert r.data.tags["slurm_array_job_id"] == sub["array_job_id"]
            assert r.data.tags["slurm_array_task_id"] == str(sub["array_index"])
        assert (tmp_path / "runs/smoke/slurm" / sub["job_id"]).is_dir()  # logs under the sweep's folder
        steps = [m.step for m in client.get_metric_history(r.info.run_id, "loss")]
        assert len(steps) == len(set(steps)) and steps, r.data.tags["family"]  # each epoch once
        if r.data.tags["family"] == "crr":
            assert sorted(steps) == list(range(12))  # 6 + 6 epochs
    st = deqbench("status", REPO / "configs/sweeps/smoke.yaml", cwd=tmp_path)
    assert "3 cells: 3 finished" in st.stdout


@pytest.fixture(scope="module")
def array_sweep(slurm_cluster, tmp_path_factory):
    """Three 1-rank cells, one of them failing (its image file is missing), submitted with --no-wait."""
    tmp = tmp_path_factory.mktemp("array")
    spec = {"name": "t_array", "base": str(TINY), "set": {"train.epochs": 2, "crr.epochs": 2},
            "seeds": [0, 1],
            "groups": [{}, {"seeds": [0], "set": {"data.image": str(tmp / "late.png")}}]}
    (tmp / "sweep.yaml").write_text(yaml.safe_dump(spec))
    out = deqbench("sweep", "sweep.yaml", "--launcher", "submitit", "--launcher-config", LOCAL, "--no-wait", cwd=tmp)
    subs = [json.loads(p.read_text()) for p in sorted((tmp / "runs/t_array").glob("*/submitted.json"))]
    return tmp, out, subs


def test_equal_resources_share_one_array_and_no_wait_returns(array_sweep):
    tmp, out, subs = array_sweep
    assert out.returncode == 0, out.stdout + out.stderr
    assert "submitted 3 cell(s) as Slurm job" in out.stdout and "deqbench status" in out.stdout
    assert len({s["array_job_id"] for s in subs}) == 1
    assert sorted(s["array_index"] for s in subs) == [0, 1, 2]
    assert sorted(s["job_id"] for s in subs) == sorted(f"{subs[0]['array_job_id']}_{i}" for i in range(3))


def test_status_follows_squeue_then_outcomes(array_sweep):
    tmp, _, subs = array_sweep
    early = deqbench("status", "sweep.yaml", cwd=tmp)
    assert early.returncode == (1 if "FAILED" in early.stdout else 0)  # exit 1 once a cell FAILED
    # Right after submission every cell is pending or running (or already done: they are tiny).
    assert "NOT_STARTED" not in early.stdout, early.stdout
    wait_jobs([s["array_job_id"] for s in subs[:1]])
    late = deqbench("status", "sweep.yaml", cwd=tmp)
    assert "3 cells: 1 failed, 2 finished" in late.stdout, late.stdout
    assert late.returncode == 1
    assert "late.png" in late.stdout  # the failure's reason


def test_rerun_submits_only_unfinished_cells(array_sweep):
    """Acceptance 7: the failed cell's input appears; re-running submits that cell alone."""
    tmp, _, subs = array_sweep
    wait_jobs([s["array_job_id"] for s in subs[:1]])
    import skimage.data
    import skimage.io

    skimage.io.imsave(tmp / "late.png", skimage.data.camera()[::8, ::8])
    again = deqbench("sweep", "sweep.yaml", "--launcher", "submitit", "--launcher-config", LOCAL, cwd=tmp)
    assert again.returncode == 0, again.stdout + again.stderr
    assert "3 cells, 2 already finished, 1 to run" in again.stdout
    assert "submitted 1 cell(s) as Slurm job" in again.stdout and "1 finished, 0 failed" in again.stdout
    _, found = runs(tmp, "t_array")
    assert sorted(r.info.status for r in found) == ["FAILED", "FINISHED", "FINISHED", "FINISHED"]
    final = deqbench("sweep", "sweep.yaml", "--launcher", "submitit", "--launcher-config", LOCAL, cwd=tmp)
    assert final.returncode == 0 and "nothing to run" in final.stdout


def test_status_reports_pending_from_squeue_then_the_cancelled_job(slurm_cluster, tmp_path):
    """A job held back (begin in an hour) is PENDING in `deqbench status`; cancelled, it is FAILED with Slurm's state."""
    cfg = yaml.safe_load(LOCAL.read_text())
    cfg["slurm_additional_parameters"] = {"begin": "now+1hour"}
    (tmp_path / "later.yaml").write_text(yaml.safe_dump(cfg))
    (tmp_path / "s.yaml").write_text(yaml.safe_dump({"name": "t_pending", "base": str(TINY), "seeds": [0]}))
    out = deqbench("sweep", "s.yaml", "--launcher", "submitit", "--launcher-config", "later.yaml", "--no-wait",
                   cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    (sub_path,) = (tmp_path / "runs/t_pending").glob("*/submitted.json")
    job = json.loads(sub_path.read_text())["job_id"]
    try:
        st = deqbench("status", "s.yaml", cwd=tmp_path)
        assert "PENDING" in st.stdout and f"Slurm job {job} pending" in st.stdout, st.stdout
    finally:
        subprocess.run(["scancel", job], check=False)
    wait_jobs([job])
    st = deqbench("status", "s.yaml", cwd=tmp_path)
    assert "FAILED" in st.stdout and "CANCELLED" in st.stdout, st.stdout


def test_dry_run_prints_the_array_script_and_submits_nothing(slurm_cluster, tmp_path):
    cfg = {"slurm_partition": slurm_cluster, "slurm_account": "imaging", "slurm_qos": "normal",
           "slurm_constraint": "cpu", "timeout_min": 30, "mem_gb": 3, "cpus_per_task": 1,
           "slurm_array_parallelism": 2, "slurm_setup": ["export DEQBENCH_MARK=1"]}
    (tmp_path / "l.yaml").write_text(yaml.safe_dump(cfg))
    spec = {"name": "t_dry", "base": str(TINY), "seeds": [0, 1, 2],
            "groups": [{}, {"seeds": [0], "set": {"resources.tasks_per_node": 2}}]}
    (tmp_path / "s.yaml").write_text(yaml.safe_dump(spec))
    out = deqbench("sweep", "s.yaml", "--launcher", "submitit", "--launcher-config", "l.yaml", "--dry-run",
                   cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    text = out.stdout
    assert "4 cells (dry run, nothing submitted)" in text
    assert "job array of 3 tasks" in text and "one job (nodes=1, tasks_per_node=2" in text
    for flag in ("--array=0-2%2", "--partition=debug", "--account=imaging", "--qos=normal", "--constraint=cpu",
                 "--time=30", "--mem=3GB", "--ntasks-per-node=2", "--cpus-per-task=1", "--signal=USR2@90"):
        assert f"#SBATCH {flag}" in text, flag
    assert "export DEQBENCH_MARK=1" in text
    assert f"{tmp_path}/runs/t_dry/slurm/%j" in text
    assert not (tmp_path / "runs").exists()  # nothing written, nothing submitted


def test_sbatch_script_matches_the_golden_file(slurm_cluster):
    from jobs.launchers.submitit_launcher import make_executor, sbatch_script

    cfg = {"slurm_partition": slurm_cluster, "timeout_min": 20, "mem_gb": 2, "slurm_array_parallelism": 4,
           "slurm_setup": ["source .venv/bin/activate"]}
    res = {"nodes": 1, "tasks_per_node": 2, "gpus_per_node": 0, "cpus_per_task": 1}
    text = sbatch_script(make_executor(Path("/RUNS/golden/slurm/%j"), cfg, res, "deqbench-golden"), 5)
    text = text.replace(os.path.realpath(sys.executable), "PYTHON").replace(sys.executable, "PYTHON")
    assert text == GOLDEN.read_text()


# --- bad input: exit 2 before anything is submitted ----------------------------------
@pytest.fixture
def one_cell(tmp_path):
    (tmp_path / "s.yaml").write_text(yaml.safe_dump({"name": "t_bad", "base": str(TINY), "seeds": [0]}))
    return tmp_path


def _refused(out, tmp, *words):
    assert out.returncode == 2, out.stdout + out.stderr
    for w in words:
        assert w in out.stderr, (w, out.stderr)
    assert not list(tmp.glob("runs/*/*/submitted.json")) and not list(tmp.glob("runs/*/slurm"))


def test_unknown_launcher_key_refused(one_cell):
    (one_cell / "l.yaml").write_text(yaml.safe_dump({"slurm_partition": "debug", "gpu_per_node": 1}))
    out = deqbench("sweep", "s.yaml", "--launcher", "submitit", "--launcher-config", "l.yaml", cwd=one_cell)
    _refused(out, one_cell, "l.yaml", "unknown launcher key(s) 'gpu_per_node'", "gpus_per_node")


def test_missing_partition_refused(slurm_cluster, one_cell):
    (one_cell / "l.yaml").write_text(yaml.safe_dump({"slurm_partition": "gpu_a100"}))
    out = deqbench("sweep", "s.yaml", "--launcher", "submitit", "--launcher-config", "l.yaml", cwd=one_cell)
    _refused(out, one_cell, "partition 'gpu_a100' does not exist", "partitions: debug")


def test_slurm_missing_refused(one_cell):
    env = {**os.environ, "PATH": ""}
    out = deqbench("sweep", "s.yaml", "--launcher", "submitit", "--launcher-config", LOCAL, cwd=one_cell, env=env)
    _refused(out, one_cell, "Slurm is not installed", "sbatch", "local_cluster.sh start")
    dry = deqbench("sweep", "s.yaml", "--launcher", "submitit", "--launcher-config", LOCAL, "--dry-run",
                   cwd=one_cell, env=env)
    _refused(dry, one_cell, "Slurm is not installed")


def test_launcher_config_required(one_cell):
    out = deqbench("sweep", "s.yaml", "--launcher", "submitit", cwd=one_cell)
    _refused(out, one_cell, "needs --launcher-config")
