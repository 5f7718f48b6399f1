"""Live progress of a running cell: epoch / total, latest loss and PSNR, ETA.

The node job wraps its tracker in :class:`ProgressTracker`, which sees every
metric the training loop logs (with its step, the global epoch) and reports a
``progress`` record into the cell's ``status.json`` at most every second;
``deqbench status`` shows it (:func:`describe`).
"""

from __future__ import annotations

import time
from typing import Any, Callable, Mapping

from suite.config import flatten


def total_epochs(config: Mapping[str, Any]) -> int:
    """Epochs of all stages of a cell: ``train.epochs`` plus the ``*epochs`` keys of its family's own sections.

    For example ``crr.epochs`` (CRR's refiner stage) or ``deprox.pretrain_epochs``.

    Args:
        config: the nested resolved config (``cell.config``).
    """
    from suite.families import find_family

    family = find_family(config.get("family"))
    sections = tuple(f"{name}." for name in (family.sections if family else ()))
    flat = flatten(config)
    return int(flat.get("train.epochs", 0)) + sum(
        int(v) for k, v in flat.items() if k.startswith(sections) and k.endswith("epochs"))


class ProgressTracker:
    """Passes everything to ``inner`` and reports where training is.

    A metric row with ``loss`` is one finished epoch; its step is the 0-based
    global epoch. The ETA is the remaining epochs at the wall-clock rate of the
    epochs this process trained (the first epoch's ``time/epoch_s`` before
    there are two).

    Args:
        inner: the run's tracker.
        total: epochs of all stages (:func:`total_epochs`).
        report: receives the ``progress`` dict: ``epoch``, ``total``, ``loss``,
            ``psnr`` (latest logged, any step), ``eta_s``, ``at`` (time.time()).
        every_s: shortest interval between two reports (the last epoch is always reported).
    """

    def __init__(self, inner: Any, total: int, report: Callable[[dict[str, Any]], None], every_s: float = 1.0) -> None:
        self.inner, self.total, self.report, self.every_s = inner, total, report, every_s
        self.state: dict[str, Any] = {"epoch": 0, "total": total, "loss": None, "psnr": None, "eta_s": None}
        self._first: tuple[int, float] | None = None  # (epoch, time) of the first epoch seen here
        self._reported = 0.0

    def log_metrics(self, metrics: Mapping[str, float], step: int | None = None) -> None:
        self.inner.log_metrics(metrics, step=step)
        now = time.time()
        if "psnr" in metrics:
            self.state["psnr"] = float(metrics["psnr"])
        if "loss" not in metrics or step is None:
            return
        epoch = step + 1
        self.state.update(epoch=epoch, loss=float(metrics["loss"]))
        if self._first is None:
            self._first = (epoch, now - float(metrics.get("time/epoch_s", 0.0)))
        done, since = epoch - self._first[0] + 1, self._first[1]
        rate = done / (now - since) if now > since else None
        self.state["eta_s"] = round(max(0, self.total - epoch) / rate, 1) if rate else None
        if now - self._reported >= self.every_s or epoch >= self.total or done == 1:
            self._reported = now
            self.report({**self.state, "at": now})

    def log_artifact(self, path: Any, subdir: str | None = None) -> None:
        self.inner.log_artifact(path, subdir)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)


def _duration(seconds: float) -> str:
    s = int(round(seconds))
    return f"{s // 3600}h{s % 3600 // 60:02d}m" if s >= 3600 else f"{s // 60}m{s % 60:02d}s" if s >= 60 else f"{s}s"


def describe(progress: Mapping[str, Any] | None, now: float | None = None) -> str:
    """One line for ``deqbench status``: ``epoch 12/44  loss 1.23e-03  psnr 27.31 dB  ETA 3m05s``."""
    if not progress:
        return ""
    parts = [f"epoch {progress.get('epoch', 0)}/{progress.get('total', '?')}"]
    if progress.get("loss") is not None:
        parts.append(f"loss {progress['loss']:.3g}")
    if progress.get("psnr") is not None:
        parts.append(f"psnr {progress['psnr']:.2f} dB")
    if progress.get("eta_s") is not None:
        parts.append(f"ETA {_duration(progress['eta_s'])}")
    age = (now or time.time()) - progress.get("at", 0)
    if progress.get("at") and age > 60:
        parts.append(f"(no news for {_duration(age)})")
    return "  ".join(parts)
