"""Atomic, verified, rotating training checkpoints.

A checkpoint is a ``dict`` saved with ``torch.save``: model/optimiser state, RNG
states, the position in training (stage, next epoch) and whatever the caller put
in :attr:`Checkpointer.extra` (the launcher keeps the tracking run id there, so a
requeued job continues the same run).

On disk, ``ckpt_<step>.pt`` is a 48-byte header -- :data:`MAGIC`, the payload's
length (8 bytes, little-endian) and its SHA-256 -- followed by the ``torch.save``
payload. A save writes a temporary file in the same directory, fsyncs it,
renames it over the final name and fsyncs the directory, so a process killed
at any point (SIGKILL, node loss) leaves either the previous checkpoints or
the new one, never a partial file under a checkpoint's name. Loading verifies
length and checksum, so a file torn some other way (a power loss on a file
system that reorders writes, a copy cut short) is rejected and the previous
checkpoint is used. Files written before this format (a bare ``torch.save``
zip) still load.

Fault injection for tests: ``$DEQBENCH_CKPT_WRITE_DELAY_S`` makes a save write
in 2 KiB chunks, sleeping that long between them, so that a test can kill the
process mid-write.
"""

from __future__ import annotations

import hashlib
import io
import os
import re
import struct
import sys
import time
from pathlib import Path
from typing import Any, Callable

import torch

_NAME = re.compile(r"ckpt_(\d+)\.pt$")
_TMP = ".tmp"  # suffix of a save in progress (``.ckpt_<step>.pt.<pid>.tmp``)
MAGIC = b"DQBCKPT1"
_HEADER = struct.Struct("<8sQ32s")  # magic, payload length, SHA-256 of the payload
_LEGACY = b"PK\x03\x04"  # a bare torch.save zip (checkpoints written before the header)
DELAY_ENV = "DEQBENCH_CKPT_WRITE_DELAY_S"


class CheckpointError(ValueError):
    """Checkpoints exist but none can be loaded; the message names each file and why."""


class TornCheckpoint(ValueError):
    """A checkpoint file cut short or corrupted (fails its length or checksum): it holds nothing usable."""


class CheckpointWriteError(OSError):
    """A checkpoint could not be written (disk full, read-only or missing directory); names the path."""


def _encode_parts(obj: Any) -> tuple[bytes, memoryview]:
    """The header and the ``torch.save`` payload of ``obj`` (not joined: a large checkpoint is not copied)."""
    buf = io.BytesIO()
    torch.save(obj, buf)
    payload = buf.getbuffer()
    return _HEADER.pack(MAGIC, len(payload), hashlib.sha256(payload).digest()), payload


def encode(obj: Any) -> bytes:
    """``obj`` as the bytes of a checkpoint file: header + ``torch.save`` payload."""
    header, payload = _encode_parts(obj)
    return header + bytes(payload)


def decode(data: bytes) -> Any:
    """Loads what :func:`encode` wrote (or a legacy bare ``torch.save`` file).

    Raises:
        TornCheckpoint: the file is cut short or fails its checksum.
        ValueError: it is not a checkpoint (``torch.load``'s own errors pass through for legacy files).
    """
    if MAGIC.startswith(data[: len(MAGIC)]):
        if len(data) < _HEADER.size:
            raise TornCheckpoint(f"torn: {len(data)} bytes, shorter than the {_HEADER.size}-byte header")
        _, length, digest = _HEADER.unpack_from(data)
        payload = memoryview(data)[_HEADER.size :]
        if len(payload) != length:
            raise TornCheckpoint(f"torn: {len(payload)} of {length} payload bytes")
        if hashlib.sha256(payload).digest() != digest:
            raise TornCheckpoint("checksum mismatch (SHA-256 of the payload differs from the header's)")
        return torch.load(io.BytesIO(payload), map_location="cpu", weights_only=False)
    if data[:4] == _LEGACY:
        return torch.load(io.BytesIO(data), map_location="cpu", weights_only=False)
    raise ValueError("not a deqbench checkpoint (no header)")


def _fsync_dir(directory: Path) -> None:
    """Makes a rename or unlink in ``directory`` durable (where the OS allows opening directories)."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:  # some file systems refuse fsync on a directory; the rename is still atomic
        pass
    finally:
        os.close(fd)


def _write_chunks(fh: Any, data: bytes | memoryview) -> None:
    delay = float(os.environ.get(DELAY_ENV) or 0)
    if delay <= 0:
        fh.write(data)
        return
    for i in range(0, len(data), 2048):
        fh.write(data[i : i + 2048])
        fh.flush()
        time.sleep(delay)


def write_atomic(path: Path, *parts: bytes | memoryview) -> None:
    """Writes ``parts`` one after the other to ``path``; a crash leaves the old file or the new one, never a mix.

    Raises:
        CheckpointWriteError: the file system refused (no space, read-only, ...);
            the partial temporary file is removed.
    """
    tmp = path.with_name(f".{path.name}.{os.getpid()}{_TMP}")
    try:
        with open(tmp, "wb") as fh:
            for data in parts:
                _write_chunks(fh, data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except OSError as err:
        _unlink_quietly(tmp)
        raise CheckpointWriteError(cannot_write(path, err)) from None
    _fsync_dir(path.parent)


def cannot_write(path: str | Path, err: OSError) -> str:
    """``cannot write PATH: No space left on device``: one line naming the path and the reason."""
    return f"cannot write {path}: {os.strerror(err.errno) if err.errno else err}"


def _unlink_quietly(path: Path) -> None:
    try:
        path.unlink(missing_ok=True)
    except OSError:  # a read-only file system: nothing was written there either
        pass


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

    def _leftovers(self) -> list[Path]:
        """Temporary files of saves that were killed mid-write (never loaded)."""
        if not self.directory.is_dir():
            return []
        return [p for p in self.directory.iterdir() if p.name.startswith(".ckpt_") and p.name.endswith(_TMP)]

    def save(self, state: dict[str, Any], step: int) -> Path:
        """Writes ``state`` (plus :attr:`extra`) as checkpoint ``step`` atomically (see the module docstring).

        The :attr:`before_save` callbacks run first: the launcher flushes the
        metrics buffered since the previous checkpoint there, so that what the
        tracker holds always matches what a resume replays (no epoch twice).

        Raises:
            CheckpointWriteError: the directory cannot be created or written
                (disk full, read-only); the message names the path.
        """
        for hook in self.before_save:
            hook()
        try:
            self.directory.mkdir(parents=True, exist_ok=True)
        except OSError as err:
            raise CheckpointWriteError(cannot_write(self.directory, err)) from None
        for stale in self._leftovers():  # a killed save's partial file: the one writer of this directory is us
            _unlink_quietly(stale)
        path = self.directory / f"ckpt_{step:08d}.pt"
        write_atomic(path, *_encode_parts({**state, "extra": dict(self.extra)}))
        for _, old in self._files()[: -self.keep]:
            old.unlink(missing_ok=True)
        return path

    def clear(self) -> None:
        """Deletes every checkpoint (a failed cell starts afresh)."""
        for _, path in self._files():
            path.unlink(missing_ok=True)
        for stale in self._leftovers():
            stale.unlink(missing_ok=True)

    def latest(self) -> dict[str, Any] | None:
        """The newest checkpoint that loads and passes its checksum, or None when there is none.

        A file that fails (torn, corrupted, not a checkpoint) is reported on
        stderr and skipped, so training resumes from the previous good one.
        Temporary files of killed saves are never candidates. When only torn
        files exist (they hold nothing), training starts from the beginning.

        Raises:
            CheckpointError: checkpoints exist, none of them loads, and one is
                intact but unusable (another format or version: not ours to discard).
        """
        bad, intact = [], False
        for _, path in reversed(self._files()):
            try:
                state = decode(path.read_bytes())
            except Exception as err:  # noqa: BLE001 - any unreadable file is skipped the same way
                intact |= not isinstance(err, TornCheckpoint)
                bad.append(f"{path} ({type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''})")
                print(f"deqbench: skipping unreadable checkpoint {bad[-1]}", file=sys.stderr, flush=True)
                continue
            if isinstance(state, dict) and "progress" in state:
                return state
            intact = True
            bad.append(f"{path} (not a training checkpoint)")
        if intact:
            raise CheckpointError(f"no readable checkpoint in {self.directory}: {'; '.join(bad)}")
        return None
