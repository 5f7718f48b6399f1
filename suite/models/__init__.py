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


def get_model(name: str) -> Callable[[ExperimentConfig], nn.Module]:
    """The builder registered as ``name`` (``deq_inr``, ``crr``, ...)."""
    return MODELS.get(name)


def build_model(cfg: ExperimentConfig) -> nn.Module:
    """Seeds torch with ``cfg.seed`` and builds the model of ``cfg.family``."""
    import torch

    torch.manual_seed(cfg.seed)
    return get_model(cfg.family)(cfg)
