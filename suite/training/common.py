"""Small helpers shared by the training loops: device, RNG state, peak memory, run files."""

from __future__ import annotations

import json
import math
import resource
import sys
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
import torch


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
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss / 2**20 if sys.platform == "darwin" else rss / 2**10


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
