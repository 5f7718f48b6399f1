"""Training entry point: ``fit(cfg, model, data, tracker, ckpt, outdir)``.

Each experiment family declares its loop (:attr:`suite.families.Family.fit`);
all share that signature and return the final metrics. The skeleton they
share (progress, batches, divergence check, per-phase peak memory, artifacts)
is :mod:`suite.training.common`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from suite.training.checkpoint import Checkpointer
from suite.training.tracker import MemoryTracker, NullTracker, Tracker


def fit(
    cfg: Any,
    model: Any,
    data: Any,
    tracker: Tracker,
    ckpt: Checkpointer | None = None,
    outdir: str | Path | None = None,
) -> dict[str, float]:
    """Trains ``model`` on ``data`` as ``cfg.family`` prescribes; returns final metrics."""
    from suite.families import get_family
    from suite.training.common import keep_cpu_heap

    keep_cpu_heap()  # only with $DEQBENCH_KEEP_CPU_HEAP=1: faster CPU steps, more memory (no effect on results)
    return get_family(cfg.family).fit(cfg, model, data, tracker, ckpt=ckpt, outdir=outdir)


__all__ = ["fit", "Checkpointer", "Tracker", "MemoryTracker", "NullTracker"]
