"""Training entry point: ``fit(cfg, model, data, tracker, ckpt, outdir)``.

Each experiment family registers its loop in :data:`TRAINERS`; all share that
signature and return the final metrics.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

from suite.config import ExperimentConfig
from suite.registry import Registry
from suite.training.checkpoint import Checkpointer
from suite.training.tracker import MemoryTracker, NullTracker, Tracker

TRAINERS: Registry[Callable[..., dict[str, float]]] = Registry("trainer")


@TRAINERS.register("deq_inr")
@TRAINERS.register("crr")
def _fit_inr(*args: Any, **kwargs: Any) -> dict[str, float]:
    from suite.training.inr import fit_inr

    return fit_inr(*args, **kwargs)


@TRAINERS.register("deprox")
def _fit_deprox(*args: Any, **kwargs: Any) -> dict[str, float]:
    from suite.training.deprox import fit_deprox

    return fit_deprox(*args, **kwargs)


def fit(
    cfg: ExperimentConfig,
    model: Any,
    data: Any,
    tracker: Tracker,
    ckpt: Checkpointer | None = None,
    outdir: str | Path | None = None,
) -> dict[str, float]:
    """Trains ``model`` on ``data`` as ``cfg.family`` prescribes; returns final metrics."""
    return TRAINERS.get(cfg.family)(cfg, model, data, tracker, ckpt=ckpt, outdir=outdir)


__all__ = ["fit", "TRAINERS", "Checkpointer", "Tracker", "MemoryTracker", "NullTracker"]
