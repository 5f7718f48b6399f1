"""The training skeleton every family's loop shares.

- :class:`Progress`: where a run is (stage, next epoch, wall time, what a stage
  carries to the next); saved in every checkpoint.
- :func:`index_batches`, :func:`check_finite` / :class:`DivergedError`: the
  epoch's batches and the divergence check.
- :func:`pick_device`, :func:`rng_state` / :func:`set_rng_state`: device and
  the RNG state of a resume.
- :func:`keep_cpu_heap`: opt-in (``$DEQBENCH_KEEP_CPU_HEAP=1``): CPU tensors of
  tens of MiB reuse freed heap memory instead of a fresh ``mmap`` (and its page
  faults) per allocation; faster, at a memory cost.
- :class:`PhasePeak`: peak memory of one phase (training, evaluation). Every
  family logs ``mem/peak_mb`` = the largest of its phases' peaks, measured the
  same way (see :class:`PhasePeak`).
- :func:`save_png`, :func:`log_run_files`: artifacts (PNGs, ``images.pt``, JSON).

Checkpoints themselves go through :class:`~suite.training.checkpoint.Checkpointer`
and, under DDP, :func:`suite.training.distributed.save_checkpoint` (rank 0 writes).
"""

from __future__ import annotations

import ctypes
import functools
import json
import math
import os
import resource
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Optional, Sequence

import numpy as np
import torch


class DivergedError(RuntimeError):
    """Training produced a non-finite loss (a diverging solver, too large a learning rate)."""


@dataclass
class Progress:
    """Where a run is; saved in its checkpoints.

    Attributes:
        stage: 1 or 2.
        epoch: next epoch within the stage.
        elapsed: wall time so far (s).
        best: what a stage keeps for the next (CRR: the best refiner so far).
        train_mem: training memory peak so far (MiB).
        stage1_psnr: validation PSNR after stage 1 (when there is one).
    """

    stage: int = 1
    epoch: int = 0
    elapsed: float = 0.0
    best: dict[str, Any] = field(default_factory=dict)
    train_mem: float = 0.0
    stage1_psnr: Optional[float] = None


def resume(ckpt: Any, model: torch.nn.Module, gen: torch.Generator) -> tuple[Progress, Optional[dict[str, Any]]]:
    """The resume preamble of every loop: restores progress, weights and RNGs from the newest checkpoint.

    Then every rank starts from rank 0's weights (data parallel). The caller
    restores what is its own (optimiser of the current stage, caches) from the
    returned state.

    Args:
        ckpt: a :class:`~suite.training.checkpoint.Checkpointer` or None (no resume).
        model: loads the checkpoint's ``model`` state.
        gen: the loop's batch generator; loads ``gen``.

    Returns:
        ``(progress, state)``; a fresh :class:`Progress` and None without a checkpoint.
    """
    from suite.training import distributed as D

    prog, state = Progress(), (ckpt.latest() if ckpt else None)
    if state is not None:
        prog = Progress(**state["progress"])
        model.load_state_dict(state["model"])
        gen.set_state(state["gen"])
        set_rng_state(state["rng"])
    D.broadcast_module(model)
    return prog, state


def save(ckpt: Any, prog: Progress, t_start: float, model: torch.nn.Module, opt: torch.optim.Optimizer,
         gen: torch.Generator, step: int, **extra: Any) -> None:
    """Writes a checkpoint of a loop (rank 0 writes; see :func:`suite.training.distributed.save_checkpoint`).

    It holds ``progress`` (wall time updated from ``t_start``), ``model``,
    ``opt``, ``gen``, ``rng`` and the loop's own ``extra`` entries.
    """
    from suite.training import distributed as D

    prog.elapsed = time.perf_counter() - t_start
    D.save_checkpoint(ckpt, {"progress": vars(prog).copy(), "model": model.state_dict(), "opt": opt.state_dict(),
                             "gen": gen.get_state(), "rng": rng_state(), **extra}, step)


def check_finite(loss: Any, stage: int, epoch: int, hint: str) -> None:
    """Raises :class:`DivergedError` when ``loss`` (a float or 0-d tensor) is not finite; ``hint`` says what to try."""
    value = float(loss.detach() if isinstance(loss, torch.Tensor) else loss)
    if not math.isfinite(value):
        raise DivergedError(
            f"non-finite loss ({value}) at stage {stage}, epoch {epoch}: the solver or the optimisation diverged "
            f"(try {hint})"
        )


def index_batches(n: int, batch_size: int, gen: torch.Generator, device: Optional[torch.device] = None,
                  whole: str = "none") -> list[Optional[torch.Tensor]]:
    """Shuffled index batches of one epoch over ``n`` items.

    Args:
        n: number of items.
        batch_size: items per batch; -1 (or ``>= n``): one batch of all.
        gen: draws the permutation.
        device: where the index tensors go (None: CPU).
        whole: one batch of all is ``[None]`` without a draw (``"none"``) or the
            shuffled permutation (``"shuffled"``, one draw).
    """
    full = batch_size < 0 or batch_size >= n
    if full and whole == "none":
        return [None]
    perm = torch.randperm(n, generator=gen)
    if device is not None:
        perm = perm.to(device)
    return [perm] if full else list(perm.split(batch_size))


def pick_device(name: str) -> torch.device:
    """``auto`` → CUDA when available, else CPU; ``cuda`` without a GPU is an error."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise ValueError("train.device: 'cuda' requested but no CUDA device is available; use 'auto' or 'cpu'")
    return torch.device(name)


def rng_state() -> dict[str, Any]:
    """Torch CPU (and CUDA) RNG states, for checkpoints."""
    state: dict[str, Any] = {"cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    """Restores :func:`rng_state`."""
    torch.set_rng_state(state["cpu"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def reset_peak_memory(device: torch.device) -> None:
    """Starts a new CUDA peak window (CPU RSS peaks cannot be reset)."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def peak_memory_mb(device: torch.device) -> float:
    """CUDA allocator peak on GPU, else the process's peak resident set size, in MiB."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return _max_rss_mb()


_M_TRIM_THRESHOLD, _M_MMAP_MAX = -1, -4  # glibc mallopt parameters (malloc.h)


@functools.lru_cache(maxsize=1)
def _glibc() -> Optional[ctypes.CDLL]:
    try:
        libc = ctypes.CDLL("libc.so.6")
        return libc if hasattr(libc, "mallopt") and hasattr(libc, "malloc_trim") else None
    except OSError:  # not glibc (macOS, musl): nothing to tune
        return None


KEEP_CPU_HEAP_ENV = "DEQBENCH_KEEP_CPU_HEAP"


def keep_cpu_heap(enabled: bool | None = None) -> bool:
    """Makes glibc serve large allocations from the heap and keep what is freed, for this process (opt-in).

    glibc gives every allocation above ``M_MMAP_THRESHOLD`` (at most 32 MiB) a
    fresh ``mmap`` and unmaps it on free, so a training step on CPU whose
    tensors are larger (a 256×256 DEQ-INR state is 64 MiB) page-faults through
    all of them again on every step: at 256×256 that is 2.5× the step's CPU
    time (BENCHMARKS.md, "CPU allocator"). With ``mmap`` off and trimming left
    to :class:`PhasePeak` (``malloc_trim`` at each phase's start), freed blocks
    are reused. The price is memory: the heap fragments, and a 2000-step
    256×256 CRR run's resident set grew to 11.8 GiB. So it is off unless asked
    for. Numbers are unchanged either way; only where memory comes from.

    Args:
        enabled: apply it; None: when ``$DEQBENCH_KEEP_CPU_HEAP`` is ``1``.

    Returns:
        Whether it applied (False when not asked, or the C library is not glibc).
    """
    if enabled is None:
        enabled = os.environ.get(KEEP_CPU_HEAP_ENV, "").strip() == "1"
    libc = _glibc() if enabled else None
    if libc is None:
        return False
    return bool(libc.mallopt(_M_MMAP_MAX, 0)) and bool(libc.mallopt(_M_TRIM_THRESHOLD, 2**31 - 1))


def _rss_mb() -> Optional[float]:
    """Current resident set size of this process in MiB (Linux ``/proc``), else None."""
    try:
        with open("/proc/self/statm") as fh:
            return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20
    except (OSError, ValueError, IndexError):
        return None


def _max_rss_mb() -> float:
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss / 2**20 if sys.platform == "darwin" else rss / 2**10


class PhasePeak:
    """Peak memory of one phase (a ``with`` block), in MiB.

    CUDA: the caching allocator's peak, after ``reset_peak_memory_stats`` on
    entry (tensors only). CPU: the kernel's peak RSS (``ru_maxrss``) cannot be
    reset, so a background thread samples the process's current resident set
    size (``/proc/self/statm``) every ``interval`` seconds during the phase and
    keeps the maximum. That is the whole process (interpreter, libraries, data,
    and memory the allocator kept from earlier phases), and a lower bound of the
    true peak between samples. Without ``/proc`` (macOS) it falls back to the
    process's lifetime peak, which is not per phase.

    Args:
        device: the device the phase runs on.
        interval: CPU sampling period in seconds.
    """

    def __init__(self, device: torch.device, interval: float = 0.005) -> None:
        self.device = device
        self.interval = interval
        self._peak = 0.0
        self._stop = threading.Event()
        self._thread: Optional[threading.Thread] = None

    def __enter__(self) -> "PhasePeak":
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
        elif _rss_mb() is not None:
            libc = _glibc()
            if libc is not None:  # hand back what earlier phases freed (keep_cpu_heap keeps it): this phase's own peak
                libc.malloc_trim(0)
            self._peak = _rss_mb() or 0.0
            self._thread = threading.Thread(target=self._sample, daemon=True)
            self._thread.start()
        return self

    def _sample(self) -> None:
        while not self._stop.wait(self.interval):
            self._peak = max(self._peak, _rss_mb() or 0.0)

    def read(self) -> float:
        """The peak so far in this phase (MiB)."""
        if self.device.type == "cuda":
            return torch.cuda.max_memory_allocated(self.device) / 2**20
        now = _rss_mb()
        if now is None:
            return _max_rss_mb()
        self._peak = max(self._peak, now)
        return self._peak

    def __exit__(self, *exc: Any) -> None:
        self.value = self.read()
        self._stop.set()
        if self._thread is not None:
            self._thread.join()


def save_png(img: torch.Tensor, path: Path) -> Path:
    """Writes a ``(H, W)`` image (leading size-1 dims allowed), clamped to [0, 1], as 8-bit PNG."""
    import skimage.io

    arr = (img.squeeze().clamp(0, 1).cpu().numpy() * 255).round().astype(np.uint8)
    skimage.io.imsave(path, arr, check_contrast=False)
    return path


def json_safe(obj: Any) -> Any:
    """NaN/inf floats as None (strict JSON), recursively."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [json_safe(v) for v in obj]
    return obj


def log_run_files(tracker: Any, outdir: Path, pngs: Sequence[Path], images: Mapping[str, Any],
                  documents: Mapping[str, Any]) -> None:
    """Saves ``images`` to ``images.pt`` and each document as strict JSON, then logs them and ``pngs``.

    Args:
        tracker: receives every file (``log_artifact``).
        outdir: the run's artifact directory (exists).
        pngs: images already written (see :func:`save_png`).
        images: tensors for the analysis commands (``images.pt``).
        documents: file name → JSON-serialisable object, e.g. ``{"metrics.json": results}``.
    """
    paths = list(pngs)
    torch.save(dict(images), outdir / "images.pt")
    paths.append(outdir / "images.pt")
    for name, obj in documents.items():
        (outdir / name).write_text(json.dumps(json_safe(obj), indent=2))
        paths.append(outdir / name)
    for p in paths:
        tracker.log_artifact(p)
