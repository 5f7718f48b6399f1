"""The local launcher's warm start: each cell a child of a fork server that imported the stack once.

Real cells, a real SQLite MLflow store; the fork server's imports take ~10 s on 2 busy cores.
"""

import os
import signal
import threading
import time
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[2]
TINY = REPO / "configs/experiments/crr_tiny.yaml"
SMALL = {"data.size": 41, "model.hidden": 4, "crr.hidden": 4, "crr.epochs": 1}


def test_a_forked_cell_is_a_node_job_of_its_own_and_one_killed_fails_alone(tmp_path):
    from jobs import tracking
    from jobs.cells import expand_sweep, read_status
    from jobs.launchers import local

    spec = {"name": "t_fork", "base": str(TINY), "set": {**SMALL, "train.epochs": 1}, "seeds": [0],
            "groups": [{}, {"seeds": [1], "set": {**SMALL, "train.epochs": 100000}}]}  # seed 1 runs until killed
    (tmp_path / "s.yaml").write_text(yaml.safe_dump(spec))
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    _, cells = expand_sweep(tmp_path / "s.yaml", [], tmp_path / "runs", uri)
    tracking.finished_hashes(uri, "t_fork")  # the store exists before cells start, as deqbench sweep does
    short, long_ = sorted(cells, key=lambda c: c.config["seed"])
    outcomes = []
    runner = threading.Thread(target=lambda: outcomes.extend(local.submit(cells, workers=2, progress=False)))
    runner.start()
    deadline = time.monotonic() + 300
    while read_status(long_.workdir).get("state") != "RUNNING":
        assert runner.is_alive() and time.monotonic() < deadline, outcomes
        time.sleep(0.1)
    pid = read_status(long_.workdir)["pid"]
    cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
    assert "-m jobs.node" in cmdline and str(Path(long_.workdir) / "cell.json") in cmdline  # ps, deqbench cancel
    assert pid != os.getpid() and os.getsid(pid) == pid  # a process and a session of its own
    os.kill(pid, signal.SIGKILL)  # a crash, as far as the launcher can tell
    runner.join(timeout=300)
    assert not runner.is_alive()
    out = {o["hash"]: o for o in outcomes}
    assert (out[long_.hash]["state"], out[long_.hash]["reason"]) == ("FAILED", "signal SIGKILL")
    assert out[short.hash]["state"] == "FINISHED" and out[short.hash]["results"]["psnr"] > 0
    assert read_status(short.workdir)["pid"] not in (pid, os.getpid())
    run = tracking.client(uri).get_run(out[short.hash]["run_id"])
    assert run.data.tags["torch_threads"] == "1"  # its environment: 2 cores, 2 workers
    assert '"state": "FINISHED"' in (Path(short.workdir) / "log.txt").read_text()  # its output went to its log
