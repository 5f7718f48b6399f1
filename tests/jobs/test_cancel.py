"""Stopping a local sweep: Ctrl-C and ``deqbench cancel``, with real cell processes.

Cells end KILLED (``status.json`` reason ``CANCELLED``, MLflow run KILLED with
tag ``deqbench.failure_reason``), no cell process is left behind, a cell still
queued is KILLED too, and running the sweep again resumes each cell from its
checkpoint into the same MLflow run, no epoch logged twice.
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
EPOCHS, CRR_EPOCHS = 40, 2


def deqbench(*args, cwd, timeout=600):
    return subprocess.run([sys.executable, "-m", "jobs.cli", *map(str, args)], cwd=cwd, capture_output=True,
                          text=True, timeout=timeout)


def _sweep(tmp: Path, name: str) -> list[str]:
    """Two cells run one at a time: when the first has a checkpoint, the second is still queued."""
    spec = {"name": name, "base": str(TINY), "seeds": [0, 1],
            "set": {"train.epochs": EPOCHS, "train.ckpt_every": 3, "crr.epochs": CRR_EPOCHS}}
    (tmp / "s.yaml").write_text(yaml.safe_dump(spec))
    return [sys.executable, "-m", "jobs.cli", "sweep", "s.yaml", "--workers", "1"]


def _start_and_wait_for_a_checkpoint(tmp: Path, name: str) -> subprocess.Popen:
    proc = subprocess.Popen(_sweep(tmp, name), cwd=tmp, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 300
    while not list(tmp.glob(f"runs/{name}/*/ckpt/ckpt_*.pt")):
        assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()
        time.sleep(0.2)
    return proc


def _node_processes(tmp: Path) -> list[int]:
    """Live processes running a cell of this test (``jobs.node`` on a cell.json under ``tmp``)."""
    pids = []
    for p in Path("/proc").iterdir():
        try:
            cmd = (p / "cmdline").read_bytes().replace(b"\0", b" ").decode()
        except (OSError, ValueError):
            continue
        if p.name.isdigit() and "jobs.node" in cmd and str(tmp) in cmd:
            pids.append(int(p.name))
    return pids


def _assert_killed_and_resumable(tmp: Path, name: str) -> dict[str, str]:
    """Both cells KILLED/CANCELLED; the one that ran has a KILLED run tagged so. Returns {hash: run id}."""
    assert not _node_processes(tmp)
    statuses = {p.parent.name: json.loads(p.read_text()) for p in tmp.glob(f"runs/{name}/*/status.json")}
    assert len(statuses) == 2
    for st in statuses.values():
        assert st["state"] == "KILLED" and st["reason"] == "CANCELLED", st
    client = MlflowClient(f"sqlite:///{tmp}/mlflow.db")
    runs = client.search_runs([client.get_experiment_by_name(name).experiment_id])
    assert runs and all(r.info.status == "KILLED" for r in runs)
    assert all(r.data.tags["deqbench.failure_reason"] == "CANCELLED" for r in runs)
    return {r.data.tags["cell_hash"]: r.info.run_id for r in runs}


def _assert_rerun_resumes(tmp: Path, name: str, before: dict[str, str]) -> None:
    again = deqbench(*_sweep(tmp, name)[3:], cwd=tmp)
    assert again.returncode == 0, again.stdout + again.stderr
    assert "2 finished, 0 failed" in again.stdout
    client = MlflowClient(f"sqlite:///{tmp}/mlflow.db")
    runs = client.search_runs([client.get_experiment_by_name(name).experiment_id])
    assert len(runs) == 2 and all(r.info.status == "FINISHED" for r in runs)
    for r in runs:
        if r.data.tags["cell_hash"] in before:  # the cell that had begun: same run, resumed
            assert r.info.run_id == before[r.data.tags["cell_hash"]] and r.data.tags.get("resumed") == "true"
        steps = [m.step for m in client.get_metric_history(r.info.run_id, "loss")]
        assert sorted(steps) == list(range(EPOCHS + CRR_EPOCHS))  # none missing, none twice


@pytest.mark.slow  # two tiny cells, stopped and resumed: ~1-2 min on 2 busy cores
def test_ctrl_c_leaves_cells_killed_and_a_rerun_resumes_them(tmp_path):
    proc = _start_and_wait_for_a_checkpoint(tmp_path, "t_ctrl_c")
    proc.send_signal(signal.SIGINT)  # what a terminal's Ctrl-C sends the sweep
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 1, out + err
    assert "sweep stopped: 2 cell(s) KILLED" in err
    assert out.count("[CANCELLED]") == 2, out
    before = _assert_killed_and_resumable(tmp_path, "t_ctrl_c")
    _assert_rerun_resumes(tmp_path, "t_ctrl_c", before)


@pytest.mark.slow  # ~1.5 min on 2 busy cores (MLflow store creation and torch imports dominate)
def test_cancel_command_stops_a_local_sweep(tmp_path):
    proc = _start_and_wait_for_a_checkpoint(tmp_path, "t_cancel")
    try:
        out = deqbench("cancel", "s.yaml", cwd=tmp_path, timeout=180)
    finally:
        if proc.poll() is None:
            proc.wait(timeout=60)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "SIGINT to the local launcher" in out.stdout and "2 cell(s) KILLED" in out.stdout, out.stdout
    assert proc.returncode == 1
    _assert_killed_and_resumable(tmp_path, "t_cancel")
    again = deqbench("cancel", "s.yaml", cwd=tmp_path)
    assert again.returncode == 0 and "nothing to cancel" in again.stdout


@pytest.mark.slow  # ~1.5 min on 2 busy cores
def test_cancel_stops_a_node_job_whose_launcher_is_gone(tmp_path):
    """A cell process left running (its launcher was killed) is found by the pid in its status.json."""
    proc = _start_and_wait_for_a_checkpoint(tmp_path, "t_orphan")
    os.kill(proc.pid, signal.SIGKILL)  # the launcher dies; its cell runs on in its own session
    proc.wait()
    (node,) = _node_processes(tmp_path)
    out = deqbench("cancel", "s.yaml", cwd=tmp_path, timeout=180)
    assert out.returncode == 0 and "SIGTERM to the node job" in out.stdout, out.stdout + out.stderr
    assert not _node_processes(tmp_path)
    statuses = [json.loads(p.read_text()) for p in tmp_path.glob("runs/t_orphan/*/status.json")]
    assert [(s["state"], s["reason"]) for s in statuses] == [("KILLED", "CANCELLED")]


def test_cancel_of_a_sweep_that_never_ran(tmp_path):
    _sweep(tmp_path, "t_idle")
    out = deqbench("cancel", "s.yaml", cwd=tmp_path)
    assert out.returncode == 0 and "nothing to cancel: no cell of sweep 't_idle' is running or queued" in out.stdout
    bad = deqbench("cancel", "missing.yaml", cwd=tmp_path)
    assert bad.returncode == 2 and "missing.yaml" in bad.stderr and "Traceback" not in bad.stderr


@pytest.mark.slow  # a local Ray starts, two trials one at a time: ~2 min
def test_cancel_stops_a_ray_sweep(tmp_path):
    pytest.importorskip("ray")
    cfg = {**yaml.safe_load((REPO / "configs/launchers/ray_local.yaml").read_text()), "max_concurrent_trials": 1}
    (tmp_path / "l.yaml").write_text(yaml.safe_dump(cfg))
    cmd = [*_sweep(tmp_path, "t_cancel_ray")[:-2], "--launcher", "ray", "--launcher-config", "l.yaml"]
    spec = yaml.safe_load((tmp_path / "s.yaml").read_text())
    spec["set"]["train.epochs"] = 20 * EPOCHS  # a trial must still run when cancel comes, even on a quiet machine
    (tmp_path / "s.yaml").write_text(yaml.safe_dump(spec))
    proc = subprocess.Popen(cmd, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.monotonic() + 400
    while not list(tmp_path.glob("runs/t_cancel_ray/*/ckpt/ckpt_*.pt")):
        assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()[0][-3000:]
        time.sleep(0.3)
    out = deqbench("cancel", "s.yaml", "--wait-s", "120", cwd=tmp_path, timeout=300)
    log, _ = proc.communicate(timeout=120)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "SIGINT to the ray launcher" in out.stdout and "2 cell(s) KILLED" in out.stdout, out.stdout + log[-3000:]
    _assert_killed_and_resumable(tmp_path, "t_cancel_ray")


# --- fast: the local launcher's stop switch and exit reasons, with stand-in cell processes ------------
STAND_IN = r"""
import json, os, signal, sys, time
wd, what = os.path.dirname(sys.argv[1]), sys.argv[2]
def status(**kw):
    open(os.path.join(wd, "status.json"), "w").write(json.dumps(kw))
if what == "exit3":
    sys.exit(3)
if what == "sigkill":
    os.kill(os.getpid(), signal.SIGKILL)
status(state="RUNNING", pid=os.getpid())
def stop(signum, frame):  # what the node job does on SIGTERM: checkpoint, then end KILLED
    status(state="KILLED", error="stopped by SIGTERM after saving checkpoint 3", reason="SIGTERM")
    sys.exit(1)
signal.signal(signal.SIGTERM, stop)
time.sleep(60)
status(state="FINISHED")
"""


def _stand_in(behaviour):
    return lambda cell, path: [sys.executable, "-c", STAND_IN, str(path), behaviour(cell)]


def _cells(tmp, names):
    from jobs.cells import Cell

    return [Cell(config={"train": {"device": "cpu"}}, hash=n, experiment="t_stop", workdir=str(tmp / n),
                 tracking_uri=f"sqlite:///{tmp}/mlflow.db", label=n) for n in names]


def test_a_cell_process_that_dies_is_failed_with_its_exit_code_or_signal(tmp_path):
    from jobs.launchers import local

    cells = _cells(tmp_path, ["exit3", "sigkill"])
    out = {o["hash"]: o for o in local.submit(cells, workers=2, progress=False, command=_stand_in(lambda c: c.hash))}
    assert (out["exit3"]["state"], out["exit3"]["reason"]) == ("FAILED", "exit code 3")
    assert (out["sigkill"]["state"], out["sigkill"]["reason"]) == ("FAILED", "signal SIGKILL")
    assert json.loads((tmp_path / "sigkill" / "status.json").read_text())["reason"] == "signal SIGKILL"


def test_sigint_to_the_local_launcher_stops_running_and_queued_cells(tmp_path):
    """Ctrl-C: the running cell gets SIGTERM (and ends KILLED), the queued ones never start; all CANCELLED."""
    import threading

    from jobs.launchers import local

    cells = _cells(tmp_path, ["a", "b", "c"])
    running = tmp_path / "a" / "status.json"

    def ctrl_c():
        deadline = time.monotonic() + 60
        while not running.exists() and time.monotonic() < deadline:
            time.sleep(0.05)
        os.kill(os.getpid(), signal.SIGINT)

    before = signal.getsignal(signal.SIGINT)  # SIG_IGN when pytest itself runs in the background
    threading.Thread(target=ctrl_c, daemon=True).start()
    t0 = time.monotonic()
    out = {o["hash"]: o for o in local.submit(cells, workers=1, progress=False, command=_stand_in(lambda c: "sleep"))}
    assert time.monotonic() - t0 < 30  # not the 60 s the stand-in sleeps
    assert {h: (o["state"], o["reason"]) for h, o in out.items()} == {h: ("KILLED", "CANCELLED") for h in "abc"}
    assert out["a"]["error"] == "stopped by SIGTERM after saving checkpoint 3"  # it stopped itself, gracefully
    assert not (tmp_path / "b" / "status.json").read_text().count("RUNNING")  # never started
    assert json.loads((tmp_path / "launcher.json").read_text())["pid"] == os.getpid()
    assert signal.getsignal(signal.SIGINT) is before  # restored
