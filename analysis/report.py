"""Spectral reports: ``deqbench report spectral --experiment NAME [--run RUN_ID] --out DIR``.

For each image of an experiment — DEQ-INR and CRR runs grouped by
``data.image``, DE-Prox runs by ``deprox.kind``, each split further by the
params that vary within (solver, acceleration, K, ...; see
:func:`image_labels`), the seed-0 run (the newest if re-run; else the smallest
seed) standing for its group — or for the single run given by ``run_id``, the
report shows:

- the ground truth and the outputs side by side — zero-filled ``A^H y``
  (DE-Prox), the DEQ of stage 1 (CRR), the final output (DEQ+CRR, or the
  model's own) — over their centred log-magnitude spectra with the
  high-frequency energy (HFE) of each;
- residual maps ``|gt - output|`` and significant-residual maps with their share (SR);
- radially averaged power spectra of ground truth, outputs and residuals;
- PSNR and loss against the epoch (MLflow metric history), the epoch where
  ``stage`` changes from 1 to 2 marked;
- the signal characteristics (PSNR, SSIM, HFE, SR per output), one row per image.

Every number is computed with :mod:`suite.metrics` on the run's ``images.pt``
artifact (``ground_truth``, ``reconstruction`` and, when recorded, ``stage1``
(CRR) and ``zero_filled`` (DE-Prox): tensors ``(1, C, H, W)``, ``C`` the slices
of an MRI volume), with the run's own metric settings (params
``eval.hfe_cutoff``, ``eval.hfe_mode``, ``eval.sr_threshold``, resolved from
``eval.preset`` when one was used, which the report names; the metric
defaults when absent), so it equals what the metric module gives on those
images. PSNR/SSIM use the ground truth's range for images and the volume's
maximum for DE-Prox (fastMRI). A run without ``images.pt`` falls back to its
8-bit PNGs (noted); a missing stage-1 image shows as "not recorded".

Without ``run_id`` three sweep-wide figures are added when their data exist
(otherwise listed as skipped): noise robustness (metrics
``noise/<sigma>/psnr|ssim`` by model), solver iterations (``solver/fwd_nstep``
and ``solver/bwd_nstep`` histories by ``deq.solver``) and peak memory against
the number of unrolled iterations K (``mem/peak_mb``; DEQ runs as horizontal
lines).

Outputs in DIR::

    spectral_report.html          self-contained: summary table, then every image and figure
    spectral_report.pdf           summary page, 4 pages per image, 1 page per sweep-wide figure
    signal_characteristics.csv    one row per image, full precision (columns: CHARACTERISTIC_COLUMNS)
    <image>/report.pdf|.html      that image alone (summary row page + its 4 pages)
    <image>/{reconstructions,residuals,radial_spectra,training_curves}.pdf|.png
    {noise_robustness,solver_iterations,memory_vs_k}.pdf|.png

Each image's files are also logged to its run as MLflow artifacts under ``report/``.

Complex convention: images are real (magnitude images for MRI); spectra are
``fft2`` over the last two axes as in :mod:`suite.metrics.spectral`.
"""

from __future__ import annotations

import inspect
import math
import re
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Mapping, Sequence

import numpy as np
import torch

from suite import metrics as M
from suite.families import find_family

if TYPE_CHECKING:  # pragma: no cover
    import pandas as pd
    from matplotlib.figure import Figure

REPORT_KINDS = ("spectral",)
GROUP_KEYS = ("data.image", "data.volume", "data.file", "data.path")
"""Params that name the image a DEQ-INR/CRR run fits; the first present wins."""
SECONDARY_GROUP_KEYS = ("deq.solver", "deq.grad", "model.filter")
"""DEQ-INR/CRR params that also tell runs of one image apart, where they vary."""
MODEL_KEYS = ("deprox.kind", "model.kind", "model.name", "family", "tag.family")
"""Params (and tag) that name a run's model, first non-empty wins."""
SOLVER_KEYS = ("deq.solver", "model.solver")
UNROLL_K_KEYS = ("model.unroll_k", "model.n_iter", "model.k", "unroll.k", "deprox.n_iter", "deprox.unroll_k")
"""Params holding an unrolled network's number of iterations K, first present wins."""
STAGE1_LABEL = "DEQ (stage 1)"
ZERO_FILLED_LABEL = "Zero-filled"
OUTPUTS = ("zero_filled", "stage1", "final")
"""Outputs compared, in column order: the ``A^H y`` baseline (DE-Prox), the frozen DEQ (CRR), the run's output."""
GT_LABEL = "Ground truth"

IMAGE_FIGURES = ("reconstructions", "residuals", "radial_spectra", "training_curves")
"""Per-image figures, in page order."""
EXPERIMENT_FIGURES = ("noise_robustness", "solver_iterations", "memory_vs_k")
CSV_NAME = "signal_characteristics.csv"
HTML_NAME = "spectral_report.html"
PDF_NAME = "spectral_report.pdf"
ARTIFACT_DIR = "report"

_QUANTITIES = ("psnr", "ssim", "hfe", "hfe_residual", "sr")
CHARACTERISTIC_COLUMNS = (
    "image", "run_id", "run_name", "family", "seed", "volume", "slices", "height", "width", "source",
    "hfe_cutoff", "hfe_mode", "sr_threshold", "preset", "hfe_gt", "gain_db",
    *(f"{q}_{o}" for q in _QUANTITIES for o in OUTPUTS),
)
"""Columns of ``signal_characteristics.csv``. ``*_zero_filled``: ``A^H y`` (DE-Prox);
``*_stage1``: the frozen DEQ (CRR); ``*_final``: the run's output; ``hfe_residual_*``:
HFE of ``gt - output``; ``gain_db = psnr_final - psnr_stage1``. PSNR in dB, HFE and
SR in %; NaN where not recorded. ``volume``: the MRI volume's file (DE-Prox).
``preset``: the run's ``eval.preset`` (``none`` when not used or not logged)."""
SUMMARY_COLUMNS = (
    "image", "family", "run_name",
    "psnr_zero_filled", "psnr_stage1", "psnr_final", "gain_db", "hfe_gt", "hfe_zero_filled", "hfe_stage1",
    "hfe_final", "hfe_residual_stage1", "hfe_residual_final", "sr_zero_filled", "sr_stage1", "sr_final",
)
"""The columns shown in the HTML/PDF summary tables, less those empty for every row."""
_ID_COLUMNS = ("image", "family", "run_name")

_NOISE_RE = re.compile(r"^noise/(?P<sigma>[^/]+)/(?P<metric>psnr|ssim)$")
_UNSAFE = re.compile(r"[^A-Za-z0-9._-]+")


# --------------------------------------------------------------------- settings and images


def _default(fn: Any, name: str) -> Any:
    return inspect.signature(fn).parameters[name].default


@dataclass(frozen=True)
class SpectralSettings:
    """The definitions of HFE and SR a run used.

    Attributes:
        hfe_cutoff: disk radius as a fraction of the Nyquist radius.
        hfe_mode: ``"power"`` or ``"magnitude"``.
        sr_threshold: fraction of the ground truth's range.
        preset: the ``eval.preset`` the three values came from, or ``"none"``.
    """

    hfe_cutoff: float = _default(M.hfe, "cutoff")
    hfe_mode: str = _default(M.hfe, "mode")
    sr_threshold: float = _default(M.significant_residuals, "threshold")
    preset: str = "none"

    @classmethod
    def from_params(cls, params: Mapping[str, Any]) -> "SpectralSettings":
        """From a run's params (``eval.hfe_cutoff``, ...); defaults where absent or empty."""
        def get(key: str, default: Any, cast: Any) -> Any:
            value = params.get(key)
            if value is None or (isinstance(value, float) and math.isnan(value)) or value == "":
                return default
            return cast(value)

        base = cls()
        return cls(
            hfe_cutoff=get("eval.hfe_cutoff", base.hfe_cutoff, float),
            hfe_mode=get("eval.hfe_mode", base.hfe_mode, str),
            sr_threshold=get("eval.sr_threshold", base.sr_threshold, float),
            preset=get("eval.preset", base.preset, str),
        )


@dataclass
class RunImages:
    """A run's images, all ``(1, C, H, W)`` real tensors of one shape.

    Attributes:
        ground_truth: the target.
        final: the run's output (``images.pt["reconstruction"]``).
        stage1: the frozen DEQ's output for CRR (``images.pt["stage1"]``), or None.
        source: ``"images.pt"`` or ``"8-bit PNG"``.
        zero_filled: the ``A^H y`` baseline for DE-Prox (``images.pt["zero_filled"]``), or None.
        volume: the MRI volume these slices come from (``images.pt["volume"]``), or None.
    """

    ground_truth: torch.Tensor
    final: torch.Tensor
    stage1: torch.Tensor | None = None
    source: str = "images.pt"
    zero_filled: torch.Tensor | None = None
    volume: str | None = None

    def output(self, name: str) -> torch.Tensor | None:
        """One of :data:`OUTPUTS` by name."""
        return {"zero_filled": self.zero_filled, "stage1": self.stage1, "final": self.final}[name]


def _as_4d(x: torch.Tensor, name: str) -> torch.Tensor:
    """``(H, W)``, ``(C, H, W)`` or ``(1, C, H, W)`` as ``(1, C, H, W)``."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"images.pt[{name!r}] must be a tensor, got {type(x).__name__}")
    if x.is_complex():
        raise TypeError(f"images.pt[{name!r}] must be real (a magnitude image), got {x.dtype}")
    while x.ndim < 4:
        x = x.unsqueeze(0)
    if x.ndim != 4 or x.shape[0] != 1:
        raise ValueError(f"images.pt[{name!r}] must be (1, C, H, W), got shape {tuple(x.shape)}")
    return x.detach().cpu()


def images_from_dict(data: Mapping[str, Any], source: str = "images.pt") -> RunImages:
    """:class:`RunImages` from the ``images.pt`` dictionary.

    Args:
        data: ``{"ground_truth", "reconstruction"[, "stage1"][, "zero_filled"]}`` tensors
            ``(1, C, H, W)`` (``C`` slices of a volume), optionally ``"volume"`` (a name).
        source: where they came from (shown in the report).

    Raises:
        ValueError: a required key is missing or the shapes differ.
    """
    missing = [k for k in ("ground_truth", "reconstruction") if k not in data]
    if missing:
        raise ValueError(f"images.pt lacks {missing}; it has {sorted(data)}")
    gt = _as_4d(data["ground_truth"], "ground_truth")
    final = _as_4d(data["reconstruction"], "reconstruction")
    stage1 = _as_4d(data["stage1"], "stage1") if data.get("stage1") is not None else None
    zf = _as_4d(data["zero_filled"], "zero_filled") if data.get("zero_filled") is not None else None
    for name, x in (("reconstruction", final), ("stage1", stage1), ("zero_filled", zf)):
        if x is not None and x.shape != gt.shape:
            raise ValueError(f"images.pt[{name!r}] has shape {tuple(x.shape)}, ground truth {tuple(gt.shape)}")
    volume = data.get("volume")
    return RunImages(gt, final, stage1, source, zf, None if volume is None else str(volume))


def _read_png(path: Path) -> torch.Tensor:
    import skimage.io

    arr = np.asarray(skimage.io.imread(path), dtype=np.float32)
    if arr.ndim == 3:  # RGB(A) written by someone else: luminance
        arr = arr[..., :3].mean(axis=-1)
    return torch.from_numpy(arr / 255.0)[None, None]


def load_run_images(client: Any, run_id: str) -> tuple[RunImages | None, list[str]]:
    """Downloads a run's images: ``images.pt``, else its PNGs.

    Args:
        client: an ``MlflowClient``.
        run_id: the run.

    Returns:
        ``(images or None, notes)``; notes say what was missing or substituted.
    """
    notes: list[str] = []
    try:
        names = {Path(f.path).name for f in client.list_artifacts(run_id)}
    except Exception as err:  # unreachable artifact store: report without images
        return None, [f"artifacts of run {run_id} could not be listed: {err}"]
    with tempfile.TemporaryDirectory(prefix="deqbench-report-") as tmp:
        if "images.pt" in names:
            path = Path(client.download_artifacts(run_id, "images.pt", tmp))
            data = torch.load(path, map_location="cpu", weights_only=True)
            images = images_from_dict(data)
            if images.stage1 is None and "stage1.png" in names:
                images.stage1 = _read_png(Path(client.download_artifacts(run_id, "stage1.png", tmp)))
                notes.append("stage-1 image read from the 8-bit stage1.png (images.pt has no 'stage1')")
            return images, notes
        if {"ground_truth.png", "reconstruction.png"} <= names:
            png = {n: _read_png(Path(client.download_artifacts(run_id, n, tmp)))
                   for n in ("ground_truth.png", "reconstruction.png", "stage1.png") if n in names}
            notes.append("images.pt not recorded: values computed on the 8-bit PNGs (differ from logged metrics)")
            return RunImages(png["ground_truth.png"], png["reconstruction.png"], png.get("stage1.png"),
                             "8-bit PNG"), notes
    return None, [f"run {run_id} recorded no images (neither images.pt nor ground_truth.png/reconstruction.png)"]


# --------------------------------------------------------------------- numbers


def _data_range(family: str | None, gt: torch.Tensor) -> torch.Tensor | None:
    """The family's data range (:attr:`suite.families.Family.data_range`, e.g. a volume's maximum), else None."""
    fam = find_family(family)
    return fam.data_range(gt) if fam is not None and fam.data_range is not None else None


def significant_residual_mask(pred: torch.Tensor, target: torch.Tensor, threshold: float) -> torch.Tensor:
    """Pixels counted by :func:`suite.metrics.significant_residuals`.

    ``|target - pred| > threshold * (max - min of target)`` per sample, in the
    same dtype arithmetic, so ``100 * mask.mean()`` equals the SR share.

    Args:
        pred: ``(B, C, H, W)``.
        target: ``(B, C, H, W)``.
        threshold: fraction of the target's range.

    Returns:
        ``(B, C, H, W)`` boolean.
    """
    dtype = torch.float64 if torch.float64 in (pred.dtype, target.dtype) else torch.float32
    flat = target.reshape(target.shape[0], -1)
    bound = (threshold * (flat.amax(dim=1) - flat.amin(dim=1)).to(torch.float64)).to(dtype)
    return (target.to(dtype) - pred).abs() > bound.view(-1, 1, 1, 1)


def signal_characteristics(
    images: RunImages, settings: SpectralSettings, family: str | None = None
) -> dict[str, float]:
    """PSNR, SSIM, HFE and SR of each output, and HFE of the ground truth and residuals.

    All by :mod:`suite.metrics` with ``settings``; PSNR/SSIM use the ground
    truth's range, or the family's own (:attr:`suite.families.Family.data_range`:
    a volume's maximum for DE-Prox).

    Args:
        images: the run's images ``(1, C, H, W)``.
        settings: HFE/SR definitions.
        family: the run's family.

    Returns:
        Keys ``hfe_gt`` and, for each of :data:`OUTPUTS`: ``psnr_*``, ``ssim_*``,
        ``hfe_*``, ``hfe_residual_*``, ``sr_*`` (NaN where the output is missing),
        and ``gain_db = psnr_final - psnr_stage1``.
    """
    gt = images.ground_truth
    hfe_kw = {"cutoff": settings.hfe_cutoff, "mode": settings.hfe_mode}
    out = {"hfe_gt": float(M.hfe(gt, **hfe_kw)[0])}
    rng = _data_range(family, gt)
    for name in OUTPUTS:
        pred = images.output(name)
        if pred is None:
            for k in _QUANTITIES:
                out[f"{k}_{name}"] = math.nan
            continue
        out[f"psnr_{name}"] = float(M.psnr(pred, gt, data_range=rng)[0])
        out[f"ssim_{name}"] = float(M.ssim(pred, gt, data_range=rng)[0]) if min(gt.shape[-2:]) >= 7 else math.nan
        out[f"hfe_{name}"] = float(M.hfe(pred, **hfe_kw)[0])
        out[f"hfe_residual_{name}"] = float(M.hfe(gt - pred, **hfe_kw)[0])
        out[f"sr_{name}"] = float(M.significant_residuals(pred, gt, threshold=settings.sr_threshold)[0])
    out["gain_db"] = out["psnr_final"] - out["psnr_stage1"]
    return out


def metric_history(client: Any, run_id: str, key: str) -> list[tuple[int, float]]:
    """``(step, value)`` of one metric, by step (the newest value where a step repeats)."""
    by_step: dict[int, tuple[int, float]] = {}
    for m in client.get_metric_history(run_id, key):
        if m.step not in by_step or m.timestamp >= by_step[m.step][0]:
            by_step[m.step] = (m.timestamp, float(m.value))
    return [(s, by_step[s][1]) for s in sorted(by_step)]


def stage_boundaries(stage: Sequence[tuple[int, float]]) -> list[int]:
    """Epochs at which the logged ``stage`` changes: the first epoch of each new stage.

    Args:
        stage: ``(epoch, stage)`` history, any order.

    Returns:
        Sorted epochs whose stage differs from the previous logged epoch's.
    """
    ordered = sorted(stage)
    return [s for (_, prev), (s, cur) in zip(ordered, ordered[1:]) if cur != prev]


# --------------------------------------------------------------------- run selection


def _present(value: Any) -> bool:
    """False for None, NaN, NaT and pd.NA (what a missing param or metric reads as)."""
    import pandas as pd

    if value is None:
        return False
    na = pd.isna(value)
    return not (np.ndim(na) == 0 and bool(na))


def _first(row: Mapping[str, Any], keys: Sequence[str]) -> Any:
    return next((row[k] for k in keys if k in row and _present(row[k]) and str(row[k]) != ""), None)


def family_of(row: Mapping[str, Any]) -> str | None:
    """A run's family (param ``family``, else tag ``family``)."""
    value = _first(row, ("family", "tag.family"))
    return None if value is None else str(value)


def group_keys(family: str | None, columns: Sequence[str]) -> tuple[str, ...]:
    """The params that say what a run of ``family`` reconstructs, the naming one first.

    Args:
        family: the run's family.
        columns: the columns of the runs table.

    Returns:
        the family's :attr:`~suite.families.Family.group_keys`, or else the first of
        :data:`GROUP_KEYS` then :data:`SECONDARY_GROUP_KEYS`; only those present
        in ``columns``; empty when the naming one is absent.
    """
    fam = find_family(family)
    if fam is not None and fam.group_keys:
        keys = fam.group_keys
    else:
        first = next((k for k in GROUP_KEYS if k in columns), None)
        keys = (first, *SECONDARY_GROUP_KEYS) if first else ()
    if not keys or keys[0] not in columns:
        return ()
    return tuple(k for k in keys if k in columns)


def image_labels(runs: "pd.DataFrame") -> list[str]:
    """What each run reconstructs, as a label; runs with one label form one group.

    The value of the family's naming param — the image (``data.image``) for
    DEQ-INR and CRR, the model kind (``deprox.kind``) for DE-Prox — followed by
    ``name=value`` for each other group param (:func:`group_keys`) that varies
    among the experiment's runs of that family and naming value: ``camera``,
    ``camera, solver=anderson``, ``deq, acceleration=4``, ``unrolled, unroll_k=5``.
    A run without the naming param is ``run-<id prefix>``. When the experiment
    mixes families the family is appended, e.g. ``camera (deq_inr)``.

    Args:
        runs: wide table of :func:`analysis.runs.load_runs`.

    Returns:
        One label per row.
    """
    records = runs.to_dict("records")
    families = [family_of(r) for r in records]
    columns = list(runs.columns)
    labels = []
    for rec, fam in zip(records, families):
        keys = group_keys(fam, columns)
        if not keys or not _present(rec.get(keys[0])):
            labels.append(f"run-{str(rec['run_id'])[:8]}")
            continue
        name = str(rec[keys[0]])
        same = [r for r, f in zip(records, families) if f == fam and str(r.get(keys[0])) == name]
        varying = [k for k in keys[1:] if len({str(r.get(k)) for r in same}) > 1]
        labels.append(name + "".join(f", {k.rsplit('.', 1)[-1]}={rec.get(k)}" for k in varying))
    if len(set(families)) > 1:
        labels = [f"{lab} ({fam})" for lab, fam in zip(labels, families)]
    return labels


def model_label(row: Mapping[str, Any]) -> str:
    """A run's model: the first of :data:`MODEL_KEYS` it has, else ``"unknown"``."""
    value = _first(row, MODEL_KEYS)
    return "unknown" if value is None else str(value)


def _seed_order(seed: Any) -> tuple[int, float]:
    """Sort key of a seed: numeric seeds first, smallest first; missing ones last."""
    try:
        return (0, float(seed)) if _present(seed) else (1, 0.0)
    except (TypeError, ValueError):
        return (1, 0.0)


def representative_runs(runs: "pd.DataFrame") -> "pd.DataFrame":
    """One run per image (label of :func:`image_labels`): the seed-0 run.

    Where a group has no seed 0, its smallest seed stands in; where a seed was
    run more than once (a re-run), the newest run counts, as in
    :mod:`analysis.table`.

    Args:
        runs: wide table of :func:`analysis.runs.load_runs` (FINISHED runs).

    Returns:
        The chosen rows, ordered by label, with an added ``image`` column.
    """
    df = runs.assign(image=image_labels(runs))
    chosen = []
    for _, part in df.groupby("image", sort=True):
        seeds = part["seed"] if "seed" in part.columns else [None] * len(part)
        starts = part["start_time"] if "start_time" in part.columns else [None] * len(part)
        order = sorted(
            zip(part.index, seeds, starts),
            key=lambda t: (_seed_order(t[1]), -(t[2].value if _present(t[2]) else 0)),
        )
        chosen.append(order[0][0])
    return df.loc[chosen].reset_index(drop=True)


# --------------------------------------------------------------------- sweep-wide tables


def _is_unrolled(label: str) -> bool:
    return "unroll" in label.lower()


def _is_baseline(label: str) -> bool:
    low = label.lower()
    return "zero" in low or low in ("zf", "adjoint")


def noise_table(runs: "pd.DataFrame") -> "pd.DataFrame":
    """Noise-robustness values in long form.

    Args:
        runs: wide table (FINISHED runs); metrics ``noise/<sigma>/psnr`` and ``noise/<sigma>/ssim``.

    Returns:
        Columns ``model``, ``run_id``, ``sigma`` (float), ``metric``, ``value``;
        one row per run and logged metric (empty when none). ``model`` is the
        run's :func:`image_labels` label (its configuration less the seed, e.g.
        ``deq, acceleration=4`` or ``unrolled, unroll_k=5``), so seeds average and
        configurations do not.
    """
    import pandas as pd

    cols = [(c, _NOISE_RE.match(c)) for c in runs.columns]
    rows = []
    for rec, label in zip(runs.to_dict("records"), image_labels(runs)):
        for col, m in cols:
            if m is None or not _present(rec[col]):
                continue
            try:
                sigma = float(m["sigma"])
            except ValueError:
                continue
            rows.append({"model": label, "run_id": rec["run_id"], "sigma": sigma,
                         "metric": m["metric"], "value": float(rec[col])})
    return pd.DataFrame(rows, columns=["model", "run_id", "sigma", "metric", "value"])


def solver_table(runs: "pd.DataFrame", client: Any) -> "pd.DataFrame":
    """Per-epoch solver iterations of every DEQ run, in long form.

    Unrolled and zero-filled runs are left out (their "iterations" are fixed).

    Args:
        runs: wide table (FINISHED runs).
        client: an ``MlflowClient`` (histories of ``solver/fwd_nstep`` and ``solver/bwd_nstep``).

    Returns:
        Columns ``solver``, ``direction`` (``forward``/``backward``), ``run_id``,
        ``step``, ``nstep``; one row per logged epoch.
    """
    import pandas as pd

    rows = []
    for rec in runs.to_dict("records"):
        label = model_label(rec)
        if _is_unrolled(label) or _is_baseline(label):
            continue
        solver = _first(rec, SOLVER_KEYS)
        for key, direction in (("solver/fwd_nstep", "forward"), ("solver/bwd_nstep", "backward")):
            if key not in rec or not _present(rec[key]):
                continue
            for step, value in metric_history(client, rec["run_id"], key):
                rows.append({"solver": "unknown" if solver is None else str(solver), "direction": direction,
                             "run_id": rec["run_id"], "step": step, "nstep": value})
    return pd.DataFrame(rows, columns=["solver", "direction", "run_id", "step", "nstep"])


def memory_tables(runs: "pd.DataFrame") -> tuple["pd.DataFrame", "pd.DataFrame"]:
    """Peak memory of unrolled runs by K, and of the DEQ runs of the same families.

    Args:
        runs: wide table (FINISHED runs) with ``mem/peak_mb``.

    Returns:
        ``(unrolled, deq)``: ``unrolled`` has ``model``, ``k``, ``mem_mb``,
        ``run_id`` (runs whose model names "unroll" and that have a K param,
        :data:`UNROLL_K_KEYS`); ``deq`` has ``model``, ``mem_mb``, ``run_id``
        (other non-baseline runs of a family that has unrolled runs).
    """
    import pandas as pd

    unrolled, deq = [], []
    if "mem/peak_mb" in runs.columns:
        records = [r for r in runs.to_dict("records") if _present(r["mem/peak_mb"])]
        for rec in records:
            label = model_label(rec)
            k = _first(rec, UNROLL_K_KEYS)
            if _is_unrolled(label) and k is not None:
                unrolled.append({"model": label, "k": int(k), "mem_mb": float(rec["mem/peak_mb"]),
                                 "run_id": rec["run_id"], "family": _first(rec, ("family", "tag.family"))})
        families = {u["family"] for u in unrolled}
        for rec in records:
            label = model_label(rec)
            family = _first(rec, ("family", "tag.family"))
            if not _is_unrolled(label) and not _is_baseline(label) and family in families:
                deq.append({"model": label, "mem_mb": float(rec["mem/peak_mb"]), "run_id": rec["run_id"]})
    return (pd.DataFrame(unrolled, columns=["model", "k", "mem_mb", "run_id"]),
            pd.DataFrame(deq, columns=["model", "mem_mb", "run_id"]))


def experiment_figures(runs: "pd.DataFrame", client: Any) -> tuple[dict[str, "Figure"], list[str]]:
    """The sweep-wide figures whose data exist, and what was skipped (with why).

    Returns:
        ``({name: figure}, skipped)``, names from :data:`EXPERIMENT_FIGURES`.
    """
    from analysis import figures as F

    figs: dict[str, Figure] = {}
    skipped: list[str] = []
    noise = noise_table(runs)
    if len(noise):
        figs["noise_robustness"] = F.noise_figure(noise)
    else:
        skipped.append("noise_robustness: no run logged noise/<sigma>/psnr or noise/<sigma>/ssim")
    solver = solver_table(runs, client)
    if len(solver):
        figs["solver_iterations"] = F.solver_figure(solver)
    else:
        skipped.append("solver_iterations: no DEQ run logged solver/fwd_nstep")
    unrolled, deq = memory_tables(runs)
    if len(unrolled):
        figs["memory_vs_k"] = F.memory_figure(unrolled, deq)
    else:
        skipped.append(f"memory_vs_k: no unrolled run with mem/peak_mb and a K param ({', '.join(UNROLL_K_KEYS)})")
    return figs, skipped


# --------------------------------------------------------------------- per-image figures


def _plane(x: torch.Tensor | None) -> np.ndarray | None:
    """The middle ``(H, W)`` plane of ``(1, C, H, W)`` as float64 numpy."""
    if x is None:
        return None
    return x[0, x.shape[1] // 2].to(torch.float64).numpy()


def output_columns(
    images: RunImages | None, family: str | None, model: str
) -> list[tuple[str, str, torch.Tensor | None]]:
    """The outputs to compare, ``(key, label, (1, C, H, W) or None)``, ground truth excluded.

    In order: ``Zero-filled`` when ``images.pt`` has the ``A^H y`` baseline and the
    model is not that baseline itself (DE-Prox); ``DEQ (stage 1)`` for CRR (or any
    run with a stage-1 image), kept as "not recorded" when missing; the run's
    output, labelled ``DEQ+CRR`` (CRR), ``DEQ`` (DEQ-INR) or its model label.
    ``key`` is one of :data:`OUTPUTS`.
    """
    fam = find_family(family)
    final_label = (fam.final_label if fam is not None else "") or model
    cols: list[tuple[str, str, torch.Tensor | None]] = []
    if images is not None and images.zero_filled is not None and not _is_baseline(model):
        cols.append(("zero_filled", ZERO_FILLED_LABEL, images.zero_filled))
    stage1 = images.stage1 if images is not None else None
    if (fam is not None and fam.stage1) or stage1 is not None:
        cols.append(("stage1", STAGE1_LABEL, stage1))
    cols.append(("final", final_label, images.final if images is not None else None))
    return cols


def image_figures(
    images: RunImages | None,
    chars: Mapping[str, float],
    settings: SpectralSettings,
    family: str | None,
    model: str,
    histories: Mapping[str, Sequence[tuple[int, float]]],
    stage1_psnr: float = math.nan,
    title: str = "",
) -> dict[str, "Figure"]:
    """The four per-image figures (:data:`IMAGE_FIGURES`).

    Args:
        images: the run's images or None (panels then say "not recorded").
        chars: :func:`signal_characteristics` of ``images`` (shown in titles).
        settings: HFE/SR definitions (cut-off circle, SR threshold).
        family: the run's family.
        model: the run's model label.
        histories: ``psnr``, ``loss`` and ``stage`` metric histories.
        stage1_psnr: logged ``stage1/psnr`` (horizontal line), NaN if absent.
        title: prefix of every figure title.

    Returns:
        ``{name: figure}`` in :data:`IMAGE_FIGURES` order.
    """
    from analysis import figures as F

    cols = output_columns(images, family, model)
    gt = images.ground_truth if images is not None else None
    panels = [F.ImagePanel(GT_LABEL, _plane(gt), chars.get("hfe_gt", math.nan))]
    residuals, curves = [], {}
    if gt is not None:
        h, w = gt.shape[-2:]
        freq = M.radial_frequencies(h, w).numpy()
        curves[GT_LABEL] = (freq, M.radial_power_spectrum(gt)[0].numpy())
    for key, label, pred in cols:
        panels.append(F.ImagePanel(label, _plane(pred), chars.get(f"hfe_{key}", math.nan),
                                   chars.get(f"psnr_{key}", math.nan)))
        if pred is None or gt is None:
            residuals.append(F.ResidualPanel(label, None, None))
            continue
        resid = M.residual_map(pred, gt)
        mask = significant_residual_mask(pred, gt, settings.sr_threshold)
        residuals.append(F.ResidualPanel(label, _plane(resid), _plane(mask.to(torch.float64)) > 0.5,
                                         chars.get(f"sr_{key}", math.nan)))
        curves[label] = (freq, M.radial_power_spectrum(pred)[0].numpy())
    for _, label, pred in cols:
        if pred is not None and gt is not None:
            curves[f"residual {label}"] = (freq, M.radial_power_spectrum(gt - pred)[0].numpy())
    psnr_hist = list(histories.get("psnr", ()))
    stage = list(histories.get("stage", ()))
    if stage:  # the final value is logged one step after the last epoch: keep the epochs
        last = max(s for s, _ in stage)
        psnr_hist = [(s, v) for s, v in psnr_hist if s <= last]
    head = f"{title}: " if title else ""
    return {
        "reconstructions": F.reconstruction_figure(panels, settings.hfe_cutoff, f"{head}reconstructions and spectra"),
        "residuals": F.residual_figure(residuals, settings.sr_threshold, f"{head}residuals"),
        "radial_spectra": F.radial_spectrum_figure(curves, f"{head}radially averaged power spectra"),
        "training_curves": F.training_curves_figure(psnr_hist, list(histories.get("loss", ())),
                                                    stage_boundaries(stage), stage1_psnr, f"{head}training"),
    }


# --------------------------------------------------------------------- the report


@dataclass
class ImageReport:
    """What was made for one image.

    Attributes:
        image: the image label (``data.image``).
        run_id: the representative run.
        directory: ``DIR/<image>``.
        characteristics: its row of ``signal_characteristics.csv``.
        files: figures (PDF, PNG) and the image's ``report.pdf``/``report.html``.
        notes: what was missing or substituted.
        logged: artifact paths logged to the run (``report/<name>``).
        pdf_pages: pages of ``report.pdf``.
    """

    image: str
    run_id: str
    directory: Path
    characteristics: dict[str, Any]
    files: list[Path] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    logged: list[str] = field(default_factory=list)
    pdf_pages: int = 0


@dataclass
class SpectralReport:
    """Where a spectral report went.

    Attributes:
        out: the output directory.
        html: ``spectral_report.html``.
        pdf: ``spectral_report.pdf``.
        csv: ``signal_characteristics.csv``.
        images: one entry per image.
        experiment_files: the sweep-wide figures written (PDF, PNG).
        skipped: figures not made, with the reason.
        pdf_pages: pages of ``spectral_report.pdf``.
    """

    out: Path
    html: Path
    pdf: Path
    csv: Path
    images: list[ImageReport]
    experiment_files: list[Path]
    skipped: list[str]
    pdf_pages: int = 0

    def paths(self) -> list[Path]:
        """Every file written: HTML, PDF, CSV, then per image, then sweep-wide figures."""
        out = [self.html, self.pdf, self.csv]
        for im in self.images:
            out += im.files
        return out + self.experiment_files


def _safe_dir(label: str, taken: set[str]) -> str:
    name = _UNSAFE.sub("_", label).strip("._") or "image"
    base, i = name, 2
    while name in taken:
        name, i = f"{base}_{i}", i + 1
    taken.add(name)
    return name


def _summary(chars: Sequence[Mapping[str, Any]]) -> "pd.DataFrame":
    """The signal-characteristics table, one row per image, :data:`CHARACTERISTIC_COLUMNS`."""
    import pandas as pd

    return pd.DataFrame(list(chars), columns=list(CHARACTERISTIC_COLUMNS))


def shown_columns(summary: "pd.DataFrame") -> list[str]:
    """:data:`SUMMARY_COLUMNS` less the value columns that are empty in every row."""
    return [c for c in SUMMARY_COLUMNS if c in _ID_COLUMNS or summary[c].notna().any()]


def _settings_note(df: "pd.DataFrame") -> str:
    def preset(r: Any) -> str:
        name = getattr(r, "preset", "none")
        return "" if not isinstance(name, str) or name in ("", "none") else f"; preset {name}"

    parts = sorted({f"HFE outside {r.hfe_cutoff:g} x Nyquist ({r.hfe_mode}{preset(r)}), "
                    f"SR > {100 * r.sr_threshold:g} % of range" for r in df.itertuples()})
    return "Definitions: " + "; ".join(parts) + ". PSNR in dB, HFE and SR in %. " \
        "'stage1' = frozen DEQ (CRR stage 1), 'final' = the run's output, 'residual' = gt - output."


def _check_logged(chars: Mapping[str, float], metrics: Mapping[str, Any], source: str) -> list[str]:
    """Notes where the recomputed final values differ from the run's logged ones."""
    notes = []
    for logged, mine in (("psnr", "psnr_final"), ("hfe", "hfe_final"), ("sr", "sr_final"),
                         ("stage1/psnr", "psnr_stage1")):
        a, b = metrics.get(logged), chars.get(mine)
        if a is None or b is None or not _present(a) or math.isnan(b):
            continue
        if not math.isclose(float(a), b, rel_tol=1e-6, abs_tol=1e-9):
            notes.append(f"logged {logged} = {float(a):.6g} but recomputed on the {source} images = {b:.6g}")
    return notes


def _select_runs(runs: "pd.DataFrame", experiment: str, run_id: str | None) -> "pd.DataFrame":
    """The runs to report on, with an ``image`` column: ``run_id`` alone, or one per image."""
    if run_id is not None:
        labelled = runs.assign(image=image_labels(runs))
        chosen = labelled[labelled["run_id"] == run_id].reset_index(drop=True)
        if chosen.empty:
            ids = ", ".join(runs["run_id"].head(10))
            raise ValueError(f"run {run_id!r} is not in experiment {experiment!r}; its runs include: {ids or 'none'}")
        return chosen
    if runs.empty:
        raise ValueError(f"experiment {experiment!r} has no FINISHED run to report on")
    return representative_runs(runs)


def _image_report(
    client: Any, rec: Mapping[str, Any], directory: Path, png_dpi: int
) -> tuple[ImageReport, dict[str, "Figure"]]:
    """Numbers and figures of one image's run; the figures are saved (PDF, PNG) in ``directory``."""
    from analysis import figures as F

    rid = str(rec["run_id"])
    family = family_of(rec)
    settings = SpectralSettings.from_params(rec)
    images, notes = load_run_images(client, rid)
    if rec.get("status") not in (None, "FINISHED"):
        notes.append(f"run status is {rec['status']}")
    chars: dict[str, Any] = {
        "image": rec["image"], "run_id": rid, "run_name": rec.get("run_name"), "family": family,
        "seed": rec.get("seed") if _present(rec.get("seed")) else None,
        "volume": images.volume if images else None,
        "slices": int(images.ground_truth.shape[1]) if images else None,
        "height": int(images.ground_truth.shape[-2]) if images else None,
        "width": int(images.ground_truth.shape[-1]) if images else None,
        "source": images.source if images else "not recorded",
        "hfe_cutoff": settings.hfe_cutoff, "hfe_mode": settings.hfe_mode, "sr_threshold": settings.sr_threshold,
        "preset": settings.preset,
    }
    values = signal_characteristics(images, settings, family) if images else {}
    chars.update({c: values.get(c, math.nan) for c in CHARACTERISTIC_COLUMNS if c not in chars})
    if images is not None and images.volume is not None:
        notes.append(f"values are for validation volume {images.volume} (the middle slice is shown); "
                     "the run's logged metrics average all its validation volumes")
    elif images is not None:
        notes += _check_logged(chars, rec, images.source)
    if images is not None:
        fam = find_family(family)
        if images.stage1 is None and fam is not None and fam.stage1:
            notes.append("stage-1 (DEQ) reconstruction not recorded: stage-1 panels are empty")
    histories = {k: metric_history(client, rid, k) for k in ("psnr", "loss", "stage")}
    stage1_psnr = float(rec["stage1/psnr"]) if _present(rec.get("stage1/psnr")) else math.nan
    figs = image_figures(images, chars, settings, family, model_label(rec), histories, stage1_psnr,
                         title=rec["image"])
    rep = ImageReport(rec["image"], rid, directory, chars, notes=notes)
    for name, fig in figs.items():
        rep.files += F.save_figure(fig, directory / name, dpi=png_dpi)
    return rep, figs


def _image_section(rep: ImageReport, names: Sequence[str]) -> list[str]:
    """HTML fragments of one image: heading, notes, its figures (the PNGs already written)."""
    from analysis import html as H

    parts = [H.heading(f"{rep.image} — run {rep.characteristics['run_name'] or ''} ({rep.run_id})", 2,
                       anchor=rep.directory.name), H.bullet_list(rep.notes)]
    return parts + [H.figure(rep.directory / f"{n}.png", caption=n.replace("_", " "), name=n) for n in names]


def _write_pdf(path: Path, pages: Sequence["Figure"]) -> int:
    """A multi-page vector PDF, one figure per page; returns the page count."""
    from matplotlib.backends.backend_pdf import PdfPages

    with PdfPages(path) as pdf:
        for fig in pages:
            pdf.savefig(fig)
        return pdf.get_pagecount()


def _log_files(client: Any, rep: ImageReport) -> None:
    """Logs an image's files to its run under :data:`ARTIFACT_DIR`; a failure becomes a note."""
    for path in rep.files:
        try:
            client.log_artifact(rep.run_id, str(path), ARTIFACT_DIR)
        except Exception as err:  # a read-only or unreachable store: the files are still on disk
            rep.notes.append(f"could not log {path.name} to run {rep.run_id}: {err}")
            return
        rep.logged.append(f"{ARTIFACT_DIR}/{path.name}")


def spectral_report(
    experiment: str,
    out: str | Path,
    run_id: str | None = None,
    tracking_uri: str | None = None,
    log_artifacts: bool = True,
    png_dpi: int = 150,
) -> SpectralReport:
    """Writes the spectral report of an experiment (see the module docstring).

    Args:
        experiment: MLflow experiment (sweep) name.
        out: output directory (created).
        run_id: report on this run only (any status); default one
            representative FINISHED run per image and the sweep-wide figures.
        tracking_uri: MLflow store (default ``MLFLOW_TRACKING_URI``, else ``sqlite:///mlflow.db``).
        log_artifacts: also log each image's files to its run under ``report/``.
        png_dpi: resolution of the PNG figures (also the ones embedded in the HTML).

    Returns:
        Where everything went.

    Raises:
        ValueError: unknown experiment or store, a run id not in the experiment,
            or an experiment without FINISHED runs.
    """
    from mlflow.tracking import MlflowClient

    from analysis import figures as F
    from analysis import html as H
    from analysis.runs import load_runs, resolve_tracking_uri

    uri = resolve_tracking_uri(tracking_uri)
    out = Path(out).absolute()
    runs = load_runs(experiment, tracking_uri=uri, include_unfinished=run_id is not None)
    chosen = _select_runs(runs, experiment, run_id)
    client = MlflowClient(tracking_uri=uri)
    out.mkdir(parents=True, exist_ok=True)

    taken: set[str] = set()
    made = [_image_report(client, rec, out / _safe_dir(rec["image"], taken), png_dpi)
            for rec in chosen.to_dict("records")]
    summary = _summary([rep.characteristics for rep, _ in made])
    csv_path = out / CSV_NAME
    summary.to_csv(csv_path, index=False, float_format="%.17g")
    shown = summary[shown_columns(summary)]
    definitions = _settings_note(summary)

    if run_id is None:
        exp_figs, skipped = experiment_figures(runs, client)
    else:
        exp_figs, skipped = {}, [f"{n}: not made for a single run (--run)" for n in EXPERIMENT_FIGURES]
    exp_files = [p for name, fig in exp_figs.items() for p in F.save_figure(fig, out / name, dpi=png_dpi)]

    sections = []
    for rep, figs in made:  # each image alone: report.pdf and report.html, logged to its run
        sections.append(_image_section(rep, list(figs)))
        row = _summary([rep.characteristics])
        row = row[shown_columns(row)]
        table_page = F.table_figure(row, f"{experiment}: {rep.image}", notes=[definitions, *rep.notes])
        rep.pdf_pages = _write_pdf(rep.directory / "report.pdf", [table_page, *figs.values()])
        html_path = H.write(rep.directory / "report.html", f"Spectral report: {experiment} / {rep.image}",
                            [H.table(row, table_id="summary"), H.paragraph(definitions, "note"), *sections[-1]])
        rep.files += [rep.directory / "report.pdf", html_path]
        if log_artifacts:
            _log_files(client, rep)

    title = f"Spectral report: {experiment}"
    table_page = F.table_figure(shown, f"{title} — signal characteristics",
                                notes=[definitions, *(f"skipped {s}" for s in skipped)])
    pages = [table_page, *(fig for _, figs in made for fig in figs.values()), *exp_figs.values()]
    pdf_path = out / PDF_NAME
    n_pages = _write_pdf(pdf_path, pages)

    parts = [H.heading("Signal characteristics", 2), H.table(shown, table_id="summary"),
             H.paragraph(f"{definitions} Full precision: {CSV_NAME}.", "note")]
    parts += [p for section in sections for p in section]
    if exp_figs or skipped:
        parts.append(H.heading("Across runs", 2))
        parts += [H.figure(out / f"{n}.png", caption=n.replace("_", " "), name=n) for n in exp_figs]
        if skipped:
            parts += [H.paragraph("Not made:", "note"), H.bullet_list(skipped)]
    html_path = H.write(out / HTML_NAME, title, parts)
    return SpectralReport(out, html_path, pdf_path, csv_path, [rep for rep, _ in made], exp_files, skipped, n_pages)


def report_command(
    kind: str,
    experiment: str,
    out: str | Path,
    run_id: str | None = None,
    tracking_uri: str | None = None,
) -> list[Path]:
    """``deqbench report KIND``: writes the report and says where it went.

    Prints the figures that were skipped and the MLflow runs the per-image
    files were logged to.

    Args:
        kind: report kind, one of :data:`REPORT_KINDS`.
        experiment: MLflow experiment (sweep) name.
        out: output directory.
        run_id: one run only (see :func:`spectral_report`).
        tracking_uri: MLflow store.

    Returns:
        Every file written (:meth:`SpectralReport.paths`).

    Raises:
        ValueError: unknown ``kind``, besides :func:`spectral_report`'s cases.
    """
    if kind not in REPORT_KINDS:
        raise ValueError(f"unknown report kind {kind!r}; choose one of {list(REPORT_KINDS)}")
    rep = spectral_report(experiment, out, run_id=run_id, tracking_uri=tracking_uri)
    for s in rep.skipped:
        print(f"skipped {s}")
    for im in rep.images:
        if im.logged:
            print(f"{im.image}: {len(im.logged)} files logged to MLflow run {im.run_id} under {ARTIFACT_DIR}/")
        for note in im.notes:
            print(f"{im.image}: {note}")
    return rep.paths()
