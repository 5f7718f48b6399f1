"""DE-Prox: deep-equilibrium proximal gradient MRI reconstruction, and its baselines.

Gilton, Ongie & Willett (2021), "Deep equilibrium architectures for inverse
problems in imaging": the reconstruction is the fixed point

    x* = R(x* - eta * A^H (A x* - y)),      initialised at  x0 = A^H y,

with ``R`` a learned denoiser (a spectrally normalised :class:`DnCNN`), found
by a torchdeq solver (Anderson acceleration by default) and differentiated
implicitly (``ift=True``) or with a phantom gradient (``grad=k``).

Complex convention: images (the DEQ state, the denoiser's input/output and the
returned reconstruction) are real ``(B, 2, H, W)`` tensors with channel 0 the
real and channel 1 the imaginary part. Measurements ``y`` and the physics
operator use fastMRI's trailing-2 convention of :mod:`suite.physics.mri`
(``A``: ``(B, H, W, 2) -> (B, C, H, W, 2)``); :func:`chan_to_last` and
:func:`last_to_chan` convert at that boundary only.

All three models share one call signature::

    x_hat, info = model(y, physics)   # y (B, C, H, W, 2) -> x_hat (B, 2, H, W)

``info`` holds ``(B,)`` tensors ``nstep``, ``abs_lowest`` (``||f(x) - x||_2``),
``rel_lowest`` (``abs / ||f(x)||``): solver statistics for :class:`DEProx`, the
last-step residual for :class:`Unrolled`, and ``nstep = 0`` with NaN residuals
(not applicable) for :class:`ZeroFilled`. After ``loss.backward()`` a DE-Prox
model trained with ``ift=True`` holds the backward solver's statistics in
:attr:`DEProx.last_backward_info` (keys as above).
"""

from __future__ import annotations

import contextlib
from typing import Callable, Iterator, Optional

import torch
from torch import nn
from torch.nn.utils import parametrize
from torchdeq import get_deq

from suite.models.dncnn import DnCNN

__all__ = [
    "DEProx",
    "Unrolled",
    "ZeroFilled",
    "SOLVERS",
    "DEQ_CORES",
    "STOP_MODES",
    "chan_to_last",
    "last_to_chan",
    "complex_magnitude",
    "build_dncnn_denoiser",
]

SOLVERS = ("anderson", "broyden", "fixed_point_iter")
DEQ_CORES = ("indexing", "sliced")
STOP_MODES = ("abs", "rel")


def chan_to_last(x: torch.Tensor) -> torch.Tensor:
    """``(B, 2, H, W)`` -> ``(B, H, W, 2)`` (contiguous, for the physics operator)."""
    if x.ndim != 4 or x.shape[1] != 2:
        raise ValueError(f"expected a complex image (B, 2, H, W), got shape {tuple(x.shape)}")
    return x.permute(0, 2, 3, 1).contiguous()


def last_to_chan(x: torch.Tensor) -> torch.Tensor:
    """``(B, H, W, 2)`` -> ``(B, 2, H, W)``."""
    if x.ndim != 4 or x.shape[-1] != 2:
        raise ValueError(f"expected a complex image (B, H, W, 2), got shape {tuple(x.shape)}")
    return x.permute(0, 3, 1, 2).contiguous()


def complex_magnitude(x: torch.Tensor) -> torch.Tensor:
    """``(B, 2, H, W)`` -> ``(B, H, W)`` magnitude (gradient 0, not NaN, at 0)."""
    return torch.linalg.vector_norm(x, dim=1)


def build_dncnn_denoiser(
    depth: int = 17,
    width: int = 64,
    norm: Optional[str] = "group",
    spectral_norm: bool = True,
    residual: bool = True,
    num_groups: int = 8,
    sn_coeff: float = 1.0,
) -> DnCNN:
    """The DE-Prox denoiser of Gilton et al.: DnCNN on 2 channels (complex as channels).

    Defaults follow the design (17 x 64, GroupNorm, spectral norm, residual).
    """
    return DnCNN(
        in_channels=2,
        out_channels=2,
        depth=depth,
        width=width,
        residual=residual,
        spectral_norm=spectral_norm,
        sn_coeff=sn_coeff,
        norm=norm,
        num_groups=num_groups,
    )


def _per_sample_residual(new: torch.Tensor, old: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(||new - old||, ||new - old|| / ||new||)`` per batch element, each ``(B,)``."""
    diff = (new - old).flatten(1).norm(dim=1)
    return diff, diff / (new.flatten(1).norm(dim=1) + 1e-9)


@contextlib.contextmanager
def _no_spectral_norm_updates(denoiser: nn.Module) -> Iterator[None]:
    """Within the context the denoiser's forward does not advance its power iterations.

    The models advance them once per step (``_prepare``), so every call of the
    fixed-point map -- solver, phantom gradient and IFT backward -- sees one
    function; outside, a :class:`DnCNN` trained on its own (denoiser
    pre-training) keeps updating them per forward.
    """
    if not hasattr(denoiser, "sn_update_on_forward"):
        yield
        return
    previous = denoiser.sn_update_on_forward
    denoiser.sn_update_on_forward = False
    try:
        yield
    finally:
        denoiser.sn_update_on_forward = previous


@contextlib.contextmanager
def _cached_parametrizations(module: nn.Module) -> Iterator[None]:
    """Evaluates every parametrised weight once (e.g. spectral norms) and reuses it.

    Inside the context all calls of ``module`` share one set of normalised
    weights, with their autograd graph when gradients are enabled (the torchdeq
    solver itself runs under ``no_grad``, so the cache is filled first).
    """
    with parametrize.cached():
        for sub in module.modules():
            if parametrize.is_parametrized(sub):
                for name in sub.parametrizations.keys():
                    getattr(sub, name)
        yield


class _ProximalGradientModel(nn.Module):
    """Shared parts: the denoiser, the step ``eta`` and one proximal-gradient step."""

    def __init__(self, denoiser: nn.Module, eta: float) -> None:
        super().__init__()
        if not isinstance(denoiser, nn.Module):
            raise TypeError(f"denoiser must be an nn.Module, got {type(denoiser).__name__}")
        if isinstance(eta, bool) or not isinstance(eta, (int, float)) or not eta > 0:
            raise ValueError(f"eta must be a number > 0, got {eta!r}")
        self.denoiser = denoiser
        self.eta = float(eta)

    def _prepare(self, x0: torch.Tensor) -> None:
        """Spectral-norm power iteration: once per model step, not per denoiser call."""
        if hasattr(self.denoiser, "prepare_spectral_norm"):
            self.denoiser.prepare_spectral_norm(x0.shape[-2:], update=self.training)

    def step_fn(self, y: torch.Tensor, physics: nn.Module) -> Callable[[torch.Tensor], torch.Tensor]:
        """``f(x) = R(x - eta * A^H (A x - y))`` on ``(B, 2, H, W)`` images."""

        def f(x: torch.Tensor) -> torch.Tensor:
            grad = last_to_chan(physics.A_adjoint(physics.A(chan_to_last(x)) - y))
            with _no_spectral_norm_updates(self.denoiser):  # also in the IFT backward
                return self.denoiser(x - self.eta * grad)

        return f


class DEProx(_ProximalGradientModel):
    """Deep-equilibrium proximal gradient reconstruction (Gilton et al. 2021).

    Args:
        denoiser: ``R``, mapping ``(B, 2, H, W)`` to ``(B, 2, H, W)``; default a
            17 x 64 spectrally normalised DnCNN with GroupNorm
            (:func:`build_dncnn_denoiser`).
        eta: Gradient step ``eta > 0`` (``<= 2`` keeps the gradient step
            non-expansive since ``||A|| <= 1``).
        solver: Forward solver, one of :data:`SOLVERS`; default ``"anderson"``.
        b_solver: Backward (IFT) solver; default: same as ``solver``.
        f_max_iter: Forward solver iterations. Default 30.
        b_max_iter: Backward solver iterations. Default 30.
        f_tol: Forward stopping tolerance (on ``stop_mode``). Default 1e-3.
        b_tol: Backward stopping tolerance. Default 1e-4.
        stop_mode: ``"rel"`` (default, scale-free) or ``"abs"``, for both solvers.
        ift: Implicit differentiation (default). ``False`` uses the phantom gradient.
        grad: Phantom-gradient steps ``k >= 1`` (used when ``ift=False``).
        tau: Phantom-gradient damping in ``(0, 1]``.
        core: torchdeq computational graph, ``"indexing"`` (default) or ``"sliced"``.
        eval_f_max_iter: Forward iterations at evaluation; ``0`` = ``f_max_iter``.

    Shapes:
        ``forward(y, physics)``: ``y (B, C, H, W, 2)`` -> ``(x_hat (B, 2, H, W), info)``.

    Attributes:
        last_backward_info: ``{"nstep", "abs_lowest", "rel_lowest"}`` ``(B,)`` tensors
            of the latest IFT backward solve (empty before the first one).
    """

    def __init__(
        self,
        denoiser: Optional[nn.Module] = None,
        eta: float = 1.0,
        solver: str = "anderson",
        b_solver: Optional[str] = None,
        f_max_iter: int = 30,
        b_max_iter: int = 30,
        f_tol: float = 1e-3,
        b_tol: float = 1e-4,
        stop_mode: str = "rel",
        ift: bool = True,
        grad: int = 1,
        tau: float = 1.0,
        core: str = "indexing",
        eval_f_max_iter: int = 0,
    ) -> None:
        super().__init__(build_dncnn_denoiser() if denoiser is None else denoiser, eta)
        b_solver = solver if b_solver is None else b_solver
        for name, value in (("solver", solver), ("b_solver", b_solver)):
            if value not in SOLVERS:
                raise ValueError(f"unknown {name} {value!r}; valid: {', '.join(SOLVERS)}")
        if core not in DEQ_CORES:
            raise ValueError(f"unknown core {core!r}; valid: {', '.join(DEQ_CORES)}")
        if stop_mode not in STOP_MODES:
            raise ValueError(f"unknown stop_mode {stop_mode!r}; valid: {', '.join(STOP_MODES)}")
        for name, value, low in (("f_max_iter", f_max_iter, 1), ("b_max_iter", b_max_iter, 1),
                                 ("grad", grad, 1), ("eval_f_max_iter", eval_f_max_iter, 0)):
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise ValueError(f"{name} must be an integer >= {low}, got {value!r}")
        for name, value in (("f_tol", f_tol), ("b_tol", b_tol)):
            if not isinstance(value, (int, float)) or not value > 0:
                raise ValueError(f"{name} must be > 0, got {value!r}")
        if not isinstance(tau, (int, float)) or not 0 < tau <= 1:
            raise ValueError(f"tau must be in (0, 1], got {tau!r}")
        self.solver, self.b_solver, self.ift, self.grad = solver, b_solver, bool(ift), grad
        self.deq = get_deq(
            core=core,
            f_solver=solver,
            b_solver=b_solver,
            f_max_iter=f_max_iter,
            b_max_iter=b_max_iter,
            f_tol=float(f_tol),
            b_tol=float(b_tol),
            f_stop_mode=stop_mode,
            b_stop_mode=stop_mode,
            ift=bool(ift),
            grad=grad,
            tau=float(tau),
            eval_f_max_iter=eval_f_max_iter,
        )
        self.last_backward_info: dict[str, torch.Tensor] = {}

    def _backward_writer(self, user_writer: Optional[Callable[[dict], None]]) -> Callable[[dict], None]:
        def writer(info: dict) -> None:
            self.last_backward_info = {
                k: info[k].detach() for k in ("nstep", "abs_lowest", "rel_lowest") if k in info
            }
            if user_writer is not None:
                user_writer(info)

        return writer

    def forward(
        self,
        y: torch.Tensor,
        physics: nn.Module,
        backward_writer: Optional[Callable[[dict], None]] = None,
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Solves for the fixed point.

        Args:
            y: Measured k-space ``(B, C, H, W, 2)``.
            physics: Operator with ``A``/``A_adjoint`` (:mod:`suite.physics.mri`).
            backward_writer: Optional callable receiving torchdeq's backward solver
                statistics when ``ift=True`` (also kept in :attr:`last_backward_info`).

        Returns:
            ``x_hat (B, 2, H, W)`` and ``info`` with ``nstep``, ``abs_lowest``,
            ``rel_lowest`` (each ``(B,)``, detached).
        """
        x0 = last_to_chan(physics.A_adjoint(y))
        self._prepare(x0)
        f = self.step_fn(y, physics)
        with _cached_parametrizations(self.denoiser):
            z_out, info = self.deq(f, x0, backward_writer=self._backward_writer(backward_writer))
        stats = {k: info[k].detach() for k in ("nstep", "abs_lowest", "rel_lowest")}
        return z_out[-1], stats


class Unrolled(_ProximalGradientModel):
    """``n_iter`` proximal-gradient steps with one shared denoiser, backprop through all.

    Args:
        denoiser: As for :class:`DEProx`; default :func:`build_dncnn_denoiser`.
        eta: Gradient step.
        n_iter: Number of unrolled iterations ``K >= 1``. Default 10.

    Shapes:
        ``forward(y, physics)``: ``y (B, C, H, W, 2)`` -> ``(x_hat (B, 2, H, W), info)``,
        ``info["nstep"] = K`` and the last step's residual ``||x_K - x_{K-1}||``.
    """

    def __init__(self, denoiser: Optional[nn.Module] = None, eta: float = 1.0, n_iter: int = 10) -> None:
        super().__init__(build_dncnn_denoiser() if denoiser is None else denoiser, eta)
        if isinstance(n_iter, bool) or not isinstance(n_iter, int) or n_iter < 1:
            raise ValueError(f"n_iter must be an integer >= 1, got {n_iter!r}")
        self.n_iter = n_iter

    def forward(self, y: torch.Tensor, physics: nn.Module) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """``K`` steps from ``A^H y``; see the class docstring."""
        x = last_to_chan(physics.A_adjoint(y))
        self._prepare(x)
        f = self.step_fn(y, physics)
        prev = x
        with _cached_parametrizations(self.denoiser):
            for _ in range(self.n_iter):
                prev, x = x, f(x)
        abs_res, rel_res = _per_sample_residual(x.detach(), prev.detach())
        nstep = torch.full((x.shape[0],), float(self.n_iter), device=x.device)
        return x, {"nstep": nstep, "abs_lowest": abs_res, "rel_lowest": rel_res}


class ZeroFilled(nn.Module):
    """Zero-filled baseline ``A^H y`` (no parameters).

    Shapes:
        ``forward(y, physics)``: ``y (B, C, H, W, 2)`` -> ``(x_hat (B, 2, H, W), info)``
        with ``nstep = 0`` and NaN residuals (no solver).
    """

    def forward(self, y: torch.Tensor, physics: nn.Module) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        x = last_to_chan(physics.A_adjoint(y))
        batch = x.shape[0]
        nan = torch.full((batch,), float("nan"), device=x.device)
        return x, {"nstep": torch.zeros(batch, device=x.device), "abs_lowest": nan, "rel_lowest": nan.clone()}
