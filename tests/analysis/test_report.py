"""Spectral reports and sweep-wide figures, on real sqlite MLflow stores.

Fast tests use runs written here with MlflowClient: CRR-like runs whose
``images.pt`` artifacts are built from scikit-image's bundled camera and
astronaut images, DE-Prox-like runs (noise, solver, memory metrics), and
degraded runs (no stage-1 image, PNGs only, nothing). Expected values are
computed here from the tensors the test made, with :mod:`suite.metrics` (the
report must agree with the metric module) or numpy, never read from the code
under test. The slow test runs the real CRR pipeline and the real CLI.
"""

from __future__ import annotations

import csv
import math
import os
import re
import subprocess
import sys
import time
from dataclasses import dataclass, field
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from analysis import figures as F
from analysis.report import (
    CHARACTERISTIC_COLUMNS,
    IMAGE_FIGURES,
    RunImages,
    image_labels,
    output_columns,
    representative_runs,
    SUMMARY_COLUMNS,
    SpectralSettings,
    experiment_figures,
    image_figures,
    load_run_images,
    memory_tables,
    metric_history,
    noise_table,
    report_command,
    signal_characteristics,
    significant_residual_mask,
    solver_table,
    spectral_report,
    stage_boundaries,
)
from analysis.runs import load_runs
from suite import metrics as M

REPO = Path(__file__).resolve().parents[2]
CRR_EXP = "spectral-synth"
DEGRADED_EXP = "spectral-degraded"
DEPROX_EXP = "deprox-synth"
E1, E2 = 3, 2  # stage-1 and stage-2 epochs of the synthetic CRR runs


# ----------------------------------------------------------------------------- helpers


def panels(fig) -> list:
    return [a for a in fig.axes if a.get_label() == F.PANEL]


def page_count(pdf: Path) -> int:
    """Pages of a PDF, counted from its page objects (matplotlib writes no object streams)."""
    return len(re.findall(rb"/Type\s*/Page(?![a-zA-Z])", pdf.read_bytes()))


class TableParser(HTMLParser):
    """Collects every <table id=...>: header texts and rows of (text, data-value)."""

    def __init__(self) -> None:
        super().__init__()
        self.tables: dict[str, dict] = {}
        self._cur: dict | None = None
        self._cell: list | None = None
        self.img_srcs: list[str] = []
        self.external: list[str] = []

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        if tag == "img":
            self.img_srcs.append(a.get("src", ""))
        if tag in ("script", "link") and (a.get("src") or a.get("href")):
            self.external.append(a.get("src") or a.get("href"))
        if tag == "table" and a.get("id"):
            self._cur = self.tables.setdefault(a["id"], {"header": [], "rows": []})
        elif self._cur is not None and tag == "tr":
            self._cur["rows"].append([])
        elif self._cur is not None and tag in ("td", "th"):
            self._cell = [tag, "", a.get("data-value")]

    def handle_data(self, data):
        if self._cell is not None:
            self._cell[1] += data

    def handle_endtag(self, tag):
        if self._cur is None:
            return
        if tag in ("td", "th") and self._cell is not None:
            kind, text, value = self._cell
            if kind == "th":
                self._cur["header"].append(text)
            else:
                self._cur["rows"][-1].append((text, value))
            self._cell = None
        elif tag == "table":
            self._cur["rows"] = [r for r in self._cur["rows"] if r]
            self._cur = None


def parse_html(path: Path) -> TableParser:
    p = TableParser()
    p.feed(path.read_text(encoding="utf-8"))
    return p


def read_csv(path: Path) -> list[dict[str, str]]:
    with path.open(newline="") as fh:
        return list(csv.DictReader(fh))


def gray(name: str, shape: tuple[int, int]) -> torch.Tensor:
    """A bundled scikit-image picture as a (1, 1, H, W) float32 tensor in [0, 1]."""
    import skimage.color
    import skimage.data
    import skimage.transform

    img = getattr(skimage.data, name)()
    if img.ndim == 3:
        img = skimage.color.rgb2gray(img)
    small = skimage.transform.resize(img.astype(np.float64) / (255.0 if img.max() > 1 else 1.0), shape,
                                     anti_aliasing=True)
    return torch.from_numpy(small.astype(np.float32))[None, None]


def crr_outputs(gt: torch.Tensor, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """A blurred 'stage 1' and a 'final' that recovers part of the detail."""
    from scipy.ndimage import gaussian_filter

    rng = np.random.default_rng(seed)
    g = gt[0, 0].numpy().astype(np.float64)
    s1 = gaussian_filter(g, 1.5)
    final = s1 + 0.6 * (g - s1) + rng.normal(scale=0.01, size=g.shape)
    as_t = lambda a: torch.from_numpy(a.astype(np.float32))[None, None]  # noqa: E731
    return as_t(s1), as_t(final)


@dataclass
class Synth:
    """What the fixture logged: run ids, images and settings per run."""

    uri: str
    root: Path
    runs: dict[str, dict] = field(default_factory=dict)  # key -> info


def _log_images(client, run_id: str, tmp: Path, images: dict[str, torch.Tensor]) -> None:
    path = tmp / run_id / "images.pt"
    path.parent.mkdir(parents=True)
    torch.save(images, path)
    client.log_artifact(run_id, str(path))


def _save_png(img: torch.Tensor, path: Path) -> None:
    import skimage.io

    arr = (img.squeeze().clamp(0, 1).numpy() * 255).round().astype(np.uint8)
    skimage.io.imsave(path, arr, check_contrast=False)


def _crr_run(client, exp_id: str, tmp: Path, *, image: str, seed: int, shape, settings: SpectralSettings,
             logged_settings: SpectralSettings, now: int) -> dict:
    from mlflow.entities import Metric, Param

    gt = gray(image, shape)
    s1, final = crr_outputs(gt, seed)
    params = {"family": "crr", "data.image": image, "seed": str(seed), "deq.solver": "anderson",
              "train.epochs": str(E1), "crr.epochs": str(E2), "eval.hfe_cutoff": str(settings.hfe_cutoff),
              "eval.hfe_mode": settings.hfe_mode, "eval.sr_threshold": str(settings.sr_threshold)}
    run = client.create_run(exp_id, start_time=now, run_name=f"{image}-seed{seed}", tags={"family": "crr"})
    rid = run.info.run_id
    metrics, loss, psnr = [], [], []
    for step in range(E1 + E2):
        stage = 1.0 if step < E1 else 2.0
        lv, pv = 0.1 / (step + 1), 20.0 + step
        loss.append((step, lv))
        psnr.append((step, pv))
        metrics += [Metric("loss", lv, now + step, step), Metric("psnr", pv, now + step, step),
                    Metric("stage", stage, now + step, step)]
        if stage == 1.0:
            metrics.append(Metric("solver/fwd_nstep", 10.0 + step, now + step, step))
    final_vals = {
        "psnr": float(M.psnr(final, gt)[0]),
        "hfe": float(M.hfe(final, cutoff=logged_settings.hfe_cutoff, mode=logged_settings.hfe_mode)[0]),
        "sr": float(M.significant_residuals(final, gt, threshold=logged_settings.sr_threshold)[0]),
        "stage1/psnr": float(M.psnr(s1, gt)[0]),
    }
    metrics += [Metric(k, v, now + 99, E1 + E2) for k, v in final_vals.items()]
    client.log_batch(rid, metrics=metrics, params=[Param(k, v) for k, v in params.items()])
    _log_images(client, rid, tmp, {"reconstruction": final, "ground_truth": gt, "stage1": s1})
    client.set_terminated(rid, "FINISHED")
    return {"run_id": rid, "image": image, "seed": seed, "gt": gt, "stage1": s1, "final": final,
            "settings": settings, "loss": loss, "psnr": psnr}


@pytest.fixture(scope="module")
def synth(tmp_path_factory: pytest.TempPathFactory) -> Synth:
    """Three sqlite experiments: CRR-like runs, degraded runs, DE-Prox-like runs."""
    from mlflow.entities import Metric, Param
    from mlflow.tracking import MlflowClient

    root = tmp_path_factory.mktemp("spectral")
    uri = f"sqlite:///{root}/mlflow.db"
    client = MlflowClient(tracking_uri=uri)
    out = Synth(uri, root)
    tmp = root / "staging"
    now = int(time.time() * 1000)

    # --- CRR-like: camera seeds 1 then 0 (seed 0 must win although newer), astronaut seed 3
    exp = client.create_experiment(CRR_EXP, artifact_location=str(root / "art1"))
    cam = SpectralSettings(hfe_cutoff=0.3, hfe_mode="power", sr_threshold=0.04)
    ast = SpectralSettings(hfe_cutoff=0.2, hfe_mode="magnitude", sr_threshold=0.06)
    out.runs["camera1"] = _crr_run(client, exp, tmp, image="camera", seed=1, shape=(33, 33), settings=cam,
                                   logged_settings=cam, now=now)
    out.runs["camera0"] = _crr_run(client, exp, tmp, image="camera", seed=0, shape=(33, 33), settings=cam,
                                   logged_settings=cam, now=now + 1000)
    # the astronaut run logged its hfe with the metric defaults: the report must say they differ
    out.runs["astronaut"] = _crr_run(client, exp, tmp, image="astronaut", seed=3, shape=(31, 37), settings=ast,
                                     logged_settings=SpectralSettings(), now=now + 2000)

    # --- degraded runs
    exp = client.create_experiment(DEGRADED_EXP, artifact_location=str(root / "art2"))
    gt = gray("camera", (27, 27))
    s1, final = crr_outputs(gt, 5)
    for key, family in (("nostage1", "crr"), ("pngonly", "crr"), ("nothing", "deq_inr")):
        run = client.create_run(exp, start_time=now, run_name=key)
        rid = run.info.run_id
        client.log_batch(rid, params=[Param("family", family), Param("data.image", key), Param("seed", "0")],
                         metrics=[Metric("stage", 1.0, now, 0), Metric("psnr", 5.0, now, 0)])
        if key == "nostage1":
            _log_images(client, rid, tmp, {"reconstruction": final, "ground_truth": gt})
        elif key == "pngonly":
            d = tmp / rid
            d.mkdir(parents=True)
            for name, img in (("ground_truth", gt), ("reconstruction", final), ("stage1", s1)):
                _save_png(img, d / f"{name}.png")
                client.log_artifact(rid, str(d / f"{name}.png"))
        client.set_terminated(rid, "FINISHED")
        out.runs[key] = {"run_id": rid, "gt": gt, "stage1": s1, "final": final}

    # --- DE-Prox-like: DEQ (two solvers), unrolled for K in 2, 4, 8, zero-filled
    exp = client.create_experiment(DEPROX_EXP, artifact_location=str(root / "art3"))
    rng = np.random.default_rng(7)
    specs = [("deq", "anderson", None, s) for s in range(3)] + [("deq", "fixed_point_iter", None, s) for s in range(2)]
    specs += [("unrolled", "anderson", k, s) for k in (2, 4, 8) for s in range(2)] + [("zero_filled", None, None, 0)]
    deprox = []
    for i, (kind, solver, k, seed) in enumerate(specs):
        # as the real flattened config: every run has deprox.unroll_k (5 unless unrolled) and deq.solver,
        # and a meaningless data.image default
        params = {"family": "deprox", "deprox.kind": kind, "seed": str(seed), "data.image": "camera",
                  "mri.acceleration": "4", "deprox.unroll_k": str(k or 5), "deq.solver": solver or "anderson"}
        noise = {}
        for sigma in ("0.0", "0.01", "0.05"):
            base = {"deq": 33.0, "unrolled": 31.0, "zero_filled": 24.0}[kind] - 100 * float(sigma)
            noise[f"noise/{sigma}/psnr"] = float(base + rng.normal(scale=0.3))
            noise[f"noise/{sigma}/ssim"] = float(0.9 - 2 * float(sigma) + rng.normal(scale=0.01))
        mem = {"deq": 300.0, "unrolled": 100.0 * (k or 0), "zero_filled": 50.0}[kind] + float(rng.normal(scale=5))
        metrics = [Metric(key, v, now, 0) for key, v in noise.items()] + [Metric("mem/peak_mb", mem, now, 0)]
        fwd, bwd = [], []
        if kind != "zero_filled":
            for step in range(4):
                f = float(k) if kind == "unrolled" else float(rng.integers(8, 30))
                fwd.append(f)
                metrics.append(Metric("solver/fwd_nstep", f, now + step, step))
                if kind == "deq" and solver == "anderson":
                    b = float(rng.integers(5, 15))
                    bwd.append(b)
                    metrics.append(Metric("solver/bwd_nstep", b, now + step, step))
        run = client.create_run(exp, start_time=now + i, run_name=f"{kind}-{solver}-{k}-{seed}")
        client.log_batch(run.info.run_id, metrics=metrics, params=[Param(a, b) for a, b in params.items()])
        entry = {"run_id": run.info.run_id, "kind": kind, "solver": solver, "k": k, "noise": noise,
                 "mem": mem, "fwd": fwd, "bwd": bwd, "seed": seed}
        if i == 0:  # one validation volume, as the DE-Prox trainer writes it: (1, S, H, W) raw magnitudes
            gen = torch.Generator().manual_seed(5)
            gt = 3.0 + 10.0 * torch.rand(1, 4, 15, 17, generator=gen)
            entry.update(gt=gt, final=gt + 0.4 * torch.randn(1, 4, 15, 17, generator=gen),
                         zero_filled=gt + 1.5 * torch.randn(1, 4, 15, 17, generator=gen))
            _log_images(client, run.info.run_id, tmp, {"reconstruction": entry["final"], "ground_truth": gt,
                                                       "zero_filled": entry["zero_filled"], "volume": "file1.h5"})
        client.set_terminated(run.info.run_id, "FINISHED")
        deprox.append(entry)
    out.runs["deprox"] = {"runs": deprox}
    return out


@pytest.fixture(scope="module")
def crr_report(synth: Synth, tmp_path_factory: pytest.TempPathFactory):
    return spectral_report(CRR_EXP, tmp_path_factory.mktemp("report"), tracking_uri=synth.uri, png_dpi=72)


def expected_characteristics(info: dict) -> dict[str, float]:
    """Computed here, directly with suite.metrics, on the tensors the fixture made."""
    s: SpectralSettings = info["settings"]
    gt, out = info["gt"], {}
    out["hfe_gt"] = float(M.hfe(gt, cutoff=s.hfe_cutoff, mode=s.hfe_mode)[0])
    for name in ("stage1", "final"):
        pred = info[name]
        out[f"psnr_{name}"] = float(M.psnr(pred, gt)[0])
        out[f"ssim_{name}"] = float(M.ssim(pred, gt)[0])
        out[f"hfe_{name}"] = float(M.hfe(pred, cutoff=s.hfe_cutoff, mode=s.hfe_mode)[0])
        out[f"hfe_residual_{name}"] = float(M.hfe(gt - pred, cutoff=s.hfe_cutoff, mode=s.hfe_mode)[0])
        out[f"sr_{name}"] = float(M.significant_residuals(pred, gt, threshold=s.sr_threshold)[0])
    out["gain_db"] = out["psnr_final"] - out["psnr_stage1"]
    return out


def assert_same(got: str, want: float) -> None:
    if math.isnan(want):
        assert got == ""
    else:
        assert float(got) == pytest.approx(want, rel=1e-12, abs=1e-12)


# ----------------------------------------------------------------------------- the CRR report


def test_csv_values_equal_metric_module_on_the_images(synth: Synth, crr_report) -> None:
    rows = {r["image"]: r for r in read_csv(crr_report.csv)}
    assert sorted(rows) == ["astronaut", "camera"]
    assert list(read_csv(crr_report.csv)[0].keys()) == list(CHARACTERISTIC_COLUMNS)
    for key in ("camera0", "astronaut"):
        info, row = synth.runs[key], rows[synth.runs[key]["image"]]
        assert row["run_id"] == info["run_id"]
        assert float(row["hfe_cutoff"]) == info["settings"].hfe_cutoff
        assert row["hfe_mode"] == info["settings"].hfe_mode
        for col, want in expected_characteristics(info).items():
            assert float(row[col]) == pytest.approx(want, rel=1e-12, abs=1e-12), (key, col)
        for q in ("psnr", "ssim", "hfe", "hfe_residual", "sr"):  # no A^H y baseline in a CRR run
            assert row[f"{q}_zero_filled"] == ""
        h, w = info["gt"].shape[-2:]
        assert (int(row["height"]), int(row["width"])) == (h, w)
        assert row["source"] == "images.pt"


def test_seed0_is_the_representative(synth: Synth, crr_report) -> None:
    by_image = {im.image: im.run_id for im in crr_report.images}
    # camera seed 1 started first; seed 0 must still be chosen
    assert by_image == {"camera": synth.runs["camera0"]["run_id"], "astronaut": synth.runs["astronaut"]["run_id"]}


def test_html_summary_table_matches_csv_and_is_self_contained(crr_report) -> None:
    parsed = parse_html(crr_report.html)
    summary = parsed.tables["summary"]
    # the zero-filled columns are empty for CRR and left out of the display
    assert summary["header"] == [c for c in SUMMARY_COLUMNS if "zero_filled" not in c]
    csv_rows = {r["image"]: r for r in read_csv(crr_report.csv)}
    assert len(summary["rows"]) == 2
    for row in summary["rows"]:
        cells = dict(zip(summary["header"], row))
        want = csv_rows[cells["image"][0]]
        for col in summary["header"]:
            text, value = cells[col]
            if value is None:
                assert text == want[col]
            else:  # exact value in data-value, rounded text shown
                assert float(value) == pytest.approx(float(want[col]), rel=1e-15)
                assert text == f"{float(want[col]):.2f}"
    # every image is embedded; nothing is fetched from elsewhere
    n_figs = 4 * 2 + len(crr_report.experiment_files) // 2
    assert len(parsed.img_srcs) == n_figs
    assert all(s.startswith("data:image/png;base64,") for s in parsed.img_srcs)
    assert parsed.external == []


def test_pdf_pages_and_files(synth: Synth, crr_report) -> None:
    # summary page + 4 per image + the solver figure (noise and memory have no data here)
    n_exp = len(crr_report.experiment_files) // 2
    assert [p.stem for p in crr_report.experiment_files] == ["solver_iterations", "solver_iterations"]
    assert page_count(crr_report.pdf) == 1 + 4 * 2 + n_exp == crr_report.pdf_pages
    for im in crr_report.images:
        assert page_count(im.directory / "report.pdf") == 5 == im.pdf_pages
        names = sorted(p.name for p in im.files)
        assert names == sorted([f"{n}.{ext}" for n in IMAGE_FIGURES for ext in ("pdf", "png")]
                               + ["report.pdf", "report.html"])
        for p in im.files:
            assert p.is_file() and p.stat().st_size > 1000
            if p.suffix == ".pdf":
                assert p.read_bytes().startswith(b"%PDF")
            if p.suffix == ".png":
                assert p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert crr_report.paths()[:3] == [crr_report.html, crr_report.pdf, crr_report.csv]
    assert len(set(crr_report.paths())) == len(crr_report.paths())
    assert any("noise_robustness" in s for s in crr_report.skipped)
    assert any("memory_vs_k" in s for s in crr_report.skipped)


def test_per_image_files_logged_to_the_run(synth: Synth, crr_report) -> None:
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=synth.uri)
    for im in crr_report.images:
        logged = sorted(Path(f.path).name for f in client.list_artifacts(im.run_id, "report"))
        assert logged == sorted(p.name for p in im.files)
    # the seed-1 camera run is not a representative: nothing logged to it
    assert client.list_artifacts(synth.runs["camera1"]["run_id"], "report") == []


def test_logged_metric_mismatch_is_noted(crr_report) -> None:
    notes = {im.image: im.notes for im in crr_report.images}
    assert notes["camera"] == []
    assert any(n.startswith("logged hfe") for n in notes["astronaut"]), notes["astronaut"]


# ----------------------------------------------------------------------------- figures, directly


def test_image_figures_panels_values_and_stage_boundary(synth: Synth) -> None:
    from mlflow.tracking import MlflowClient

    info = synth.runs["camera0"]
    client = MlflowClient(tracking_uri=synth.uri)
    images, notes = load_run_images(client, info["run_id"])
    assert notes == [] and images.source == "images.pt"
    assert torch.equal(images.stage1, info["stage1"]) and torch.equal(images.final, info["final"])
    s = info["settings"]
    chars = signal_characteristics(images, s, "crr")
    hist = {k: metric_history(client, info["run_id"], k) for k in ("psnr", "loss", "stage")}
    assert stage_boundaries(hist["stage"]) == [E1]
    figs = image_figures(images, chars, s, "crr", "crr", hist)
    assert list(figs) == list(IMAGE_FIGURES)

    rec = panels(figs["reconstructions"])
    assert len(rec) == 6  # GT, stage 1, final over their spectra
    gt = info["gt"][0, 0].double().numpy()
    for ax, img in zip(rec[:3], (info["gt"], info["stage1"], info["final"])):
        assert np.allclose(ax.images[0].get_array(), img[0, 0].double().numpy())
    assert np.allclose(rec[3].images[0].get_array(), np.log10(np.abs(np.fft.fftshift(np.fft.fft2(gt)))))
    want = expected_characteristics(info)
    assert f"HFE {want['hfe_gt']:.2f} %" in rec[3].get_title()
    assert f"HFE {want['hfe_final']:.2f} %" in rec[5].get_title()
    circle = rec[4].patches[0]
    assert circle.get_radius() == pytest.approx(s.hfe_cutoff * 33 / 2)

    res = panels(figs["residuals"])
    assert len(res) == 4
    assert sum(a.get_label() == "<colorbar>" for a in figs["residuals"].axes) == 1
    mask = res[3].images[0].get_array()
    assert 100 * float(np.mean(mask)) == pytest.approx(want["sr_final"], abs=1e-12)
    assert f"SR {want['sr_final']:.2f} %" in res[3].get_title()
    assert np.allclose(res[1].images[0].get_array(), np.abs(gt - info["final"][0, 0].double().numpy()), atol=1e-6)

    (spec_ax,) = panels(figs["radial_spectra"])
    lines = {l.get_label(): l for l in spec_ax.lines}
    assert list(lines) == ["Ground truth", "DEQ (stage 1)", "DEQ+CRR", "residual DEQ (stage 1)", "residual DEQ+CRR"]
    want_ps = M.radial_power_spectrum(info["gt"] - info["final"])[0].numpy()
    assert np.allclose(lines["residual DEQ+CRR"].get_ydata(), want_ps, rtol=1e-12)
    assert np.allclose(lines["Ground truth"].get_xdata(), M.radial_frequencies(33, 33).numpy())

    curves = panels(figs["training_curves"])
    assert len(curves) == 2
    for ax in curves:
        marks = [l for l in ax.lines if l.get_gid() == F.STAGE_LINE_GID]
        assert len(marks) == 1 and list(marks[0].get_xdata()) == [E1, E1]
    psnr_line = curves[0].lines[0]
    # the per-epoch history, not the final value logged one step later
    assert list(psnr_line.get_xdata()) == [s for s, _ in info["psnr"]]
    assert list(psnr_line.get_ydata()) == [v for _, v in info["psnr"]]
    assert list(curves[1].lines[0].get_ydata()) == pytest.approx([v for _, v in info["loss"]])


def test_training_curves_boundary_and_loss_scale() -> None:
    psnr = [(e, 20.0 + e) for e in range(6)]
    fig = F.training_curves_figure(psnr, [(e, 10.0 ** -e) for e in range(6)], boundaries=[4], stage1_psnr=23.0)
    ax_psnr, ax_loss = panels(fig)
    assert ax_loss.get_yscale() == "log"  # five decades
    assert [list(l.get_xdata()) for l in ax_psnr.lines if l.get_gid() == F.STAGE_LINE_GID] == [[4, 4]]
    assert any(list(l.get_ydata()) == [23.0, 23.0] for l in ax_psnr.lines)
    fig = F.training_curves_figure(psnr, [(e, 0.40 - 0.01 * e) for e in range(6)])
    ax_psnr, ax_loss = panels(fig)
    assert ax_loss.get_yscale() == "linear"  # less than a decade: log ticks would not tell values apart
    assert not [l for l in ax_psnr.lines if l.get_gid() == F.STAGE_LINE_GID]


def test_significant_residual_mask_matches_metric() -> None:
    gen = torch.Generator().manual_seed(3)
    for dtype in (torch.float32, torch.float64):
        t = torch.rand(3, 2, 17, 13, generator=gen, dtype=dtype)
        p = t + 0.1 * torch.randn(3, 2, 17, 13, generator=gen, dtype=dtype)
        for thr in (0.0, 0.05, 0.13):
            mask = significant_residual_mask(p, t, thr)
            share = 100.0 * mask.reshape(3, -1).double().mean(dim=1)
            assert torch.allclose(share, M.significant_residuals(p, t, threshold=thr), rtol=0, atol=1e-12)


def test_stage_boundaries() -> None:
    assert stage_boundaries([(3, 2.0), (0, 1.0), (1, 1.0), (2, 1.0), (4, 2.0)]) == [3]
    assert stage_boundaries([(0, 1.0), (1, 1.0)]) == []
    assert stage_boundaries([]) == []


def test_reconstruction_figure_not_recorded_panel() -> None:
    img = np.random.default_rng(0).random((9, 11))
    fig = F.reconstruction_figure([F.ImagePanel("Ground truth", img), F.ImagePanel("DEQ (stage 1)", None),
                                   F.ImagePanel("DEQ+CRR", img, 1.0, 20.0)], cutoff=0.25)
    axs = panels(fig)
    assert len(axs) == 6
    for ax in (axs[1], axs[4]):
        assert len(ax.images) == 0 and [t.get_text() for t in ax.texts] == [F.NOT_RECORDED]
    assert len(axs[0].images) == len(axs[2].images) == 1
    with pytest.raises(ValueError, match="at least one panel"):
        F.reconstruction_figure([], cutoff=0.25)


# ----------------------------------------------------------------------------- degraded runs


def test_missing_stage1_png_fallback_and_nothing(synth: Synth, tmp_path: Path) -> None:
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=synth.uri)
    info = synth.runs["nostage1"]
    images, notes = load_run_images(client, info["run_id"])
    assert images.stage1 is None and notes == []
    chars = signal_characteristics(images, SpectralSettings(), "crr")
    assert math.isnan(chars["psnr_stage1"]) and math.isnan(chars["gain_db"])
    assert chars["psnr_final"] == pytest.approx(float(M.psnr(info["final"], info["gt"])[0]), rel=1e-12)
    figs = image_figures(images, chars, SpectralSettings(), "crr", "crr", {})
    rec = panels(figs["reconstructions"])
    assert len(rec) == 6 and len(rec[1].images) == 0 and rec[1].texts[0].get_text() == F.NOT_RECORDED
    assert len(panels(figs["residuals"])[0].images) == 0

    info = synth.runs["pngonly"]
    images, notes = load_run_images(client, info["run_id"])
    assert images.source == "8-bit PNG" and any("8-bit" in n for n in notes)
    for got, want in ((images.ground_truth, info["gt"]), (images.stage1, info["stage1"])):
        assert (got - want.clamp(0, 1)).abs().max() <= 0.5 / 255 + 1e-6

    images, notes = load_run_images(client, synth.runs["nothing"]["run_id"])
    assert images is None and "recorded no images" in notes[0]

    # a full single-run report on the run without images still completes
    rep = spectral_report(DEGRADED_EXP, tmp_path, run_id=synth.runs["nothing"]["run_id"], tracking_uri=synth.uri,
                          log_artifacts=False, png_dpi=72)
    (row,) = read_csv(rep.csv)
    assert row["source"] == "not recorded" and row["hfe_final"] == "" and row["family"] == "deq_inr"
    assert page_count(rep.pdf) == 5 and rep.experiment_files == []
    assert len(rep.skipped) == 3 and all("--run" in s for s in rep.skipped)


def test_errors(synth: Synth, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"unknown report kind 'spectra'.*\['spectral'\]"):
        report_command("spectra", CRR_EXP, tmp_path, tracking_uri=synth.uri)
    with pytest.raises(ValueError, match="run 'nope' is not in experiment"):
        spectral_report(CRR_EXP, tmp_path, run_id="nope", tracking_uri=synth.uri)
    with pytest.raises(ValueError, match="unknown experiment 'missing'"):
        spectral_report("missing", tmp_path, tracking_uri=synth.uri)


# ----------------------------------------------------------------------------- sweep-wide figures


def test_noise_table_and_figure(synth: Synth) -> None:
    runs = load_runs(DEPROX_EXP, tracking_uri=synth.uri)
    table = noise_table(runs)
    logged = synth.runs["deprox"]["runs"]
    assert len(table) == sum(len(r["noise"]) for r in logged)
    fig = F.noise_figure(table)
    axs = panels(fig)
    assert len(axs) == 2 and axs[0].get_ylabel() == "PSNR (dB)" and axs[1].get_ylabel() == "SSIM"
    for ax, metric in zip(axs, ("psnr", "ssim")):
        plotted = sorted(tuple(np.round(l.get_ydata(), 9)) for l in ax.lines if len(l.get_xdata()))
        want = []  # one line per configuration (seeds averaged): deq per solver, unrolled per K, zero-filled
        for kind, solver, k in (("deq", "anderson", None), ("deq", "fixed_point_iter", None), ("unrolled", None, 2),
                                ("unrolled", None, 4), ("unrolled", None, 8), ("zero_filled", None, None)):
            group = [r for r in logged if r["kind"] == kind and (k is None or r["k"] == k)
                     and (solver is None or r["solver"] == solver)]
            means = [np.mean([r["noise"][f"noise/{s}/{metric}"] for r in group]) for s in ("0.0", "0.01", "0.05")]
            want.append(tuple(np.round(means, 9)))
        assert plotted == sorted(want)
        xs = {tuple(l.get_xdata()) for l in ax.lines if len(l.get_xdata())}
        assert xs == {(0.0, 0.01, 0.05)}


def test_solver_table_and_figure(synth: Synth) -> None:
    from mlflow.tracking import MlflowClient

    runs = load_runs(DEPROX_EXP, tracking_uri=synth.uri)
    table = solver_table(runs, MlflowClient(tracking_uri=synth.uri))
    logged = synth.runs["deprox"]["runs"]
    for solver in ("anderson", "fixed_point_iter"):
        deq = [r for r in logged if r["kind"] == "deq" and r["solver"] == solver]
        fwd = table[(table["solver"] == solver) & (table["direction"] == "forward")]
        assert sorted(fwd["nstep"]) == sorted(v for r in deq for v in r["fwd"])
        bwd = table[(table["solver"] == solver) & (table["direction"] == "backward")]
        assert sorted(bwd["nstep"]) == sorted(v for r in deq for v in r["bwd"])
    unrolled_ids = {r["run_id"] for r in logged if r["kind"] != "deq"}
    assert not set(table["run_id"]) & unrolled_ids  # fixed K is no solver statistic
    fig = F.solver_figure(table)
    axs = panels(fig)
    assert len(axs) == 2 and "forward" in axs[0].get_xlabel() and "backward" in axs[1].get_xlabel()


def test_memory_tables_and_figure(synth: Synth) -> None:
    runs = load_runs(DEPROX_EXP, tracking_uri=synth.uri)
    unrolled, deq = memory_tables(runs)
    logged = synth.runs["deprox"]["runs"]
    want_u = sorted((r["k"], r["mem"]) for r in logged if r["kind"] == "unrolled")
    assert sorted(zip(unrolled["k"], unrolled["mem_mb"])) == want_u
    assert sorted(deq["mem_mb"]) == sorted(r["mem"] for r in logged if r["kind"] == "deq")  # not zero-filled
    fig = F.memory_figure(unrolled, deq)
    (ax,) = panels(fig)
    (hline,) = [l for l in ax.lines if l.get_gid() == F.DEQ_LINE_GID]
    assert hline.get_ydata()[0] == pytest.approx(np.mean([r["mem"] for r in logged if r["kind"] == "deq"]))
    (curve,) = [l for l in ax.lines if len(l.get_xdata()) and l.get_gid() is None]
    assert list(curve.get_xdata()) == [2, 4, 8]
    for k, y in zip((2, 4, 8), curve.get_ydata()):
        assert y == pytest.approx(np.mean([m for kk, m in want_u if kk == k]))


def test_experiment_figures_made_or_skipped(synth: Synth) -> None:
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=synth.uri)
    figs, skipped = experiment_figures(load_runs(DEPROX_EXP, tracking_uri=synth.uri), client)
    assert sorted(figs) == ["memory_vs_k", "noise_robustness", "solver_iterations"] and skipped == []
    figs, skipped = experiment_figures(load_runs(DEGRADED_EXP, tracking_uri=synth.uri), client)
    assert figs == {} and len(skipped) == 3


# ----------------------------------------------------------------------------- DE-Prox and grouping


def test_deprox_groups_by_kind_and_reports_the_volume(synth: Synth, tmp_path: Path) -> None:
    logged = synth.runs["deprox"]["runs"]
    runs = load_runs(DEPROX_EXP, tracking_uri=synth.uri)
    reps = representative_runs(runs)
    # data.image is a meaningless default for DE-Prox; the kind names the group, solver and K
    # split it where they vary within a kind (acceleration is constant here); seed 0 stands for each
    def label(r: dict) -> str:
        if r["kind"] == "deq":
            return f"deq, solver={r['solver']}"
        return f"unrolled, unroll_k={r['k']}" if r["kind"] == "unrolled" else r["kind"]

    want = {label(r): r["run_id"] for r in logged if r["seed"] == 0}
    assert dict(zip(reps["image"], reps["run_id"])) == want
    assert sorted(want) == ["deq, solver=anderson", "deq, solver=fixed_point_iter", "unrolled, unroll_k=2",
                            "unrolled, unroll_k=4", "unrolled, unroll_k=8", "zero_filled"]

    info = logged[0]
    rep = spectral_report(DEPROX_EXP, tmp_path, run_id=info["run_id"], tracking_uri=synth.uri,
                          log_artifacts=False, png_dpi=72)
    (row,) = read_csv(rep.csv)
    assert row["image"] == "deq, solver=anderson" and row["volume"] == "file1.h5" and row["slices"] == "4"
    gt, vmax = info["gt"], info["gt"].amax()  # fastMRI: the volume's maximum is the data range
    for name in ("zero_filled", "final"):
        pred = info[name]
        assert_same(row[f"psnr_{name}"], float(M.psnr(pred, gt, data_range=vmax)[0]))
        assert_same(row[f"ssim_{name}"], float(M.ssim(pred, gt, data_range=vmax)[0]))
        assert_same(row[f"hfe_{name}"], float(M.hfe(pred)[0]))
        assert_same(row[f"sr_{name}"], float(M.significant_residuals(pred, gt)[0]))
    assert_same(row["psnr_stage1"], math.nan)
    assert any("validation volume file1.h5" in n for n in rep.images[0].notes)
    header = parse_html(rep.html).tables["summary"]["header"]
    assert "psnr_zero_filled" in header and "psnr_stage1" not in header
    assert page_count(rep.images[0].directory / "report.pdf") == 5


def test_representative_is_seed0_newest_rerun() -> None:
    t = pd.to_datetime([1000, 2000, 3000, 4000, 5000], unit="ms", utc=True)
    runs = pd.DataFrame({"run_id": list("abcde"), "family": "crr", "start_time": t,
                         "data.image": ["camera", "camera", "camera", "boat", "boat"],
                         "seed": pd.array([1, 0, 0, 2, 1], dtype="Int64")})
    reps = representative_runs(runs)
    # camera: two seed-0 runs, the newer ('c') counts; boat: no seed 0, the smallest seed ('e')
    assert dict(zip(reps["image"], reps["run_id"])) == {"boat": "e", "camera": "c"}


def test_image_labels_and_output_columns() -> None:
    rows = [
        {"run_id": "a1", "family": "deprox", "deprox.kind": "deq", "mri.acceleration": 4, "data.image": "camera"},
        {"run_id": "a2", "family": "deprox", "deprox.kind": "deq", "mri.acceleration": 8, "data.image": "camera"},
        {"run_id": "a3", "family": "deprox", "deprox.kind": "zero_filled", "mri.acceleration": 8,
         "data.image": "camera"},
    ]
    # acceleration varies among the deq runs only
    assert image_labels(pd.DataFrame(rows)) == ["deq, acceleration=4", "deq, acceleration=8", "zero_filled"]
    mixed = pd.DataFrame(rows[:1] + [{"run_id": "b1", "family": "crr", "data.image": "camera"},
                                     {"run_id": "c1", "family": "crr", "data.image": None}])
    assert image_labels(mixed) == ["deq (deprox)", "camera (crr)", "run-c1 (crr)"]
    inr = pd.DataFrame({"run_id": list("xyz"), "family": "deq_inr", "data.image": ["camera", "camera", "boat"],
                        "deq.solver": ["anderson", "broyden", "anderson"], "train.lr": [1e-3, 1e-3, 2e-3]})
    assert image_labels(inr) == ["camera, solver=anderson", "camera, solver=broyden", "boat"]

    x = torch.zeros(1, 2, 9, 9)
    images = RunImages(x, x + 1, zero_filled=x + 2)
    assert [c[:2] for c in output_columns(images, "deprox", "deq")] == [("zero_filled", "Zero-filled"),
                                                                        ("final", "deq")]
    assert [c[:2] for c in output_columns(images, "deprox", "zero_filled")] == [("final", "zero_filled")]
    assert [c[:2] for c in output_columns(RunImages(x, x), "crr", "crr")] == [("stage1", "DEQ (stage 1)"),
                                                                             ("final", "DEQ+CRR")]
    assert output_columns(RunImages(x, x), "crr", "crr")[0][2] is None
    assert [c[:2] for c in output_columns(None, "deq_inr", "deq_inr")] == [("final", "DEQ")]


# ----------------------------------------------------------------------------- the real pipeline


@pytest.fixture(scope="module")
def real_crr(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One tiny CRR run through the real CLI (2 + 2 epochs) in its own directory."""
    cwd = tmp_path_factory.mktemp("crr_real")
    env = {k: v for k, v in os.environ.items() if k not in ("MLFLOW_TRACKING_URI", "DEQBENCH_RUNS")}
    proc = subprocess.run(
        [sys.executable, "-m", "jobs.cli", "run", str(REPO / "configs/experiments/crr_tiny.yaml"),
         "--set", "train.epochs=2", "--set", "crr.epochs=2"],
        cwd=cwd, env=env, capture_output=True, text=True, timeout=600,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return cwd


@pytest.mark.slow
def test_cli_report_on_a_real_crr_run(real_crr: Path) -> None:
    from mlflow.tracking import MlflowClient

    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}
    proc = subprocess.run([sys.executable, "-m", "jobs.cli", "report", "spectral", "--experiment", "crr_tiny",
                           "--out", "rep"], cwd=real_crr, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    written = [Path(line.split("report written to ", 1)[1]) for line in proc.stdout.splitlines()
               if line.startswith("report written to ")]
    assert written[:3] == [real_crr / "rep" / n for n in
                           ("spectral_report.html", "spectral_report.pdf", "signal_characteristics.csv")]
    assert all(p.is_file() for p in written)
    assert "camera: 10 files logged to MLflow run" in proc.stdout

    client = MlflowClient(tracking_uri=f"sqlite:///{real_crr}/mlflow.db")
    run = client.search_runs([client.get_experiment_by_name("crr_tiny").experiment_id])[0]
    (row,) = read_csv(real_crr / "rep" / "signal_characteristics.csv")
    assert row["run_id"] == run.info.run_id and row["family"] == "crr"
    # the report's numbers are the run's own logged final metrics ...
    m = run.data.metrics
    for logged, col in (("hfe", "hfe_final"), ("sr", "sr_final"), ("psnr", "psnr_final"),
                        ("stage1/psnr", "psnr_stage1"), ("ssim", "ssim_final")):
        assert float(row[col]) == pytest.approx(m[logged], rel=1e-9, abs=1e-12), col
    # ... and suite.metrics on the run's images.pt
    data = torch.load(client.download_artifacts(run.info.run_id, "images.pt", str(real_crr)), weights_only=True)
    gt, s1 = data["ground_truth"], data["stage1"]
    assert float(row["hfe_stage1"]) == pytest.approx(float(M.hfe(s1)[0]), rel=1e-12)
    assert float(row["sr_stage1"]) == pytest.approx(float(M.significant_residuals(s1, gt)[0]), rel=1e-12)
    assert float(row["hfe_gt"]) == pytest.approx(float(M.hfe(gt)[0]), rel=1e-12)
    # stage boundary at train.epochs = 2, as logged
    assert stage_boundaries(metric_history(client, run.info.run_id, "stage")) == [2]
    parsed = parse_html(real_crr / "rep" / "spectral_report.html")
    hfe_cell = dict(zip(parsed.tables["summary"]["header"], parsed.tables["summary"]["rows"][0]))["hfe_final"]
    assert float(hfe_cell[1]) == pytest.approx(m["hfe"], rel=1e-9)
    # 1 summary page, 4 image pages, the solver-iteration page
    assert page_count(real_crr / "rep" / "spectral_report.pdf") == 6
    logged = sorted(Path(f.path).name for f in client.list_artifacts(run.info.run_id, "report"))
    assert "report.pdf" in logged and "reconstructions.png" in logged and len(logged) == 10


def test_mri_volume_uses_volume_max_and_middle_slice() -> None:
    gen = torch.Generator().manual_seed(11)
    gt = 0.2 + torch.rand(1, 5, 17, 19, generator=gen)  # min well above 0: range != max
    pred = gt + 0.05 * torch.randn(1, 5, 17, 19, generator=gen)
    images = RunImages(gt, pred)
    chars = signal_characteristics(images, SpectralSettings(), "deprox")
    vmax = gt.amax()
    assert chars["psnr_final"] == pytest.approx(float(M.psnr(pred, gt, data_range=vmax)[0]), rel=1e-12)
    assert chars["ssim_final"] == pytest.approx(float(M.ssim(pred, gt, data_range=vmax)[0]), rel=1e-12)
    assert chars["psnr_final"] != pytest.approx(float(M.psnr(pred, gt)[0]), rel=1e-3)
    assert math.isnan(chars["psnr_stage1"])
    figs = image_figures(images, chars, SpectralSettings(), "deprox", "deq", {})
    rec = panels(figs["reconstructions"])
    assert len(rec) == 4  # ground truth and the model's output, over their spectra
    assert rec[1].get_title().startswith("deq")
    assert np.allclose(rec[0].images[0].get_array(), gt[0, 2].double().numpy())
