"""The family contract: each built-in family is one object whose declared final metrics its fit returns."""

from __future__ import annotations

import pytest
import torch

from suite.config import load_config
from suite.data import load_data
from suite.families import FAMILIES, Family, family_names, get_family
from suite.metrics.registry import METRICS, Metric, computed_metrics, metric_direction, register_metric
from suite.models import build_model
from suite.training import MemoryTracker, fit

TINY = {
    "deq_inr": ("configs/experiments/deq_inr_tiny.yaml", {"train.epochs": 2, "data.size": 41}),
    "crr": ("configs/experiments/crr_tiny.yaml", {"train.epochs": 2, "crr.epochs": 2, "data.size": 41}),
    "deprox": ("configs/experiments/deprox_tiny.yaml", {
        "mri.synth_volumes": 3, "mri.synth_slices": 2, "mri.slice_start": 0, "mri.slice_stop": 2,
        "mri.synth_size": [56, 43], "mri.crop": [41, 43], "mri.val_volumes": 1, "deprox.depth": 3,
        "deprox.width": 8, "deprox.pretrain_epochs": 1, "train.epochs": 1, "eval.noise_sigmas": [0.0]}),
}


def test_builtins_are_registered_family_objects():
    assert family_names() == ["crr", "deprox", "deq_inr"]
    for name in family_names():
        fam = get_family(name)
        assert isinstance(fam, Family) and fam.name == name and FAMILIES[name] is fam


@pytest.mark.parametrize("name", ["crr", pytest.param("deprox", marks=pytest.mark.slow), "deq_inr"])
def test_fit_returns_the_declared_final_metrics(name, tmp_path):
    path, over = TINY[name]
    cfg = load_config(path, {**over, "mri.synth_dir": str(tmp_path)} if name == "deprox" else over)
    fam = get_family(cfg.family)
    results = fit(cfg, build_model(cfg), load_data(cfg), MemoryTracker())
    missing = set(fam.final_metrics) - set(results)
    assert not missing, missing
    # per-phase memory, the same keys and meaning for every family
    assert results["mem/peak_mb"] == max(results["mem/train_peak_mb"], results["mem/infer_peak_mb"]) > 0


def test_evaluate_scores_every_registered_image_metric():
    cfg = load_config("configs/experiments/deq_inr_tiny.yaml")
    gen = torch.Generator().manual_seed(0)
    target = torch.rand(1, 1, 41, 41, generator=gen)
    pred = (target + 0.05 * torch.randn(1, 1, 41, 41, generator=gen)).clamp(0, 1)
    scores = get_family("deq_inr").evaluate(pred, target, cfg)
    assert tuple(scores) == computed_metrics() == ("psnr", "ssim", "nmse", "vif", "hfe", "sr")
    vol = get_family("deprox").evaluate(pred, target, cfg)
    assert set(vol) == set(scores) and vol["psnr"] != scores["psnr"]  # fastMRI range: the volume's maximum


def test_a_metric_is_one_registration():
    metric = Metric("l1err", "min", "", lambda p, t, ev, rng: (p - t).abs().flatten(1).mean(1), "mean |error|")
    register_metric(metric)
    try:
        assert metric_direction("l1err") == "min" and metric_direction("noise/0.1/l1err") == "min"
        from analysis.table import metric_direction as table_direction

        assert table_direction("l1err") == "min"
        cfg = load_config("configs/experiments/deq_inr_tiny.yaml")
        t = torch.zeros(1, 1, 41, 41)
        t[..., 10:30, 10:30] = 1.0
        assert get_family("deq_inr").evaluate(t * 0.5, t, cfg)["l1err"] == pytest.approx(float((t * 0.5).mean()))
        with pytest.raises(ValueError, match="already registered"):
            register_metric(metric)
    finally:
        del METRICS["l1err"]
