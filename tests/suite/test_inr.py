"""DEQ-INR and CRR: models, freezing, conservative refinement, resuming."""

import math

import pytest
import torch

from suite.config import load_config
from suite.data import load_data
from suite.data.images import pixels_to_image
from suite.metrics import psnr
from suite.models import build_model, get_model
from suite.models.crr import CRR
from suite.models.deq_inr import DEQINR
from suite.training import Checkpointer, MemoryTracker, fit
from suite.training.inr import DivergedError

TINY = "configs/experiments/crr_tiny.yaml"


def tiny(**over):
    return load_config(TINY, over)


def test_unknown_model_lists_valid_names():
    with pytest.raises(ValueError, match="valid: crr, deprox, deq_inr"):
        get_model("siren")


@pytest.mark.parametrize("solver", ["anderson", "broyden", "fixed_point_iter"])
@pytest.mark.parametrize("filt, grad, norm", [("fourier", "ift", "weight_norm"), ("gabor", "phantom", "spectral_norm"), ("fourier", "phantom", "none")])
def test_deq_inr_variants_train(solver, filt, grad, norm):
    cfg = load_config("configs/experiments/deq_inr_tiny.yaml", {"deq.solver": solver, "model.filter": filt,
                      "deq.grad": grad, "model.norm": norm, "data.size": 17, "train.epochs": 3})
    model, data = build_model(cfg), load_data(cfg)
    assert isinstance(model, DEQINR)
    pred, stats = model(data.coords)
    assert pred.shape == (17 * 17, 1) and stats["nstep"] >= 1
    loss = torch.mean((pred - data.target) ** 2)
    loss.backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.f.parameters() if p.requires_grad)


def test_minibatch_training_runs():
    cfg = load_config("configs/experiments/deq_inr_tiny.yaml", {"train.batch_size": 300, "train.epochs": 2})
    tr = MemoryTracker()
    res = fit(cfg, build_model(cfg), load_data(cfg), tr)
    assert len(tr.series("loss")) == 2 and math.isfinite(res["psnr"])


def test_deq_inr_logs_design_metrics():
    cfg = load_config("configs/experiments/deq_inr_tiny.yaml")
    tr = MemoryTracker()
    res = fit(cfg, build_model(cfg), load_data(cfg), tr)
    per_epoch = ["loss", "solver/fwd_nstep", "solver/bwd_nstep", "solver/abs_lowest", "solver/rel_lowest", "time/epoch_s"]
    for key in per_epoch:
        assert [s for s, _ in tr.history[key]] == list(range(cfg.train.epochs)), key
    for key in ["psnr", "ssim", "nmse", "vif", "hfe", "sr", "mem/peak_mb", "time/total_s"]:
        assert math.isfinite(res[key]) and tr.last(key) == res[key], key
    assert tr.last("solver/bwd_nstep") > 0  # IFT backward solver ran
    assert res["mem/peak_mb"] > 10


def test_crr_freezes_deq_and_starts_at_deq_output():
    cfg = tiny()
    model, data = build_model(cfg), load_data(cfg)
    assert isinstance(model, CRR)
    model.freeze_deq()
    model.train()
    assert not model.deq.training and model.refiner.training
    assert not any(p.requires_grad for p in model.deq.parameters())
    before = {k: v.clone() for k, v in model.deq.state_dict().items()}
    opt = torch.optim.Adam(model.refiner.parameters(), lr=1e-2)
    with torch.no_grad():
        y_deq = model.deq(data.coords)[0]
    out = model(data.coords, y_deq)
    p_deq = psnr(pixels_to_image(y_deq, *data.shape), data.image)
    p_crr = psnr(pixels_to_image(out.detach(), *data.shape), data.image)
    assert abs(float(p_crr - p_deq)) < 1e-4  # step 0: CRR output == DEQ output
    loss = torch.mean((out - data.target) ** 2)
    loss.backward()
    assert all(p.grad is None for p in model.deq.parameters())
    opt.step()
    for k, v in model.deq.state_dict().items():
        assert torch.equal(v, before[k]), k


def test_refiner_init_std_is_configurable():
    small = build_model(tiny(**{"crr.init_std": 1e-5})).refiner.last.weight.std()
    large = build_model(tiny(**{"crr.init_std": 1e-1})).refiner.last.weight.std()
    assert small < 1e-4 < 1e-2 < large


@pytest.mark.parametrize("lr", [1e-3, 1.0])  # a sane and a destructive refiner learning rate
def test_crr_never_lowers_psnr(lr):
    cfg = tiny(**{"crr.lr": lr, "crr.epochs": 5})
    tr = MemoryTracker()
    res = fit(cfg, build_model(cfg), load_data(cfg), tr)
    assert res["crr/gain_db"] >= -0.005
    assert res["psnr"] == pytest.approx(res["stage1/psnr"] + res["crr/gain_db"])
    stage2 = [v for (s, v) in tr.history["psnr"] if s is not None and cfg.train.epochs <= s < cfg.train.epochs + 5]
    assert len(stage2) == 5
    if lr == 1.0:
        assert min(stage2) < res["stage1/psnr"]  # the refiner did get worse ...
        assert res["psnr"] >= res["stage1/psnr"] - 0.005  # ... and CRR did not follow it


def test_non_finite_loss_raises_named_error():
    cfg = tiny()
    data = load_data(cfg)
    target = data.target.clone()
    target[5] = float("nan")  # what a diverged solver's output does to the loss
    bad = type(data)(data.name, data.image, data.coords, target)
    with pytest.raises(DivergedError, match="non-finite loss.*stage 1, epoch 0"):
        fit(cfg, build_model(cfg), bad, MemoryTracker())


class Crash(Exception):
    pass


class CrashingTracker(MemoryTracker):
    """Simulates a kill after ``at`` epochs were logged."""

    def __init__(self, at):
        super().__init__()
        self.at = at

    def log_metrics(self, metrics, step=None):
        if step == self.at:
            raise Crash()
        super().log_metrics(metrics, step)


# crash in stage 1 (full batch) and in stage 2 (mini-batches) of a 6 + 6 epoch CRR run
@pytest.mark.parametrize("crash_at, batch_size", [(3, -1), (9, 500)])
def test_resume_matches_uninterrupted(tmp_path, crash_at, batch_size):
    cfg = tiny(**{"train.batch_size": batch_size})
    ref = fit(cfg, build_model(cfg), load_data(cfg), MemoryTracker())

    ckpt = Checkpointer(tmp_path / "ckpt", cfg.train.ckpt_every)
    with pytest.raises(Crash):
        fit(cfg, build_model(cfg), load_data(cfg), CrashingTracker(crash_at), ckpt=ckpt)
    assert ckpt.latest() is not None
    resumed_tracker = MemoryTracker()
    res = fit(cfg, build_model(cfg), load_data(cfg), resumed_tracker, ckpt=Checkpointer(tmp_path / "ckpt", cfg.train.ckpt_every))
    assert res["psnr"] == ref["psnr"]
    assert res["stage1/psnr"] == ref["stage1/psnr"]
    first = min(s for s, _ in resumed_tracker.history["loss"])
    assert first == (crash_at // 2) * 2  # resumed from the newest checkpoint, not from scratch
