"""A cell SIGKILLed while writing its checkpoint, again and again, ends as if never interrupted.

A real node job (tiny DEQ-INR, CPU, one thread, a checkpoint every epoch) runs
with ``$DEQBENCH_CKPT_WRITE_DELAY_S`` set, which makes each checkpoint write
slow (2 KiB chunks with a sleep between them). For each of a seeded list of
checkpoint steps the test waits until that checkpoint's write begins, sleeps a
seeded random fraction of the write's duration and sends SIGKILL to the process
group. When the kill landed mid-write, the partial file is then moved to the
checkpoint's final name -- what a file system that reorders writes can leave
after a power loss -- so the restarted cell must reject it by its checksum and
resume from the previous checkpoint. After the last kill the cell runs to the
end. Checked: every torn file rejected (never loaded), one MLflow run, every
epoch's loss logged once and equal to an uninterrupted run's, same final metrics.
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from mlflow.tracking import MlflowClient

from suite.training.checkpoint import _HEADER, MAGIC

REPO = Path(__file__).resolve().parents[2]
TINY = REPO / "configs/experiments/deq_inr_tiny.yaml"
DELAY_S = 0.02  # per 2 KiB chunk
FINAL_KEYS = ("psnr", "ssim", "nmse", "vif", "hfe", "sr", "solver/eval_nstep", "solver/eval_abs_lowest")
ENV = {**os.environ, "DEQBENCH_TORCH_THREADS": "1", "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}


def _cell(tmp: Path, epochs: int):
    from jobs.cells import expand_sweep

    tmp.mkdir(parents=True, exist_ok=True)
    spec = {"name": "t_torn", "base": str(TINY), "seeds": [0],
            "set": {"train.epochs": epochs, "train.ckpt_every": 1, "train.eval_every": 2}}
    (tmp / "s.yaml").write_text(yaml.safe_dump(spec))
    _, (cell,) = expand_sweep(tmp / "s.yaml", runs_dir=tmp / "runs", tracking_uri=f"sqlite:///{tmp}/mlflow.db")
    return cell, cell.save()


def _start(cell_json: Path, cwd: Path, delay: bool) -> subprocess.Popen:
    env = {**ENV, "DEQBENCH_CKPT_WRITE_DELAY_S": str(DELAY_S)} if delay else ENV
    log = open(cell_json.parent / "log.txt", "ab")
    return subprocess.Popen([sys.executable, "-m", "jobs.node", str(cell_json)], cwd=cwd, env=env, stdout=log,
                            stderr=subprocess.STDOUT, start_new_session=True)


def _run(cell, cell_json: Path, cwd: Path) -> dict:
    proc = _start(cell_json, cwd, delay=False)
    assert proc.wait(timeout=600) == 0, (Path(cell.workdir) / "log.txt").read_text()[-3000:]
    return json.loads((Path(cell.workdir) / "status.json").read_text())


def _torn(partial: bytes) -> bool:
    """Whether a killed write's file is incomplete (a complete one, killed before its rename, is valid)."""
    if len(partial) < _HEADER.size or partial[:8] != MAGIC:
        return True
    return len(partial) - _HEADER.size != _HEADER.unpack_from(partial)[1]


def _kill_during(proc: subprocess.Popen, ckdir: Path, step: int, fraction: float, write_s: float) -> Path | None:
    """SIGKILLs ``proc`` ``fraction * write_s`` after checkpoint ``step``'s write begins; the partial file if any."""
    pattern = f".ckpt_{step:08d}.pt.*.tmp"
    deadline = time.monotonic() + 300
    while not list(ckdir.glob(pattern)):
        assert proc.poll() is None, f"the cell ended before writing checkpoint {step}"
        assert time.monotonic() < deadline, f"checkpoint {step} never started"
        time.sleep(0.002)
    time.sleep(fraction * write_s)
    os.killpg(proc.pid, signal.SIGKILL)
    assert proc.wait(timeout=60) == -signal.SIGKILL
    left = list(ckdir.glob(pattern))
    return left[0] if left else None


def _kill_repeatedly(tmp: Path, epochs: int, kills: int, seed: int) -> None:
    rng = random.Random(seed)
    ref_cell, ref_json = _cell(tmp / "ref", epochs)
    reference = _run(ref_cell, ref_json, tmp / "ref")
    size = max(p.stat().st_size for p in (Path(ref_cell.workdir) / "ckpt").glob("ckpt_*.pt"))
    write_s = -(-size // 2048) * DELAY_S  # the slowed write's duration, sleeps only

    cell, cell_json = _cell(tmp / "killed", epochs)
    ckdir = Path(cell.workdir) / "ckpt"
    steps = sorted(rng.sample(range(1, epochs), kills))
    mid_write = torn = 0
    for step in steps:
        proc = _start(cell_json, tmp / "killed", delay=True)
        partial = _kill_during(proc, ckdir, step, rng.uniform(0.0, 1.0), write_s)
        if partial is not None:  # the kill landed before the rename: promote the partial file to the final name
            mid_write += 1
            torn += _torn(partial.read_bytes())
            os.replace(partial, ckdir / f"ckpt_{step:08d}.pt")
    status = _run(cell, cell_json, tmp / "killed")

    log = (Path(cell.workdir) / "log.txt").read_text()
    # each restart checks once in the node job and once in fit: count distinct files (one torn file per step)
    rejected = len({line for line in log.splitlines() if line.startswith("deqbench: skipping unreadable checkpoint")})
    print(f"\n{kills} SIGKILLs at checkpoint steps {steps}: {mid_write} mid-write, {torn} torn files, "
          f"{rejected} rejected on load; write {write_s:.2f} s slowed, checkpoint {size} B")
    assert mid_write >= 1, "no kill landed mid-write: the test did not test anything"
    assert rejected == torn, log[-3000:]
    assert "Traceback" not in log
    assert not list(ckdir.glob(".ckpt_*.tmp"))  # a killed save's leftovers are removed by the next save

    assert status["state"] == "FINISHED" and status["resumed_from"] is True
    for key in FINAL_KEYS:
        assert status["results"][key] == pytest.approx(reference["results"][key], rel=1e-6, abs=1e-9), key
    client = MlflowClient(f"sqlite:///{tmp}/killed/mlflow.db")
    ref_client = MlflowClient(f"sqlite:///{tmp}/ref/mlflow.db")
    (run,) = client.search_runs([client.get_experiment_by_name("t_torn").experiment_id])
    assert run.info.status == "FINISHED" and run.info.run_id == status["run_id"]
    loss = sorted((m.step, m.value) for m in client.get_metric_history(run.info.run_id, "loss"))
    ref_loss = sorted((m.step, m.value) for m in ref_client.get_metric_history(reference["run_id"], "loss"))
    assert [s for s, _ in loss] == list(range(epochs))  # every epoch once
    assert [v for _, v in loss] == pytest.approx([v for _, v in ref_loss], rel=1e-6)
    exact = all(status["results"][k] == reference["results"][k] for k in FINAL_KEYS)
    print(f"checked: {epochs} epochs' loss, {len(FINAL_KEYS)} final metrics ({'bit-identical' if exact else 'to 1e-6'}); "
          f"lost: 0")


def test_sigkill_during_checkpoint_writes_resumes_from_the_last_good_one(tmp_path):
    _kill_repeatedly(tmp_path, epochs=5, kills=2, seed=0)


@pytest.mark.slow
def test_many_sigkills_during_checkpoint_writes(tmp_path):
    _kill_repeatedly(tmp_path, epochs=16, kills=12, seed=1)
