"""Which cells' newest MLflow run FINISHED, asked without importing mlflow (seconds): for ``deqbench status``.

A SQLite store (the default) is read read-only with the stdlib ``sqlite3``
from MLflow's own tables; an ``http(s)://`` server through MLflow's public
REST API with ``urllib`` (``$MLFLOW_TRACKING_TOKEN``, or
``$MLFLOW_TRACKING_USERNAME``/``PASSWORD`` or ``~/.mlflow/credentials``, as
MLflow sends them). Anything else goes through the MLflow client
(:func:`jobs.tracking.finished_hashes`), whose answer this equals: a file
store, Databricks, a SQLite file whose tables are not what MLflow writes, a
server that refuses the request (4xx other than an unknown experiment), and
the settings only MLflow's client knows (:data:`CLIENT_ONLY_ENV`). Transient
errors (a locked database, a refused connection, a 5xx) are retried within
the same patience as the client's, then :class:`jobs.tracking.TrackingUnavailable`.
"""

from __future__ import annotations

import base64
import configparser
import http.client
import json
import os
import sqlite3
import urllib.error
import urllib.parse
import urllib.request
from contextlib import closing
from pathlib import Path
from typing import Any

from jobs import tracking

# TLS and auth plugins, workspaces: MLflow's client does these; we hand the query to it.
CLIENT_ONLY_ENV = ("MLFLOW_TRACKING_AUTH", "MLFLOW_TRACKING_AWS_SIGV4", "MLFLOW_TRACKING_INSECURE_TLS",
                   "MLFLOW_TRACKING_CLIENT_CERT_PATH", "MLFLOW_TRACKING_SERVER_CERT_PATH", "MLFLOW_WORKSPACE",
                   "MLFLOW_ENABLE_WORKSPACES")
PAGE_SIZE = 1000  # runs per runs/search page, as jobs.tracking.runs_by_hash asks
# MLflow's search_runs order for ``order_by=["attributes.start_time ASC"]`` (runs_by_hash's): NULL start
# times last, then the start time, then the run id; the last run of a hash is its newest.
_NEWEST_SQL = """SELECT t.value, r.status FROM runs r JOIN tags t ON t.run_uuid = r.run_uuid AND t.key = 'cell_hash'
WHERE r.experiment_id = ? AND r.lifecycle_stage = 'active'
ORDER BY r.start_time IS NULL, r.start_time, r.run_uuid"""


class _UseClient(Exception):
    """This store, or its settings, needs MLflow's client."""


def finished_hashes(uri: str, name: str, patience_s: float = tracking.COMMAND_PATIENCE_S) -> set[str]:
    """Cell hashes whose newest run (tag ``cell_hash``) in experiment ``name`` FINISHED; as
    :func:`jobs.tracking.finished_hashes`, without mlflow for SQLite and HTTP stores.

    Raises:
        TrackingUnavailable: the store stayed unreachable (or locked) for ``patience_s``.
    """
    try:
        if uri.startswith("sqlite:///"):
            newest = _sqlite_newest(uri[len("sqlite:///"):], name, patience_s)
        elif uri.startswith(("http://", "https://")):
            newest = _rest_newest(uri.rstrip("/"), name, patience_s)
        else:
            raise _UseClient(uri)
    except _UseClient:
        return tracking.finished_hashes(uri, name, patience_s)
    return {h for h, status in newest.items() if status == "FINISHED"}


def _workspaces() -> bool:
    return any(os.environ.get(var) for var in ("MLFLOW_WORKSPACE", "MLFLOW_ENABLE_WORKSPACES"))


def _sqlite_newest(path: str, name: str, patience_s: float) -> dict[str, str]:
    """``{cell_hash: status of its newest active run}`` from the SQLite file ``path`` (opened read-only)."""
    if not path or "?" in path or _workspaces():
        raise _UseClient(path)  # in memory, URL options, or experiment names scoped by workspace
    if not Path(path).is_file():
        return {}  # MLflow's client would create an empty store: no runs either

    def query() -> dict[str, str]:
        with closing(sqlite3.connect(f"{Path(path).absolute().as_uri()}?mode=ro", uri=True, timeout=1.0)) as db:
            exps = db.execute("SELECT experiment_id FROM experiments WHERE name = ? "
                              "AND lifecycle_stage IN ('active', 'deleted')", (name,)).fetchall()
            if len(exps) > 1:
                raise _UseClient(name)  # one name in several workspaces
            rows = db.execute(_NEWEST_SQL, exps[0]).fetchall() if exps else []
        return {h: status for h, status in rows if h}  # later rows are newer: each hash keeps its newest

    try:
        return tracking._retry(query, patience_s)  # "database is locked" is retried; TrackingUnavailable past patience
    except sqlite3.Error as err:  # not MLflow's tables as we know them
        raise _UseClient(str(err)) from err


def _rest_newest(base: str, name: str, patience_s: float) -> dict[str, str]:
    """``{cell_hash: status of its newest active run}`` from the MLflow server at ``base`` (REST API 2.0)."""
    if any(os.environ.get(var) for var in CLIENT_ONLY_ENV):
        raise _UseClient(base)
    headers = {"Content-Type": "application/json", **_auth_header()}
    timeout = tracking.env_seconds("MLFLOW_HTTP_REQUEST_TIMEOUT", 30.0)  # the client's, see tracking._fail_fast_http

    def call(endpoint: str, body: dict[str, Any] | None = None) -> dict[str, Any] | None:
        url = f"{base}/api/2.0/mlflow/{endpoint}"
        data = None if body is None else json.dumps(body).encode()
        return tracking._retry(lambda: _request(url, data, headers, timeout), patience_s)

    exp = call("experiments/get-by-name?" + urllib.parse.urlencode({"experiment_name": name}))
    if exp is None:
        return {}
    search = {"experiment_ids": [exp["experiment"]["experiment_id"]], "max_results": PAGE_SIZE,
              "order_by": ["attributes.start_time ASC"], "run_view_type": "ACTIVE_ONLY"}
    out: dict[str, str] = {}
    while True:
        page = call("runs/search", search) or {}
        for run in page.get("runs", []):
            h = next((t.get("value") for t in run.get("data", {}).get("tags", []) if t.get("key") == "cell_hash"), None)
            if h:
                out[h] = run["info"]["status"]
        if not page.get("next_page_token"):
            return out
        search["page_token"] = page["next_page_token"]


def _request(url: str, data: bytes | None, headers: dict[str, str], timeout: float) -> dict[str, Any] | None:
    """One request's JSON answer; None for an unknown resource (404 RESOURCE_DOES_NOT_EXIST).

    Raises:
        ConnectionError: no answer (refused, reset, timed out, unknown host) — transient for ``tracking._retry``.
        RuntimeError: a 5xx ("error code 5..", transient, as MLflow words it).
        _UseClient: any other refusal (auth, a server without this API): the client reports it as before.
    """
    try:
        with urllib.request.urlopen(urllib.request.Request(url, data=data, headers=headers), timeout=timeout) as resp:
            return json.loads(resp.read())
    except urllib.error.HTTPError as err:
        if err.code >= 500:
            raise RuntimeError(f"API request to {url} failed with error code {err.code}") from None
        if err.code == 404 and b"RESOURCE_DOES_NOT_EXIST" in err.read():
            return None
        raise _UseClient(f"{url}: HTTP {err.code}") from None
    except (OSError, http.client.HTTPException) as err:
        raise ConnectionError(f"connection to {url} failed: {err}") from None
    except ValueError as err:  # not JSON: not an MLflow server as we know it
        raise _UseClient(f"{url}: {err}") from None


def _auth_header() -> dict[str, str]:
    """MLflow's ``Authorization`` header: basic auth (environment, else ``~/.mlflow/credentials``), else the token."""
    creds = configparser.ConfigParser()
    creds.read(Path.home() / ".mlflow" / "credentials")
    stored = creds["mlflow"] if "mlflow" in creds else {}
    user = os.environ.get("MLFLOW_TRACKING_USERNAME") or stored.get("mlflow_tracking_username")
    password = os.environ.get("MLFLOW_TRACKING_PASSWORD") or stored.get("mlflow_tracking_password")
    if user and password:
        return {"Authorization": "Basic " + base64.standard_b64encode(f"{user}:{password}".encode()).decode()}
    token = os.environ.get("MLFLOW_TRACKING_TOKEN")
    return {"Authorization": f"Bearer {token}"} if token else {}
