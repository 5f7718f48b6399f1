"""Atomic, rotating training checkpoints.

A checkpoint is a ``dict`` saved with ``torch.save``: model/optimiser state, RNG
states, the position in training (stage, next epoch) and whatever the caller put
in :attr:`Checkpointer.extra` (the launcher keeps the tracking run id there, so a
requeued job continues the same run).
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any, Callable

import torch

_NAME = re.compile(r"ckpt_(\d+)\.pt$")


class Checkpointer:
    """Saves every ``every`` epochs into ``directory``, keeping the newest ``keep``.

    Args:
        directory: where ``ckpt_<step>.pt`` files go (created on first save).
        every: save period in epochs (see :meth:`due`).
        keep: how many checkpoints to keep.
    """

    def __init__(self, directory: str | Path, every: int, keep: int = 2) -> None:
        if every < 1:
            raise ValueError(f"checkpoint period must be >= 1 epoch, got {every}")
        self.directory = Path(directory)
        self.every = every
        self.keep = keep
        self.extra: dict[str, Any] = {}
        self.before_save: list[Callable[[], None]] = []

    def due(self, epochs_done: int) -> bool:
        """Whether a checkpoint is due after ``epochs_done`` epochs of a stage."""
        return epochs_done > 0 and epochs_done % self.every == 0

    def _files(self) -> list[tuple[int, Path]]:
        if not self.directory.is_dir():
            return []
        found = [(int(m.group(1)), p) for p in self.directory.iterdir() if (m := _NAME.search(p.name))]
        return sorted(found)

    def save(self, state: dict[str, Any], step: int) -> Path:
        """Writes ``state`` (plus :attr:`extra`) as checkpoint ``step`` atomically.

        The :attr:`before_save` callbacks run first: the launcher flushes the
        metrics buffered since the previous checkpoint there, so that what the
        tracker holds always matches what a resume replays (no epoch twice).
        """
        for hook in self.before_save:
            hook()
        self.directory.mkdir(parents=True, exist_ok=True)
        path = self.directory / f"ckpt_{step:08d}.pt"
        tmp = path.with_suffix(".tmp")
        torch.save({**state, "extra": dict(self.extra)}, tmp)
        os.replace(tmp, path)
        for _, old in self._files()[: -self.keep]:
            old.unlink(missing_ok=True)
        return path

    def clear(self) -> None:
        """Deletes every checkpoint (a failed cell starts afresh)."""
        for _, path in self._files():
            path.unlink(missing_ok=True)

    def latest(self) -> dict[str, Any] | None:
        """The newest checkpoint, or None when there is none."""
        files = self._files()
        if not files:
            return None
        return torch.load(files[-1][1], map_location="cpu", weights_only=False)
