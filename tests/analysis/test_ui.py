"""``deqbench ui`` lands on the sweep's training runs, with the headline metrics as columns.

The store is real: a two-cell CRR sweep at tiny scale (``crr_tiny.yaml``, 2 + 2
epochs on a 45×45 image) run in-process through the node job, so the runs carry
what a sweep logs (short run names, ``family`` tag, ``psnr``, ``crr/gain_db``...).
The server is real too: ``python -m jobs.cli ui --experiment ui-sweep`` (which
tags the experiment, prints the runs URL and runs ``mlflow ui``) on a free port,
started once per module in its own process group and stopped at the end. The
page is rendered by headless Chromium (Debian package ``chromium``, installed by
``make test``); its screenshot is kept in ``test-artifacts/ui_runs.png``
(``$DEQBENCH_TEST_ARTIFACTS`` overrides the folder).

Time, measured on 2 cores shared with other work (load ~9): ~65 s to set up
(the two runs with the store's creation ~20 s, the server's start the rest) and
~20 s for the two Chromium renders.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

import pytest

REPO = Path(__file__).resolve().parents[2]
EXPERIMENT = "ui-sweep"
READY_TIMEOUT_S = 240.0
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
SWEEP = f"""
name: {EXPERIMENT}
base: {REPO}/configs/experiments/crr_tiny.yaml
set: {{train.epochs: 2, crr.epochs: 2}}
axes:
  data.image: [camera, astronaut]
"""


@dataclass
class UiStore:
    uri: str
    runs: dict[str, dict[str, Any]] = field(default_factory=dict)  # run_id -> {name, metrics, params}


@pytest.fixture(scope="module")
def ui_store(tmp_path_factory: pytest.TempPathFactory) -> UiStore:
    """Two finished CRR runs of a real (tiny) sweep; what they logged is read back from the store."""
    from jobs import tracking
    from jobs.cells import expand_sweep
    from jobs.node import run_cell

    root = tmp_path_factory.mktemp("ui_store")
    (root / "sweep.yaml").write_text(SWEEP)
    uri = f"sqlite:///{root}/mlflow.db"
    _, cells = expand_sweep(root / "sweep.yaml", [], root / "runs", uri)
    store = UiStore(uri)
    client = tracking.client(uri)
    for cell in cells:
        out = run_cell(cell)
        assert out["state"] == "FINISHED", out
        run = client.get_run(out["run_id"])
        store.runs[out["run_id"]] = {"name": run.info.run_name, "metrics": run.data.metrics,
                                     "params": run.data.params}
    return store


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def http(method: str, url: str, body: dict | None = None, timeout: float = 10.0) -> tuple[int, Any]:
    data = None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(url, data=data, method=method, headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=timeout) as resp:
        raw = resp.read()
        ctype = resp.headers.get("Content-Type", "")
        return resp.status, json.loads(raw) if "json" in ctype else raw.decode(errors="replace")


@dataclass
class Server:
    base: str
    log: Path
    runs_url: str


def _stop(proc: subprocess.Popen) -> None:
    """SIGTERM to the server's own process group (it was started in a new session), then SIGKILL."""
    for sig, wait in ((signal.SIGTERM, 30), (signal.SIGKILL, 10)):
        if proc.poll() is not None:
            return
        try:
            os.killpg(proc.pid, sig)
            proc.wait(timeout=wait)
        except ProcessLookupError:
            return
        except subprocess.TimeoutExpired:
            continue


@pytest.fixture(scope="module")
def server(ui_store: UiStore, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    port = free_port()
    log = tmp_path_factory.mktemp("ui_log") / "ui.log"
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}
    with log.open("w") as fh:
        proc = subprocess.Popen(
            [sys.executable, "-m", "jobs.cli", "ui", "--tracking-uri", ui_store.uri, "--port", str(port),
             "--experiment", EXPERIMENT],
            stdout=fh, stderr=subprocess.STDOUT, env=env, start_new_session=True, cwd=REPO,
        )
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + READY_TIMEOUT_S
        while True:
            if proc.poll() is not None:
                pytest.fail(f"deqbench ui exited with {proc.returncode}:\n{log.read_text()[-3000:]}")
            try:
                if http("GET", f"{base}/health", timeout=5)[0] == 200:
                    break
            except (urllib.error.URLError, ConnectionError, TimeoutError, OSError):
                pass
            if time.monotonic() > deadline:
                pytest.fail(f"deqbench ui not ready after {READY_TIMEOUT_S:.0f} s:\n{log.read_text()[-3000:]}")
            time.sleep(0.5)
        printed = re.search(rf"runs of '{EXPERIMENT}' \(2 runs\): (\S+)", log.read_text())
        assert printed, log.read_text()[-3000:]
        yield Server(base, log, printed.group(1))
    finally:
        _stop(proc)


def _experiment(server: Server) -> dict[str, Any]:
    status, body = http("GET", f"{server.base}/api/2.0/mlflow/experiments/get-by-name?experiment_name={EXPERIMENT}")
    assert status == 200
    return body["experiment"]


def test_ui_prints_the_runs_view_of_a_model_training_experiment(server: Server, ui_store: UiStore) -> None:
    exp = _experiment(server)
    assert f"MLflow UI for {ui_store.uri} at {server.base}" in server.log.read_text()
    assert server.runs_url.startswith(f"{server.base}/#/experiments/{exp['experiment_id']}/runs?")
    assert "workflowType=machine_learning" in server.runs_url and "compareRunsMode=TABLE" in server.runs_url

    tags = {t["key"]: t["value"] for t in exp["tags"]}
    assert tags["mlflow.experimentKind"] == "custom_model_development"
    key = re.search(r"viewStateShareKey=(\w+)", server.runs_url).group(1)
    view = json.loads(tags[f"mlflow.sharedViewState.{key}"])
    state = json.loads(view["state"])
    assert state["selectedColumns"][:5] == [
        "metrics.`psnr`", "metrics.`ssim`", "metrics.`vif`", "metrics.`crr/best_epoch`", "metrics.`crr/gain_db`"]
    assert "params.`data.image`" in state["selectedColumns"]  # the sweep's axis
    assert "params.`train.epochs`" not in state["selectedColumns"]  # the same in every run
    assert state["orderByKey"] == "metrics.`psnr`" and state["orderByAsc"] is False
    # short run names: the axis by the last part of its key, and the seed
    assert sorted(r["name"] for r in ui_store.runs.values()) == ["image=astronaut seed=0", "image=camera seed=0"]


def test_ui_serves_the_store_over_rest(server: Server, ui_store: UiStore) -> None:
    exp_id = _experiment(server)["experiment_id"]
    status, body = http("POST", f"{server.base}/api/2.0/mlflow/runs/search",
                        {"experiment_ids": [exp_id], "max_results": 100})
    assert status == 200
    runs = {r["info"]["run_id"]: r for r in body["runs"]}
    assert set(runs) == set(ui_store.runs)
    for run_id, want in ui_store.runs.items():
        got = runs[run_id]
        assert got["info"]["run_name"] == want["name"] and got["info"]["status"] == "FINISHED"
        assert {m["key"]: m["value"] for m in got["data"]["metrics"]}["psnr"] == want["metrics"]["psnr"]

    status, body = http("POST", f"{server.base}/api/2.0/mlflow/runs/search",
                        {"experiment_ids": [exp_id], "filter": "params.`data.image` = 'camera'"})
    assert [r["info"]["run_name"] for r in body["runs"]] == ["image=camera seed=0"]

    with pytest.raises(urllib.error.HTTPError) as err:
        http("GET", f"{server.base}/api/2.0/mlflow/experiments/get-by-name?experiment_name=no-such-sweep")
    assert err.value.code == 404


def chromium(url: str, action: str, profile: Path) -> subprocess.CompletedProcess:
    """Headless Chromium on ``url``: ``action`` is ``--dump-dom`` or ``--screenshot=FILE``."""
    return subprocess.run(
        [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
         f"--user-data-dir={profile}", "--window-size=1600,1000", "--virtual-time-budget=30000", action, url],
        capture_output=True, text=True, timeout=180,
    )


def page_text(dom: str) -> str:
    """The visible text of a DOM dump, whitespace-normalised."""
    return " ".join(re.sub(r"<[^>]+>", " ", re.sub(r"<(script|style)\b.*?</\1>", " ", dom, flags=re.S)).split())


@pytest.mark.browser
@pytest.mark.skipif(CHROMIUM is None, reason="needs chromium (Debian package chromium; `make test` installs it)")
def test_ui_lands_on_the_training_runs_with_metric_columns(server: Server, ui_store: UiStore, tmp_path: Path,
                                                            artifacts_dir: Path) -> None:
    shot = artifacts_dir / "ui_runs.png"  # first, so that it is there to look at when a check fails
    proc = chromium(server.runs_url, f"--screenshot={shot}", tmp_path / "profile_shot")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert shot.stat().st_size > 10_000  # a rendered page, not a blank one

    proc = chromium(server.runs_url, "--dump-dom", tmp_path / "profile")
    assert proc.returncode == 0, proc.stderr[-2000:]
    text = page_text(proc.stdout)
    assert "Model training" in text and f"{EXPERIMENT} Runs" in text, text[:2000]
    assert "No data available" not in text and "Traces 0" not in text  # not the GenAI overview
    assert "2 matching runs" in text, text[:3000]

    table = text[text.index("Run Name"):text.index("matching runs")]
    for header in ("psnr", "ssim", "vif", "crr/gain_db", "data.image"):
        assert header in table.split(), (header, table[:1500])
    assert "time/total_s" not in table and "solver/fwd_nstep" not in table  # only the headline columns
    by_psnr = sorted(ui_store.runs.values(), key=lambda r: -r["metrics"]["psnr"])
    names = [table.index(r["name"]) for r in by_psnr]
    assert names == sorted(names), table[:1500]  # best PSNR first
    shown = [float(x) for x in re.findall(r"-?\d+\.\d+(?:e-?\d+)?", table)]
    for run in by_psnr:  # each run's PSNR and gain as the table shows them (rounded)
        for metric in ("psnr", "crr/gain_db"):
            assert any(abs(x - run["metrics"][metric]) < 1e-3 * max(1.0, abs(x)) for x in shown), (metric, table)


def test_ui_names_an_unknown_experiment_in_one_line(ui_store: UiStore, capsys: pytest.CaptureFixture) -> None:
    from jobs.cli import main

    assert main(["ui", "--tracking-uri", ui_store.uri, "--experiment", "no-such-sweep"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "'no-such-sweep'" in err and EXPERIMENT in err, err
