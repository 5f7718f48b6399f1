"""``deqbench bench metrics``: the metric engine against its references.

Times, in one run and on the same inputs, :mod:`suite.metrics` against the
code it reproduces and checks that the values agree:

- per-volume SSIM and PSNR on a fastMRI-like volume ``(S, H, W)`` against
  ``fastmri.evaluate.ssim`` / ``psnr`` (data range: the volume's maximum);
- VIFp on a batch of 512 x 512 greyscale images against ``sewar.full_ref.vifp``
  called once per image on the 0-255 scale, and per volume (``sewar`` reads the
  slices as channels).

Inputs are float32, as a model's outputs are. Each timing is the median over
``repeats`` runs after ``warmup`` untimed ones. The last two lines are the SSIM
(volume) and VIF (image batch) speed-ups.
"""

from __future__ import annotations

import statistics
import time
from typing import Any, Callable, Dict, List, Tuple

import numpy as np

from jobs.bench._common import print_table

DEFAULTS: Dict[str, Any] = {
    "repeats": 5,
    "warmup": 1,
    "threads": 1,
    "seed": 0,
    "tolerance": 1e-4,
    "volume": {"shape": [16, 320, 320], "anatomy": "knee", "scale": 3e-4},
    "images": {"batch": 4, "size": 512},
    "vif_volume": True,
    "goals": {"ssim": 5.0, "vif": 30.0},
}

_IMAGE_NAMES = ("camera", "astronaut", "brick", "moon", "grass", "gravel")


def _merge(cfg: Dict[str, Any]) -> Dict[str, Any]:
    """Defaults overlaid with ``cfg`` (one level deep); unknown keys refused."""
    unknown = sorted(set(cfg) - set(DEFAULTS))
    if unknown:
        raise ValueError(f"unknown key(s) {unknown} in bench metrics config; valid: {sorted(DEFAULTS)}")
    out = {k: (dict(v) if isinstance(v, dict) else v) for k, v in DEFAULTS.items()}
    for key, value in cfg.items():
        if isinstance(DEFAULTS[key], dict):
            if not isinstance(value, dict) or set(value) - set(DEFAULTS[key]):
                raise ValueError(
                    f"{key} must be a mapping with keys from {sorted(DEFAULTS[key])}, got {value!r}"
                )
            out[key].update(value)
        else:
            out[key] = value
    for key in ("repeats", "warmup"):
        if isinstance(out[key], bool) or not isinstance(out[key], int) or out[key] < (key == "repeats"):
            raise ValueError(f"{key} must be an integer >= {int(key == 'repeats')}, got {out[key]!r}")
    return out


def _time_pair(
    ours: Callable[[], Any], ref: Callable[[], Any], repeats: int, warmup: int
) -> Tuple[float, Any, float, Any]:
    """Median wall times in seconds of ``ours()`` and ``ref()`` and their results.

    The two alternate, repeat by repeat, so that a change in the machine's load
    during the run weighs on both alike.
    """
    for _ in range(warmup):
        ours(), ref()
    times: Tuple[List[float], List[float]] = ([], [])
    results = [None, None]
    for _ in range(repeats):
        for k, fn in enumerate((ours, ref)):
            start = time.perf_counter()
            results[k] = fn()
            times[k].append(time.perf_counter() - start)
    return statistics.median(times[0]), results[0], statistics.median(times[1]), results[1]


def _volume(cfg: Dict[str, Any], rng: np.random.Generator) -> Tuple[np.ndarray, np.ndarray]:
    """A float32 magnitude volume ``(S, H, W)`` at fastMRI's scale and a degraded copy."""
    from scipy.ndimage import gaussian_filter

    from suite.data.synth import make_phantom_volume

    s, h, w = cfg["shape"]
    gt = np.abs(make_phantom_volume(rng, s, (h, w), (h, w), cfg["anatomy"])) * cfg["scale"]
    pred = gaussian_filter(gt, (0, 0.8, 0.8)) + rng.normal(0.0, 0.02 * cfg["scale"], gt.shape)
    return gt.astype(np.float32), np.abs(pred).astype(np.float32)


def _images(cfg: Dict[str, Any], rng: np.random.Generator) -> Tuple[np.ndarray, np.ndarray]:
    """``(B, N, N)`` float32 greyscale images on 0-255 and noisy or blurred copies."""
    from scipy.ndimage import gaussian_filter
    from skimage import color, data
    from skimage.transform import resize

    targets, preds = [], []
    for i in range(cfg["batch"]):
        img = getattr(data, _IMAGE_NAMES[i % len(_IMAGE_NAMES)])()
        img = color.rgb2gray(img) * 255.0 if img.ndim == 3 else img.astype(np.float64)
        if img.shape != (cfg["size"], cfg["size"]):
            img = resize(img, (cfg["size"], cfg["size"]), preserve_range=True, anti_aliasing=True)
        degraded = gaussian_filter(img, 1.0) if i % 2 else img + rng.normal(0.0, 10.0, img.shape)
        targets.append(img)
        preds.append(degraded)
    return np.stack(targets).astype(np.float32), np.stack(preds).astype(np.float32)


def _row(rows: List[List[str]], name: str, ours: float, ref: float, diff: float) -> float:
    speedup = ref / ours
    rows.append([name, f"{ours * 1e3:.1f}", f"{ref * 1e3:.1f}", f"{speedup:.1f}x", f"{diff:.1e}"])
    return speedup


def _print_table(rows: List[List[str]]) -> None:
    header = ["metric / workload", "ours ms", "reference ms", "speedup", "max |diff|"]
    print_table(header, rows)


def main(cfg: Dict[str, Any]) -> int:
    """Run the benchmark described by ``configs/bench/metrics.yaml``.

    Args:
        cfg: Parsed YAML: ``repeats``, ``warmup``, ``threads`` (``None`` keeps
            torch's default), ``seed``, ``tolerance``, ``volume`` (``shape``
            ``[S, H, W]``, ``anatomy``, ``scale``), ``images`` (``batch``,
            ``size``), ``vif_volume`` (also time VIF per volume), ``goals``
            (speed-ups to reach). Missing keys take :data:`DEFAULTS`.

    Returns:
        0 when every metric agrees with its reference within ``tolerance``,
        1 otherwise (speed goals are reported, not enforced).
    """
    import torch

    cfg = _merge(cfg or {})
    threads_before = torch.get_num_threads()
    if cfg["threads"] is not None:
        torch.set_num_threads(int(cfg["threads"]))
    try:
        return _run(cfg)
    finally:
        torch.set_num_threads(threads_before)


def _run(cfg: Dict[str, Any]) -> int:
    """The body of :func:`main` on a merged config."""
    import fastmri.evaluate
    import sewar.full_ref
    import torch

    from suite.metrics import psnr, ssim, vif

    reps, warm, tol = cfg["repeats"], cfg["warmup"], float(cfg["tolerance"])
    rng = np.random.default_rng(cfg["seed"])
    gt, pred = _volume(cfg["volume"], rng)
    targets, preds = _images(cfg["images"], rng)
    print(
        f"volume {gt.shape} float32, images {targets.shape} float32; torch threads "
        f"{torch.get_num_threads()}; median of {reps} repeats"
    )

    rows: List[List[str]] = []
    diffs: Dict[str, float] = {}
    t_gt, t_pred = torch.from_numpy(gt)[None], torch.from_numpy(pred)[None]  # (1, S, H, W)
    vmax = float(gt.max())

    ours, val, ref, ref_val = _time_pair(
        lambda: ssim(t_pred, t_gt, data_range=vmax), lambda: fastmri.evaluate.ssim(gt, pred), reps, warm
    )
    diffs["ssim"] = abs(val.item() - float(ref_val[0]))
    ssim_speedup = _row(rows, "ssim / volume vs fastmri", ours, ref, diffs["ssim"])

    ours, val, ref, ref_val = _time_pair(
        lambda: psnr(t_pred, t_gt, data_range=vmax), lambda: fastmri.evaluate.psnr(gt, pred), reps, warm
    )
    diffs["psnr"] = abs(val.item() - float(ref_val))
    _row(rows, "psnr / volume vs fastmri", ours, ref, diffs["psnr"])

    t_targets, t_preds = torch.from_numpy(targets), torch.from_numpy(preds)
    ref_imgs = [(targets[i].astype(np.float64), preds[i].astype(np.float64)) for i in range(len(targets))]
    ours, val, ref, ref_val = _time_pair(
        lambda: vif(t_preds, t_targets, data_range=255.0),
        lambda: [sewar.full_ref.vifp(a, b, sigma_nsq=2) for a, b in ref_imgs],
        reps,
        warm,
    )
    diffs["vif"] = float(np.max(np.abs(val.numpy() - np.asarray(ref_val))))
    vif_speedup = _row(rows, f"vif / {len(targets)} images vs sewar", ours, ref, diffs["vif"])

    if cfg["vif_volume"]:
        # sewar on (H, W, S) averages over slices, as vif does over (1, S, H, W).
        gt255 = np.moveaxis(gt.astype(np.float64) * (255.0 / vmax), 0, -1)
        pred255 = np.moveaxis(pred.astype(np.float64) * (255.0 / vmax), 0, -1)
        ours, val, ref, ref_val = _time_pair(
            lambda: vif(t_pred, t_gt, data_range=vmax),
            lambda: sewar.full_ref.vifp(gt255, pred255, sigma_nsq=2),
            reps,
            warm,
        )
        diffs["vif/volume"] = abs(val.item() - float(ref_val))
        _row(rows, "vif / volume vs sewar", ours, ref, diffs["vif/volume"])

    _print_table(rows)
    failed = [k for k, d in diffs.items() if not d <= tol]
    for name, speedup in (("ssim", ssim_speedup), ("vif", vif_speedup)):
        goal = float(cfg["goals"][name])
        print(f"{name} goal {goal:.0f}x: {'met' if speedup >= goal else 'NOT met'}")
    print(f"agreement within {tol:g}: {'all' if not failed else 'FAILED for ' + ', '.join(failed)}")
    print(f"ssim speedup vs fastmri.evaluate: {ssim_speedup:.1f}x")
    print(f"vif speedup vs sewar: {vif_speedup:.1f}x")
    return 0 if not failed else 1
