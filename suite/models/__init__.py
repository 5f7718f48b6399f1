"""Models: ``build_model(cfg)`` builds the model of ``cfg.family`` (its :class:`~suite.families.Family`'s builder).

``get_model(name)`` is a family's builder; a wrong name lists the valid ones.
"""

from __future__ import annotations

from typing import Any, Callable

from torch import nn


def get_model(name: str) -> Callable[[Any], nn.Module]:
    """The model builder of family ``name`` (a registered name or a ``module:NAME`` reference)."""
    from suite.families import get_family

    return get_family(name).build_model


def build_model(cfg: Any) -> nn.Module:
    """Seeds torch with ``cfg.seed`` and builds the model of ``cfg.family``."""
    import torch

    torch.manual_seed(cfg.seed)
    return get_model(cfg.family)(cfg)
