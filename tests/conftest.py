"""Shared fixtures.

``slurm_cluster``: the real local one-node Slurm cluster. Tests marked
``@pytest.mark.slurm`` take it as an argument; it runs
``slurm/local_cluster.sh start`` once per session (a no-op when the cluster is
up; it installs and starts it otherwise) and skips, with the script's own
message, only when the cluster cannot be started.

``artifacts_dir``: where tests keep files for people to look at (e.g. the UI
screenshot): ``$DEQBENCH_TEST_ARTIFACTS``, else ``test-artifacts/`` here.

Under ``CI=true`` a skipped test marked ``slurm``, ``latex`` or ``browser`` is
reported as failed: CI must not pass because Slurm, pdflatex or Chromium was
missing (``make test`` installs them; see ``scripts/install_tools.sh``).
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path
from typing import Any, Iterator

import pytest

REPO = Path(__file__).resolve().parents[1]
LOCAL_CLUSTER = REPO / "slurm" / "local_cluster.sh"
MUST_RUN_IN_CI = ("slurm", "latex", "browser")
"""Markers of tests that need a real tool: under ``CI=true`` their skip is a failure."""


def _in_ci() -> bool:
    return os.environ.get("CI", "").strip().lower() in ("true", "1", "yes")


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo) -> Iterator[Any]:
    """Under ``CI=true``, turns the skip of a ``slurm``/``latex``/``browser`` test into a failure."""
    outcome = yield
    report = outcome.get_result()
    marks = [m for m in MUST_RUN_IN_CI if item.get_closest_marker(m)]
    if report.skipped and marks and _in_ci() and not hasattr(report, "wasxfail"):
        reason = report.longrepr[2] if isinstance(report.longrepr, tuple) else str(report.longrepr)
        report.outcome = "failed"
        report.longrepr = f"CI=true: a {'/'.join(marks)} test may not skip ({reason})"


@pytest.fixture(scope="session")
def artifacts_dir() -> Path:
    """Folder for test artifacts (screenshots): ``$DEQBENCH_TEST_ARTIFACTS`` or ``test-artifacts/``."""
    path = Path(os.environ.get("DEQBENCH_TEST_ARTIFACTS") or REPO / "test-artifacts")
    path.mkdir(parents=True, exist_ok=True)
    return path


@pytest.fixture(scope="session")
def slurm_cluster() -> str:
    """Starts the local Slurm cluster if needed; returns its partition, ``"debug"``."""
    try:
        proc = subprocess.run(
            ["bash", str(LOCAL_CLUSTER), "start"], capture_output=True, text=True, timeout=900
        )
    except subprocess.TimeoutExpired:
        pytest.skip("local Slurm cluster: `slurm/local_cluster.sh start` took over 15 min")
    if proc.returncode != 0:
        tail = "\n".join((proc.stdout + proc.stderr).strip().splitlines()[-5:])
        pytest.skip(f"local Slurm cluster could not start (exit {proc.returncode}): {tail}")
    return "debug"


@pytest.fixture(autouse=True)
def _no_outside_tracking_store(monkeypatch: pytest.MonkeyPatch) -> None:
    """Tests choose their own MLflow store: a ``$MLFLOW_TRACKING_URI`` from the user's shell
    (or one leaked by a library) must not send their runs elsewhere."""
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
