"""The DEQ-INR training recipe: warm starts, when to solve, and how to evaluate.

TorchDEQ's deq-zoo ``deq-inr`` amortises the fixed point across optimiser steps:
each pixel's last state is cached and starts its next solve, the forward solver
runs on the first step only, and the phantom gradient's unrolled steps advance
the state on every later step. Solving from zero with IFT at every step is the
other end. :class:`Recipe` reads which one from :class:`suite.config.DEQConfig`
(``warm_start``, ``solve_every``, ``eval_init``, ``eval_max_iter``; the gradient
is the model's own ``grad``) and carries the cache.

Cache: ``(n_pixels, hidden)`` real states, one row per pixel of the image, in
the data's pixel order; with ``b_warm_start`` a second one of the same shape
holds each pixel's last adjoint (the IFT backward solve's solution), which
starts its next backward solve (:func:`suite.models.deq_inr.warm_ift`). A step writes back the rows of its batch (under data
parallelism the shards are gathered first, so every rank holds the same cache),
and checkpoints save it so that a resumed run continues exactly.
"""

from __future__ import annotations

from typing import Any, Callable

import torch
from torch import nn

from suite.config import DEQConfig
from suite.training import distributed as D


class Recipe:
    """What one DEQ-INR training run does at each step (see module docstring).

    Args:
        deq: the validated recipe keys.
        n_pixels: rows of the cache (the image's pixel count).
        hidden: the model's state width.
        device: where the cache lives (the model's device).
    """

    def __init__(self, deq: DEQConfig, n_pixels: int, hidden: int, device: torch.device) -> None:
        self.solve_every = deq.solve_every
        self.eval_from_cache = deq.eval_init == "cache"
        self.cache = torch.zeros(n_pixels, hidden, device=device) if deq.warm_start else None
        self.adjoint = torch.zeros(n_pixels, hidden, device=device) if deq.b_warm_start else None

    def solves_at(self, step: int) -> bool:
        """Whether the forward solver runs at optimiser step ``step`` (0-based, global)."""
        if self.solve_every == 0:
            return step == 0
        return step % self.solve_every == 0

    def start(self, idx: torch.Tensor | None, which: str = "cache") -> torch.Tensor | None:
        """``(len(idx), hidden)`` initial states of a batch's pixels (None: start at zero).

        Args:
            idx: pixel indices of the batch; None for every pixel (full batch).
            which: ``cache`` (fixed points) or ``adjoint`` (backward solutions).
        """
        rows = getattr(self, which)
        if rows is None:
            return None
        return rows if idx is None else rows[idx]

    def remember(self, idx: torch.Tensor | None, z: torch.Tensor, which: str = "cache") -> None:
        """Stores a batch's new rows ``z`` ``(len(idx), hidden)`` (the whole batch, on every rank) in ``which``."""
        rows = getattr(self, which)
        if rows is None:
            return
        if idx is None:
            rows.copy_(z)
        else:
            rows[idx] = z

    def state_dict(self) -> dict[str, Any]:
        """What a checkpoint needs to resume exactly: the caches (on the CPU)."""
        return {k: None if getattr(self, k) is None else getattr(self, k).cpu() for k in ("cache", "adjoint")}

    def load_state_dict(self, state: dict[str, Any] | None) -> None:
        """Restores :meth:`state_dict`; a checkpoint without a cache leaves it at zero."""
        for key in ("cache", "adjoint"):
            if getattr(self, key) is not None and state and state.get(key) is not None:
                getattr(self, key).copy_(state[key])


@torch.no_grad()
def evaluate_grid(model: nn.Module, coords: torch.Tensor, recipe: Recipe | None,
                  chunk: int = 1 << 18) -> tuple[torch.Tensor, dict[str, float]]:
    """Solves every pixel as an evaluation does: from zero, or from the cache.

    Args:
        model: a :class:`~suite.models.deq_inr.DEQINR` (put in eval mode here).
        coords: ``(n, 2)`` coordinates of the whole grid.
        recipe: the run's recipe (None: from zero).
        chunk: pixels per solve (bounds memory at 512×512 and up).

    Returns:
        ``(n, 1)`` prediction in model space (every rank gets all of it under data
        parallelism), and the evaluation's solver statistics, pixel-weighted means
        over the grid: ``solver/eval_nstep``, ``solver/eval_abs_lowest``,
        ``solver/eval_rel_lowest``.
    """
    model.eval()
    from_cache = recipe is not None and recipe.eval_from_cache
    sums = {"nstep": 0.0, "abs_lowest": 0.0, "rel_lowest": 0.0}
    rows = 0

    def solve(c: slice) -> torch.Tensor:
        nonlocal rows
        pred, stats, _ = model.solve(coords[c], z0=recipe.cache[c] if from_cache else None)
        k = c.stop - c.start
        rows += k
        for key in sums:
            sums[key] += stats[key] * k
        return pred

    out = D.on_grid(solve, coords.shape[0], chunk)
    local = {f"solver/eval_{key}": v / max(rows, 1) for key, v in sums.items()}
    return out, D.reduce_mean(local, weight=rows)


def recipe_step(model: nn.Module, recipe: Recipe, x: torch.Tensor, idx: torch.Tensor | None, step: int,
                ) -> tuple[Callable[[slice], tuple[torch.Tensor, dict[str, float]]], Callable[[], None]]:
    """The forward pass of one training step, and what to do after it.

    Args:
        model: the DEQ-INR being trained.
        recipe: warm start and solve schedule.
        x: ``(n, 2)`` the batch's coordinates.
        idx: the batch's pixel indices (None: every pixel).
        step: global optimiser step (decides whether the solver runs).

    Returns:
        ``forward(shard)`` → ``(prediction (n_r, 1), solver stats)`` on rows
        ``shard`` of the batch, and ``commit()``, to call once after the step,
        which writes the batch's new states (and adjoints) into the caches (gathered over ranks).
    """
    z0, g0 = recipe.start(idx), recipe.start(idx, "adjoint")
    max_iter = None if recipe.solves_at(step) else 0
    held: dict[str, Any] = {}

    def forward(s: slice) -> tuple[torch.Tensor, dict[str, float]]:
        kw = {} if g0 is None else {"g0": g0[s]}
        pred, stats, z = model.solve(x[s], z0=None if z0 is None else z0[s], max_iter=max_iter, **kw)
        held["z"] = z
        return pred, {"solver/fwd_nstep": stats["nstep"], "solver/abs_lowest": stats["abs_lowest"],
                      "solver/rel_lowest": stats["rel_lowest"]}

    def commit() -> None:
        if recipe.cache is not None:
            recipe.remember(idx, D.gather_rows(held["z"], x.shape[0]))
        if recipe.adjoint is not None:
            recipe.remember(idx, D.gather_rows(model.adjoint_out(), x.shape[0]), "adjoint")

    return forward, commit
