"""``deqbench bench orchestration`` at tiny scale: every cell FINISHED in each backend's own store,
the printed summary consistent with the printed totals, skips and bad configs. Never timings."""

from __future__ import annotations

import json
import os
import re
import sys
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from jobs.bench import orchestration as orch

TOTAL = re.compile(r"^repeat 1/1 (\w+): (\d+\.\d+) s for (\d+) cells$", re.M)
SUMMARY = re.compile(r"^overhead per cell vs direct: (.*)$", re.M)


def _summary(out: str) -> dict[str, str]:
    """``{backend: "0.12" | "skipped"}`` from the last line."""
    found = SUMMARY.findall(out)
    assert len(found) == 1, out
    parts = [p.strip() for p in found[0].split(",") if p.strip()]
    return {p.split()[0]: p.split()[1].rstrip("s") if p.split()[1] != "skipped" else "skipped" for p in parts}


def _check_store(where: Path, n: int) -> list[dict]:
    """Every run in ``where``'s fresh store FINISHED, one per seed 0..n-1, distinct cell hashes; their status.json."""
    client = MlflowClient(f"sqlite:///{where / 'mlflow.db'}")
    exp = client.get_experiment_by_name(orch.SWEEP_NAME)
    runs = client.search_runs([exp.experiment_id])
    assert [r.info.status for r in runs] == ["FINISHED"] * n
    assert sorted(int(r.data.params["seed"]) for r in runs) == list(range(n))
    hashes = {r.data.tags["cell_hash"] for r in runs}
    assert len(hashes) == n
    statuses = [json.loads((where / "runs" / orch.SWEEP_NAME / h / "status.json").read_text()) for h in hashes]
    assert [s["state"] for s in statuses] == ["FINISHED"] * n
    assert {s["run_id"] for s in statuses} == {r.info.run_id for r in runs}
    return statuses


def _check_arithmetic(out: str, n: int, backends: list[str]) -> dict[str, float]:
    totals = {b: float(t) for b, t, cells in TOTAL.findall(out) if int(cells) == n}
    assert sorted(totals) == sorted(backends), out
    summary = _summary(out)
    for b in backends:
        if b != "direct":  # (T_backend - T_direct) / N, from the printed totals (2-decimal rounding)
            assert float(summary[b]) == pytest.approx((totals[b] - totals["direct"]) / n, abs=0.006)
    return totals


@pytest.mark.slow  # 25-40 s here: each local node-job process spends ~6 s importing torch and MLflow
def test_direct_and_local_every_cell_finished(tmp_path, capsys):
    n = 2
    code = orch.main({"cells": n, "repeats": 1, "workers": 2, "backends": ["direct", "local"],
                      "workdir": str(tmp_path)})
    out = capsys.readouterr().out
    assert code == 0, out
    assert "all cells FINISHED in every store: yes" in out
    _check_arithmetic(out, n, ["direct", "local"])
    assert set(_summary(out)) == {"local"}
    # direct ran in this process; the local launcher in one child process per cell
    assert {s["pid"] for s in _check_store(tmp_path / "direct-r0", n)} == {os.getpid()}
    local_pids = {s["pid"] for s in _check_store(tmp_path / "local-r0", n)}
    assert os.getpid() not in local_pids and len(local_pids) == n
    assert (tmp_path / "direct-r0" / "mlflow.db") != (tmp_path / "local-r0" / "mlflow.db")


def test_submitit_skipped_when_slurm_is_absent(tmp_path, capsys, monkeypatch):
    """No Slurm client on PATH (only this Python's directory): skipped with the reason, or an error when required."""
    monkeypatch.setenv("PATH", str(Path(sys.executable).parent))
    cfg = {"cells": 1, "repeats": 1, "backends": ["direct", "submitit"], "workdir": str(tmp_path / "a")}
    assert orch.main(cfg) == 0
    out = capsys.readouterr().out
    assert re.search(r"^submitit skipped: RuntimeError: .*Slurm is not installed", out, re.M), out
    assert _summary(out) == {"submitit": "skipped"}
    assert not (tmp_path / "a" / "submitit-r0").exists()
    _check_store(tmp_path / "a" / "direct-r0", 1)
    with pytest.raises(RuntimeError, match="backend 'submitit' is required but cannot run here"):
        orch.main({**cfg, "require": ["submitit"], "workdir": str(tmp_path / "b")})
    assert not (tmp_path / "b" / "direct-r0").exists()  # refused before anything ran


@pytest.mark.parametrize(
    "cfg, exc, message",
    [
        ({"cell": 3}, ValueError, r"unknown key\(s\) \['cell'\].*'cells'"),
        ({"cells": 0}, ValueError, "cells must be an integer >= 1, got 0"),
        ({"repeats": True}, ValueError, "repeats must be an integer >= 1"),
        ({"backends": ["direct", "slurm"]}, ValueError, r"unknown backend\(s\) \['slurm'\].*'submitit'"),
        ({"backends": ["local"]}, ValueError, "must include 'direct'"),
        ({"backends": ["direct", "local"], "require": ["ray"]}, ValueError, r"require \['ray'\] not in backends"),
        ({"backends": "direct"}, TypeError, "backends must be a list"),
        ({"set": ["train.epochs=1"]}, TypeError, "set must be a mapping"),
    ],
)
def test_bad_config_refused(cfg, exc, message, tmp_path):
    with pytest.raises(exc, match=message):
        orch.main({**cfg, "workdir": str(tmp_path)})
    assert not list(tmp_path.iterdir())  # nothing written


@pytest.mark.slow
@pytest.mark.slurm
def test_submitit_every_cell_finished_on_slurm(slurm_cluster, tmp_path, capsys):
    n = 2
    code = orch.main({"cells": n, "repeats": 1, "backends": ["direct", "submitit"], "require": ["submitit"],
                      "workdir": str(tmp_path)})
    out = capsys.readouterr().out
    assert code == 0, out
    _check_arithmetic(out, n, ["direct", "submitit"])
    statuses = _check_store(tmp_path / "submitit-r0", n)
    assert all(s["slurm_job_id"] and s["pid"] != os.getpid() for s in statuses)  # Slurm array tasks ran them
    assert len({s["slurm_job_id"].split("_")[0] for s in statuses}) == 1  # one job array


@pytest.mark.slow
def test_ray_every_cell_finished(tmp_path, capsys):
    pytest.importorskip("ray")
    n = 2
    code = orch.main({"cells": n, "repeats": 1, "backends": ["direct", "ray"], "require": ["ray"],
                      "workdir": str(tmp_path)})
    out = capsys.readouterr().out
    assert code == 0, out
    _check_arithmetic(out, n, ["direct", "ray"])
    statuses = _check_store(tmp_path / "ray-r0", n)
    assert all(s["pid"] != os.getpid() for s in statuses)  # trials in Ray worker processes
    assert (tmp_path / "ray-r0" / "runs" / orch.SWEEP_NAME / "ray" / "tune").is_dir()
