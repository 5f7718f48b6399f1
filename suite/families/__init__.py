"""Experiment families: each one is a single :class:`Family` object, found in one registry.

A family declares everything the rest of the code needs to know about it: its
config sections, model builder, data loader, fit, evaluation, final-metric
keys, and how reports group and label its runs. The suite's own families live
in :mod:`suite.families.deq_inr`, :mod:`suite.families.crr` and
:mod:`suite.families.deprox`; nothing else in ``suite/``, ``jobs/`` or
``analysis/`` names a family.

``family:`` in an experiment YAML is one of:

- a registered name: the built-ins, or a name an installed package declares in
  the entry-point group ``deqbench.families`` (``name = "pkg.module:OBJECT"``);
- ``package.module:NAME``: an importable module's :class:`Family` object;
- ``path/to/file.py:NAME``: a Python file's :class:`Family` object. A relative
  path is taken from the working directory and made absolute when the config
  is loaded (:func:`absolute_reference`), so that a node job started elsewhere
  (a Slurm task, a Ray trial) finds the same file.

Example (a user's ``my_family.py``)::

    from dataclasses import dataclass, replace
    from suite.families import get_family

    @dataclass(frozen=True)
    class MyConfig:           # the family's own YAML section ``mine:``, strictly validated
        width: int = 64

    MINE = replace(get_family("deq_inr"), name="mine", sections={"mine": MyConfig},
                   build_model=lambda cfg: MyModel(cfg.mine.width), final_label="Mine")
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.util
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping, Optional

ENTRY_POINT_GROUP = "deqbench.families"
BUILTIN_MODULES = ("suite.families.deq_inr", "suite.families.crr", "suite.families.deprox")
"""Modules holding the built-in families (each a module-level ``FAMILY``)."""


@dataclass(frozen=True)
class Family:
    """One experiment family.

    Attributes:
        name: what runs record as their family (the ``family`` tag).
        build_model: ``cfg -> nn.Module`` (torch is seeded with ``cfg.seed`` before).
        load_data: ``cfg -> data`` consumed by ``fit``.
        fit: ``fit(cfg, model, data, tracker, ckpt=None, outdir=None) -> final metrics``;
            logs per-epoch metrics to ``tracker``, checkpoints through ``ckpt``, writes
            artifacts (``images.pt``, PNGs, ``metrics.json``) under ``outdir``.
        evaluate: ``evaluate(pred, target, cfg) -> {metric: value}``, the scores of a
            final output ``(1, C, H, W)`` against its ground truth.
        sections: the family's own config sections, ``{yaml key: frozen dataclass}``;
            validated as strictly as the built-in ones (unknown keys, types, ranges).
        final_metrics: keys of the final metrics ``fit`` returns and logs.
        group_keys: params that group its runs in reports; the first names the
            group, each other one is added as ``name=value`` where it varies.
            Empty: the image (``data.image``) and the DEQ settings that vary.
        final_label: how reports label the run's output (empty: its model label).
        stage1: reports expect a stage-1 output (a frozen first stage) next to the final one.
        data_range: ``(B, C, H, W) ground truth -> (B,) range`` for PSNR/SSIM in
            reports (fastMRI: the volume's maximum); None: the ground truth's range.
    """

    name: str
    build_model: Callable[[Any], Any]
    load_data: Callable[[Any], Any]
    fit: Callable[..., dict[str, float]]
    evaluate: Optional[Callable[..., dict[str, float]]] = None
    sections: Mapping[str, type] = field(default_factory=dict)
    final_metrics: tuple[str, ...] = ()
    group_keys: tuple[str, ...] = ()
    final_label: str = ""
    stage1: bool = False
    data_range: Optional[Callable[[Any], Any]] = None


FAMILIES: dict[str, Family] = {}
"""Registered families by name: the built-ins, then those of the ``deqbench.families`` entry points."""
_REFERENCES: dict[str, Family] = {}  # resolved module:NAME / file.py:NAME references


def register_family(family: Family) -> Family:
    """Adds ``family`` to :data:`FAMILIES`; a second family of the same name is an error."""
    if not isinstance(family, Family):
        raise TypeError(f"expected a suite.families.Family, got {type(family).__name__}")
    if FAMILIES.get(family.name, family) is not family:
        raise ValueError(f"family {family.name!r} is already registered")
    FAMILIES[family.name] = family
    return family


def _load_registered() -> None:
    """Registers the built-ins (once) and the entry points not registered yet (installed since, too)."""
    if not FAMILIES:
        for module in BUILTIN_MODULES:
            register_family(importlib.import_module(module).FAMILY)
    from importlib.metadata import entry_points

    for ep in entry_points(group=ENTRY_POINT_GROUP):
        if ep.name not in FAMILIES:
            fam = _checked(ep.load(), f"entry point {ep.name!r} ({ep.value})")
            FAMILIES[ep.name] = fam  # found by the entry point's name, whatever its object calls itself


def family_names() -> list[str]:
    """Sorted names of the registered families (built-ins and entry points)."""
    _load_registered()
    return sorted(FAMILIES)


def _checked(obj: Any, where: str) -> Family:
    if not isinstance(obj, Family):
        raise ValueError(f"family {where} is a {type(obj).__name__}, not a suite.families.Family")
    return obj


def _import_reference(ref: str) -> Family:
    """``module:NAME`` or ``path/to/file.py:NAME`` → the :class:`Family` object."""
    target, _, attr = ref.rpartition(":")
    if target.endswith(".py"):
        path = Path(target).expanduser().absolute()
        if not path.is_file():
            raise ValueError(f"family {ref!r}: file {str(path)!r} not found")
        mod_name = f"deqbench_user_{path.stem}_{hashlib.sha1(str(path).encode()).hexdigest()[:10]}"
        module = sys.modules.get(mod_name)
        if module is None:
            spec = importlib.util.spec_from_file_location(mod_name, path)
            module = importlib.util.module_from_spec(spec)
            sys.modules[mod_name] = module  # dataclasses and pickling look the module up
            try:
                spec.loader.exec_module(module)
            except BaseException:
                del sys.modules[mod_name]
                raise
    else:
        try:
            module = importlib.import_module(target)
        except ImportError as err:
            raise ValueError(f"family {ref!r}: cannot import module {target!r} ({err})") from None
    if not hasattr(module, attr):
        raise ValueError(f"family {ref!r}: {target!r} has no attribute {attr!r}")
    return _checked(getattr(module, attr), repr(ref))


def absolute_reference(ref: str) -> str:
    """``path/to/file.py:NAME`` with the path made absolute (from the working directory); anything else unchanged."""
    target, sep, attr = ref.rpartition(":")
    if not sep or not target.endswith(".py") or Path(target).expanduser().is_absolute():
        return ref
    return f"{Path(target).expanduser().absolute()}:{attr}"


def get_family(ref: str) -> Family:
    """The family ``ref`` names: a registered name or a ``module:NAME`` / ``file.py:NAME`` reference.

    Raises:
        ValueError: unknown name (the message lists the valid ones), a module or
            file that cannot be imported, or an object that is not a :class:`Family`.
    """
    if not isinstance(ref, str) or not ref:
        raise ValueError(f"family: expected a name or a module:NAME reference, got {ref!r}")
    if not FAMILIES or (ref not in FAMILIES and ":" not in ref):
        _load_registered()
    if ref in FAMILIES:
        return FAMILIES[ref]
    if ":" not in ref:
        raise ValueError(f"unknown family {ref!r}; valid: {', '.join(sorted(FAMILIES))} "
                         "(or a package.module:NAME or path/to/file.py:NAME reference)")
    if ref not in _REFERENCES:
        _REFERENCES[ref] = _import_reference(ref)
    return _REFERENCES[ref]


def find_family(ref: Any) -> Optional[Family]:
    """:func:`get_family` for readers of finished runs: None when ``ref`` does not resolve here."""
    try:
        return get_family(str(ref)) if ref not in (None, "") else None
    except Exception:  # noqa: BLE001 - a user's module may fail in any way; reports fall back to defaults
        return None
