"""Data registry: ``load_data(cfg)`` returns what the family's trainer consumes."""

from __future__ import annotations

from typing import Any, Callable

from suite.config import ExperimentConfig
from suite.registry import Registry

DATASETS: Registry[Callable[[ExperimentConfig], Any]] = Registry("dataset")


@DATASETS.register("deq_inr")
@DATASETS.register("crr")
def _image(cfg: ExperimentConfig) -> Any:
    from suite.data.images import image_data

    return image_data(cfg.data.image, cfg.data.size)


@DATASETS.register("deprox")
def _fastmri(cfg: ExperimentConfig) -> Any:
    from suite.training.deprox import load_deprox_data

    return load_deprox_data(cfg)


def load_data(cfg: ExperimentConfig) -> Any:
    """Loads the data of ``cfg.family`` (images for INR/CRR, fastMRI volumes for DE-Prox)."""
    return DATASETS.get(cfg.family)(cfg)
