"""The DEQ-INR family: an implicit neural representation of one image, its hidden state a fixed point.

Config: ``data`` (the image), ``model`` (filters, width, depth), ``deq`` (solver,
gradient, recipe), ``train``, ``eval``. Model :class:`~suite.models.deq_inr.DEQINR`;
loop :func:`suite.training.inr.fit_inr`. Reports group runs by image.
"""

from __future__ import annotations

from typing import Any

from suite.families import Family

FINAL_METRICS = ("psnr", "ssim", "nmse", "vif", "hfe", "sr", "mem/peak_mb", "mem/train_peak_mb", "mem/infer_peak_mb",
                 "time/total_s", "solver/eval_nstep", "solver/eval_abs_lowest", "solver/eval_rel_lowest")


def build_model(cfg: Any) -> Any:
    """:class:`~suite.models.deq_inr.DEQINR` from the ``model`` and ``deq`` sections."""
    from suite.models.deq_inr import DEQINR

    return DEQINR(cfg.model, cfg.deq)


def load_image(cfg: Any) -> Any:
    """The image ``data.image`` at ``data.size`` (:func:`suite.data.images.image_data`)."""
    from suite.data.images import image_data

    return image_data(cfg.data.image, cfg.data.size)


def evaluate_image(pred: Any, target: Any, cfg: Any) -> dict[str, float]:
    """Every registered image metric of a ``(1, 1, H, W)`` output, data range = the ground truth's
    (:func:`suite.training.inr.final_metrics`)."""
    from suite.training.inr import final_metrics

    return final_metrics(pred, target, cfg.eval)


def fit(cfg: Any, model: Any, data: Any, tracker: Any, ckpt: Any = None, outdir: Any = None) -> dict[str, float]:
    """Trains the DEQ-INR alone (:func:`suite.training.inr.fit_inr`, no refinement stage)."""
    from suite.training.inr import fit_inr

    return fit_inr(cfg, model, data, tracker, ckpt=ckpt, outdir=outdir, refine=False)


FAMILY = Family(
    name="deq_inr",
    build_model=build_model,
    load_data=load_image,
    fit=fit,
    evaluate=evaluate_image,
    final_metrics=FINAL_METRICS,
    final_label="DEQ",
)
