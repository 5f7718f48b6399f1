"""Live progress and time-based flushing.

Fast: the progress record (epoch / total, loss, PSNR, ETA) a training loop's
metrics produce, how ``deqbench status`` renders it, and the tracker's rule that
no step reaches the store twice (a real SQLite MLflow store, in process).

End to end (real subprocesses, a real SQLite store): a cell flushes every
epoch, so its run holds epochs past its last checkpoint; ``deqbench status
--json`` shows it RUNNING with its progress; it is SIGKILLed (no handler runs,
nothing is flushed or checkpointed on the way out) and run again: it resumes
from the checkpoint into the same run, replays the epochs the store already
holds without logging them again, and ends with every epoch's metrics exactly once.
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

from jobs import tracking
from jobs.progress import ProgressTracker, describe, total_epochs
from jobs.status import _detail
from suite.training import MemoryTracker

REPO = Path(__file__).resolve().parents[2]
TINY = REPO / "configs/experiments/crr_tiny.yaml"


def test_total_epochs_counts_every_stage_of_the_cells_family():
    assert total_epochs({"family": "crr", "train": {"epochs": 7}, "crr": {"epochs": 3},
                         "deprox": {"pretrain_epochs": 5}}) == 10
    assert total_epochs({"family": "deq_inr", "train": {"epochs": 7}, "crr": {"epochs": 3}}) == 7
    assert total_epochs({"family": "deprox", "train": {"epochs": 4}, "deprox": {"pretrain_epochs": 2}}) == 6


def test_progress_reports_epoch_loss_psnr_and_eta():
    reports: list[dict] = []
    inner = MemoryTracker()
    prog = ProgressTracker(inner, total=10, report=reports.append, every_s=0.0)
    prog.log_metrics({"loss": 0.5, "time/epoch_s": 0.05, "stage": 1.0}, step=3)  # a resumed run: epoch 4 first
    time.sleep(0.05)
    prog.log_metrics({"loss": 0.25, "psnr": 21.5, "stage": 1.0}, step=4)
    assert inner.history["loss"] == [(3, 0.5), (4, 0.25)]  # everything reaches the run's tracker
    last = reports[-1]
    assert (last["epoch"], last["total"], last["loss"], last["psnr"]) == (5, 10, 0.25, 21.5)
    # 2 epochs in about 0.1 s of wall time (more on a loaded machine): 5 epochs left take about 0.25 s
    assert 0.1 < last["eta_s"] < 10.0, last
    prog.log_metrics({"psnr": 22.0, "ssim": 0.5}, step=10)  # the final metrics: no epoch, the PSNR is news
    assert prog.state["psnr"] == 22.0 and prog.state["epoch"] == 5


def test_status_line_shows_progress_and_failure_reason():
    now = time.time()
    line = describe({"epoch": 12, "total": 44, "loss": 0.00123, "psnr": 27.314, "eta_s": 185, "at": now}, now)
    assert line == "epoch 12/44  loss 0.00123  psnr 27.31 dB  ETA 3m05s"
    assert "no news for 5m00s" in describe({"epoch": 1, "total": 2, "at": now - 300}, now)
    row = {"progress": None, "detail": "Slurm job 12_0 ended", "reason": "OUT_OF_MEMORY"}
    assert _detail(row) == "[OUT_OF_MEMORY] Slurm job 12_0 ended"


def test_no_step_reaches_the_store_twice(tmp_path, monkeypatch):
    """A resumed run's tracker skips steps the store holds; values a checkpoint kept are logged once."""
    monkeypatch.setenv(tracking.FLUSH_EVERY_ENV, "1000")
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    first = tracking.start_run(uri, "t_dedup", "r", {"a": 1}, {"cell_hash": "x"})
    for step in range(6):
        first.log_metrics({"loss": float(step), "psnr": 10.0 + step}, step=step)
    first.flush()
    for step in range(6, 9):  # logged after the last flush; the process dies: lost with it
        first.log_metrics({"loss": float(step)}, step=step)
    kept = [("loss", 99.0, 1, 4), ("loss", 6.0, 1, 6), ("psnr", 16.0, 1, 6)]  # what a checkpoint kept unlogged
    again = tracking.start_run(uri, "t_dedup", "r", {}, {}, resume_run_id=first.run_id)
    again.restore(kept)
    for step in range(3, 10):  # the resume replays from an older checkpoint
        again.log_metrics({"loss": float(step), "psnr": 10.0 + step}, step=step)
    again.flush()
    client = MlflowClient(uri)
    loss = sorted((m.step, m.value) for m in client.get_metric_history(first.run_id, "loss"))
    assert loss == [(s, float(s)) for s in range(10)]  # step 4 stays the first value; 6 from the checkpoint once
    assert [m.step for m in sorted(client.get_metric_history(first.run_id, "psnr"), key=lambda m: m.step)] == list(range(10))


def test_metrics_reach_the_store_every_flush_period(tmp_path, monkeypatch):
    monkeypatch.setenv(tracking.FLUSH_EVERY_ENV, "2")
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    tracker = tracking.start_run(uri, "t_period", "r", {}, {})
    client = MlflowClient(uri)
    tracker.log_metrics({"loss": 1.0}, step=0)
    assert client.get_metric_history(tracker.run_id, "loss") == []  # buffered: the period has not passed
    time.sleep(2.1)
    tracker.log_metrics({"loss": 0.5}, step=1)  # the period has passed: this epoch's log writes both
    assert [m.step for m in client.get_metric_history(tracker.run_id, "loss")] == [0, 1]


def _poll(cond, what: str, timeout: float = 300):
    deadline = time.monotonic() + timeout
    while not (value := cond()):
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)
    return value


def _status(workdir: Path) -> dict:
    try:
        return json.loads((workdir / "status.json").read_text())
    except (OSError, ValueError):
        return {}


def _ckpt_steps(workdir: Path) -> list[int]:
    return sorted(int(p.stem.split("_")[1]) for p in (workdir / "ckpt").glob("ckpt_*.pt"))


@pytest.mark.slow  # three process start-ups: ~30 s on an idle 2-core machine, minutes under load
def test_sigkill_and_resume_log_every_epoch_exactly_once(tmp_path):
    e1, e2, every = 24, 4, 8
    spec = {"name": "t_kill9", "base": str(TINY), "seeds": [0],
            "set": {"train.epochs": e1, "crr.epochs": e2, "train.ckpt_every": every, "train.eval_every": 3}}
    (tmp_path / "s.yaml").write_text(yaml.safe_dump(spec))
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    from jobs.cells import expand_sweep

    (cell,) = expand_sweep(tmp_path / "s.yaml", runs_dir=tmp_path / "runs", tracking_uri=uri)[1]
    workdir = Path(cell.workdir)
    env = {**os.environ, "DEQBENCH_FLUSH_EVERY_S": "0", "DEQBENCH_TORCH_THREADS": "1"}
    node = subprocess.Popen([sys.executable, "-m", "jobs.node", str(cell.save())], cwd=tmp_path, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    client = MlflowClient(uri)

    def stored_past_checkpoint():
        ckpts, run_id = _ckpt_steps(workdir), _status(workdir).get("run_id")
        if not ckpts or not run_id or node.poll() is not None:
            return None
        try:
            steps = [m.step for m in client.get_metric_history(run_id, "loss")]
        except Exception:  # noqa: BLE001 - the writer holds the SQLite lock for a moment
            return None
        return steps if steps and max(steps) + 1 >= ckpts[-1] + 2 else None

    _poll(stored_past_checkpoint, "the store to hold epochs past the last checkpoint")
    node.send_signal(signal.SIGKILL)
    node.wait(timeout=60)
    assert node.returncode == -signal.SIGKILL
    # what status shows of a cell whose node job died without a word: its last report
    st = subprocess.run([sys.executable, "-m", "jobs.cli", "status", "s.yaml", "--json"], cwd=tmp_path,
                        capture_output=True, text=True, timeout=120)
    assert st.returncode == 0, st.stderr
    (row,) = json.loads(st.stdout)["cells"]
    assert row["state"] == "RUNNING" and row["progress"]["total"] == e1 + e2, row
    assert 1 <= row["progress"]["epoch"] < e1 + e2 and row["progress"]["loss"] > 0 and row["progress"]["eta_s"] > 0
    run_id = _status(workdir)["run_id"]
    before = sorted(m.step for m in client.get_metric_history(run_id, "loss"))
    ckpt = _ckpt_steps(workdir)[-1]
    assert before == list(range(len(before))) and len(before) > ckpt  # the replay overlaps what the store holds

    again = subprocess.run([sys.executable, "-m", "jobs.cli", "sweep", "s.yaml"], cwd=tmp_path, env=env,
                           capture_output=True, text=True, timeout=600)
    assert again.returncode == 0, again.stdout + again.stderr[-3000:]
    (run,) = client.search_runs([client.get_experiment_by_name("t_kill9").experiment_id])
    assert run.info.run_id == run_id and run.info.status == "FINISHED" and run.data.tags["resumed"] == "true"
    checked = 0
    for key in ("loss", "stage", "time/epoch_s"):
        steps = sorted(m.step for m in client.get_metric_history(run_id, key))
        assert steps == list(range(e1 + e2)), (key, steps)
        checked += len(steps)
    psnr = sorted(m.step for m in client.get_metric_history(run_id, "psnr"))
    assert psnr == [s for s in range(e1) if (s + 1) % 3 == 0] + list(range(e1, e1 + e2)) + [e1 + e2]
    results = _status(workdir)["results"]
    assert all(run.data.metrics[k] == v for k, v in results.items())
    print(f"\nSIGKILL after epoch {len(before)} (checkpoint {ckpt}): {len(before) - ckpt} epochs replayed, not "
          f"logged again; {checked + len(psnr) + len(results)} values checked, 0 lost, 0 duplicated")
    done = subprocess.run([sys.executable, "-m", "jobs.cli", "status", "s.yaml", "--watch", "0.2", "--json"],
                          cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and json.loads(done.stdout.strip().splitlines()[-1])["counts"] == {"FINISHED": 1}


def test_status_goes_on_without_an_unreachable_store(tmp_path):
    """During a tracking outage `deqbench status` still answers, from the cells' status.json (5 s patience)."""
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]  # closed again: connections are refused
    (tmp_path / "s.yaml").write_text(yaml.safe_dump({"name": "t_down", "base": str(TINY), "seeds": [0]}))
    t0 = time.monotonic()
    out = subprocess.run([sys.executable, "-m", "jobs.cli", "status", "s.yaml", "--tracking-uri",
                          f"http://127.0.0.1:{port}"], cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0 and "1 cells: 1 not_started" in out.stdout, out.stdout + out.stderr
    assert "unreachable" in out.stderr and "status.json only" in out.stderr
    assert time.monotonic() - t0 < 120  # not MLflow's own minutes of retries per call
