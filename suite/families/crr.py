"""The CRR family: Conservative Residual Refinement of a frozen DEQ-INR.

Stage 1 trains a DEQ-INR (as :mod:`suite.families.deq_inr`) and freezes it;
stage 2 trains a shallow refiner (section ``crr``, :class:`~suite.config.CRRConfig`)
on the DEQ's residual. Reports show the stage-1 output next to the final one.
"""

from __future__ import annotations

from typing import Any

from suite.config import CRRConfig
from suite.families import Family
from suite.families.deq_inr import FINAL_METRICS, evaluate_image, load_image


def build_model(cfg: Any) -> Any:
    """:class:`~suite.models.crr.CRR`: a DEQ-INR and the refiner of section ``crr``."""
    from suite.models.crr import CRR
    from suite.models.deq_inr import DEQINR

    return CRR(DEQINR(cfg.model, cfg.deq), cfg.crr)


def fit(cfg: Any, model: Any, data: Any, tracker: Any, ckpt: Any = None, outdir: Any = None) -> dict[str, float]:
    """Both stages (:func:`suite.training.inr.fit_inr` with the refinement stage)."""
    from suite.training.inr import fit_inr

    return fit_inr(cfg, model, data, tracker, ckpt=ckpt, outdir=outdir, refine=True)


FAMILY = Family(
    name="crr",
    build_model=build_model,
    load_data=load_image,
    fit=fit,
    evaluate=evaluate_image,
    sections={"crr": CRRConfig},
    final_metrics=(*FINAL_METRICS, "stage1/psnr", "crr/gain_db", "crr/best_epoch"),
    final_label="DEQ+CRR",
    stage1=True,
)
