"""``jobs.store_query.finished_hashes`` (no mlflow import) answers as ``jobs.tracking.finished_hashes`` (the client).

A real SQLite store written by MLflow's client holds, per cell hash, runs
that FINISHED, still run, FAILED then FINISHED and the reverse, were KILLED,
were deleted, share a start time; a second experiment and an untagged run
must not count. The light answer is read with ``sqlite3`` and, over HTTP,
from MLflow's own server app with its basic authentication
(``mlflow.server.auth.create_app``: the REST handlers ``mlflow server
--app-name basic-auth`` serves, needs Flask-WTF) run by werkzeug in a
subprocess, a few seconds; the same against ``slurm/mlflow_server.sh`` is
slow (10-50 s to start).
"""

from __future__ import annotations

import os
import socket
import sqlite3
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Iterator

import pytest
from mlflow.tracking import MlflowClient

from jobs import store_query, tracking

NAME = "t_store_query"
ADMIN = ("admin", "Adm1n-test-pw")
SERVE = """import os, sys
os.environ["_MLFLOW_SERVER_FILE_STORE"], os.environ["_MLFLOW_SERVER_ARTIFACT_ROOT"] = sys.argv[1], sys.argv[2]
from mlflow.server.auth import create_app
from werkzeug.serving import make_server
make_server("127.0.0.1", int(sys.argv[3]), create_app(), threaded=True).serve_forever()
"""
AUTH_INI = """[mlflow]
default_permission = READ
database_uri = sqlite:///{db}
admin_username = {user}
admin_password = {password}
authorization_function = mlflow.server.auth:authenticate_request_basic_auth
grant_default_workspace_access = false
"""


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> tuple[str, set[str]]:
    """A SQLite store with runs of every kind; returns its URI and the hashes whose newest run FINISHED."""
    tmp = tmp_path_factory.mktemp("store")
    uri = f"sqlite:///{tmp}/mlflow.db"
    c = MlflowClient(uri)
    exp, other = c.create_experiment(NAME), c.create_experiment(NAME + "_other")

    def run(h: str | None, start: int, status: str | None, experiment: str = exp) -> str:
        r = c.create_run(experiment, start_time=start, tags={"cell_hash": h} if h else {})
        if status:
            c.set_terminated(r.info.run_id, status=status, end_time=start + 1)
        return r.info.run_id

    run("fin", 1000, "FINISHED")
    run("running", 1000, None)
    run("failed_then_fin", 1000, "FAILED"), run("failed_then_fin", 2000, "FINISHED")
    run("fin_then_failed", 1000, "FINISHED"), run("fin_then_failed", 2000, "FAILED")
    run("fin_then_killed", 1000, "FINISHED"), run("fin_then_killed", 2000, "KILLED")
    run("fin_then_deleted_failed", 1000, "FINISHED")
    c.delete_run(run("fin_then_deleted_failed", 2000, "FAILED"))  # deleted runs do not count
    tie = {run("tie", 3000, "FINISHED"): "FINISHED", run("tie", 3000, "FAILED"): "FAILED"}
    run(None, 4000, "FINISHED")  # no cell_hash tag
    run("other_experiment", 1000, "FINISHED", experiment=other)
    run("running", 5000, "FINISHED", experiment=other)
    expected = {"fin", "failed_then_fin", "fin_then_deleted_failed"}
    if tie[max(tie)] == "FINISHED":  # equal start times: MLflow orders by run id, the last one is the newest
        expected.add("tie")
    return uri, expected


@pytest.fixture(scope="module")
def rest(store: tuple[str, set[str]], tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """MLflow's server app with basic auth (user and password: ``ADMIN``) on ``store``'s SQLite file, served by
    werkzeug in a subprocess; yields its URL."""
    tmp, port = tmp_path_factory.mktemp("rest"), _free_port()
    (tmp / "auth.ini").write_text(AUTH_INI.format(db=tmp / "auth.db", user=ADMIN[0], password=ADMIN[1]))
    env = {**os.environ, "MLFLOW_AUTH_CONFIG_PATH": str(tmp / "auth.ini"), "MLFLOW_FLASK_SERVER_SECRET_KEY": "test"}
    proc = subprocess.Popen([sys.executable, "-c", SERVE, store[0], str(tmp / "artifacts"), str(port)], env=env,
                            stdout=subprocess.DEVNULL, stderr=(tmp / "server.log").open("w"), start_new_session=True)
    url, deadline = f"http://127.0.0.1:{port}", time.monotonic() + 120
    try:
        while True:
            try:
                with urllib.request.urlopen(f"{url}/health", timeout=2):
                    break
            except OSError:
                assert proc.poll() is None and time.monotonic() < deadline, (tmp / "server.log").read_text()[-2000:]
                time.sleep(0.2)
        yield url
    finally:
        proc.kill()
        proc.wait(timeout=30)


def test_sqlite_answer_equals_the_mlflow_clients(store):
    uri, expected = store
    assert store_query.finished_hashes(uri, NAME) == tracking.finished_hashes(uri, NAME) == expected
    assert store_query.finished_hashes(uri, "nope") == tracking.finished_hashes(uri, "nope") == set()  # no experiment


def test_sqlite_answer_imports_no_mlflow(store):
    uri, expected = store
    code = (f"import sys\nfrom jobs.store_query import finished_hashes\n"
            f"print(sorted(finished_hashes({uri!r}, {NAME!r})))\nprint('mlflow' in sys.modules, 'sqlalchemy' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.splitlines() == [str(sorted(expected)), "False False"]


def test_missing_sqlite_file_has_no_runs_and_is_not_created(tmp_path):
    assert store_query.finished_hashes(f"sqlite:///{tmp_path}/none.db", NAME) == set()
    assert not (tmp_path / "none.db").exists()


def test_sqlite_file_without_mlflows_tables_goes_to_the_client(tmp_path):
    with sqlite3.connect(tmp_path / "foreign.db") as db:
        db.execute("CREATE TABLE notes (x)")
    assert store_query.finished_hashes(f"sqlite:///{tmp_path}/foreign.db", NAME) == set()
    with sqlite3.connect(tmp_path / "foreign.db") as db:  # the client answered: it created its tables there
        assert db.execute("SELECT name FROM sqlite_master WHERE name = 'experiments'").fetchone()


def test_rest_answer_equals_the_mlflow_clients_across_pages(store, rest, monkeypatch):
    monkeypatch.setenv("HOME", str(Path(store[0][len("sqlite:///"):]).parent))  # no ~/.mlflow/credentials
    monkeypatch.setenv("MLFLOW_TRACKING_USERNAME", ADMIN[0])
    monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", ADMIN[1])
    monkeypatch.setattr(store_query, "PAGE_SIZE", 2)  # 12 runs: 6 pages
    assert store_query.finished_hashes(rest, NAME) == tracking.finished_hashes(rest, NAME) == store[1]
    assert store_query.finished_hashes(rest + "/", "no_such_experiment") == set()
    assert "mlflow.server" not in sys.modules  # the server is the subprocess's


def test_rest_refusal_goes_to_the_client_which_says_why(store, rest, monkeypatch):
    monkeypatch.setenv("HOME", str(Path(store[0][len("sqlite:///"):]).parent))
    monkeypatch.setenv("MLFLOW_TRACKING_USERNAME", ADMIN[0])
    monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", "wrong")
    with pytest.raises(Exception, match="error code 401") as light:
        store_query.finished_hashes(rest, NAME)
    with pytest.raises(Exception, match="error code 401") as client:
        tracking.finished_hashes(rest, NAME)
    assert str(light.value) == str(client.value)  # the same error: the light path handed over to the client


def test_a_store_that_refuses_is_one_line_from_the_cli(store, rest, monkeypatch, tmp_path, capsys):
    from jobs.cli import main

    monkeypatch.setenv("HOME", str(Path(store[0][len("sqlite:///"):]).parent))
    monkeypatch.setenv("MLFLOW_TRACKING_USERNAME", ADMIN[0])
    monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", "wrong")
    for argv in (["status", "configs/sweeps/smoke.yaml", "--runs-dir", str(tmp_path)],
                 ["table", "--experiment", NAME, "--rows", "seed", "--metrics", "psnr"]):
        assert main([*argv, "--tracking-uri", rest]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and "Traceback" not in err, err
        assert err.startswith(f"deqbench {argv[0]}: error: tracking store: ") and "401" in err, err


def test_unreachable_server_is_tracking_unavailable_after_the_patience():
    url = f"http://127.0.0.1:{_free_port()}"  # nothing listens: connection refused
    start = time.monotonic()
    with pytest.raises(tracking.TrackingUnavailable, match=f"unreachable for .*limit 0.6 s.*{url}"):
        store_query.finished_hashes(url, NAME, patience_s=0.6)
    assert 0.5 < time.monotonic() - start < 10


def test_auth_header_follows_mlflows_precedence(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path))
    for var in ("MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD", "MLFLOW_TRACKING_TOKEN"):
        monkeypatch.delenv(var, raising=False)
    assert store_query._auth_header() == {}
    monkeypatch.setenv("MLFLOW_TRACKING_TOKEN", "tok")
    assert store_query._auth_header() == {"Authorization": "Bearer tok"}
    (tmp_path / ".mlflow").mkdir()
    (tmp_path / ".mlflow/credentials").write_text("[mlflow]\nmlflow_tracking_username = ann\n"
                                                  "mlflow_tracking_password = file-pw\n")
    monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", "env-pw")  # the environment wins over the file, field by field
    assert store_query._auth_header() == {"Authorization": "Basic YW5uOmVudi1wdw=="}  # base64("ann:env-pw")


@pytest.mark.slow
def test_rest_answer_equals_the_mlflow_clients_on_mlflow_server_sh(store, tmp_path):
    from test_tracking_outage import Server  # slurm/mlflow_server.sh on a free port

    srv = Server(tmp_path)
    srv.env["MLFLOW_BACKEND_STORE_URI"] = store[0]
    srv.start()
    try:
        assert store_query.finished_hashes(srv.uri, NAME) == tracking.finished_hashes(srv.uri, NAME) == store[1]
    finally:
        srv.kill()
    with pytest.raises(tracking.TrackingUnavailable):  # killed: refused, past the patience
        store_query.finished_hashes(srv.uri, NAME, patience_s=0.5)
