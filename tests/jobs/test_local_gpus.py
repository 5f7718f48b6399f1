"""GPUs on one machine: the local launcher's device pool and each cell's CUDA_VISIBLE_DEVICES.

The device list is faked through ``CUDA_VISIBLE_DEVICES`` (or handed to the pool);
cells run through the real :func:`jobs.launchers.local.submit` with a stand-in
child process that records what it saw instead of training.
"""

import json
import random
import sys
import threading
import time
from pathlib import Path

import pytest

from jobs.cells import Cell
from jobs.launchers import local
from jobs.launchers.gpus import DevicePool, discover_devices, parse_visible_devices, wants_gpus

FOUR = ["0", "1", "2", "3"]

# The stand-in for `python -m jobs.node`: records its CUDA_VISIBLE_DEVICES and when it ran.
CHILD = """
import json, os, sys, time
wd = os.path.dirname(sys.argv[1])
start = time.time()
time.sleep(float(sys.argv[2]))
seen = {"cvd": os.environ.get("CUDA_VISIBLE_DEVICES"), "start": start, "end": time.time()}
open(os.path.join(wd, "seen.json"), "w").write(json.dumps(seen))
open(os.path.join(wd, "status.json"), "w").write(json.dumps({"state": "FINISHED"}))
"""


def fake_node(seconds=0.5):
    return lambda cell, path: [sys.executable, "-c", CHILD, str(path), str(seconds)]


def cell(tmp, name, device="cuda", ranks=1):
    cfg = {"train": {"device": device}, "resources": {"tasks_per_node": ranks}}
    return Cell(config=cfg, hash=name, experiment="t_gpu", workdir=str(tmp / name), tracking_uri="", label=name)


def seen(c):
    return json.loads((Path(c.workdir) / "seen.json").read_text())


def check_no_oversubscription(runs, n_devices):
    """Cells whose run times overlap held disjoint devices; never more than ``n_devices`` busy."""
    for i, (a, da) in enumerate(runs):
        for b, db in runs[i + 1:]:
            if a["start"] < b["end"] and b["start"] < a["end"]:
                assert not set(da) & set(db), (a, da, b, db)
    busiest = 0
    for t in sorted(r["start"] for r, _ in runs):
        busy = [d for r, devs in runs if r["start"] <= t < r["end"] for d in devs]
        assert len(busy) == len(set(busy)) <= n_devices
        busiest = max(busiest, len(busy))
    return busiest


# --- discovery -------------------------------------------------------------------------------


def test_visible_devices_are_parsed_as_opaque_ids():
    assert parse_visible_devices("0,1,2,3") == FOUR
    assert parse_visible_devices(" 2, 3 ,") == ["2", "3"]
    assert parse_visible_devices("") == []
    assert parse_visible_devices("-1") == []
    assert parse_visible_devices("1,-1,2") == ["1"]  # CUDA ignores everything from a negative entry on
    uuids = "GPU-8f2c1a3e-0000-1111-2222-333344445555,MIG-GPU-aa/1/0"
    assert parse_visible_devices(uuids) == uuids.split(",")


def test_discovery_reads_the_variable_else_torch(monkeypatch):
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0,1,2,3")
    assert discover_devices() == (FOUR, "CUDA_VISIBLE_DEVICES")
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    assert discover_devices() == ([], "CUDA_VISIBLE_DEVICES")
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES")
    import torch

    assert discover_devices() == ([str(i) for i in range(torch.cuda.device_count())], "torch")


def test_which_cells_want_gpus():
    assert wants_gpus({"train": {"device": "cuda"}}, have_gpus=False)
    assert wants_gpus({"train": {"device": "auto"}}, have_gpus=True)
    assert not wants_gpus({"train": {"device": "auto"}}, have_gpus=False)
    # the Slurm request alone does not force a GPU: a cluster sweep still runs on a laptop's CPU
    assert not wants_gpus({"train": {"device": "auto"}, "resources": {"gpus_per_node": 1}}, have_gpus=False)
    assert not wants_gpus({"train": {"device": "cpu"}}, have_gpus=True)


# --- the pool --------------------------------------------------------------------------------


def test_pool_hands_out_disjoint_ids_a_ddp_cell_gets_one_per_rank():
    pool = DevicePool(FOUR)
    one, two = pool.acquire(1), pool.acquire(2)
    assert len(one) == 1 and len(two) == 2 and not set(one) & set(two)
    assert set(one + two + pool.free()) == set(FOUR) and len(pool.free()) == 1
    pool.release(two)
    assert sorted(pool.free()) == sorted(set(FOUR) - set(one))


def test_pool_blocks_until_released():
    pool = DevicePool(FOUR)
    held = pool.acquire(3)
    got = []
    waiter = threading.Thread(target=lambda: got.append(pool.acquire(2)))
    waiter.start()
    waiter.join(0.3)
    assert waiter.is_alive() and not got  # 1 free, 2 wanted: it waits
    with pytest.raises(TimeoutError):
        pool.acquire(2, timeout=0.05)
    pool.release(held)
    waiter.join(5)
    assert not waiter.is_alive() and len(got[0]) == 2


def test_pool_refuses_more_than_exist():
    with pytest.raises(ValueError, match="needs 5 GPUs .* but 4 exist"):
        DevicePool(FOUR).acquire(5)
    with pytest.raises(ValueError, match="needs 1 GPU .* but 0 exist"):
        DevicePool([]).acquire(1)


def test_pool_under_contention_never_oversubscribes():
    pool, lock, busy, worst, errors = DevicePool(FOUR), threading.Lock(), set(), [0], []

    def cell_like(n):
        devs = pool.acquire(n)
        with lock:
            if set(devs) & busy:
                errors.append((devs, set(busy)))
            busy.update(devs)
            worst[0] = max(worst[0], len(busy))
        time.sleep(random.uniform(0, 0.01))
        with lock:
            busy.difference_update(devs)
        pool.release(devs)

    threads = [threading.Thread(target=cell_like, args=(random.choice([1, 1, 2, 4]),)) for _ in range(40)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert not errors and worst[0] <= 4 and sorted(pool.free()) == FOUR


# --- each cell's environment, through submit ------------------------------------------------------


def test_each_cell_gets_its_own_devices(tmp_path, monkeypatch, capsys):
    """6 one-GPU cells, 2 two-rank cells, a CPU cell and an 8-rank cell on 4 GPUs, 6 workers."""
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0,1,2,3")
    gpu = [cell(tmp_path, f"g{i}") for i in range(6)] + [cell(tmp_path, "auto", device="auto")]
    ddp = [cell(tmp_path, f"ddp{i}", ranks=2) for i in range(2)]
    cpu = cell(tmp_path, "cpu", device="cpu")
    big = cell(tmp_path, "big", ranks=8)
    out = {o["hash"]: o for o in local.submit([big, *gpu, *ddp, cpu], workers=6, progress=False, command=fake_node())}

    assert "4 GPUs found via CUDA_VISIBLE_DEVICES (0,1,2,3)" in capsys.readouterr().out
    assert out["big"]["state"] == "FAILED"  # it cannot ever run; the others went on
    assert "needs 8 GPUs (one per rank) but 4 exist" in out["big"]["error"]
    assert "\n" not in out["big"]["error"] and not (tmp_path / "big/seen.json").exists()
    assert all(o["state"] == "FINISHED" for h, o in out.items() if h != "big"), out
    assert seen(cpu)["cvd"] == ""  # a CPU cell on a GPU machine sees no GPU
    runs = []
    for c in gpu + ddp:
        devs = seen(c)["cvd"].split(",")
        assert len(devs) == len(set(devs)) == c.world_size and set(devs) <= set(FOUR), (c.hash, devs)
        runs.append((seen(c), devs))
    assert check_no_oversubscription(runs, 4) >= 2  # they did run side by side


def test_workers_default_to_the_gpus(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "GPU-aaa,GPU-bbb")  # UUIDs reach the cells as they are
    cells = [cell(tmp_path, f"g{i}", device="auto") for i in range(5)]
    out = local.submit(cells, progress=False, command=fake_node(0.3))
    assert "; 2 worker(s)" in capsys.readouterr().out
    assert all(o["state"] == "FINISHED" for o in out)
    runs = [(seen(c), [seen(c)["cvd"]]) for c in cells]
    assert {devs[0] for _, devs in runs} <= {"GPU-aaa", "GPU-bbb"}
    check_no_oversubscription(runs, 2)


def test_workers_default_without_gpus(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    cells = [cell(tmp_path, "auto", device="auto"), cell(tmp_path, "cuda")]
    out = {o["hash"]: o for o in local.submit(cells, progress=False, command=fake_node(0.0))}
    assert "0 GPUs found via CUDA_VISIBLE_DEVICES" in capsys.readouterr().out
    assert out["auto"]["state"] == "FINISHED" and seen(cells[0])["cvd"] == ""  # auto: runs on CPU
    assert out["cuda"]["state"] == "FAILED" and "needs 1 GPU (one per rank) but 0 exist" in out["cuda"]["error"]
    assert local.default_workers(None, 100, 0, 0) == local.default_workers(None, 100, 4, 0) >= 1  # one per core
    assert local.default_workers(None, 100, 4, 3) == 4
    assert local.default_workers(None, 3, 4, 3) == 3
    assert local.default_workers(8, 100, 4, 3) == 8  # given: kept (GPU cells still wait for their devices)


def test_ddp_cell_runs_under_torchrun():
    c = Cell(config={"resources": {"tasks_per_node": 2}}, hash="h", experiment="e", workdir="/w", tracking_uri="",
             label="l")
    cmd = local.node_command(c, Path("/w/cell.json"))
    assert cmd[1:5] == ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
    assert cmd[-3:] == ["-m", "jobs.node", "/w/cell.json"]
