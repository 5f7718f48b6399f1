"""Experiment and sweep configuration: YAML → frozen dataclasses, strictly validated.

Precedence, lowest first: dataclass defaults < experiment file < sweep ``set`` <
sweep axis value < ``--set key=value`` overrides. Every key is dotted
(``deq.solver``, ``data.image``). Unknown keys, wrong types and out-of-range
values raise :class:`ConfigError` (a ``ValueError``) naming the key, the value
received and what is allowed — before anything is launched.

Example::

    cfg = load_config("configs/experiments/crr.yaml", overrides=["deq.solver=broyden"])
    cfg.deq.solver        # 'broyden'
    flatten(cfg)["train.epochs"]
"""

from __future__ import annotations

import copy
import dataclasses
import functools
import hashlib
import json
from dataclasses import dataclass, field, fields, is_dataclass, make_dataclass
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence, get_args, get_origin, get_type_hints

import yaml

SOLVERS = ("anderson", "broyden", "fixed_point_iter")


class ConfigError(ValueError):
    """A configuration value was refused; the message names key, value and what is allowed."""


def _choice(default: Any, choices: Sequence[Any]) -> Any:
    return field(default=default, metadata={"choices": tuple(choices)})


def _range(default: Any, lo: float | None = None, hi: float | None = None) -> Any:
    return field(default=default, metadata={"min": lo, "max": hi})


@dataclass(frozen=True)
class DataConfig:
    """What is fitted or reconstructed.

    ``image`` is a scikit-image sample (``astronaut``, ``camera``) or a path to an
    image file; it is converted to grey and resized to ``size`` × ``size``.
    """

    image: str = "camera"
    size: int = _range(64, 4, 4096)


@dataclass(frozen=True)
class ModelConfig:
    """The DEQ-INR: a multiplicative filter network solved to a fixed point."""

    filter: str = _choice("fourier", ("fourier", "gabor"))
    hidden: int = _range(64, 1, 8192)
    n_layers: int = _range(1, 1, 64)
    input_scale: float = _range(32.0, 0.0, 1e6)
    gabor_alpha: float = _range(6.0, 0.0, 1e6)
    norm: str = _choice("weight_norm", ("none", "weight_norm", "spectral_norm"))


@dataclass(frozen=True)
class DEQConfig:
    """The fixed-point solver, the gradient and the training recipe (torchdeq's options, validated).

    Recipe (DEQ-INR and CRR stage 1; see README "DEQ-INR recipes"):

    - ``warm_start``: each pixel's last fixed point is cached and starts its next
      solve (TorchDEQ deq-inr's ``use_cached_input``); otherwise every solve starts at 0.
    - ``solve_every``: the forward solver (``solver``, ``f_max_iter``, ``f_tol``) runs
      on optimiser steps ``s`` with ``s % solve_every == 0``; ``0`` = on the first step
      only (deq-inr's ``skip_solver``). Steps without a solve start from the cache
      and advance only through the gradient's steps (phantom). Needs ``warm_start``
      unless it is 1.
    - ``grad``: ``phantom`` (``phantom_steps`` unrolled steps damped by ``tau``) or ``ift``.
    - ``b_warm_start``: with ``ift``, each pixel's last adjoint (the backward
      solve's solution) is cached too and starts its next backward solve, so a
      short ``b_max_iter`` gives the gradient of a long one from zero. Needs
      ``warm_start`` and ``grad: ift``.
    - ``eval_init``: evaluations solve from ``zero`` or from the ``cache`` (needs
      ``warm_start``), with up to ``eval_max_iter`` iterations (0: ``f_max_iter``).
    """

    solver: str = _choice("anderson", SOLVERS)
    f_max_iter: int = _range(30, 1, 10000)
    f_tol: float = _range(1e-3, 0.0, 1.0)
    b_solver: str = _choice("fixed_point_iter", SOLVERS)
    b_max_iter: int = _range(30, 1, 10000)
    b_tol: float = _range(1e-6, 0.0, 1.0)
    grad: str = _choice("ift", ("ift", "phantom"))
    phantom_steps: int = _range(1, 1, 100)
    tau: float = _range(1.0, 0.0, 10.0)
    warm_start: bool = False
    b_warm_start: bool = False
    solve_every: int = _range(1, 0, 10**7)
    eval_init: str = _choice("zero", ("zero", "cache"))
    eval_max_iter: int = _range(0, 0, 10000)

    def __post_init__(self) -> None:
        if not self.warm_start and self.solve_every != 1:
            raise ConfigError(
                f"deq.solve_every {self.solve_every} needs deq.warm_start: true (without a cache, a step "
                "that skips the solve would start from zero); allowed without it: 1"
            )
        if self.b_warm_start and not (self.warm_start and self.grad == "ift"):
            raise ConfigError("deq.b_warm_start needs deq.warm_start: true and deq.grad: ift "
                              f"(got warm_start {self.warm_start}, grad {self.grad!r})")
        if not self.warm_start and self.eval_init == "cache":
            raise ConfigError("deq.eval_init 'cache' needs deq.warm_start: true; allowed without it: zero")


@dataclass(frozen=True)
class TrainConfig:
    """Optimisation of the (stage-1) model.

    ``batch_size`` −1 trains full-batch (every pixel each step); a positive value
    trains on shuffled mini-batches of that many pixels, one epoch = one pass.
    """

    epochs: int = _range(100, 0, 10**7)
    lr: float = _range(1e-3, 0.0, 10.0)
    batch_size: int = _range(-1, -1, 10**9)
    eval_every: int = _range(1, 1, 10**7)
    ckpt_every: int = _range(50, 1, 10**7)
    device: str = _choice("auto", ("auto", "cpu", "cuda"))


@dataclass(frozen=True)
class CRRConfig:
    """Stage 2 of Conservative Residual Refinement: the shallow refiner.

    The refiner sees (Fourier features of the coordinates, frozen DEQ output) and
    predicts ``y_gt − y_deq``; its last layer starts at N(0, ``init_std``).
    """

    epochs: int = _range(300, 0, 10**7)
    lr: float = _range(1e-3, 0.0, 10.0)
    hidden: int = _range(64, 1, 8192)
    n_layers: int = _range(2, 1, 64)
    init_std: float = _range(1e-5, 0.0, 1.0)
    n_features: int = _range(64, 0, 8192)
    feature_scale: float = _range(10.0, 0.0, 1e6)
    keep_best: bool = True


MRI_CHALLENGES = ("singlecoil", "multicoil")
MRI_MASK_TYPES = ("random", "equispaced", "equispaced_fraction")
DEPROX_KINDS = ("deq", "unrolled", "zero_filled")
DEPROX_LOSSES = ("mse", "l1", "ssim", "perp")


def _pair(key: str, value: tuple[int, ...], lo: int, hi: int) -> None:
    """Refuses anything but two ints ``(H, W)`` in ``[lo, hi]``."""
    if len(value) != 2 or not all(lo <= v <= hi for v in value):
        raise ConfigError(f"{key}: expected two ints (H, W), each in [{lo}, {hi}], got {list(value)!r}")


@dataclass(frozen=True)
class MRIConfig:
    """fastMRI volumes for DE-Prox: source, undersampling, slices, crop, split.

    ``root`` is a directory of fastMRI ``.h5`` volumes (or one volume), or
    ``synthetic``: a deterministic synthetic set (:mod:`suite.data.synth`,
    ``synth_*`` keys) written once into ``synth_dir`` (empty: ``$DEQBENCH_CACHE``,
    else ``~/.cache/deqbench``) and reused. Validation volumes are ``val_root``
    when given, else the last ``val_volumes`` files of ``root`` (sorted by name).

    Slices ``[slice_start, slice_stop)`` (half-open, clipped to each volume) are
    cropped to ``crop`` (``crop_mode`` ``image``: the target's field of view;
    ``kspace``: central k-space block) and undersampled column-wise with a
    seeded ``mask_type`` mask per volume: ``acceleration`` with a fully sampled
    centre of ``center_fraction`` of the ``crop[1]`` columns. ``preload`` keeps
    every served slice in memory (small sets only).
    """

    root: str = "synthetic"
    val_root: str = ""
    val_volumes: int = _range(1, 1, 10**6)
    challenge: str = _choice("singlecoil", MRI_CHALLENGES)
    acceleration: int = _range(4, 1, 1024)
    center_fraction: float = _range(0.08, 0.0, 1.0)
    mask_type: str = _choice("random", MRI_MASK_TYPES)
    slice_start: int = _range(11, 0, 10**6)
    slice_stop: int = _range(27, 1, 10**6)
    crop: tuple[int, ...] = (320, 320)
    crop_mode: str = _choice("image", ("image", "kspace"))
    clamp: float = _range(6.0, 0.0, 1e6)
    preload: bool = False
    synth_dir: str = ""
    synth_volumes: int = _range(8, 2, 10**5)
    synth_slices: int = _range(32, 1, 10**4)
    synth_coils: int = _range(0, 0, 128)
    synth_size: tuple[int, ...] = (640, 368)
    synth_anatomy: str = _choice("knee", ("knee", "brain"))
    synth_seed: int = _range(0, 0, 2**31 - 1)

    def __post_init__(self) -> None:
        _pair("mri.crop", self.crop, 8, 8192)
        _pair("mri.synth_size", self.synth_size, 8, 8192)
        if self.slice_start >= self.slice_stop:
            raise ConfigError(
                f"mri.slice_start {self.slice_start} must be < mri.slice_stop {self.slice_stop} "
                "(a half-open range [start, stop))"
            )
        if not self.center_fraction > 0 or not self.clamp > 0:
            raise ConfigError(
                f"mri.center_fraction and mri.clamp must be > 0, got {self.center_fraction!r} and {self.clamp!r}"
            )
        if self.center_fraction * self.acceleration >= 1:
            raise ConfigError(
                f"mri.center_fraction {self.center_fraction} x mri.acceleration {self.acceleration} must be < 1: "
                "the fully sampled centre alone would exceed the sampling budget 1/acceleration"
            )
        cols = self.crop[1]
        n_low = round(cols * self.center_fraction)
        if n_low < 1 or cols / self.acceleration < 1:
            raise ConfigError(
                f"mri.acceleration {self.acceleration} with mri.center_fraction {self.center_fraction} cannot be made "
                f"on {cols} columns (mri.crop[1]): the mask needs at least one centre column "
                f"(got {n_low}) and at least one sampled column (got {cols / self.acceleration:.2f})"
            )
        if self.root == "synthetic":
            if self.crop[0] > self.synth_size[0] or self.crop[1] > self.synth_size[1]:
                raise ConfigError(
                    f"mri.crop {list(self.crop)} must fit inside mri.synth_size {list(self.synth_size)}"
                )
            if self.slice_start >= self.synth_slices:
                raise ConfigError(
                    f"mri.slice_start {self.slice_start} lies outside the synthetic volumes "
                    f"(mri.synth_slices = {self.synth_slices}, valid indices 0..{self.synth_slices - 1})"
                )
            if self.val_volumes >= self.synth_volumes and not self.val_root:
                raise ConfigError(
                    f"mri.val_volumes {self.val_volumes} leaves no training volume of "
                    f"mri.synth_volumes {self.synth_volumes}"
                )
            if (self.challenge == "multicoil") != (self.synth_coils >= 2):
                raise ConfigError(
                    f"mri.challenge {self.challenge!r} needs mri.synth_coils "
                    f"{'>= 2' if self.challenge == 'multicoil' else '0 or 1'}, got {self.synth_coils}"
                )


@dataclass(frozen=True)
class DEProxConfig:
    """DE-Prox and its baselines: ``x <- R(x - eta A^H (A x - y))``, ``R`` a DnCNN.

    ``kind``: ``deq`` (fixed point by the ``deq`` section's solver, IFT or
    phantom gradient), ``unrolled`` (``unroll_k`` steps, backprop through all)
    or ``zero_filled`` (``A^H y``, no training). ``R``: ``depth`` x ``width``
    DnCNN, every conv spectrally normalised to ``sn_coeff``, ``norm``
    ``group`` (GroupNorm, ``num_groups``) or ``none``, residual learning.

    Training has two stages: ``pretrain_epochs`` of Gaussian denoising of the
    target images (noise std ``pretrain_sigma`` in the served units, where the
    zero-filled magnitude image has unit standard deviation; Adam at
    ``pretrain_lr``), then ``train.epochs`` of end-to-end fine-tuning with
    ``loss`` at ``train.lr``.
    """

    kind: str = _choice("deq", DEPROX_KINDS)
    unroll_k: int = _range(5, 1, 1000)
    depth: int = _range(17, 2, 256)
    width: int = _range(64, 1, 4096)
    norm: str = _choice("group", ("none", "group"))
    num_groups: int = _range(8, 1, 4096)
    spectral_norm: bool = True
    sn_coeff: float = _range(1.0, 0.0, 10.0)
    residual: bool = True
    eta: float = _range(1.0, 0.0, 10.0)
    loss: str = _choice("mse", DEPROX_LOSSES)
    pretrain_epochs: int = _range(10, 0, 10**7)
    pretrain_sigma: float = _range(0.1, 0.0, 100.0)
    pretrain_lr: float = _range(1e-3, 0.0, 10.0)

    def __post_init__(self) -> None:
        if not self.eta > 0 or not self.sn_coeff > 0:
            raise ConfigError(f"deprox.eta and deprox.sn_coeff must be > 0, got {self.eta!r} and {self.sn_coeff!r}")
        if self.norm == "group" and self.width % self.num_groups:
            raise ConfigError(
                f"deprox.num_groups {self.num_groups} must divide deprox.width {self.width} (norm: group)"
            )


EVAL_PRESETS: dict[str, dict[str, Any]] = {
    # reproduces Table II of the CRR paper (HFE of the 512×512 ground truths: astronaut 73.3 %,
    # camera 78.2 %); this definition gives 72.8 % and 77.8 %
    "crr_paper": {"hfe_mode": "magnitude", "hfe_cutoff": 0.12, "sr_threshold": 0.05},
}
"""Named HFE/SR definitions for ``eval.preset``: the ``EvalConfig`` keys each one sets."""


@dataclass(frozen=True)
class EvalConfig:
    """Definitions of the spectral metrics, and the noise-robustness grid.

    HFE: share (%) of the centred spectrum's energy (``hfe_mode`` ``power`` =
    |F|², ``magnitude`` = |F|) outside a disk of radius ``hfe_cutoff`` × min(H, W)/2.
    SR: share (%) of pixels with |gt − pred| > ``sr_threshold`` × range(gt).
    ``preset``: ``none``, or a named definition from :data:`EVAL_PRESETS`
    (``crr_paper``: magnitude, cutoff 0.12, threshold 0.05, the CRR paper's
    Table II); a preset overrides ``hfe_mode``, ``hfe_cutoff`` and
    ``sr_threshold``, whatever they are set to, and the resolved values are what
    the run logs.
    ``noise_sigmas``: noise levels for robustness evaluation (families that have one).
    """

    hfe_cutoff: float = _range(0.25, 0.0, 1.0)
    hfe_mode: str = _choice("power", ("power", "magnitude"))
    sr_threshold: float = _range(0.05, 0.0, 1.0)
    preset: str = _choice("none", ("none", *EVAL_PRESETS))
    noise_sigmas: tuple[float, ...] = (0.0, 0.005, 0.01, 0.02, 0.05)

    def __post_init__(self) -> None:
        if self.preset == "none":
            return
        if self.preset not in EVAL_PRESETS:
            raise ConfigError(
                f"eval.preset: invalid value {self.preset!r}; allowed: {', '.join(('none', *EVAL_PRESETS))}"
            )
        for key, value in EVAL_PRESETS[self.preset].items():
            object.__setattr__(self, key, value)


@dataclass(frozen=True)
class ResourcesConfig:
    """What one cell needs: world size = ``nodes`` × ``tasks_per_node`` DDP processes.

    Cells with equal resources share a Slurm job array; other launcher settings
    (partition, time, memory) live in the launcher config.
    """

    nodes: int = _range(1, 1, 4096)
    tasks_per_node: int = _range(1, 1, 256)
    gpus_per_node: int = _range(0, 0, 64)
    cpus_per_task: int = _range(1, 1, 1024)


@dataclass(frozen=True)
class ExperimentConfig:
    """One fully resolved experiment (a cell, once the seed is fixed).

    ``family`` names a :class:`suite.families.Family`: a registered name or a
    ``module:NAME`` / ``path/to/file.py:NAME`` reference. A family whose config
    sections are not fields here (a user's own) gets a subclass with them
    (:func:`experiment_class`).
    """

    name: str = "default"
    family: str = "crr"
    seed: int = _range(0, 0, 2**31 - 1)
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    deq: DEQConfig = field(default_factory=DEQConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    crr: CRRConfig = field(default_factory=CRRConfig)
    mri: MRIConfig = field(default_factory=MRIConfig)
    deprox: DEProxConfig = field(default_factory=DEProxConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    resources: ResourcesConfig = field(default_factory=ResourcesConfig)


# --------------------------------------------------------------------- dicts


def flatten(obj: Any, prefix: str = "") -> dict[str, Any]:
    """Flattens a config dataclass or nested mapping to dotted keys.

    Args:
        obj: an :class:`ExperimentConfig` (or any nested dataclass / mapping).
        prefix: prepended to every key.

    Returns:
        ``{"data.image": "camera", "train.epochs": 100, ...}``.
    """
    if is_dataclass(obj):
        obj = dataclasses.asdict(obj)
    out: dict[str, Any] = {}
    for key, value in obj.items():
        dotted = f"{prefix}{key}"
        if isinstance(value, Mapping):
            out.update(flatten(value, dotted + "."))
        else:
            out[dotted] = value
    return out


def to_dict(cfg: ExperimentConfig) -> dict[str, Any]:
    """Nested plain-dict form of a config (what is saved to YAML and checkpoints)."""
    return dataclasses.asdict(cfg)


# Keys added after cells were first recorded: left out of the hash while at their default, so that an
# existing cell keeps its identity (its runs, checkpoints and resume) when the suite gains an option.
LATE_KEYS: dict[str, Any] = {"deq.b_warm_start": False}


def config_hash(cfg: ExperimentConfig) -> str:
    """Stable 12-hex-digit identity of a resolved config; key order does not matter (see ``LATE_KEYS``)."""
    tree = to_dict(cfg)
    for dotted, default in LATE_KEYS.items():
        section, key = dotted.split(".")
        if tree[section].get(key, default) == default:
            tree[section].pop(key, None)
    blob = json.dumps(tree, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(blob.encode()).hexdigest()[:12]


def set_dotted(tree: dict[str, Any], key: str, value: Any) -> None:
    """Sets ``tree["a"]["b"] = value`` for ``key="a.b"``, creating sub-dicts."""
    if not isinstance(key, str):
        raise ConfigError(f"key {key!r}: keys must be strings (dotted names such as train.epochs)")
    parts = key.split(".")
    node = tree
    for part in parts[:-1]:
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ConfigError(f"key {key!r}: {part!r} is a value, not a section")
        node = child
    node[parts[-1]] = value


def parse_overrides(items: Iterable[str]) -> dict[str, Any]:
    """Parses ``["a.b=3", "c=x"]`` (``--set``) into ``{"a.b": 3, "c": "x"}`` with YAML typing."""
    out: dict[str, Any] = {}
    for item in items:
        key, sep, raw = item.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"--set expects key=value, got {item!r}")
        out[key.strip()] = yaml.safe_load(raw) if raw.strip() else ""
    return out


def read_yaml(path: str | Path) -> dict[str, Any]:
    """Reads a YAML mapping; a missing file or a non-mapping is a clear error."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    try:
        with path.open() as fh:
            data = yaml.safe_load(fh) or {}
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark is not None else ""
        problem = getattr(err, "problem", None) or str(err).splitlines()[0]
        raise ConfigError(f"{path}: malformed YAML at {where}{problem}") from None
    except (OSError, UnicodeDecodeError) as err:
        raise ConfigError(f"{path}: cannot be read as a YAML text file ({err})") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping at the top level, got {type(data).__name__}")
    return data


# ------------------------------------------------------------------- building


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", str(tp))


def _coerce(key: str, value: Any, tp: Any, meta: Mapping[str, Any]) -> Any:
    """Checks one leaf value against its declared type, choices and range."""
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{key}: expected a bool (true/false), got {value!r}")
    elif tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{key}: expected an int, got {value!r} ({type(value).__name__})")
    elif tp is float:
        if isinstance(value, str):  # PyYAML reads 1e-3 (no dot) as a string
            try:
                value = float(value)
            except ValueError:
                pass
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{key}: expected a number, got {value!r} ({type(value).__name__})")
        value = float(value)
        if value != value:  # NaN passes every range check
            raise ConfigError(f"{key}: expected a number, got NaN")
    elif tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{key}: expected a string, got {value!r} ({type(value).__name__})")
    elif get_origin(tp) is tuple:
        (inner, *_rest) = get_args(tp)
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key}: expected a list, got {value!r}")
        value = tuple(_coerce(f"{key}[{i}]", v, inner, {}) for i, v in enumerate(value))
    else:  # pragma: no cover - schema error, not user error
        raise TypeError(f"{key}: unsupported schema type {_type_name(tp)}")
    choices = meta.get("choices")
    if choices is not None and value not in choices:
        raise ConfigError(f"{key}: invalid value {value!r}; allowed: {', '.join(map(str, choices))}")
    lo, hi = meta.get("min"), meta.get("max")
    if lo is not None and value < lo or hi is not None and value > hi:
        raise ConfigError(f"{key}: value {value!r} out of range [{lo}, {hi}]")
    return value


def build(cls: type, data: Mapping[str, Any], prefix: str = "") -> Any:
    """Builds dataclass ``cls`` from a nested mapping, refusing unknown keys.

    Args:
        cls: the dataclass to build (e.g. :class:`ExperimentConfig`).
        data: nested mapping; missing keys take the defaults.
        prefix: dotted path of ``data`` for error messages.

    Raises:
        ConfigError: unknown key, wrong type, invalid choice or out-of-range value.
    """
    if not isinstance(data, Mapping):
        raise ConfigError(f"{prefix.rstrip('.') or 'config'}: expected a mapping, got {data!r}")
    for key in data:
        if not isinstance(key, str):
            raise ConfigError(f"{prefix.rstrip('.') or 'config'}: key {key!r} is not a string")
    hints = get_type_hints(cls)
    known = {f.name: f for f in fields(cls)}
    unknown = sorted(set(data) - set(known))
    if unknown:
        raise ConfigError(
            f"unknown key {prefix + unknown[0]!r} (value {data[unknown[0]]!r}); "
            f"valid keys{' in ' + prefix.rstrip('.') if prefix else ''}: {', '.join(sorted(known))}"
        )
    kwargs = {}
    for name, value in data.items():
        tp = hints[name]
        if is_dataclass(tp):
            kwargs[name] = build(tp, value, f"{prefix}{name}.")
        else:
            kwargs[name] = _coerce(f"{prefix}{name}", value, tp, known[name].metadata)
    return cls(**kwargs)


def merge(base: dict[str, Any], flat: Mapping[str, Any]) -> dict[str, Any]:
    """Returns a deep copy of nested ``base`` with dotted ``flat`` keys applied."""
    out = copy.deepcopy(base)
    for key, value in flat.items():
        set_dotted(out, key, value)
    return out


def load_config(
    source: str | Path | Mapping[str, Any] | None = None,
    overrides: Iterable[str] | Mapping[str, Any] = (),
) -> ExperimentConfig:
    """Loads and validates an experiment config.

    Args:
        source: a YAML path, a nested mapping, or None for the defaults.
        overrides: ``--set`` strings (``"a.b=3"``) or a dotted mapping, applied last.

    Returns:
        The frozen, validated :class:`ExperimentConfig`.
    """
    if source is None:
        data: dict[str, Any] = {}
    elif isinstance(source, Mapping):
        data = copy.deepcopy(dict(source))
    else:
        data = read_yaml(source)
    flat = overrides if isinstance(overrides, Mapping) else parse_overrides(overrides)
    return build_experiment(merge(data, flat))


def replace(cfg: ExperimentConfig, **dotted: Any) -> ExperimentConfig:
    """Returns ``cfg`` with dotted keys replaced (validated): ``replace(cfg, **{"train.epochs": 3})``."""
    return build_experiment(merge(to_dict(cfg), dotted))


@functools.lru_cache(maxsize=None)
def experiment_class(family: str) -> type:
    """The config class of ``family``: :class:`ExperimentConfig`, plus the family's own sections.

    Raises:
        ConfigError: the family does not resolve (unknown name, a module or file that
            cannot be imported), or declares a section that is not a dataclass or
            that clashes with a built-in one.
    """
    from suite.families import get_family

    try:
        fam = get_family(family)
    except Exception as err:  # noqa: BLE001 - a user's module may fail in any way: one line, not a traceback
        if isinstance(err, ValueError):
            raise ConfigError(str(err)) from err
        raise ConfigError(f"family {family!r}: importing it failed: {type(err).__name__}: {err}") from err
    base = {f.name: f.type for f in fields(ExperimentConfig)}
    extra = []
    for key, section in fam.sections.items():
        if not (isinstance(section, type) and is_dataclass(section)):
            raise ConfigError(f"family {family!r}: section {key!r} must be a dataclass, got {section!r}")
        if key in base:
            if get_type_hints(ExperimentConfig)[key] is not section:
                raise ConfigError(f"family {family!r}: section {key!r} clashes with the built-in section of that name")
            continue
        extra.append((key, section, field(default_factory=section)))
    if not extra:
        return ExperimentConfig
    return make_dataclass("ExperimentConfig", extra, bases=(ExperimentConfig,), frozen=True)


def build_experiment(tree: Mapping[str, Any]) -> ExperimentConfig:
    """Builds the experiment config of the family ``tree`` names (default ``crr``), strictly validated.

    A ``path/to/file.py:NAME`` family is recorded with its absolute path.
    """
    if not isinstance(tree, Mapping):
        raise ConfigError(f"config: expected a mapping, got {tree!r}")
    from suite.families import absolute_reference

    family = absolute_reference(_coerce("family", tree.get("family", ExperimentConfig.family), str, {}))
    return build(experiment_class(family), {**tree, "family": family} if "family" in tree else tree)
