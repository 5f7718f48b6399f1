"""A cell whose directory fills up or is read-only fails with one line naming the path; the others finish.

Real file systems, mounted by the test (root needed): a cell's work directory
is a small tmpfs that fills up during the run, or is full from the start, or is
mounted read-only. The local sweep runs all cells; the others FINISH.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from mlflow.tracking import MlflowClient

REPO = Path(__file__).resolve().parents[2]
TINY = REPO / "configs/experiments/deq_inr_tiny.yaml"


@contextlib.contextmanager
def small_fs(path: Path, size_kb: int, fill_kb: int = 0, read_only: bool = False):
    """Mounts a ``size_kb`` tmpfs at ``path``, ``fill_kb`` of it taken by a file, optionally read-only."""
    path.mkdir(parents=True, exist_ok=True)
    mount = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size_kb}k,mode=0755", "tmpfs", str(path)],
                           capture_output=True, text=True)
    if mount.returncode != 0:
        why = f"cannot mount a tmpfs (root needed): {mount.stderr.strip() or mount.returncode}"
        pytest.fail(why) if os.environ.get("CI") == "true" else pytest.skip(why)
    try:
        if fill_kb:
            with open(path / "filler", "wb") as fh:
                with contextlib.suppress(OSError):
                    fh.write(b"\0" * fill_kb * 1024)
        if read_only:
            subprocess.run(["mount", "-o", "remount,ro", str(path)], check=True)
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], check=False)


def test_full_and_read_only_cell_directories_fail_alone(tmp_path):
    from jobs.cells import expand_sweep
    from jobs.tracking import git_diff

    spec = {"name": "t_disk", "base": str(TINY), "seeds": [0, 1, 2, 3],
            "set": {"train.epochs": 4, "train.ckpt_every": 1, "train.eval_every": 2}}
    (tmp_path / "s.yaml").write_text(yaml.safe_dump(spec))
    _, cells = expand_sweep(tmp_path / "s.yaml", runs_dir=tmp_path / "runs", tracking_uri="sqlite:///x.db")
    ok, filling, read_only, full = (Path(c.workdir) for c in cells)
    with contextlib.ExitStack() as mounts:
        # the start-up files fit (cell.json, config.yaml, log.txt, status.json and, from a dirty
        # checkout, git_diff.patch: one 4 KiB page each or more), a 24 KiB checkpoint does not
        diff_kb = 4 * -(-len((git_diff() or "").encode()) // 4096)
        mounts.enter_context(small_fs(filling, 40 + diff_kb))
        mounts.enter_context(small_fs(read_only, 64, read_only=True))
        mounts.enter_context(small_fs(full, 16, fill_kb=16))  # not even cell.json fits
        out = subprocess.run([sys.executable, "-m", "jobs.cli", "sweep", "s.yaml", "--workers", "2"], cwd=tmp_path,
                             capture_output=True, text=True, timeout=600,
                             env={**os.environ, "DEQBENCH_TORCH_THREADS": "1"})
        logs = {d.name: (d / "log.txt").read_text() if (d / "log.txt").is_file() else "" for d in (filling, ok)}
    print(out.stdout, out.stderr, logs, sep="\n")
    assert out.returncode == 1, out.stderr
    assert "Traceback" not in out.stdout + out.stderr
    lines = {c.hash: next(ln for ln in out.stdout.splitlines() if c.hash in ln and "seed=" in ln) for c in cells}
    assert "FINISHED" in lines[cells[0].hash]
    for cell, why in ((cells[1], "No space left on device"), (cells[2], "Read-only file system"),
                      (cells[3], "No space left on device")):
        assert "FAILED" in lines[cell.hash] and why in lines[cell.hash] and cell.workdir in lines[cell.hash], lines
    assert "3 failed" in out.stdout
    assert re.search(rf"cannot write {filling}/ckpt/ckpt_\d+\.pt: No space left", lines[cells[1].hash])  # mid-run
    client = MlflowClient(f"sqlite:///{tmp_path}/mlflow.db")
    runs = {r.data.tags["cell_hash"]: r for r in client.search_runs([client.get_experiment_by_name("t_disk").experiment_id])}
    assert sorted(runs) == sorted(c.hash for c in cells[:2])  # the others never started a run
    assert runs[cells[0].hash].info.status == "FINISHED" and runs[cells[1].hash].info.status == "FAILED"
    assert "No space left on device" in runs[cells[1].hash].data.tags["failure_reason"]
    done = runs[cells[0].hash]  # the cell next to them lost nothing
    steps = [m.step for m in client.get_metric_history(done.info.run_id, "loss")]
    assert sorted(steps) == list(range(4))
    assert done.data.metrics["psnr"] == pytest.approx(json.loads((ok / "status.json").read_text())["results"]["psnr"])
