"""Atomic, rotating training checkpoints.

A checkpoint is a ``dict`` saved with ``torch.save``: model/optimiser state, RNG
states, the position in training (stage, next epoch) and whatever the caller put
in :attr:`Checkpointer.extra` (the launcher keeps the tracking run id there, so a
requeued job continues the same run).
"""

from __future__ import annotations

import os
import re
import sys
from pathlib import Path
from typing import Any, Callable

import torch

_NAME = re.compile(r"ckpt_(\d+)\.pt$")


class CheckpointError(ValueError):
    """Checkpoints exist but none can be loaded; the message names each file and why."""


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
        """The newest checkpoint that loads, or None when there is none.

        A file that cannot be loaded (truncated by a kill, corrupted, not a
        checkpoint) is reported on stderr and skipped, so training resumes from
        the previous good one.

        Raises:
            CheckpointError: checkpoints exist but none of them loads.
        """
        files = self._files()
        bad = []
        for _, path in reversed(files):
            try:
                state = torch.load(path, map_location="cpu", weights_only=False)
            except Exception as err:  # noqa: BLE001 - any unreadable file is skipped the same way
                bad.append(f"{path} ({type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''})")
                print(f"deqbench: skipping unreadable checkpoint {bad[-1]}", file=sys.stderr)
                continue
            if isinstance(state, dict) and "progress" in state:
                return state
            bad.append(f"{path} (not a training checkpoint)")
        if bad:
            raise CheckpointError(f"no readable checkpoint in {self.directory}: {'; '.join(bad)}")
        return None
