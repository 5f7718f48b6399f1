"""The metric registry: a metric is one unit — name, function, direction, unit.

``register_metric(Metric(...))`` is all it takes to add a metric: the trainers
score final outputs with :func:`score`, and tables and reports read which way
is better (:func:`metric_direction`) and the unit from the same entry.

A :class:`Metric` whose ``name`` holds a ``fnmatch`` pattern (``solver/*``)
gives the direction and unit of every logged key it matches and has no
function (the quantity is logged by the training loop, not computed from
images). Lookup of a key: exact name, then pattern, then the key's last ``/``
segment (``noise/0.1/nmse`` is ``nmse``); anything else is
:data:`DEFAULT_DIRECTION`.

Example::

    register_metric(Metric("lpips", "min", "", lambda pred, target, ev, rng: my_lpips(pred, target)))
    score(("psnr", "lpips"), pred, target, cfg.eval)   # {"psnr": 31.2, "lpips": 0.08}
"""

from __future__ import annotations

from dataclasses import dataclass
from fnmatch import fnmatchcase
from typing import TYPE_CHECKING, Any, Callable, Iterable, Mapping, Optional

from suite import metrics as M  # the functions are imported on first use: this module does not import torch

if TYPE_CHECKING:  # pragma: no cover
    import torch

DIRECTION_CHOICES = ("max", "min", "none")
DEFAULT_DIRECTION = "max"

MetricFn = Callable[["torch.Tensor", "torch.Tensor", Any, Any], "torch.Tensor"]
"""``fn(pred, target, ev, data_range) -> (B,)``: ``pred``/``target`` ``(B, C, H, W)``, ``ev`` the
run's :class:`~suite.config.EvalConfig` (HFE/SR definitions), ``data_range`` None (the
target's range) or a number / ``(B,)`` tensor (fastMRI: a volume's maximum)."""


@dataclass(frozen=True)
class Metric:
    """One metric.

    Attributes:
        name: the logged key (``psnr``) or a ``fnmatch`` pattern of keys (``solver/*``).
        direction: ``max`` (higher is better), ``min`` (lower is better) or ``none``
            (no best is marked: a property of the output, not a score).
        unit: shown next to values (``dB``, ``%``, ``MiB``, ``s``; empty: unitless).
        fn: computes it from images (:data:`MetricFn`); None for logged quantities.
        description: one line for tables and reports.
    """

    name: str
    direction: str
    unit: str = ""
    fn: Optional[MetricFn] = None
    description: str = ""

    def __post_init__(self) -> None:
        if self.direction not in DIRECTION_CHOICES:
            raise ValueError(f"metric {self.name!r}: direction {self.direction!r} is not one of {DIRECTION_CHOICES}")


METRICS: dict[str, Metric] = {}


def register_metric(metric: Metric) -> Metric:
    """Adds ``metric`` to :data:`METRICS`; a second metric of the same name is an error."""
    if metric.name in METRICS:
        raise ValueError(f"metric {metric.name!r} is already registered")
    METRICS[metric.name] = metric
    return metric


def get_metric(name: str) -> Metric:
    """The metric registered as ``name`` (exact name, then pattern, then last ``/`` segment).

    Raises:
        ValueError: no metric matches; the message lists the registered ones.
    """
    found = _lookup(name, METRICS)
    if found is None:
        raise ValueError(f"unknown metric {name!r}; valid: {', '.join(sorted(METRICS))}")
    return found


def _lookup(key: str, table: dict[str, Any]) -> Any:
    if key in table:
        return table[key]
    for pattern, value in table.items():
        if fnmatchcase(key, pattern):
            return value
    return table.get(key.rsplit("/", 1)[-1])


def metric_direction(key: str, overrides: Optional[Mapping[str, str]] = None) -> str:
    """``max``, ``min`` or ``none`` for a logged key; ``overrides`` (key or pattern -> direction) first.

    Each table (overrides, then the registry) is searched by the full key and
    by pattern; then both by the key's last ``/`` segment.
    """
    tables = [dict(overrides or {}), {name: m.direction for name, m in METRICS.items()}]
    for table in tables:
        if key in table:
            return table[key]
        for pattern, direction in table.items():
            if fnmatchcase(key, pattern):
                return direction
    last = key.rsplit("/", 1)[-1]
    for table in tables:
        if last in table:
            return table[last]
    return DEFAULT_DIRECTION


def computed_metrics() -> tuple[str, ...]:
    """Names of the registered metrics with a function, in registration order: what a final output is scored by."""
    return tuple(name for name, m in METRICS.items() if m.fn is not None)


def metric_unit(key: str) -> str:
    """The unit of a logged key ("" when unitless or unregistered)."""
    found = _lookup(key, METRICS)
    return found.unit if found is not None else ""


def score(names: Iterable[str], pred: "torch.Tensor", target: "torch.Tensor", ev: Any, data_range: Any = None
          ) -> dict[str, float]:
    """Computes the named metrics of one sample.

    Args:
        names: registered metrics with a function.
        pred: ``(1, C, H, W)`` output.
        target: ``(1, C, H, W)`` ground truth.
        ev: the run's eval settings (``hfe_cutoff``, ``hfe_mode``, ``sr_threshold``).
        data_range: None (the target's range) or the range to use (fastMRI: the volume's maximum).

    Returns:
        ``{name: value}``, floats.
    """
    out = {}
    for name in names:
        metric = get_metric(name)
        if metric.fn is None:
            raise ValueError(f"metric {name!r} is logged by the training loop and cannot be computed from images")
        out[name] = float(metric.fn(pred, target, ev, data_range)[0])
    return out


def _vif(pred: "torch.Tensor", target: "torch.Tensor", ev: Any, rng: Any) -> "torch.Tensor":
    try:
        return M.vif(pred, target, data_range=rng)
    except ValueError:  # images smaller than the 41 x 41 pixels VIF's 4 scales need
        return pred.new_full((pred.shape[0],), float("nan"))


for _m in (
    Metric("psnr", "max", "dB", lambda p, t, ev, rng: M.psnr(p, t, data_range=rng), "peak signal-to-noise ratio"),
    Metric("ssim", "max", "", lambda p, t, ev, rng: M.ssim(p, t, data_range=rng), "structural similarity"),
    Metric("nmse", "min", "", lambda p, t, ev, rng: M.nmse(p, t), "normalised mean squared error"),
    Metric("vif", "max", "", _vif, "visual information fidelity (pixel domain; NaN under 41 x 41)"),
    Metric("hfe", "none", "%", lambda p, t, ev, rng: M.hfe(p, cutoff=ev.hfe_cutoff, mode=ev.hfe_mode),
           "high-frequency energy of the output"),
    Metric("sr", "min", "%", lambda p, t, ev, rng: M.significant_residuals(p, t, threshold=ev.sr_threshold),
           "share of significant residuals"),
    Metric("loss", "min", "", None, "training loss"),
    Metric("solver/*", "min", "", None, "solver iterations and residuals"),
    Metric("mem/*", "min", "MiB", None, "peak memory of the heaviest phase"),
    Metric("time/*", "min", "s", None, "wall time"),
    Metric("gain_db", "max", "dB", None, "final minus stage-1 PSNR"),
):
    register_metric(_m)
