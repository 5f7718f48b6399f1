"""Data: ``load_data(cfg)`` returns what the family's ``fit`` consumes (its :class:`~suite.families.Family`'s loader)."""

from __future__ import annotations

from typing import Any


def load_data(cfg: Any) -> Any:
    """Loads the data of ``cfg.family`` (images for DEQ-INR/CRR, fastMRI volumes for DE-Prox, ...)."""
    from suite.families import get_family

    return get_family(cfg.family).load_data(cfg)
