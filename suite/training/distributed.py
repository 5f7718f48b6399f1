"""Data-parallel helpers for the fit loops (``torch.distributed`` only).

The launcher (``jobs.distributed.setup``) starts the process group; training
loops only ask where they are and reduce what they computed. Without an
initialised process group every helper is the identity, so single-process
training runs exactly the code it always ran.

Convention: every rank holds the whole dataset (it is small: one image, a few
MRI slices) and works on its own *shard* of each batch -- rank ``r`` of ``W``
takes rows ``[r·n // W, (r+1)·n // W)`` of an ``n``-row batch (shard sizes
differ by at most one). A loss that is a mean over the global batch is written
as ``sum over the shard / n`` on each rank; :func:`all_reduce_grads` then sums
the gradients, which gives exactly the single-process gradient.
"""

from __future__ import annotations

from typing import Any, Callable, Iterable, Mapping

import torch
import torch.distributed as dist
from torch import nn


def is_distributed() -> bool:
    """Whether a process group with more than one rank is running."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank() -> int:
    """This process's global rank (0 without a process group)."""
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def world_size() -> int:
    """Number of ranks (1 without a process group)."""
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def is_main() -> bool:
    """Whether this is rank 0: the rank that logs, checkpoints and writes artifacts."""
    return rank() == 0


def shard(n: int, r: int | None = None, w: int | None = None) -> slice:
    """Rows of an ``n``-row batch that rank ``r`` of ``w`` works on.

    Args:
        n: global batch size.
        r: rank (default: this process's).
        w: world size (default: this process group's).

    Returns:
        ``slice(r·n // w, (r+1)·n // w)``: contiguous, disjoint, covering ``0..n``.
    """
    r = rank() if r is None else r
    w = world_size() if w is None else w
    return slice(r * n // w, (r + 1) * n // w)


def broadcast_module(model: nn.Module, src: int = 0) -> None:
    """Copies ``src``'s parameters and buffers into every rank's ``model`` (in place)."""
    if not is_distributed():
        return
    with torch.no_grad():
        for t in list(model.parameters()) + list(model.buffers()):
            dist.broadcast(t.data, src)


def all_reduce_grads(params: Iterable[nn.Parameter]) -> None:
    """Sums the gradients of ``params`` over ranks, in one flat all-reduce.

    Use with a loss of the form ``sum over the local shard / global batch size``:
    the summed gradient is then the single-process gradient of the global mean.
    Parameters without a gradient are skipped (identically on every rank).
    """
    if not is_distributed():
        return
    grads = [p.grad for p in params if p.grad is not None]
    if not grads:
        return
    flat = torch.cat([g.reshape(-1) for g in grads])
    dist.all_reduce(flat, op=dist.ReduceOp.SUM)
    offset = 0
    for g in grads:
        g.copy_(flat[offset : offset + g.numel()].view_as(g))
        offset += g.numel()


def reduce_mean(values: Mapping[str, float], weight: float = 1.0) -> dict[str, float]:
    """Weighted mean of scalar metrics over ranks (the same keys on every rank).

    Args:
        values: this rank's scalars, e.g. ``{"loss": 0.1, "solver/fwd_nstep": 7.5}``.
        weight: this rank's weight, e.g. its shard size, so that a mean over a
            shard becomes the mean over the global batch.

    Returns:
        ``{key: Σ_r w_r·v_r / Σ_r w_r}`` on every rank (``values`` unchanged, as
        floats, without a process group).
    """
    keys = sorted(values)
    if not is_distributed():
        return {k: float(values[k]) for k in keys}
    buf = torch.tensor([float(values[k]) * weight for k in keys] + [float(weight)], dtype=torch.float64)
    dist.all_reduce(buf, op=dist.ReduceOp.SUM)
    return {k: float(buf[i] / buf[-1]) for i, k in enumerate(keys)}


def reduce_sum(x: torch.Tensor) -> torch.Tensor:
    """Sum of ``x`` (any shape) over ranks, returned as a new tensor (``x`` itself without a group)."""
    if not is_distributed():
        return x
    y = x.detach().clone()
    dist.all_reduce(y, op=dist.ReduceOp.SUM)
    return y


def any_rank(flag: bool) -> bool:
    """True on every rank when ``flag`` is true on at least one (a collective: call it on all ranks)."""
    if not is_distributed():
        return bool(flag)
    t = torch.tensor([1.0 if flag else 0.0])
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item() > 0)


def gather_rows(local: torch.Tensor, n: int) -> torch.Tensor:
    """Concatenates every rank's :func:`shard` of an ``n``-row result, in rank order.

    Args:
        local: ``(len(shard(n)), *F)`` rows computed by this rank.
        n: global number of rows.

    Returns:
        ``(n, *F)`` on every rank (``local`` itself without a process group).
    """
    if not is_distributed():
        return local
    w = world_size()
    size = -(-n // w)  # ceil: all_gather needs equal sizes, so pad
    padded = local.new_zeros((size, *local.shape[1:]))
    padded[: local.shape[0]] = local
    parts = [torch.empty_like(padded) for _ in range(w)]
    dist.all_gather(parts, padded)
    return torch.cat([p[: shard(n, r, w).stop - shard(n, r, w).start] for r, p in enumerate(parts)])


@torch.no_grad()
def on_grid(fn: Callable[[slice], torch.Tensor], n: int, chunk: int | None = 1 << 18) -> torch.Tensor:
    """``fn`` over rows ``0..n`` (in chunks of ``chunk`` rows unless it is None): ``(n, C)``.

    Data parallel: over this rank's :func:`shard` of the rows, then gathered on
    every rank (without a process group: all rows, in this process).
    """
    s = shard(n) if is_distributed() else slice(0, n)
    if chunk is None:
        return gather_rows(fn(s), n)
    out = torch.cat([fn(slice(i, min(i + chunk, s.stop))) for i in range(s.start, s.stop, chunk)])
    return gather_rows(out, n)


def barrier() -> None:
    """Waits for every rank (no-op without a process group)."""
    if is_distributed():
        dist.barrier()


def save_checkpoint(ckpt: Any, state: dict[str, Any], step: int) -> None:
    """Saves a training checkpoint: rank 0 writes, the other ranks do not.

    A checkpointer that sets ``collective = True`` (``jobs.node``'s, which also
    coordinates a graceful stop on preemption) is called on every rank and
    decides itself who writes.

    Args:
        ckpt: a :class:`suite.training.checkpoint.Checkpointer`.
        state: what to save (model, optimiser, RNG, progress).
        step: the global epoch, used in the file name.
    """
    if getattr(ckpt, "collective", False) or is_main():
        ckpt.save(state, step)
