"""Config loading and strict validation."""

import pytest
import yaml

from suite.config import ConfigError, ExperimentConfig, config_hash, flatten, load_config, replace

EXPERIMENTS = ["deq_inr", "crr", "deq_inr_tiny", "crr_tiny"]


@pytest.mark.parametrize("name", EXPERIMENTS)
def test_shipped_experiments_validate(name):
    cfg = load_config(f"configs/experiments/{name}.yaml")
    assert isinstance(cfg, ExperimentConfig)
    assert cfg.name == name


def test_paper_scale_defaults():
    cfg = load_config("configs/experiments/crr.yaml")
    # stage 1: TorchDEQ's 5000 full-batch steps (issue 11; the paper's "500 epochs" at 500 steps stay ~5 dB short)
    assert (cfg.data.size, cfg.train.epochs, cfg.crr.epochs, cfg.crr.init_std) == (512, 5000, 300, 1e-5)
    assert (cfg.deq.warm_start, cfg.deq.solve_every, cfg.deq.grad) == (True, 1, "ift")
    assert load_config("configs/experiments/deq_inr.yaml").deq == cfg.deq  # CRR's stage 1 is deq_inr.yaml's


def test_precedence_file_then_overrides(tmp_path):
    path = tmp_path / "e.yaml"
    path.write_text(yaml.safe_dump({"deq": {"solver": "broyden"}, "train": {"epochs": 7}}))
    cfg = load_config(path, ["train.epochs=9", "model.filter=gabor"])
    assert cfg.deq.solver == "broyden"  # file beats default
    assert cfg.train.epochs == 9  # --set beats file
    assert cfg.model.filter == "gabor"
    assert cfg.deq.f_tol == ExperimentConfig().deq.f_tol  # default kept


@pytest.mark.parametrize(
    "override, words",
    [
        ("deq.solver=newton", ["deq.solver", "newton", "anderson", "broyden", "fixed_point_iter"]),
        ("model.filter=siren", ["model.filter", "siren", "fourier", "gabor"]),
        ("data.size=big", ["data.size", "big", "int"]),
        ("train.lr=fast", ["train.lr", "fast", "number"]),
        ("model.widht=3", ["model.widht", "hidden"]),
        ("optim.lr=1", ["optim", "valid keys"]),
        ("train.epochs=-1", ["train.epochs", "-1", "range"]),
        ("crr.keep_best=1", ["crr.keep_best", "bool"]),
        ("nonsense", ["key=value", "nonsense"]),
    ],
)
def test_bad_values_name_key_value_and_choices(override, words):
    with pytest.raises(ConfigError) as err:
        load_config(None, [override])
    for word in words:
        assert word in str(err.value)


def test_int_accepted_for_float_but_not_bool_for_int():
    assert load_config(None, ["train.lr=1"]).train.lr == 1.0
    with pytest.raises(ConfigError):
        load_config(None, ["data.size=true"])


def test_hash_is_stable_and_order_free():
    a = load_config({"train": {"epochs": 3, "lr": 0.1}, "data": {"size": 50}})
    b = load_config({"data": {"size": 50}, "train": {"lr": 0.1, "epochs": 3}})
    assert config_hash(a) == config_hash(b)
    assert config_hash(a) != config_hash(replace(a, **{"train.epochs": 4}))
    assert config_hash(a) != config_hash(replace(a, seed=1))


def test_a_late_option_at_its_default_keeps_every_cell_identity():
    # 3f502edbbbfb: the default experiment's hash before deq.b_warm_start existed (commit 68eb47d).
    assert config_hash(ExperimentConfig()) == "3f502edbbbfb"
    warm = load_config(None, ["deq.warm_start=true", "deq.grad=ift", "deq.b_warm_start=true"])
    assert config_hash(warm) != config_hash(replace(warm, **{"deq.b_warm_start": False}))


def test_backward_warm_start_needs_the_forward_cache_and_ift():
    with pytest.raises(ConfigError, match="deq.b_warm_start needs deq.warm_start: true"):
        load_config(None, ["deq.b_warm_start=true"])
    with pytest.raises(ConfigError, match="grad 'phantom'"):
        load_config(None, ["deq.warm_start=true", "deq.grad=phantom", "deq.b_warm_start=true"])


def test_flatten_uses_dotted_keys():
    flat = flatten(load_config(None))
    assert flat["deq.solver"] == "anderson" and flat["data.image"] == "camera" and "seed" in flat


def test_missing_file_is_named(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "nope.yaml")


def test_list_values_are_checked_elementwise():
    assert load_config(None, ["eval.noise_sigmas=[0, 0.1]"]).eval.noise_sigmas == (0.0, 0.1)
    with pytest.raises(ConfigError, match=r"eval.noise_sigmas\[1\].*number"):
        load_config(None, ["eval.noise_sigmas=[0, high]"])
    with pytest.raises(ConfigError, match="eval.noise_sigmas.*list"):
        load_config(None, ["eval.noise_sigmas=0.1"])


def test_spectral_metric_definitions_are_configurable():
    import torch

    from suite.training.inr import final_metrics

    gen = torch.Generator().manual_seed(0)
    gt = torch.rand(1, 1, 48, 48, generator=gen)
    pred = (gt + 0.1 * torch.randn(1, 1, 48, 48, generator=gen)).clamp(0, 1)
    base = final_metrics(pred, gt, load_config(None).eval)
    wide = final_metrics(pred, gt, load_config(None, ["eval.hfe_cutoff=0.5", "eval.sr_threshold=0.2"]).eval)
    assert wide["hfe"] < base["hfe"] and wide["sr"] < base["sr"]


def test_exponent_without_dot_is_a_float():
    # YAML 1.1 reads "1e-3" as a string; a float field takes it as the number it spells
    assert load_config(None, ["train.lr=1e-3"]).train.lr == 1e-3
    with pytest.raises(ConfigError, match="train.lr.*number"):
        load_config(None, ["train.lr=1e-3x"])


def test_eval_preset_crr_paper_sets_the_three_definition_keys():
    cfg = load_config(None, ["eval.preset=crr_paper", "eval.hfe_cutoff=0.4"])  # the preset wins
    assert (cfg.eval.hfe_mode, cfg.eval.hfe_cutoff, cfg.eval.sr_threshold) == ("magnitude", 0.12, 0.05)
    flat = flatten(cfg)  # what is logged as MLflow params: the resolved values and the preset's name
    assert (flat["eval.preset"], flat["eval.hfe_mode"], flat["eval.hfe_cutoff"]) == ("crr_paper", "magnitude", 0.12)
    assert replace(cfg, seed=1).eval == cfg.eval
    default = load_config(None).eval
    assert (default.preset, default.hfe_mode, default.hfe_cutoff, default.sr_threshold) == ("none", "power", 0.25, 0.05)


def test_invalid_eval_preset_names_key_and_allowed_values():
    with pytest.raises(ConfigError) as err:
        load_config(None, ["eval.preset=crr"])
    for word in ("eval.preset", "'crr'", "none", "crr_paper"):
        assert word in str(err.value)
