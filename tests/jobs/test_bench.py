"""Benchmarks ``memory``, ``solvers``, ``data``, ``profile`` at tiny sizes: structure and invariants, never timings."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

from jobs.bench import data as bench_data
from jobs.bench import memory as bench_memory
from jobs.bench import profile as bench_profile
from jobs.bench import solvers as bench_solvers
from suite.models.deprox import DEProx, Unrolled, build_dncnn_denoiser


@pytest.fixture(autouse=True)
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# ---------------------------------------------------------------------------------------------- memory


def _memory_rows(depth: int = 3, width: int = 4, size: int = 13) -> dict:
    torch.manual_seed(0)
    y, target, physics = bench_memory.make_problem(size, 1, 4, 0.15, 0)
    base = build_dncnn_denoiser(depth, width, "group", num_groups=2)
    base.prepare_spectral_norm((size, size), update=False)
    rows = {}
    with bench_memory.solver_allocations() as calls:
        for kind, k in [("unrolled", 2), ("unrolled", 3), ("unrolled", 4), ("deq", 3), ("deq", 6)]:
            den = copy.deepcopy(base)
            if kind == "unrolled":
                model = Unrolled(den, n_iter=k)
            else:
                model = DEProx(den, f_max_iter=k, b_max_iter=k, f_tol=1e-9, b_tol=1e-9)
            model.train()
            counter = bench_memory.CallCounter(den)
            rows[(kind, k)] = bench_memory.measure_step(model, y, physics, target, counter, calls)
    return rows


def test_memory_invariants():
    depth, width, size = 3, 4, 13
    rows = _memory_rows(depth, width, size)
    u2, u3, u4 = (rows[("unrolled", k)] for k in (2, 3, 4))
    # one more unrolled iteration saves one more denoiser graph: saved bytes grow linearly in K,
    # by at least the (depth - 1) hidden activations (width, H, W) float32 that GroupNorm/ReLU keep
    step = u3["saved_fwd"] - u2["saved_fwd"]
    assert u4["saved_fwd"] - u3["saved_fwd"] == pytest.approx(step, rel=1e-6)
    assert step * 2**20 >= (depth - 1) * width * size * size * 4
    assert u4["peak"] >= u3["peak"] >= u2["peak"]  # (at this size the spectral-norm probe can set the peak)
    assert [u["calls_grad"] for u in (u2, u3, u4)] == [2, 3, 4]
    d3, d6 = rows[("deq", 3)], rows[("deq", 6)]
    # DEQ: memory independent of the solver's iteration count; f called without graph by the solver
    assert d6["peak"] == pytest.approx(d3["peak"], rel=1e-3)
    assert d6["saved_fwd"] == d3["saved_fwd"]
    assert (d3["calls_grad"], d3["calls_nograd"], d6["calls_nograd"]) == (2, 3, 6)
    # the instrumented Anderson history equals torchdeq's allocation formula, one per solve
    formula = bench_memory.solver_buffer_elements("anderson", 1, 2 * size * size, 6, 3) * 4 / 2**20
    assert d3["solver_calls"] == 2
    assert d3["solver_mb"] == pytest.approx(formula, rel=1e-12)
    assert u2["solver_calls"] == 0
    for r in rows.values():
        assert r["peak"] >= max(r["peak_fwd"], r["peak_bwd"]) - 1e-12
        assert r["peak_fwd"] >= r["end_fwd"]


def test_memory_main_smoke(capsys):
    cfg = {"repeats": 1, "image": {"size": 12}, "denoiser": {"depth": 3, "width": 8},
           "iterations": [3, 4], "goals": {"at_k": 4}, "time_steps": False}
    assert bench_memory.main(cfg) == 0
    out = capsys.readouterr().out
    assert "DEQ / unrolled peak memory at K = 4" in out
    assert "DEQ hook-IFT anderson" in out


def test_memory_config_refused():
    with pytest.raises(ValueError, match="unknown key"):
        bench_memory.main({"repeat": 2})
    with pytest.raises(ValueError, match="at_k"):
        bench_memory.main({"iterations": [5, 10], "goals": {"at_k": 20}})


# --------------------------------------------------------------------------------------------- solvers


def _reference_fp_counts(a: torch.Tensor, b: torch.Tensor, thresholds: list, max_iter: int) -> np.ndarray:
    """Plain float64 fixed-point iteration ``z <- a * z + b`` from 0, counting evaluations per row."""
    z = torch.zeros_like(b, dtype=torch.float64)
    out = np.full((len(thresholds), b.shape[0]), np.inf)
    for k in range(1, max_iter + 1):
        fz = a.double() * z + b.double()
        rel = (fz - z).norm(dim=1) / fz.norm(dim=1)
        for i, thr in enumerate(thresholds):
            newly = (rel < thr).numpy() & np.isinf(out[i])
            out[i, newly] = k
        z = fz
    return out


def test_evals_to_threshold_matches_plain_iteration():
    a = torch.tensor([[0.5], [0.8], [0.95]]).expand(3, 4).contiguous()
    b = torch.tensor([[1.0, 2.0, 3.0, 4.0], [1.0, 0.0, 1.0, 0.0], [2.0, 2.0, 1.0, 1.0]])
    thresholds = [1e-3, 1e-4]
    counts, n_evals = bench_solvers.evals_to_threshold(
        "fixed_point_iter", lambda z: a * z + b, torch.zeros_like(b), 120, 1e-12, thresholds)
    assert n_evals == 120
    np.testing.assert_array_equal(counts, _reference_fp_counts(a, b, thresholds, 120))
    # 0.95 ** k needs ~180 steps to 1e-4: not reached within 120 evaluations
    assert np.isinf(counts[1, 2]) and np.isfinite(counts[0, 0])


@pytest.mark.parametrize("solver", ["anderson", "broyden"])
def test_accelerated_solvers_need_fewer_evaluations(solver):
    torch.manual_seed(0)
    q, _ = torch.linalg.qr(torch.randn(6, 6))
    lin = 0.9 * q  # a linear contraction with rate 0.9, rotating: fixed-point needs ~90 steps to 1e-4
    # large offsets: torchdeq's Anderson regularises its Gram matrix by an absolute 1e-4, which
    # stalls it once squared residuals fall below that; here they stay far above
    b = 100.0 * torch.randn(5, 6)
    f = lambda z: z @ lin.T + b  # noqa: E731
    counts, n_evals = bench_solvers.evals_to_threshold(solver, f, torch.zeros_like(b), 60, 1e-12, [1e-4])
    fp, _ = bench_solvers.evals_to_threshold("fixed_point_iter", f, torch.zeros_like(b), 60, 1e-12, [1e-4])
    assert n_evals == 60 + (solver == "broyden")
    assert (counts <= 30).all()  # fixed-point would need ~90
    assert np.isinf(fp).all()


def test_solvers_main_smoke(capsys):
    cfg = {
        "max_iter": 20,
        "inr": {"seeds": [0], "experiment": {
            "family": "deq_inr", "data": {"image": "camera", "size": 41},
            "model": {"hidden": 4, "input_scale": 8.0},
            "train": {"epochs": 1, "eval_every": 1, "device": "cpu"}}},
        "deprox": {"seeds": [0], "size": 16, "volumes": 2, "slices": 2,
                   "denoiser": {"depth": 3, "width": 8}, "pretrain": {"steps": 2, "batch": 2}},
    }
    assert bench_solvers.main(cfg) == 0
    out = capsys.readouterr().out
    assert "(a) DEQ-INR" in out and "(b) DE-Prox" in out
    for name in ("anderson", "broyden", "fixed_point_iter"):
        assert out.count(f"\n{name}") == 2
    assert "DE-Prox fixed-point / anderson @0.0001" in out


def test_solvers_config_refused():
    with pytest.raises(ValueError, match="solvers"):
        bench_solvers.main({"solvers": ["newton"]})


# ------------------------------------------------------------------------------------------------ data


def test_data_pipelines_agree(tmp_path):
    from suite.data.synth import write_synthetic_dataset

    write_synthetic_dataset(tmp_path, n_volumes=2, n_slices=2, shape=(24, 20), n_coils=3, seed=1,
                            recon_size=(16, 16))
    cfg = bench_data._merge({"crop": [16, 16]}, bench_data.DEFAULTS)
    pipes = bench_data.build_pipelines(str(tmp_path), cfg)
    assert {len(ds) for ds, _ in pipes.values()} == {4}
    suite_ds, ref_ds = pipes["suite"][0], pipes["fastmri+suite transform"][0]
    for i in range(4):
        a, b = suite_ds[i], ref_ds[i]
        assert (a["fname"], a["slice_num"]) == (b["fname"], b["slice_num"])
        for key in ("kspace", "mask", "sens_maps", "target", "target_complex"):
            torch.testing.assert_close(a[key], b[key], rtol=0, atol=0)
    unet = pipes["fastmri+UnetDataTransform"][0][0]
    assert tuple(unet.image.shape) == (16, 16)


def test_data_main_smoke(capsys):
    cfg = {"repeats": 1, "volumes": 2, "slices": 2, "coils": 2, "shape": [24, 20], "crop": [16, 16],
           "profile_top": 3, "step": {"batches": 1, "denoiser": {"depth": 2, "width": 8},
                                      "f_max_iter": 3, "b_max_iter": 3}}
    assert bench_data.main(cfg) == 0
    out = capsys.readouterr().out
    assert "suite / fastmri SliceDataset with the same transform" in out
    assert "loader / step" in out


# --------------------------------------------------------------------------------------------- profile


def test_profile_variants_give_the_same_gradient():
    cfg = bench_profile._merge({"denoiser": {"depth": 3, "width": 8}}, bench_profile.DEFAULTS)
    rel = bench_profile.check_variants(cfg, ["hook_ift", "channels_last", "phantom"], size=12)
    assert rel["hook_ift"] <= 1e-5
    assert rel["channels_last"] <= 1e-5


def test_profile_main_smoke(capsys):
    cfg = {"repeats": 1, "image": {"size": 12}, "denoiser": {"depth": 3, "width": 8},
           "deq": {"f_max_iter": 3, "b_max_iter": 3}, "warmup_steps": 0, "top_ops": 3}
    assert bench_profile.main(cfg) == 0
    out = capsys.readouterr().out
    assert "forward solve (torchdeq, no graph)" in out
    assert "backward solve (VJPs through f)" in out
    assert "phantom speed-up over baseline" in out
