"""Figures of the spectral report and of sweep-wide comparisons.

Every function returns a :class:`matplotlib.figure.Figure` built without
pyplot and drawn by the Agg canvas, so nothing here touches a global backend
or leaves figures open; :func:`save_figure` writes one as vector PDF and PNG.
matplotlib and seaborn are imported inside the functions (the CLI starts fast).

Images are real ``(H, W)`` numpy arrays (one plane; the report picks the
middle slice of an MRI volume). Spectra follow :mod:`suite.metrics.spectral`:
``numpy.fft.fft2`` over the two axes, centred with ``fftshift`` so that DC
sits at ``(H // 2, W // 2)``.

Panels and axes: image panels carry the axes label ``"panel"``, colour bars
matplotlib's ``"<colorbar>"``, so ``[a for a in fig.axes if a.get_label() ==
"panel"]`` are a figure's panels. A panel whose data was not recorded is kept,
shows "not recorded" and has no image.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Mapping, Sequence

import numpy as np

if TYPE_CHECKING:  # pragma: no cover
    import pandas as pd
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure

PANEL = "panel"
"""Axes label of every panel (image or plot) made here."""

NOT_RECORDED = "not recorded"
STAGE_LINE_GID = "stage-boundary"
"""``gid`` of the vertical lines marking a change of training stage."""
DEQ_LINE_GID = "deq-memory"
"""``gid`` of the horizontal DEQ lines of :func:`memory_figure`."""

_PANEL_INCH = 2.6
_CMAP = "gray"
_RESIDUAL_CMAP = "magma"


@dataclass(frozen=True)
class ImagePanel:
    """One column of the reconstruction / residual figures.

    Attributes:
        label: column title, e.g. ``"DEQ (stage 1)"``.
        image: ``(H, W)`` image in the ground truth's units, or None if not recorded.
        hfe: its high-frequency energy in % (from :func:`suite.metrics.hfe`), or NaN.
        psnr: its PSNR in dB against the ground truth, or NaN (ground truth itself).
    """

    label: str
    image: np.ndarray | None
    hfe: float = math.nan
    psnr: float = math.nan


@dataclass(frozen=True)
class ResidualPanel:
    """One column of the residual figure.

    Attributes:
        label: the output whose residual this is, e.g. ``"DEQ+CRR"``.
        residual: ``(H, W)`` absolute residual ``|gt - pred|``, or None if not recorded.
        significant: ``(H, W)`` boolean map of significant residuals, or None.
        sr: significant-residual share in % (from :func:`suite.metrics.significant_residuals`).
    """

    label: str
    residual: np.ndarray | None
    significant: np.ndarray | None
    sr: float = math.nan


def _figure(n_rows: int, n_cols: int, height: float | None = None, width: float | None = None) -> "Figure":
    """A pyplot-free figure on the Agg canvas, sized for ``n_rows x n_cols`` panels."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(
        figsize=(width or _PANEL_INCH * n_cols + 0.6, height or _PANEL_INCH * n_rows + 0.6),
        layout="constrained",
    )
    FigureCanvasAgg(fig)
    return fig


def _panels(fig: "Figure", n_rows: int, n_cols: int) -> list[list["Axes"]]:
    """An ``n_rows x n_cols`` grid of axes, each labelled :data:`PANEL`."""
    grid = fig.subplots(n_rows, n_cols, squeeze=False)
    for ax in grid.flat:
        ax.set_label(PANEL)
    return [list(row) for row in grid]


def _blank(ax: "Axes", title: str) -> None:
    """A panel without data: title and "not recorded"."""
    ax.set_title(title, fontsize=9)
    ax.text(0.5, 0.5, NOT_RECORDED, ha="center", va="center", transform=ax.transAxes, color="0.4")
    ax.set_xticks([])
    ax.set_yticks([])
    for spine in ax.spines.values():
        spine.set_color("0.8")


def _log_axis(ax: "Axes", which: str) -> None:
    """A log-scaled axis with plain ``1e-05`` labels (mathtext labels cost most of a save)."""
    from matplotlib.ticker import LogFormatter

    axis = ax.xaxis if which == "x" else ax.yaxis
    (ax.set_xscale if which == "x" else ax.set_yscale)("log")
    axis.set_major_formatter(LogFormatter(labelOnlyBase=True))
    # minor ticks are labelled only when the axis spans less than about a decade
    axis.set_minor_formatter(LogFormatter(labelOnlyBase=False, minor_thresholds=(1, 0.4)))


def _image_axes(ax: "Axes") -> None:
    ax.set_xticks([])
    ax.set_yticks([])
    ax.grid(False)


def log_magnitude_spectrum(image: np.ndarray) -> np.ndarray:
    """Centred log-magnitude spectrum ``log10 |F|``, DC at ``(H // 2, W // 2)``.

    Scale-free (raw MRI units and [0, 1] images look alike); magnitudes below
    ``1e-12`` of the largest are floored there (no ``-inf``).

    Args:
        image: real ``(H, W)`` array.

    Returns:
        ``(H, W)`` float64 array.
    """
    mag = np.abs(np.fft.fftshift(np.fft.fft2(np.asarray(image, dtype=np.float64))))
    floor = max(float(mag.max()) * 1e-12, np.finfo(np.float64).tiny)
    return np.log10(np.maximum(mag, floor))


def reconstruction_figure(panels: Sequence[ImagePanel], cutoff: float, title: str = "") -> "Figure":
    """Images side by side (top row) over their centred log-magnitude spectra (bottom row).

    Images share the grey scale ``[min, max]`` of the first panel shown (the
    ground truth); spectra share one colour scale, from the first spectrum's
    1st percentile to the largest value. Each spectrum shows the HFE disk of
    radius ``cutoff * min(H, W) / 2`` and its HFE in the title.

    Args:
        panels: columns, ground truth first; ``image`` ``(H, W)`` or None.
        cutoff: HFE cut-off as a fraction of the Nyquist radius (the run's ``eval.hfe_cutoff``).
        title: figure title.

    Returns:
        Figure with ``2 x len(panels)`` panels.
    """
    from matplotlib.patches import Circle

    if not panels:
        raise ValueError("reconstruction_figure needs at least one panel, got none")
    fig = _figure(2, len(panels))
    grid = _panels(fig, 2, len(panels))
    present = [p.image for p in panels if p.image is not None]
    ref = present[0] if present else None
    vmin, vmax = (float(ref.min()), float(ref.max())) if ref is not None else (0.0, 1.0)
    spectra = [None if p.image is None else log_magnitude_spectrum(p.image) for p in panels]
    ref_spec = next((s for s in spectra if s is not None), None)
    # one colour scale: from the reference's 1st percentile to the largest magnitude shown
    spec_max = max((float(s.max()) for s in spectra if s is not None), default=1.0)
    spec_min = float(np.percentile(ref_spec, 1)) if ref_spec is not None else spec_max - 1.0
    for col, (panel, spec) in enumerate(zip(panels, spectra)):
        top, bottom = grid[0][col], grid[1][col]
        if panel.image is None:
            _blank(top, panel.label)
            _blank(bottom, f"{panel.label}: spectrum")
            continue
        top.imshow(panel.image, cmap=_CMAP, vmin=vmin, vmax=vmax, interpolation="nearest")
        sub = "" if math.isnan(panel.psnr) else f"\nPSNR {panel.psnr:.2f} dB"
        top.set_title(f"{panel.label}{sub}", fontsize=9)
        _image_axes(top)
        h, w = panel.image.shape
        bottom.imshow(spec, cmap="viridis", vmin=spec_min, vmax=spec_max, interpolation="nearest")
        radius = cutoff * min(h, w) / 2.0
        bottom.add_patch(Circle((w // 2, h // 2), radius, fill=False, ec="white", lw=0.8, ls="--"))
        hfe_text = "HFE n/a" if math.isnan(panel.hfe) else f"HFE {panel.hfe:.2f} %"
        bottom.set_title(f"log10 |F|, {hfe_text}", fontsize=9)
        _image_axes(bottom)
    if title:
        fig.suptitle(title, fontsize=10)
    return fig


def residual_figure(panels: Sequence[ResidualPanel], threshold: float, title: str = "") -> "Figure":
    """Residual maps (top row, one shared colour scale and colour bar) over significant-residual maps.

    Args:
        panels: one column per output (stage 1, final, ...).
        threshold: SR threshold as a fraction of the ground truth's range (for the title).
        title: figure title.

    Returns:
        Figure with ``2 x len(panels)`` panels (plus one colour bar when any residual exists).
    """
    if not panels:
        raise ValueError("residual_figure needs at least one panel, got none")
    fig = _figure(2, len(panels), width=_PANEL_INCH * len(panels) + 1.2)
    grid = _panels(fig, 2, len(panels))
    vmax = max((float(p.residual.max()) for p in panels if p.residual is not None), default=1.0) or 1.0
    mappable = None
    for col, panel in enumerate(panels):
        top, bottom = grid[0][col], grid[1][col]
        if panel.residual is None:
            _blank(top, f"|gt - {panel.label}|")
            _blank(bottom, f"{panel.label}: significant residuals")
            continue
        mappable = top.imshow(panel.residual, cmap=_RESIDUAL_CMAP, vmin=0.0, vmax=vmax, interpolation="nearest")
        top.set_title(f"|gt - {panel.label}|", fontsize=9)
        _image_axes(top)
        bottom.imshow(np.asarray(panel.significant, dtype=float), cmap="Greys", vmin=0.0, vmax=1.0,
                      interpolation="nearest")
        bottom.set_title(f"SR {panel.sr:.2f} % (black: > {100 * threshold:g} % of range)", fontsize=9)
        _image_axes(bottom)
    if mappable is not None:
        fig.colorbar(mappable, ax=grid[0], shrink=0.8, label="|residual|")
    if title:
        fig.suptitle(title, fontsize=10)
    return fig


def radial_spectrum_figure(curves: Mapping[str, tuple[np.ndarray, np.ndarray]], title: str = "") -> "Figure":
    """Radially averaged power spectra on log-log axes, one line per curve.

    Curves whose label starts with ``"residual"`` are dashed.

    Args:
        curves: label -> ``(frequencies (n,), power (n,))`` from
            :func:`suite.metrics.radial_frequencies` / :func:`suite.metrics.radial_power_spectrum`.
        title: figure title.

    Returns:
        Figure with one panel and one line per curve (in the given order).
    """
    import seaborn as sns

    fig = _figure(1, 1, height=3.6, width=5.4)
    ax = _panels(fig, 1, 1)[0][0]
    colours = sns.color_palette("colorblind", n_colors=max(len(curves), 1))
    for colour, (label, (freq, power)) in zip(colours, curves.items()):
        power = np.asarray(power, dtype=float)
        # zero power (an exactly fitted ring) cannot be drawn on a log axis
        shown = np.where(power > 0, power, np.nan)
        ax.plot(freq, shown, label=label, color=colour, lw=1.2,
                ls="--" if label.lower().startswith("residual") else "-")
    _log_axis(ax, "x")
    _log_axis(ax, "y")
    ax.set_xlabel("spatial frequency (cycles / pixel)")
    ax.set_ylabel("mean power per ring")
    ax.grid(True, which="both", alpha=0.3)
    if curves:
        ax.legend(fontsize=8)
    else:
        ax.text(0.5, 0.5, NOT_RECORDED, ha="center", va="center", transform=ax.transAxes)
    ax.set_title(title or "Radially averaged power spectra", fontsize=10)
    return fig


def training_curves_figure(
    psnr: Sequence[tuple[int, float]],
    loss: Sequence[tuple[int, float]],
    boundaries: Sequence[int] = (),
    stage1_psnr: float = math.nan,
    title: str = "",
) -> "Figure":
    """PSNR and loss against the global epoch, stage changes marked.

    Args:
        psnr: ``(epoch, value)`` pairs (MLflow metric history of ``psnr``).
        loss: ``(epoch, value)`` pairs of ``loss``; a log axis when positive and spanning a decade or more.
        boundaries: epochs at which a new stage starts (first epoch of stage 2);
            each is a vertical dotted line with ``gid`` :data:`STAGE_LINE_GID` in both panels.
        stage1_psnr: the frozen DEQ's PSNR, drawn as a horizontal line when finite.
        title: figure title.

    Returns:
        Figure with two panels, PSNR then loss.
    """
    from matplotlib.ticker import MaxNLocator

    fig = _figure(1, 2, height=3.2, width=8.4)
    ax_psnr, ax_loss = _panels(fig, 1, 2)[0]
    for ax, series, name in ((ax_psnr, psnr, "PSNR (dB)"), (ax_loss, loss, "loss")):
        if series:
            x, y = zip(*series)
            ax.plot(x, y, marker="." if len(series) < 60 else None, lw=1.2, color="C0", label=name)
        else:
            ax.text(0.5, 0.5, NOT_RECORDED, ha="center", va="center", transform=ax.transAxes)
        for b in boundaries:
            ax.axvline(b, color="C3", ls=":", lw=1.2, gid=STAGE_LINE_GID, label=f"stage 2 starts (epoch {b})")
        ax.set_xlabel("epoch")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_ylabel(name)
        ax.grid(True, alpha=0.3)
    values = [v for _, v in loss]
    if values and min(values) > 0 and max(values) >= 10 * min(values):  # log only over a decade or more
        _log_axis(ax_loss, "y")
    if math.isfinite(stage1_psnr):
        ax_psnr.axhline(stage1_psnr, color="0.5", ls="--", lw=0.8, label=f"stage 1 PSNR {stage1_psnr:.2f} dB")
    for ax in (ax_psnr, ax_loss):
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=7)
    if title:
        fig.suptitle(title, fontsize=10)
    return fig


def _format_cell(value: object, decimals: int) -> str:
    if isinstance(value, float):
        return "—" if math.isnan(value) else f"{value:.{decimals}f}"
    return "—" if value is None else str(value)


def table_figure(df: "pd.DataFrame", title: str = "", decimals: int = 2, notes: Sequence[str] = ()) -> "Figure":
    """A table as a page: for the PDF report.

    Args:
        df: rows to show (floats rounded to ``decimals``; NaN shown as ``—``).
        title: page title.
        decimals: decimals of float cells.
        notes: lines printed under the table.

    Returns:
        Figure with one panel holding a matplotlib table.
    """
    n_rows, n_cols = df.shape
    fig = _figure(1, 1, width=min(max(8.0, 0.8 * n_cols), 11.7), height=1.0 + 0.25 * (n_rows + 1) + 0.2 * len(notes))
    ax = _panels(fig, 1, 1)[0][0]
    ax.axis("off")
    cells = [[_format_cell(v, decimals) for v in row] for row in df.astype(object).itertuples(index=False)]
    if cells:
        table = ax.table(cellText=cells, colLabels=[str(c) for c in df.columns], loc="upper center",
                         cellLoc="center")
        table.auto_set_font_size(False)
        table.set_fontsize(7)
        table.auto_set_column_width(list(range(n_cols)))
    else:
        ax.text(0.5, 0.5, "no rows", ha="center", va="center", transform=ax.transAxes)
    if notes:
        ax.text(0.0, 0.0, "\n".join(notes), ha="left", va="bottom", fontsize=7, transform=ax.transAxes, wrap=True)
    ax.set_title(title, fontsize=10)
    return fig


def noise_figure(df: "pd.DataFrame", title: str = "") -> "Figure":
    """Noise robustness: metric against noise level, one line per model (mean ± sd over runs).

    Args:
        df: long table with columns ``model``, ``sigma``, ``metric``
            (``psnr``/``ssim``), ``value``, ``run_id`` (see
            :func:`analysis.report.noise_table`).
        title: figure title.

    Returns:
        Figure with one panel per metric present (``psnr`` first, then ``ssim``).
    """
    import seaborn as sns

    metrics = [m for m in ("psnr", "ssim") if (df["metric"] == m).any()]
    metrics += sorted(set(df["metric"]) - set(metrics))
    if not metrics:
        raise ValueError("noise_figure needs rows with a metric, got an empty table")
    fig = _figure(1, len(metrics), height=3.4, width=4.2 * len(metrics))
    axes = _panels(fig, 1, len(metrics))[0]
    for ax, metric in zip(axes, metrics):
        part = df[df["metric"] == metric]
        sns.lineplot(data=part, x="sigma", y="value", hue="model", style="model", markers=True, dashes=False,
                     errorbar="sd", ax=ax)
        ax.set_xlabel("noise σ")
        ax.set_ylabel({"psnr": "PSNR (dB)", "ssim": "SSIM"}.get(metric, metric))
        ax.grid(True, alpha=0.3)
    fig.suptitle(title or "Noise robustness", fontsize=10)
    return fig


def solver_figure(df: "pd.DataFrame", title: str = "") -> "Figure":
    """Distributions of solver iterations per epoch, by solver.

    Args:
        df: long table with columns ``solver``, ``direction`` (``forward``/``backward``),
            ``nstep``, ``run_id``, ``step`` (see :func:`analysis.report.solver_table`).
        title: figure title.

    Returns:
        Figure with one panel per direction present (forward first).
    """
    import seaborn as sns

    directions = [d for d in ("forward", "backward") if (df["direction"] == d).any()]
    if not directions:
        raise ValueError("solver_figure needs forward or backward rows, got none")
    fig = _figure(1, len(directions), height=3.4, width=4.4 * len(directions))
    axes = _panels(fig, 1, len(directions))[0]
    for ax, direction in zip(axes, directions):
        part = df[df["direction"] == direction]
        sns.histplot(data=part, x="nstep", hue="solver", stat="probability", common_norm=False,
                     element="step", ax=ax)
        ax.set_xlabel(f"{direction} solver iterations per epoch")
        ax.grid(True, alpha=0.3)
    fig.suptitle(title or "Solver iterations", fontsize=10)
    return fig


def memory_figure(unrolled: "pd.DataFrame", deq: "pd.DataFrame", title: str = "") -> "Figure":
    """Peak memory against the number of unrolled iterations K, DEQ as horizontal lines.

    Args:
        unrolled: rows ``model``, ``k``, ``mem_mb``, ``run_id`` of unrolled runs
            (mean ± sd over runs per K and model).
        deq: rows ``model``, ``mem_mb``, ``run_id`` of DEQ runs; one horizontal
            line per model at its mean (may be empty).
        title: figure title.

    Returns:
        Figure with one panel.
    """
    import seaborn as sns

    fig = _figure(1, 1, height=3.6, width=5.4)
    ax = _panels(fig, 1, 1)[0][0]
    sns.lineplot(data=unrolled, x="k", y="mem_mb", hue="model", marker="o", errorbar="sd", ax=ax)
    palette = sns.color_palette("dark", n_colors=max(deq["model"].nunique(), 1)) if len(deq) else []
    for colour, (model, part) in zip(palette, deq.groupby("model", sort=True)):
        mean = float(part["mem_mb"].mean())
        ax.axhline(mean, color=colour, ls="--", lw=1.2, gid=DEQ_LINE_GID,
                   label=f"{model} (DEQ, {mean:.0f} MB, n={len(part)})")
    ax.set_xticks(sorted(unrolled["k"].unique()))
    ax.set_xlabel("unrolled iterations K")
    ax.set_ylabel("peak memory (MB)")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8)
    ax.set_title(title or "Memory: DEQ vs unrolled", fontsize=10)
    return fig


def save_figure(fig: "Figure", stem: Path, dpi: int = 150) -> list[Path]:
    """Writes ``stem.pdf`` (vector) and ``stem.png``.

    Args:
        fig: the figure.
        stem: path without suffix; parents are created.
        dpi: PNG resolution.

    Returns:
        The two paths, PDF first.
    """
    stem.parent.mkdir(parents=True, exist_ok=True)
    pdf, png = stem.with_suffix(".pdf"), stem.with_suffix(".png")
    fig.savefig(pdf)
    # that save solved the constrained layout; keep it for the PNG and later saves
    fig.set_layout_engine("none")
    fig.savefig(png, dpi=dpi)
    return [pdf, png]


def freeze_layout(fig: "Figure") -> "Figure":
    """Lays the figure out once and keeps that layout for later saves.

    Constrained layout is otherwise solved again on every save (most of the
    time a save takes); positions are fractions of the figure, so one layout
    serves PDF and PNG at any dpi.

    Args:
        fig: the figure (modified in place).

    Returns:
        ``fig``.
    """
    if fig.get_layout_engine() is not None:
        fig.draw_without_rendering()
        fig.set_layout_engine("none")
    return fig
