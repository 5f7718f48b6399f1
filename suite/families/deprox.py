"""The DE-Prox family: MRI reconstruction by a deep-equilibrium proximal-gradient network, and its baselines.

Config sections ``deprox`` (:class:`~suite.config.DEProxConfig`: kind, denoiser,
loss, pre-training) and ``mri`` (:class:`~suite.config.MRIConfig`: fastMRI
volumes, undersampling); the solver comes from ``deq``. Model
:mod:`suite.models.deprox`; data :func:`suite.data.mri.load_deprox_data`;
loop :func:`suite.training.deprox.fit_deprox`. Reports group runs by
``deprox.kind`` and compute PSNR/SSIM with the fastMRI data range (the
volume's maximum).
"""

from __future__ import annotations

from typing import Any

from suite.config import DEProxConfig, MRIConfig
from suite.families import Family

GROUP_KEYS = ("deprox.kind", "mri.acceleration", "deq.solver", "deq.grad", "deprox.unroll_k", "deprox.loss",
              "mri.challenge", "mri.root")


def build_model(cfg: Any) -> Any:
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


def load_data(cfg: Any) -> Any:
    """Training and validation slices (:func:`suite.data.mri.load_deprox_data`)."""
    from suite.data.mri import load_deprox_data

    return load_deprox_data(cfg)


def evaluate(pred: Any, target: Any, cfg: Any) -> dict[str, float]:
    """fastMRI-style metrics of one volume ``(1, S, H, W)`` (:func:`suite.training.deprox_eval.volume_metrics`)."""
    from suite.training.deprox_eval import volume_metrics

    return volume_metrics(pred[0], target[0], cfg)


def fit(cfg: Any, model: Any, data: Any, tracker: Any, ckpt: Any = None, outdir: Any = None) -> dict[str, float]:
    """Pre-training then fine-tuning (:func:`suite.training.deprox.fit_deprox`)."""
    from suite.training.deprox import fit_deprox

    return fit_deprox(cfg, model, data, tracker, ckpt=ckpt, outdir=outdir)


def volume_range(gt: Any) -> Any:
    """fastMRI's data range: each volume's maximum, ``(B, C, H, W) -> (B,)``."""
    import torch

    return gt.reshape(gt.shape[0], -1).amax(dim=1).clamp_min(torch.finfo(torch.float32).tiny)


FAMILY = Family(
    name="deprox",
    build_model=build_model,
    load_data=load_data,
    fit=fit,
    evaluate=evaluate,
    sections={"deprox": DEProxConfig, "mri": MRIConfig},
    final_metrics=("psnr", "ssim", "nmse", "vif", "hfe", "sr", "zf/psnr", "zf/ssim", "solver/eval_nstep",
                   "mem/infer_peak_mb", "mem/train_peak_mb", "mem/peak_mb", "time/total_s"),
    group_keys=GROUP_KEYS,
    data_range=volume_range,
)
