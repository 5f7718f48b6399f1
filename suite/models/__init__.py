"""Model registry: ``get_model(name)(cfg)`` builds the model of an experiment family.

Valid names are listed by ``MODELS.names()``; a wrong name lists them.
"""

from __future__ import annotations

from typing import Callable

from torch import nn

from suite.config import ExperimentConfig
from suite.registry import Registry

MODELS: Registry[Callable[[ExperimentConfig], nn.Module]] = Registry("model")


@MODELS.register("deq_inr")
def _deq_inr(cfg: ExperimentConfig) -> nn.Module:
    from suite.models.deq_inr import DEQINR

    return DEQINR(cfg.model, cfg.deq)


@MODELS.register("crr")
def _crr(cfg: ExperimentConfig) -> nn.Module:
    from suite.models.crr import CRR
    from suite.models.deq_inr import DEQINR

    return CRR(DEQINR(cfg.model, cfg.deq), cfg.crr)


@MODELS.register("deprox")
def _deprox(cfg: ExperimentConfig) -> nn.Module:
    """``deprox.kind``: DE-Prox DEQ (solver from ``deq``), unrolled (``deprox.unroll_k``) or zero-filled."""
    from suite.models.deprox import DEProx, Unrolled, ZeroFilled, build_dncnn_denoiser

    d = cfg.deprox
    if d.kind == "zero_filled":
        return ZeroFilled()
    denoiser = build_dncnn_denoiser(depth=d.depth, width=d.width, norm=None if d.norm == "none" else d.norm,
                                    spectral_norm=d.spectral_norm, residual=d.residual, num_groups=d.num_groups,
                                    sn_coeff=d.sn_coeff)
    if d.kind == "unrolled":
        return Unrolled(denoiser, eta=d.eta, n_iter=d.unroll_k)
    q = cfg.deq
    return DEProx(denoiser, eta=d.eta, solver=q.solver, b_solver=q.b_solver, f_max_iter=q.f_max_iter,
                  b_max_iter=q.b_max_iter, f_tol=q.f_tol, b_tol=q.b_tol, ift=q.grad == "ift", grad=q.phantom_steps,
                  tau=q.tau)


def get_model(name: str) -> Callable[[ExperimentConfig], nn.Module]:
    """The builder registered as ``name`` (``deq_inr``, ``crr``, ...)."""
    return MODELS.get(name)


def build_model(cfg: ExperimentConfig) -> nn.Module:
    """Seeds torch with ``cfg.seed`` and builds the model of ``cfg.family``."""
    import torch

    torch.manual_seed(cfg.seed)
    return get_model(cfg.family)(cfg)
