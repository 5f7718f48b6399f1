"""Many concurrent writers: 8 cells logging at once lose and duplicate nothing.

Eight tiny cells run as eight local processes at the same time, each
checkpointing (and so flushing its metrics) every epoch; the store is SQLite
(the default) or, slow, an ``mlflow server`` started with
``slurm/mlflow_server.sh``. Checked per run: the exact set of steps of every
per-epoch metric, the final metrics equal to what the node job reported in its
``status.json``, and no "database is locked" anywhere the user would see it.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
import yaml
from mlflow.tracking import MlflowClient

REPO = Path(__file__).resolve().parents[2]
TINY = REPO / "configs/experiments/crr_tiny.yaml"
E1, E2 = 4, 2  # stage-1 and stage-2 epochs


def _sweep(tmp: Path, uri_args: list[str]) -> tuple[subprocess.CompletedProcess, str]:
    name = "t_writers"
    spec = {"name": name, "base": str(TINY), "seeds": list(range(8)),
            "set": {"train.epochs": E1, "crr.epochs": E2, "train.ckpt_every": 1, "train.eval_every": 2}}
    (tmp / "s.yaml").write_text(yaml.safe_dump(spec))
    out = subprocess.run([sys.executable, "-m", "jobs.cli", "sweep", "s.yaml", "--workers", "8", *uri_args],
                         cwd=tmp, capture_output=True, text=True, timeout=900)
    return out, name


def _check_every_value_arrived(tmp: Path, uri: str, name: str, out: subprocess.CompletedProcess) -> None:
    assert out.returncode == 0, out.stdout + out.stderr[-3000:]
    assert "8 finished, 0 failed" in out.stdout
    logs = out.stdout + out.stderr + "".join(p.read_text() for p in tmp.glob(f"runs/{name}/*/log.txt"))
    assert "database is locked" not in logs.lower()
    client = MlflowClient(uri)
    runs = client.search_runs([client.get_experiment_by_name(name).experiment_id])
    assert len(runs) == 8 and {r.info.status for r in runs} == {"FINISHED"}
    assert sorted(r.data.params["seed"] for r in runs) == [str(s) for s in range(8)]
    every_epoch = list(range(E1 + E2))
    for r in runs:
        steps = {key: [m.step for m in client.get_metric_history(r.info.run_id, key)]
                 for key in ("loss", "time/epoch_s", "stage", "psnr", "solver/fwd_nstep")}
        for key in ("loss", "time/epoch_s", "stage"):
            assert sorted(steps[key]) == every_epoch, (key, steps[key])
        assert sorted(steps["solver/fwd_nstep"]) == list(range(E1))  # stage 1 only
        # psnr: stage-1 epochs 1, 3 (eval_every 2), every stage-2 epoch, and the final value at the last step
        assert sorted(steps["psnr"]) == [1, 3] + list(range(E1, E1 + E2)) + [E1 + E2]
        status = json.loads((tmp / f"runs/{name}" / r.data.tags["cell_hash"] / "status.json").read_text())
        for key, value in status["results"].items():
            assert r.data.metrics[key] == value, key


def test_eight_writers_on_sqlite(tmp_path):
    out, name = _sweep(tmp_path, [])
    _check_every_value_arrived(tmp_path, f"sqlite:///{tmp_path}/mlflow.db", name, out)


@pytest.mark.slow
def test_eight_writers_through_an_mlflow_server(tmp_path):
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    uri = f"http://127.0.0.1:{port}"
    env = {**os.environ, "MLFLOW_PORT": str(port), "MLFLOW_WORKERS": "2"}
    server = subprocess.Popen(["bash", str(REPO / "slurm/mlflow_server.sh")], cwd=tmp_path, env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                with urllib.request.urlopen(f"{uri}/health", timeout=2) as resp:
                    if resp.status == 200:
                        break
            except OSError:
                pass
            assert server.poll() is None and time.monotonic() < deadline, "mlflow server did not come up"
            time.sleep(0.5)
        out, name = _sweep(tmp_path, ["--tracking-uri", uri])
        _check_every_value_arrived(tmp_path, uri, name, out)
    finally:
        os.killpg(server.pid, 15)
        server.wait(timeout=60)
