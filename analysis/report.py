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

Layout: this module writes the report; what it computes on one run's images
is :mod:`analysis.run_images`, which runs it shows and its sweep-wide tables
:mod:`analysis.run_selection`, the figures :mod:`analysis.figures`.

Complex convention: images are real (magnitude images for MRI); spectra are
``fft2`` over the last two axes as in :mod:`suite.metrics.spectral`.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Mapping, Sequence

import numpy as np
import torch

from analysis.run_images import (  # noqa: F401  (re-exported: the report's building blocks)
    OUTPUTS, RunImages, SpectralSettings, _QUANTITIES, images_from_dict, load_run_images, metric_history,
    signal_characteristics, significant_residual_mask, stage_boundaries,
)
from analysis.run_selection import (  # noqa: F401  (re-exported)
    EXPERIMENT_FIGURES, GROUP_KEYS, MODEL_KEYS, SECONDARY_GROUP_KEYS, SOLVER_KEYS, UNROLL_K_KEYS, _is_baseline,
    _present, experiment_figures, family_of, group_keys, image_labels, memory_tables, model_label, noise_table,
    representative_runs, solver_table,
)
from suite import metrics as M
from suite.families import find_family

if TYPE_CHECKING:  # pragma: no cover
    import pandas as pd
    from matplotlib.figure import Figure

REPORT_KINDS = ("spectral",)
STAGE1_LABEL = "DEQ (stage 1)"
ZERO_FILLED_LABEL = "Zero-filled"
GT_LABEL = "Ground truth"

IMAGE_FIGURES = ("reconstructions", "residuals", "radial_spectra", "training_curves")
"""Per-image figures, in page order."""
CSV_NAME = "signal_characteristics.csv"
HTML_NAME = "spectral_report.html"
PDF_NAME = "spectral_report.pdf"
ARTIFACT_DIR = "report"

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

_UNSAFE = re.compile(r"[^A-Za-z0-9._-]+")


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
    return "Definitions: " + "; ".join(parts) + f". {_units_note(_QUANTITIES)} " \
        "'stage1' = frozen DEQ (CRR stage 1), 'final' = the run's output, 'residual' = gt - output."


def _units_note(quantities: Sequence[str]) -> str:
    """``PSNR in dB, HFE and SR in %; higher is better: PSNR, SSIM; lower: SR.`` from the metric registry."""
    from suite.metrics.registry import METRICS

    names = [q for q in quantities if q in METRICS]
    by_unit: dict[str, list[str]] = {}
    for q in names:
        if METRICS[q].unit:
            by_unit.setdefault(METRICS[q].unit, []).append(q.upper())
    units = ", ".join(f"{' and '.join(qs)} in {u}" for u, qs in by_unit.items())
    better = {d: [q.upper() for q in names if METRICS[q].direction == d] for d in ("max", "min")}
    return (f"{units}; higher is better: {', '.join(better['max']) or '-'}, "
            f"lower: {', '.join(better['min']) or '-'}.")


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
