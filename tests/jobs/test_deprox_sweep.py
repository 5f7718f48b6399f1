"""DE-Prox through the CLI: comparable zero-filled / unrolled / DEQ cells, bad data failing only its cell."""

import subprocess
import sys
from pathlib import Path

import h5py
import numpy as np
import pytest
import yaml
from mlflow.tracking import MlflowClient

from suite.config import load_config
from suite.training.deprox import ensure_synthetic

REPO = Path(__file__).resolve().parents[2]
TINY = REPO / "configs/experiments/deprox_tiny.yaml"
SMALL = {  # 3 synthetic volumes of 3 slices (2 train, 1 validation), 41 x 43, a 3 x 8 DnCNN, 1 + 2 epochs
    "mri.synth_volumes": 3, "mri.synth_slices": 3, "mri.slice_start": 0, "mri.slice_stop": 3,
    "mri.synth_size": [56, 43], "mri.crop": [41, 43], "deprox.depth": 3, "deprox.width": 8,
    "deprox.pretrain_epochs": 1, "train.epochs": 2, "train.batch_size": 2, "deq.f_max_iter": 6,
    "deq.b_max_iter": 6, "eval.noise_sigmas": [0.0, 0.1],
}


def deqbench(*args, cwd):
    return subprocess.run([sys.executable, "-m", "jobs.cli", *map(str, args)], cwd=cwd, capture_output=True, text=True,
                          timeout=900)


def runs(tmp, experiment):
    c = MlflowClient(f"sqlite:///{tmp}/mlflow.db")
    exp = c.get_experiment_by_name(experiment)
    return c, ([] if exp is None else c.search_runs([exp.experiment_id]))


@pytest.fixture(scope="module")
def sweep_dir(tmp_path_factory):
    """Three good cells (zero-filled, unrolled, DEQ) and three with bad data, run once with 2 workers."""
    tmp = tmp_path_factory.mktemp("deprox_sweep")
    small = {**SMALL, "mri.synth_dir": str(tmp / "synth")}
    good = sorted(ensure_synthetic(load_config(TINY, small).mri).glob("*.h5"))
    broken = tmp / "broken"
    broken.mkdir()
    for p in good:
        (broken / p.name).symlink_to(p)
    with h5py.File(broken / "bad.h5", "w") as f:  # a volume without k-space
        f.create_dataset("reconstruction_esc", data=np.zeros((3, 41, 43), np.float32))
    spec = {
        "name": "t_deprox",
        "base": str(TINY),
        "set": small,
        "seeds": [0],
        "groups": [
            {"axes": {"deprox.kind": ["zero_filled", "unrolled", "deq"]}},
            {"set": {**small, "mri.root": str(broken)}},
            {"set": {**small, "mri.root": str(tmp / "missing")}},
            {"set": {**small, "mri.root": str(good[0].parent), "mri.slice_start": 5, "mri.slice_stop": 8}},
        ],
    }
    (tmp / "sweep.yaml").write_text(yaml.safe_dump(spec))
    return tmp, deqbench("sweep", "sweep.yaml", "--workers", "2", cwd=tmp)


@pytest.mark.slow
def test_bad_data_fails_only_its_cell_with_a_named_reason(sweep_dir):
    tmp, out = sweep_dir
    assert out.returncode == 1, out.stdout + out.stderr
    assert "6 cells, 0 already finished, 6 to run" in out.stdout
    assert "3 finished, 3 failed" in out.stdout
    _, found = runs(tmp, "t_deprox")
    failed = sorted(r.data.tags["failure_reason"] for r in found if r.info.status == "FAILED")
    assert len(failed) == 3 and sum(r.info.status == "FINISHED" for r in found) == 3
    reasons = "\n".join(failed)
    assert "bad.h5: no 'kspace' dataset" in reasons
    assert "missing' does not exist" in reasons
    assert "slice range [5, 8) lies outside the volume, which has 3 slices" in reasons
    assert "no 'kspace'" in out.stdout  # the reason reaches the user


@pytest.mark.slow
def test_kinds_are_comparable_cells_with_design_metrics(sweep_dir):
    tmp, _ = sweep_dir
    client, found = runs(tmp, "t_deprox")
    done = {r.data.params["deprox.kind"]: r for r in found if r.info.status == "FINISHED"}
    assert sorted(done) == ["deq", "unrolled", "zero_filled"]
    zf = {k: r.data.metrics["zf/psnr"] for k, r in done.items()}
    assert len(set(zf.values())) == 1  # same volumes, masks and reference in every cell
    assert done["zero_filled"].data.metrics["psnr"] == pytest.approx(zf["deq"], abs=1e-5)
    run = done["deq"]
    p, m = run.data.params, run.data.metrics
    assert p["family"] == "deprox" and p["deq.solver"] == "anderson" and p["mri.acceleration"] == "4"
    for key in ("psnr", "ssim", "nmse", "vif", "hfe", "sr", "loss", "stage", "stage1/psnr", "solver/fwd_nstep",
                "solver/bwd_nstep", "solver/abs_lowest", "solver/rel_lowest", "mem/peak_mb", "mem/train_peak_mb",
                "mem/infer_peak_mb", "time/epoch_s", "time/total_s", "noise/0/psnr", "noise/0.1/psnr",
                "noise/0.1/ssim"):
        assert key in m, key
    assert [x.step for x in client.get_metric_history(run.info.run_id, "loss")] == [0, 1, 2]  # 1 + 2 epochs, once
    assert [x.value for x in client.get_metric_history(run.info.run_id, "stage")] == [1.0, 2.0, 2.0]
    arts = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"config.yaml", "reconstruction.png", "residual.png", "ground_truth.png", "zero_filled.png", "images.pt",
            "metrics.json", "solver_trace.json"} <= arts
    assert done["unrolled"].data.metrics["solver/fwd_nstep"] == 5.0  # deprox_tiny's unroll_k
    assert done["zero_filled"].data.metrics["solver/fwd_nstep"] == 0.0


@pytest.mark.parametrize("bad, words", [
    (["--set", "mri.acceleration=16"], ["mri.center_fraction 0.08 x mri.acceleration 16", "< 1"]),
    (["--set", "mri.center_fraction=0.005"], ["cannot be made on 48 columns"]),
    (["--set", "deprox.kind=vae"], ["deprox.kind", "vae", "deq, unrolled, zero_filled"]),
])
def test_bad_mri_settings_refused_before_launch(tmp_path, bad, words):
    (tmp_path / "s.yaml").write_text(yaml.safe_dump({"name": "t_bad", "base": str(TINY), "seeds": [0, 1]}))
    out = deqbench("sweep", "s.yaml", *bad, cwd=tmp_path)
    assert out.returncode == 2
    for w in words:
        assert w in out.stderr, out.stderr
    assert not (tmp_path / "runs").exists()
    assert runs(tmp_path, "t_bad")[1] == []
