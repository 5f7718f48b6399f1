"""What training reports to: a tracker. Training never knows MLflow.

``jobs.tracking.MlflowTracker`` implements this protocol for real runs;
:class:`MemoryTracker` keeps everything in memory (tests, notebooks).
"""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path
from typing import Mapping, Protocol


class Tracker(Protocol):
    """Sink for metrics and artifacts of one run (rank 0 only)."""

    def log_metrics(self, metrics: Mapping[str, float], step: int | None = None) -> None:
        """Records scalar metrics; ``step`` is the epoch for per-epoch series."""

    def log_artifact(self, path: str | Path, subdir: str | None = None) -> None:
        """Uploads a file produced by the run."""


class MemoryTracker:
    """A tracker that keeps every value: ``history["psnr"] == [(step, value), ...]``."""

    def __init__(self) -> None:
        self.history: dict[str, list[tuple[int | None, float]]] = defaultdict(list)
        self.artifacts: list[tuple[Path, str | None]] = []

    def log_metrics(self, metrics: Mapping[str, float], step: int | None = None) -> None:
        for key, value in metrics.items():
            self.history[key].append((step, float(value)))

    def log_artifact(self, path: str | Path, subdir: str | None = None) -> None:
        self.artifacts.append((Path(path), subdir))

    def last(self, key: str) -> float:
        """Latest value of ``key`` (the final one, as MLflow reports it)."""
        return self.history[key][-1][1]

    def series(self, key: str) -> list[float]:
        """All values of ``key`` in logging order."""
        return [v for _, v in self.history[key]]


class NullTracker:
    """A tracker that drops everything (non-zero DDP ranks)."""

    def log_metrics(self, metrics: Mapping[str, float], step: int | None = None) -> None:
        pass

    def log_artifact(self, path: str | Path, subdir: str | None = None) -> None:
        pass
