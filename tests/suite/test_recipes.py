"""DEQ-INR training recipes: warm-start cache, solve schedule, gradient, evaluation start."""

from __future__ import annotations

import json
import math
import socket
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from suite.config import ConfigError, load_config
from suite.data import load_data
from suite.models import build_model
from suite.training import Checkpointer, MemoryTracker, NullTracker, fit
from suite.training.warm_start import Recipe

TINY = "configs/experiments/deq_inr_tiny.yaml"
TORCHDEQ = {"deq.solver": "fixed_point_iter", "deq.f_max_iter": 20, "deq.warm_start": True, "deq.solve_every": 0,
            "deq.grad": "phantom", "deq.phantom_steps": 3, "deq.eval_max_iter": 20}


def tiny(**over):
    return load_config(TINY, over)


def test_recipe_keys_are_validated():
    with pytest.raises(ConfigError, match=r"deq.solve_every 0 needs deq.warm_start: true"):
        tiny(**{"deq.solve_every": 0})
    with pytest.raises(ConfigError, match=r"deq.eval_init 'cache' needs deq.warm_start"):
        tiny(**{"deq.eval_init": "cache"})
    with pytest.raises(ConfigError, match=r"deq.eval_init.*allowed: zero, cache"):
        tiny(**{"deq.warm_start": True, "deq.eval_init": "last"})
    assert tiny(**TORCHDEQ).deq.solve_every == 0


def test_named_recipes_load():
    for name in ("deq_inr", "deq_inr_torchdeq", "deq_inr_ift", "crr"):
        cfg = load_config(f"configs/experiments/{name}.yaml")
        assert cfg.data.size == 512, name
    ref = load_config("configs/experiments/deq_inr_torchdeq.yaml").deq
    assert (ref.warm_start, ref.solve_every, ref.grad, ref.phantom_steps, ref.solver, ref.f_max_iter) == \
        (True, 0, "phantom", 3, "fixed_point_iter", 100)
    old = load_config("configs/experiments/deq_inr_ift.yaml").deq
    assert (old.warm_start, old.solve_every, old.grad, old.eval_init) == (False, 1, "ift", "zero")


@pytest.mark.parametrize("solve_every, expect", [(0, [True, False, False, False, False, False]),
                                                 (2, [True, False, True, False, True, False]),
                                                 (1, [True] * 6)])
def test_forward_solver_runs_on_schedule(solve_every, expect):
    cfg = tiny(**{**TORCHDEQ, "deq.solve_every": solve_every})
    tr = MemoryTracker()
    fit(cfg, build_model(cfg), load_data(cfg), tr)
    assert [n > 0 for n in tr.series("solver/fwd_nstep")] == expect


def test_solve_every_counts_optimiser_steps_with_minibatches():
    recipe = Recipe(tiny(**{**TORCHDEQ, "deq.solve_every": 3}).deq, 10, 4, torch.device("cpu"))
    assert [recipe.solves_at(s) for s in range(7)] == [True, False, False, True, False, False, True]


def test_cache_holds_every_pixels_last_state_with_minibatches():
    cfg = tiny(**{**TORCHDEQ, "train.batch_size": 300, "train.epochs": 1})
    model, data = build_model(cfg), load_data(cfg)
    recipe = Recipe(cfg.deq, data.coords.shape[0], model.hidden, torch.device("cpu"))
    from suite.training.inr import _batches, _deq_epoch

    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    batches = _batches(data.coords.shape[0], 300, torch.Generator().manual_seed(0), torch.device("cpu"))
    assert len(batches) == 7  # 45*45 = 2025 pixels
    _deq_epoch(model, opt, data, batches, 1, 0, recipe)
    assert (recipe.cache.abs().sum(1) > 0).all()  # every pixel visited once, its state stored
    # the stored state of the last batch is that batch's state after its step's gradient steps
    model.train()
    idx = batches[-1]
    before = recipe.cache[idx].clone()
    _, _, z = model.solve(data.coords[idx], z0=before, max_iter=0)
    assert not torch.equal(z, before)  # phantom steps advance a cached state


def test_warm_start_cache_is_used_and_changes_training():
    base = {k: v for k, v in TORCHDEQ.items() if k != "deq.solve_every"}
    cold = tiny(**{**base, "deq.warm_start": False})
    warm = tiny(**base)  # solve every step, from the cache
    t_cold, t_warm = MemoryTracker(), MemoryTracker()
    fit(cold, build_model(cold), load_data(cold), t_cold)
    fit(warm, build_model(warm), load_data(warm), t_warm)
    assert t_cold.series("loss")[0] == t_warm.series("loss")[0]  # step 0: the cache is zero
    assert t_warm.series("solver/fwd_nstep")[-1] < t_cold.series("solver/fwd_nstep")[-1]  # later: warm starts


def test_evaluation_from_cache_is_stated_and_logs_its_residual(tmp_path):
    for init in ("zero", "cache"):
        cfg = tiny(**{**TORCHDEQ, "deq.eval_init": init})
        tr = MemoryTracker()
        res = fit(cfg, build_model(cfg), load_data(cfg), tr, outdir=tmp_path / init)
        for key in ("solver/eval_nstep", "solver/eval_abs_lowest", "solver/eval_rel_lowest"):
            assert math.isfinite(res[key]) and len(tr.series(key)) == 1 + cfg.train.epochs // cfg.train.eval_every
        trace = json.loads((tmp_path / init / "solver_trace.json").read_text())
        assert trace["eval_init"] == init
        if init == "cache":
            assert res["solver/eval_nstep"] < zero_nstep  # the cache is near the fixed point already
        zero_nstep = res["solver/eval_nstep"]


class Crash(Exception):
    pass


class CrashingTracker(MemoryTracker):
    def __init__(self, at):
        super().__init__()
        self.at = at

    def log_metrics(self, metrics, step=None):
        if step == self.at:
            raise Crash()
        super().log_metrics(metrics, step)


WARM_IFT = {"deq.solver": "fixed_point_iter", "deq.f_max_iter": 3, "deq.warm_start": True, "deq.grad": "ift",
            "deq.b_warm_start": True, "deq.b_max_iter": 2, "deq.eval_max_iter": 20}


@pytest.mark.parametrize("batch_size, sets", [(-1, TORCHDEQ), (500, TORCHDEQ), (-1, WARM_IFT), (500, WARM_IFT)])
def test_resume_with_a_warm_cache_is_exact(tmp_path, batch_size, sets):
    cfg = tiny(**{**sets, "train.batch_size": batch_size})
    ref_tracker = MemoryTracker()
    ref = fit(cfg, build_model(cfg), load_data(cfg), ref_tracker)
    ckpt = Checkpointer(tmp_path / "ckpt", cfg.train.ckpt_every)
    with pytest.raises(Crash):
        fit(cfg, build_model(cfg), load_data(cfg), CrashingTracker(3), ckpt=ckpt)
    state = ckpt.latest()
    assert state["recipe"]["cache"].abs().sum() > 0
    if cfg.deq.b_warm_start:
        assert state["recipe"]["adjoint"].abs().sum() > 0
    res = fit(cfg, build_model(cfg), load_data(cfg), MemoryTracker(), ckpt=Checkpointer(tmp_path / "ckpt", 2))
    assert res["psnr"] == ref["psnr"]
    # the cache is what makes it exact: resuming without it starts those pixels from zero
    state.pop("recipe")
    lost = tmp_path / "lost"
    Checkpointer(lost, 2).save({k: v for k, v in state.items() if k != "extra"}, 2)
    res_lost = fit(cfg, build_model(cfg), load_data(cfg), MemoryTracker(), ckpt=Checkpointer(lost, 2))
    assert res_lost["psnr"] != ref["psnr"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


DDP_SETS = {**TORCHDEQ, "deq.f_tol": 0.0, "train.batch_size": 500, "train.epochs": 4, "deq.solve_every": 3,
            "deq.eval_init": "cache"}


def _ddp_worker(rank: int, world: int, port: int, out: str, sets: dict) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        cfg = tiny(**sets)
        tr = MemoryTracker()
        ckpt = Checkpointer(f"{out}.ckpt{rank}", 2)
        ckpt.collective = True  # every rank writes its own copy: the caches can be compared
        res = fit(cfg, build_model(cfg), load_data(cfg), tr, ckpt=ckpt)
        Path(f"{out}.{rank}").write_text(json.dumps({"loss": tr.series("loss"), "psnr": res["psnr"]}))
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("sets", [DDP_SETS, {**WARM_IFT, **{k: DDP_SETS[k] for k in ("train.batch_size", "train.epochs",
                                                                                  "deq.eval_init")}}],
                         ids=["phantom", "warm-adjoint"])
def test_warm_cache_under_data_parallel_sharding_matches_one_process(tmp_path, sets):
    torch.set_num_threads(1)
    cfg = tiny(**sets)
    one_tr = MemoryTracker()
    one_ckpt = Checkpointer(tmp_path / "one", 2)
    one = fit(cfg, build_model(cfg), load_data(cfg), one_tr, ckpt=one_ckpt)
    out = str(tmp_path / "r")
    mp.spawn(_ddp_worker, args=(2, _free_port(), out, sets), nprocs=2, join=True)
    ranks = [json.loads(Path(f"{out}.{r}").read_text()) for r in range(2)]
    np.testing.assert_allclose(ranks[0]["loss"], one_tr.series("loss"), rtol=1e-4)
    assert ranks[0]["psnr"] == pytest.approx(one["psnr"], abs=1e-3)
    for key in ("cache", "adjoint") if cfg.deq.b_warm_start else ("cache",):
        caches = [Checkpointer(f"{out}.ckpt{r}", 2).latest()["recipe"][key] for r in range(2)]
        assert torch.equal(caches[0], caches[1])  # every rank holds the whole, same cache
        ref = one_ckpt.latest()["recipe"][key]
        torch.testing.assert_close(caches[0], ref, rtol=1e-4, atol=1e-5 * float(ref.abs().max()))


@pytest.mark.parametrize("lr", [1e-3, 1.0])
def test_crr_on_the_default_recipe_never_ends_below_its_frozen_deq(lr):
    default = load_config("configs/experiments/crr.yaml").deq
    sets = {f"deq.{k}": getattr(default, k) for k in ("warm_start", "solve_every", "solver", "f_max_iter", "grad",
                                                    "b_solver", "b_max_iter", "b_warm_start", "eval_init")}
    cfg = load_config("configs/experiments/crr_tiny.yaml", {**sets, "crr.lr": lr, "crr.epochs": 5})
    assert cfg.deq.warm_start and cfg.deq.grad == "ift" and cfg.deq.b_warm_start
    res = fit(cfg, build_model(cfg), load_data(cfg), MemoryTracker())
    assert res["crr/gain_db"] >= -0.005 and res["psnr"] == pytest.approx(res["stage1/psnr"] + res["crr/gain_db"])


def _grads_and_adjoint(model, x, y, z0, g0=None, b_max_iter=None):
    """One training step's parameter gradients and adjoint (no optimiser step)."""
    model.train()
    if b_max_iter is not None:
        model.deq.b_max_iter = b_max_iter
    model.zero_grad()
    pred, _, _ = model.solve(x, z0=z0, **({} if model.adjoint is None else {"g0": g0}))
    torch.mean((pred - y) ** 2).backward()
    return [p.grad.clone() for p in model.parameters() if p.grad is not None], model.adjoint_out()


def test_warm_started_adjoint_solved_to_convergence_is_torchdeqs_ift_gradient():
    sets = {**WARM_IFT, "deq.b_max_iter": 200, "deq.b_tol": 0.0}
    warm_cfg, ift_cfg = tiny(**sets), tiny(**{**sets, "deq.b_warm_start": False})
    warm, ift, data = build_model(warm_cfg), build_model(ift_cfg), load_data(warm_cfg)
    ift.load_state_dict(warm.state_dict())
    z0 = torch.randn(data.coords.shape[0], warm.hidden) * 0.1
    g0 = torch.randn(data.coords.shape[0], warm.hidden)  # any start: a converged solve forgets it
    gw, adj = _grads_and_adjoint(warm, data.coords, data.target, z0, g0)
    gi, _ = _grads_and_adjoint(ift, data.coords, data.target, z0)
    assert adj is not None and adj.shape == z0.shape
    for a, b in zip(gw, gi):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-7)


def test_a_short_backward_solve_from_the_cached_adjoint_beats_the_same_solve_from_zero():
    cfg = tiny(**{**WARM_IFT, "train.epochs": 40, "train.eval_every": 40})
    model, data = build_model(cfg), load_data(cfg)
    recipe = Recipe(cfg.deq, data.coords.shape[0], model.hidden, torch.device("cpu"))
    from suite.training.inr import _deq_epoch

    opt = torch.optim.Adam(model.parameters(), lr=cfg.train.lr)
    for epoch in range(cfg.train.epochs):
        _deq_epoch(model, opt, data, [None], 1, epoch, recipe)
    x, y, z0 = data.coords, data.target, recipe.cache.clone()
    _, exact = _grads_and_adjoint(model, x, y, z0, None, b_max_iter=300)
    _, warm = _grads_and_adjoint(model, x, y, z0, recipe.adjoint.clone(), b_max_iter=2)
    _, zero = _grads_and_adjoint(model, x, y, z0, None, b_max_iter=2)
    err = lambda g: float((g - exact).norm() / exact.norm())  # noqa: E731
    assert err(warm) < 0.5 * err(zero), (err(warm), err(zero))
