"""DistributedDataParallel: the helpers on a real 2-process gloo group, and 2-rank cells
through torchrun and through the submitit launcher on the local Slurm.

The reference for a 2-rank run is the same cell in one process: same global
batch, so the per-epoch loss must agree up to float rounding.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import yaml
from mlflow.tracking import MlflowClient

REPO = Path(__file__).resolve().parents[2]
TINY = REPO / "configs/experiments/crr_tiny.yaml"
LOCAL = REPO / "configs/launchers/local_slurm.yaml"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _helpers_worker(rank: int, world: int, port: int, out: str) -> None:
    from suite.training import distributed as D

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        n = 11
        s = D.shard(n)
        rows = torch.arange(n, dtype=torch.float32)[:, None] * torch.tensor([[1.0, -1.0]])
        gathered = D.gather_rows(rows[s] * 2, n)
        # a shard mean weighted by shard size == the global mean
        mean = D.reduce_mean({"x": float(rows[s, 0].mean()), "r": float(rank)}, weight=s.stop - s.start)
        lin = torch.nn.Linear(2, 1)
        torch.manual_seed(rank)  # different weights per rank ...
        torch.nn.init.normal_(lin.weight)
        D.broadcast_module(lin)  # ... until rank 0's are broadcast
        x = torch.linspace(-1, 1, 2 * n).view(n, 2)
        ((lin(x[s]) ** 2).sum() / n).backward()
        D.all_reduce_grads(lin.parameters())
        result = {"shard": [s.start, s.stop], "gathered": gathered.tolist(), "mean": mean,
                  "any": [D.any_rank(rank == 1), D.any_rank(False)], "weight": lin.weight.tolist(),
                  "bias": lin.bias.tolist(),
                  "grad": lin.weight.grad.tolist(), "main": D.is_main(), "world": D.world_size()}
        Path(f"{out}.{rank}").write_text(json.dumps(result))
    finally:
        dist.destroy_process_group()


def test_helpers_on_a_two_process_gloo_group(tmp_path):
    from suite.training import distributed as D

    out = str(tmp_path / "r")
    mp.spawn(_helpers_worker, args=(2, _free_port(), out), nprocs=2, join=True)
    r = [json.loads(Path(f"{out}.{i}").read_text()) for i in range(2)]
    assert [x["shard"] for x in r] == [[0, 5], [5, 11]]  # contiguous, disjoint, sizes differ by <= 1
    expected_rows = (torch.arange(11.0)[:, None] * torch.tensor([[2.0, -2.0]])).tolist()
    assert r[0]["gathered"] == r[1]["gathered"] == expected_rows
    assert r[0]["mean"]["x"] == pytest.approx(5.0) and r[1]["mean"] == r[0]["mean"]
    assert r[0]["mean"]["r"] == pytest.approx(6 / 11)  # rank 1 has 6 of 11 rows
    assert r[0]["any"] == r[1]["any"] == [True, False]
    assert r[0]["weight"] == r[1]["weight"]
    # The summed shard gradients equal one process's gradient of the mean over the whole batch.
    lin = torch.nn.Linear(2, 1)
    with torch.no_grad():
        lin.weight.copy_(torch.tensor(r[0]["weight"]))
        lin.bias.copy_(torch.tensor(r[0]["bias"]))
    x = torch.linspace(-1, 1, 22).view(11, 2)
    (lin(x) ** 2).mean().backward()
    assert r[0]["grad"] == r[1]["grad"]
    np.testing.assert_allclose(r[0]["grad"], lin.weight.grad.tolist(), rtol=1e-6)
    assert [x["main"] for x in r] == [True, False] and r[0]["world"] == 2
    # Without a process group the helpers are the identity.
    assert D.shard(7) == slice(0, 7) and D.world_size() == 1 and D.is_main()
    assert D.reduce_mean({"a": 2.0}, weight=5) == {"a": 2.0}


def _one_run(tmp: Path, name: str):
    client = MlflowClient(f"sqlite:///{tmp}/mlflow.db")
    exp = client.get_experiment_by_name(name)
    return client, client.search_runs([exp.experiment_id])


def test_local_launcher_runs_a_two_rank_cell_with_torchrun(tmp_path):
    """The local launcher starts a 2-rank cell as `torchrun --nproc_per_node 2 -m jobs.node`; rank 0 alone tracks."""
    spec = {"name": "t_torchrun", "base": str(TINY), "set": {"train.epochs": 3, "crr.epochs": 2,
                                                             "resources.tasks_per_node": 2}, "seeds": [0]}
    (tmp_path / "s.yaml").write_text(yaml.safe_dump(spec))
    out = subprocess.run([sys.executable, "-m", "jobs.cli", "sweep", "s.yaml", "--workers", "1"], cwd=tmp_path,
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    client, (run,) = _one_run(tmp_path, "t_torchrun")
    assert run.info.status == "FINISHED" and run.data.tags["world_size"] == "2"
    # one worker's share of the cores is split between the two ranks, not given to each
    assert run.data.tags["torch_threads"] == str(max(1, (os.cpu_count() or 1) // 2))
    assert sorted(m.step for m in client.get_metric_history(run.info.run_id, "loss")) == list(range(5))
    (status,) = (tmp_path / "runs/t_torchrun").glob("*/status.json")
    status = json.loads(status.read_text())
    assert status["world_size"] == 2 and status["state"] == "FINISHED"


@pytest.mark.slurm
def test_two_rank_cell_on_slurm_matches_one_rank(slurm_cluster, tmp_path):
    """Acceptance 3: 1-rank and 2-rank CRR-tiny on the local Slurm, same global mini-batches."""
    spec = {"name": "t_ddp", "base": str(TINY), "seeds": [0],
            "set": {"train.batch_size": 700, "train.epochs": 4, "crr.epochs": 4},  # 2025 px: batches 700, 700, 625
            "axes": {"resources.tasks_per_node": [1, 2]}}
    (tmp_path / "s.yaml").write_text(yaml.safe_dump(spec))
    out = subprocess.run([sys.executable, "-m", "jobs.cli", "sweep", "s.yaml", "--launcher", "submitit",
                          "--launcher-config", str(LOCAL)], cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stdout + out.stderr
    client, found = _one_run(tmp_path, "t_ddp")
    by_world = {r.data.tags["world_size"]: r for r in found}
    assert sorted(by_world) == ["1", "2"] and all(r.info.status == "FINISHED" for r in found)
    curves = {}
    for w, r in by_world.items():
        hist = sorted((m.step, m.value) for m in client.get_metric_history(r.info.run_id, "loss"))
        assert [s for s, _ in hist] == list(range(8))  # each epoch once: rank 1 logged nothing
        curves[w] = np.array([v for _, v in hist])
    np.testing.assert_allclose(curves["2"], curves["1"], rtol=1e-4)
    for key in ("stage1/psnr", "psnr", "solver/fwd_nstep"):
        assert by_world["2"].data.metrics[key] == pytest.approx(by_world["1"].data.metrics[key], rel=1e-4), key
    # only rank 0 wrote artifacts: one set, each logged once
    arts = [a.path for a in client.list_artifacts(by_world["2"].info.run_id)]
    assert len(arts) == len(set(arts)) and "reconstruction.png" in arts
