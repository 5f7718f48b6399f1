"""Shared fixtures.

``slurm_cluster``: the real local one-node Slurm cluster. Tests marked
``@pytest.mark.slurm`` take it as an argument; it runs
``slurm/local_cluster.sh start`` once per session (a no-op when the cluster is
up; it installs and starts it otherwise) and skips, with the script's own
message, only when the cluster cannot be started.
"""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
LOCAL_CLUSTER = REPO / "slurm" / "local_cluster.sh"


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
