"""``deqbench ui`` serves the tracking store: REST API and (when Chromium exists) the web page.

The server is the real one: ``python -m jobs.cli ui --tracking-uri URI --port P``
(which runs ``mlflow ui``) on a free port, started once per module in its own
process group and stopped (SIGTERM, then SIGKILL) at the end. ``mlflow ui``
starts four uvicorn workers, each importing the MLflow server: on 2 busy cores
that takes from ~15 s to over a minute, hence ``slow``.
"""

from __future__ import annotations

import json
import os
import re
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

pytestmark = pytest.mark.slow

EXPERIMENT = "ui-demo"
CHROMIUM = Path("/usr/bin/chromium")
READY_TIMEOUT_S = 240.0


@dataclass
class UiStore:
    uri: str
    experiment_id: str
    runs: dict[str, dict[str, Any]] = field(default_factory=dict)  # run_id -> {name, psnr, image}


@pytest.fixture(scope="module")
def ui_store(tmp_path_factory: pytest.TempPathFactory) -> UiStore:
    """A sqlite store with three finished runs and one other experiment."""
    from mlflow.entities import Metric, Param
    from mlflow.tracking import MlflowClient

    root = tmp_path_factory.mktemp("ui_store")
    uri = f"sqlite:///{root}/mlflow.db"
    client = MlflowClient(tracking_uri=uri)
    exp = client.create_experiment(EXPERIMENT, artifact_location=str(root / "artifacts"))
    client.create_experiment("another-sweep", artifact_location=str(root / "artifacts2"))
    store = UiStore(uri, exp)
    now = int(time.time() * 1000)
    for i, (image, psnr) in enumerate((("camera", 31.25), ("astronaut", 28.5), ("camera", 30.75))):
        name = f"{image}-seed{i}"
        run = client.create_run(exp, start_time=now + i, run_name=name, tags={"family": "crr"})
        client.log_batch(run.info.run_id, metrics=[Metric("psnr", psnr, now, 0)],
                         params=[Param("data.image", image), Param("seed", str(i))])
        client.set_terminated(run.info.run_id, "FINISHED")
        store.runs[run.info.run_id] = {"name": name, "psnr": psnr, "image": image}
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
    proc: subprocess.Popen


def _stop(proc: subprocess.Popen) -> None:
    """SIGTERM to the server's own process group (it was started in a new session), then SIGKILL."""
    if proc.poll() is not None:
        return
    for sig, wait in ((signal.SIGTERM, 30), (signal.SIGKILL, 10)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(timeout=wait)
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
            [sys.executable, "-m", "jobs.cli", "ui", "--tracking-uri", ui_store.uri, "--port", str(port)],
            stdout=fh, stderr=subprocess.STDOUT, env=env, start_new_session=True,
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
        yield Server(base, log, proc)
    finally:
        _stop(proc)


def test_ui_serves_the_store_over_rest(server: Server, ui_store: UiStore) -> None:
    # the command says where it serves
    assert f"MLflow UI for {ui_store.uri} at {server.base}" in server.log.read_text()

    status, body = http("GET", f"{server.base}/api/2.0/mlflow/experiments/get-by-name?experiment_name={EXPERIMENT}")
    assert status == 200
    assert body["experiment"]["name"] == EXPERIMENT
    assert body["experiment"]["experiment_id"] == ui_store.experiment_id

    status, body = http("POST", f"{server.base}/api/2.0/mlflow/runs/search",
                        {"experiment_ids": [ui_store.experiment_id], "max_results": 100})
    assert status == 200
    runs = {r["info"]["run_id"]: r for r in body["runs"]}
    assert set(runs) == set(ui_store.runs)
    for run_id, want in ui_store.runs.items():
        run = runs[run_id]
        assert run["info"]["run_name"] == want["name"] and run["info"]["status"] == "FINISHED"
        assert {m["key"]: m["value"] for m in run["data"]["metrics"]}["psnr"] == want["psnr"]
        assert {p["key"]: p["value"] for p in run["data"]["params"]}["data.image"] == want["image"]

    # a filter is evaluated by the server, not here
    status, body = http("POST", f"{server.base}/api/2.0/mlflow/runs/search",
                        {"experiment_ids": [ui_store.experiment_id], "filter": "params.`data.image` = 'camera'"})
    cameras = {k for k, v in ui_store.runs.items() if v["image"] == "camera"}
    assert {r["info"]["run_id"] for r in body["runs"]} == cameras

    with pytest.raises(urllib.error.HTTPError) as err:
        http("GET", f"{server.base}/api/2.0/mlflow/experiments/get-by-name?experiment_name=no-such-sweep")
    assert err.value.code == 404


@pytest.mark.skipif(not CHROMIUM.exists(), reason="headless check needs /usr/bin/chromium (Debian package chromium)")
def test_ui_renders_the_runs_page_in_chromium(server: Server, ui_store: UiStore, tmp_path: Path) -> None:
    url = f"{server.base}/#/experiments/{ui_store.experiment_id}/runs"
    proc = subprocess.run(
        [str(CHROMIUM), "--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
         f"--user-data-dir={tmp_path / 'profile'}", "--virtual-time-budget=30000", "--dump-dom", url],
        capture_output=True, text=True, timeout=180,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    dom = proc.stdout
    text = " ".join(re.sub(r"<[^>]+>", " ", re.sub(r"<(script|style)\b.*?</\1>", " ", dom, flags=re.S)).split())
    assert EXPERIMENT in text
    for want in ui_store.runs.values():  # the React app fetched and rendered every run
        assert want["name"] in text, want["name"]
    assert f"{len(ui_store.runs)} matching runs" in text, text[:2000]
