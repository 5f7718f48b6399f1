"""DEQ-INR: an implicit neural representation whose hidden state is a fixed point.

A multiplicative filter network (Fathony et al. 2021) made implicit, following
TorchDEQ's deq-zoo ``deq-inr``: the coordinates ``x`` give filters
``u_0..u_L = g(x)`` (Fourier: ``sin(Wx + b)``; Gabor: the same times a Gaussian
envelope), and the hidden state solves

    z* = f(z*, u),   f(z, u) = (W_L(... (W_1 (z + u_0) + b_1) ⊙ u_1 ...) + b_L) ⊙ u_L

with torchdeq. Output = ``Linear(z*)``. All tensors are real.
"""

from __future__ import annotations

import math
from typing import Any, Callable

import torch
from torch import autograd, nn
from torchdeq import get_deq
from torchdeq.norm import apply_norm, reset_norm

from suite.config import DEQConfig, ModelConfig


class FilterBank(nn.Module):
    """Coordinate filters ``u_0..u_L`` of a multiplicative filter network.

    Args:
        in_dim: coordinate dimension (2 for images).
        hidden: width of each filter.
        n_filters: number of filters (``n_layers + 1``).
        kind: ``fourier`` or ``gabor``.
        scale: input frequency scale (split evenly over the filters' product).
        gabor_alpha: shape of the Gamma prior of the Gabor envelopes' precision.
    """

    def __init__(self, in_dim: int, hidden: int, n_filters: int, kind: str, scale: float, gabor_alpha: float) -> None:
        super().__init__()
        if kind not in ("fourier", "gabor"):
            raise ValueError(f"model.filter: invalid value {kind!r}; allowed: fourier, gabor")
        self.kind, self.n_filters = kind, n_filters
        self.linear = nn.Linear(in_dim, hidden * n_filters)
        scale = scale / math.sqrt(n_filters)
        with torch.no_grad():
            self.linear.bias.uniform_(-math.pi, math.pi)
            if kind == "gabor":
                gamma = torch.distributions.Gamma(gabor_alpha, 1.0).sample((hidden * n_filters,))
                self.gamma = nn.Parameter(gamma)
                self.mu = nn.Parameter(torch.rand(hidden * n_filters, in_dim) * 2 - 1)
                self.linear.weight.mul_(scale * gamma.sqrt()[:, None])
            else:
                self.linear.weight.mul_(scale)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """``(N, in_dim)`` coordinates → ``n_filters`` tensors of shape ``(N, hidden)``."""
        u = torch.sin(self.linear(x))
        if self.kind == "gabor":
            d2 = (x.square().sum(-1, keepdim=True) - 2 * x @ self.mu.T + self.mu.square().sum(-1)).clamp_min(0)
            u = u * torch.exp(-0.5 * self.gamma * d2)
        return u.chunk(self.n_filters, dim=-1)


class MFNCell(nn.Module):
    """The implicit function ``f(z, u)`` of the DEQ-INR (see module docstring)."""

    def __init__(self, hidden: int, n_layers: int) -> None:
        super().__init__()
        self.layers = nn.ModuleList(nn.Linear(hidden, hidden) for _ in range(n_layers))
        bound = math.sqrt(1.0 / hidden)
        for layer in self.layers:
            nn.init.uniform_(layer.weight, -bound, bound)

    def forward(self, z: torch.Tensor, u: tuple[torch.Tensor, ...]) -> torch.Tensor:
        """``z`` ``(N, hidden)``, ``u`` filters ``(N, hidden)`` each → ``(N, hidden)``."""
        z = z + u[0]
        for layer, ui in zip(self.layers, u[1:]):
            z = layer(z) * ui
        return z


def deq_kwargs(deq: DEQConfig) -> dict[str, Any]:
    """torchdeq ``get_deq`` arguments for a validated :class:`DEQConfig`."""
    return dict(
        core="sliced",
        f_solver=deq.solver,
        f_max_iter=deq.f_max_iter,
        f_tol=deq.f_tol,
        b_solver=deq.b_solver,
        b_max_iter=deq.b_max_iter,
        b_tol=deq.b_tol,
        ift=deq.grad == "ift",
        grad=deq.phantom_steps,
        tau=deq.tau,
        eval_f_max_iter=deq.eval_max_iter,
    )


class AdjointSlot:
    """A training step's adjoint warm start: ``init`` goes in (None: zeros), ``out`` comes back after backward."""

    def __init__(self) -> None:
        self.init: torch.Tensor | None = None
        self.out: torch.Tensor | None = None


def warm_ift(slot: AdjointSlot) -> Callable[..., list[torch.Tensor]]:
    """An IFT gradient for torchdeq whose backward solve starts from ``slot.init``.

    The backward pass solves ``g = J_f(z*)^T g + ∂L/∂f(z*)`` for the adjoint ``g``
    (as torchdeq's IFT does, with its backward solver, ``b_max_iter``, ``b_tol``),
    but from the given start instead of zero, and leaves the solution in
    ``slot.out``. Cached per pixel across optimiser steps, the adjoint changes
    little from one step to the next, as the fixed point does (the forward warm
    start), so a short backward solve reaches what a long one from zero would.
    Built like torchdeq's hook IFT: one application of ``f`` with its graph, and a
    hook on its output that swaps the incoming gradient for the adjoint.
    """

    def grad_fn(trainer: Any, func: Callable, z_pred: torch.Tensor, writer: Callable | None = None,
                **_: Any) -> list[torch.Tensor]:
        z_pred = z_pred.requires_grad_()
        new_z = func(z_pred)
        handle = None

        def hook(grad: torch.Tensor) -> torch.Tensor:
            handle.remove()  # the solve below differentiates new_z again: no second visit
            g0 = torch.zeros_like(grad) if slot.init is None else slot.init.reshape_as(grad).to(grad.dtype)
            g, _, info = trainer.b_solver(
                lambda y: autograd.grad(new_z, z_pred, y, retain_graph=True)[0] + grad, g0,
                max_iter=trainer.b_max_iter, tol=trainer.b_tol, stop_mode=trainer.b_stop_mode)
            slot.out = g.detach()
            if writer:
                writer(info)
            return g

        handle = new_z.register_hook(hook)
        return [new_z]

    return grad_fn


class DEQINR(nn.Module):
    """Coordinates → intensity through a DEQ layer solved by torchdeq.

    Args:
        model: filter, width, depth, input scale and weight normalisation.
        deq: solver, tolerances, iterations and gradient (IFT or phantom).
        in_dim: coordinate dimension.
        out_dim: output channels (1 for grey).
    """

    def __init__(self, model: ModelConfig, deq: DEQConfig, in_dim: int = 2, out_dim: int = 1) -> None:
        super().__init__()
        self.hidden = model.hidden
        self.filters = FilterBank(in_dim, model.hidden, model.n_layers + 1, model.filter, model.input_scale, model.gabor_alpha)
        self.f = MFNCell(model.hidden, model.n_layers)
        self.norm = model.norm
        if model.norm != "none":
            apply_norm(self.f, norm_type=model.norm)
        self.deq = get_deq(**deq_kwargs(deq))
        self.adjoint = AdjointSlot() if deq.b_warm_start else None
        if self.adjoint is not None:  # torchdeq's last gradient function is its IFT: start it from the cache
            self.deq.produce_grad[-1] = warm_ift(self.adjoint)
        self.head = nn.Linear(model.hidden, out_dim)
        self.last_bwd_nstep = 0.0

    def _bwd_writer(self, info: dict) -> None:
        self.last_bwd_nstep = float(info["nstep"].float().mean())

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, dict[str, float]]:
        """Solves from zero for the fixed point and decodes it: :meth:`solve` without its state."""
        pred, stats, _ = self.solve(x)
        return pred, stats

    def solve(self, x: torch.Tensor, z0: torch.Tensor | None = None, max_iter: int | None = None,
              g0: torch.Tensor | None = None) -> tuple[torch.Tensor, dict[str, Any], torch.Tensor]:
        """Solves for the fixed point and decodes it.

        Args:
            x: ``(N, in_dim)`` coordinates in [-1, 1].
            z0: ``(N, hidden)`` initial state (a warm start); None: zeros.
            max_iter: forward-solver iterations for this call (0: no solve, start
                from ``z0`` and let the gradient's steps advance it); None: the
                configured ``f_max_iter`` (training) or ``eval_max_iter`` (eval).
            g0: ``(N, hidden)`` start of the backward (adjoint) solve, with
                ``deq.b_warm_start``; after backward, :meth:`adjoint_out` has its solution.

        Returns:
            ``(N, out_dim)`` prediction in model space ([-1, 1] for images); the
            solver statistics ``nstep``, ``abs_lowest``, ``rel_lowest`` (batch means;
            in eval mode also ``rel_trace``, the relative residual per solver step);
            and the ``(N, hidden)`` state that was decoded, detached (for a cache).
        """
        u = self.filters(x)
        if self.norm != "none":
            reset_norm(self.f)
        if z0 is None:
            z0 = torch.zeros(x.shape[0], self.hidden, device=x.device, dtype=x.dtype)
        if self.adjoint is not None:
            self.adjoint.init, self.adjoint.out = g0, None
        kwargs = None if max_iter is None else {"f_max_iter": max_iter}
        z_out, info = self.deq(lambda z: self.f(z, u), z0, solver_kwargs=kwargs, backward_writer=self._bwd_writer)
        stats: dict[str, Any] = {k: float(info[k].float().mean()) for k in ("nstep", "abs_lowest", "rel_lowest")}
        if not self.training and "rel_trace" in info:
            stats["rel_trace"] = info["rel_trace"].float().mean(0).tolist()
        return self.head(z_out[-1]), stats, z_out[-1].detach()

    def adjoint_out(self) -> torch.Tensor | None:
        """The last training step's adjoint ``(N, hidden)`` (after its backward), with ``deq.b_warm_start``."""
        return None if self.adjoint is None else self.adjoint.out
