"""A two-node local Slurm, and a node that dies mid-sweep.

``slurm/local_cluster.sh start --nodes 2`` adds node ``<host>-2``, a second
slurmd on this machine (Slurm's multiple-slurmd mode), and partition ``two``
with both nodes; the module restores the node count it found when it ends.

Node loss: a 4-cell sweep spreads over both nodes; 3 s after every cell on
the second node has a periodic checkpoint, ``local_cluster.sh kill-node`` SIGKILLs
that node's slurmd, slurmstepds and job processes (no signal the job could
catch: no checkpoint on the way out). slurmctld notices within SlurmdTimeout
(15 s in two-node mode), marks the node DOWN and requeues its jobs; the test
releases Slurm's ~2 min requeue hold after a few seconds, as test_requeue.py
does. Checked: the requeued cells ran again on the surviving node, every cell
ends FINISHED in one MLflow run, each epoch is logged exactly once, and the
killed cells' final metrics equal an uninterrupted local run.

Both tests reconfigure the shared cluster (slurmctld restarts), so both are slow:
``pytest -m slow tests/jobs/test_node_loss.py`` (about 4 min on 2 CPU cores).
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
from test_requeue import EPOCHS, OVER, TINY, _reference, _release_when_requeued, _wait

REPO = Path(__file__).resolve().parents[2]
CLUSTER = REPO / "slurm/local_cluster.sh"
TWO = REPO / "configs/launchers/local_slurm_two_nodes.yaml"
LRS = [5e-3, 4e-3, 6e-3, 3e-3]
KILL_AFTER_CKPT_S = 3.0  # ~2-3 epochs of crr_tiny at 64x64 here

pytestmark = [pytest.mark.slurm, pytest.mark.slow]


def _cluster(*args: str) -> str:
    out = subprocess.run(["bash", str(CLUSTER), *args], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stdout + out.stderr
    return out.stdout


def _nodes() -> list[str]:
    return sorted(subprocess.run(["sinfo", "-h", "-N", "-p", "two", "-o", "%N"], capture_output=True, text=True,
                                 check=True).stdout.split())


@pytest.fixture(scope="module")
def two_nodes(slurm_cluster):
    before = sum(line.startswith("NodeName=") for line in Path("/etc/slurm/slurm.conf").read_text().splitlines())
    _cluster("start", "--nodes", "2")
    yield _nodes()
    _cluster("start", "--nodes", str(max(before, 1)))  # others' tests expect the cluster as it was


def _sweep(tmp: Path, sweep: Path, *extra: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "jobs.cli", "sweep", str(sweep), "--launcher", "submitit",
                           "--launcher-config", str(TWO), *extra], cwd=tmp, capture_output=True, text=True,
                          timeout=900)


def _task_nodes(job_ids) -> dict[str, str]:
    """``{array task or job id: node}`` of the jobs' latest attempts, from ``scontrol``."""
    from jobs.slurm_env import job_info

    found = {}
    for j in job_ids:
        for rec in job_info(j):
            tid = f"{rec['ArrayJobId']}_{rec['ArrayTaskId']}" if "ArrayTaskId" in rec else rec["JobId"]
            found[tid] = rec["NodeList"]
    return found


def test_two_nodes_in_sinfo_and_the_smoke_sweep_uses_both(two_nodes, tmp_path):
    assert len(two_nodes) == 2
    sinfo = subprocess.run(["sinfo", "-h", "-N", "-o", "%N %P %t"], capture_output=True, text=True).stdout
    assert all(n in sinfo for n in two_nodes), sinfo
    out = _sweep(tmp_path, REPO / "configs/sweeps/smoke.yaml")
    assert out.returncode == 0, out.stdout + out.stderr
    assert "3 finished, 0 failed" in out.stdout
    subs = [json.loads(p.read_text()) for p in (tmp_path / "runs/smoke").glob("*/submitted.json")]
    used = set(_task_nodes({s["job_id"] for s in subs}).values())
    assert used == set(two_nodes), used  # 2 one-CPU array tasks and a 2-rank job on 2 nodes of 2 CPUs
    client = MlflowClient(f"sqlite:///{tmp_path}/mlflow.db")
    found = client.search_runs([client.get_experiment_by_name("smoke").experiment_id])
    assert sorted(r.info.status for r in found) == ["FINISHED"] * 3
    checked = 0
    for r in found:  # each epoch once; the CRR cells (1 and 2 ranks) train 6 + 6 epochs
        steps = [m.step for m in client.get_metric_history(r.info.run_id, "loss")]
        assert steps and len(steps) == len(set(steps)), r.data.tags["family"]
        if r.data.tags["family"] == "crr":
            assert sorted(steps) == list(range(12))
        checked += len(steps)
    print(f"two-node smoke: 3 cells FINISHED on nodes {sorted(used)}, {checked} loss values checked")


def test_node_loss_requeues_on_the_surviving_node_and_resumes(two_nodes, tmp_path):
    name = "t_node_loss"
    spec = {"name": name, "base": str(TINY), "set": OVER, "axes": {"train.lr": LRS}, "seeds": [0]}
    (tmp_path / "s.yaml").write_text(yaml.safe_dump(spec))
    out = _sweep(tmp_path, tmp_path / "s.yaml", "--no-wait")
    assert out.returncode == 0, out.stdout + out.stderr
    cells = {}  # array task id -> work dir
    for sub in (tmp_path / "runs" / name).glob("*/submitted.json"):
        s = json.loads(sub.read_text())
        cells[f"{s['array_job_id']}_{s['array_index']}"] = sub.parent
    assert len(cells) == 4
    array = next(iter(cells)).split("_")[0]
    survivor, dying = two_nodes

    def spread():  # every cell running, both nodes used
        nodes = {t: n for t, n in _task_nodes([array]).items() if n and n != "(null)"}
        return nodes if len(nodes) == 4 and set(nodes.values()) == {survivor, dying} else None

    nodes = _wait(spread, "the 4 cells to run on both nodes", timeout=300, job=array)
    victims = sorted(t for t, n in nodes.items() if n == dying)
    _wait(lambda: all(list((cells[t] / "ckpt").glob("ckpt_*.pt")) for t in victims),
          "a periodic checkpoint of every cell on the dying node", job=array)
    time.sleep(KILL_AFTER_CKPT_S)  # between checkpoints: the epochs since the newest one are lost with the node
    at_kill = {}
    for t in victims:  # mid-training: not done yet
        status = json.loads((cells[t] / "status.json").read_text())
        assert status["state"] == "RUNNING", t
        at_kill[t] = max(p.name for p in (cells[t] / "ckpt").glob("ckpt_*.pt"))
    killed = _cluster("kill-node", dying)
    assert f"killed node {dying}" in killed, killed
    t_kill = time.monotonic()
    for t in victims:
        _release_when_requeued(t, cells[t])
    detect_s = time.monotonic() - t_kill

    from jobs.slurm_env import TERMINAL_STATES, job_states

    def ended():
        states = job_states([array])
        return states if all(v in TERMINAL_STATES for v in states.values()) else None

    states = _wait(ended, "every cell to end", timeout=600, job=array)
    assert set(states.values()) == {"COMPLETED"}, states
    after = _task_nodes([array])
    assert all(after[t] == survivor for t in victims), after  # requeued on the node that lived

    client = MlflowClient(f"sqlite:///{tmp_path}/mlflow.db")
    found = client.search_runs([client.get_experiment_by_name(name).experiment_id])
    assert sorted(r.info.status for r in found) == ["FINISHED"] * 4
    by_cell = {r.data.tags["cell_hash"]: r for r in found}
    checked = 0
    for t, workdir in cells.items():
        run = by_cell[workdir.name]
        for key in ("loss", "psnr", "time/epoch_s", "solver/fwd_nstep"):
            steps = [m.step for m in client.get_metric_history(run.info.run_id, key)]
            assert len(steps) == len(set(steps)), f"{t} {key}: an epoch logged twice"
            checked += len(steps)
            if key in ("loss", "time/epoch_s"):
                assert sorted(steps) == list(range(EPOCHS)), f"{t} {key}: an epoch missing"
        status = json.loads((workdir / "status.json").read_text())
        assert status["state"] == "FINISHED" and status["resumed_from"] is (t in victims), t
        if t in victims:
            assert run.data.tags["resumed"] == "true", t
            log = "".join(p.read_text() for p in (workdir.parent / "slurm").glob(f"{t}/*_log.*"))
            assert log and "received; stopping" not in log, t  # no signal reached the dying node's jobs
    for i, t in enumerate(victims):  # the resumed cells end where an uninterrupted run ends
        lr = json.loads((cells[t] / "cell.json").read_text())["config"]["train"]["lr"]  # the cell's axis value
        ref_dir = tmp_path / f"ref{i}"
        ref_dir.mkdir()
        reference = _reference(ref_dir, name, {"train.lr": lr})
        for key in ("psnr", "ssim", "stage1/psnr", "crr/gain_db", "solver/eval_nstep"):
            assert by_cell[cells[t].name].data.metrics[key] == pytest.approx(reference[key], rel=1e-6, abs=1e-9), (t, key)
            checked += 1
    st = subprocess.run([sys.executable, "-m", "jobs.cli", "status", "s.yaml"], cwd=tmp_path, capture_output=True,
                        text=True)
    assert "4 cells: 4 finished" in st.stdout, st.stdout + st.stderr
    print(f"node loss: {len(victims)} of 4 cells on {dying} killed, newest checkpoints {at_kill}, "
          f"requeued and released {detect_s:.0f} s after the kill; {4 * EPOCHS} epochs, {checked} metric values checked")
    # a plain start (another test's fixture) leaves the dead node down; --nodes 2 starts its slurmd alone
    assert "start --nodes 2 brings them back" in _cluster("start")
    _cluster("start", "--nodes", "2")
    assert subprocess.run(["sinfo", "-h", "-n", dying, "-o", "%t"], capture_output=True,
                          text=True).stdout.split()[0] in ("idle", "mix", "alloc")
