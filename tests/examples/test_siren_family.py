"""Bring your own family: the shipped SIREN-filter example next to a built-in family, one sweep, one table.

The sweep runs on the local launcher, whose cells are executed by
``python -m jobs.node`` in other processes: the family reference and its own
config section travel in the cell to the node job (as on Slurm and Ray, which
run the same node job), and both families' runs land in one MLflow experiment
and one ``deqbench table``.
"""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import yaml
from mlflow.tracking import MlflowClient

from suite.config import ConfigError, load_config

REPO = Path(__file__).resolve().parents[2]
EXAMPLE = REPO / "examples" / "siren.yaml"
FAMILY_FILE = REPO / "examples" / "siren_family.py"


def deqbench(*args, cwd, timeout=600):
    return subprocess.run([sys.executable, "-m", "jobs.cli", *map(str, args)], cwd=cwd, capture_output=True,
                          text=True, timeout=timeout)


SMALL = {"train.epochs": 2, "data.size": 41}


def two_families(name):
    """A 2-cell sweep of the example's two families: the built-in DEQ-INR and SIREN, 2 epochs each."""
    return {"name": name, "seeds": [0],
            "groups": [{"base": str(REPO / "configs/experiments/deq_inr_tiny.yaml"), "set": SMALL},
                       {"base": str(EXAMPLE), "set": {**SMALL, "siren.omega_0": 10.0}}]}


def run_sweep(tmp, spec, *launcher_args):
    """Writes ``spec`` to ``tmp/sweep.yaml`` and runs it into ``tmp``'s runs and store; ``(process, uri)``.

    From the repository root: the example names its file relative to the working directory.
    """
    (tmp / "sweep.yaml").write_text(yaml.safe_dump(spec))
    uri = f"sqlite:///{tmp}/mlflow.db"
    out = deqbench("sweep", tmp / "sweep.yaml", *launcher_args, "--runs-dir", tmp / "runs", "--tracking-uri", uri,
                   cwd=REPO)
    return out, uri


@pytest.fixture(scope="module")
def sweep(tmp_path_factory):
    """:func:`two_families` in one local sweep, 2 workers."""
    tmp = tmp_path_factory.mktemp("byo")
    out, uri = run_sweep(tmp, two_families("byo"), "--workers", "2")
    return tmp, uri, out


def test_user_family_runs_in_one_sweep_with_a_builtin(sweep):
    tmp, uri, out = sweep
    assert out.returncode == 0, out.stdout + out.stderr
    assert "2 finished, 0 failed" in out.stdout
    client = MlflowClient(uri)
    found = client.search_runs([client.get_experiment_by_name("byo").experiment_id])
    by_family = {}
    for r in found:
        by_family.setdefault(r.data.params["family"], []).append(r)
    siren_ref = f"{FAMILY_FILE}:SIREN"  # recorded with its absolute path: any node job finds it
    assert sorted(by_family) == sorted(["deq_inr", siren_ref])
    siren = by_family[siren_ref]
    assert [r.data.params["siren.omega_0"] for r in siren] == ["10.0"]
    assert all(r.data.tags["family"] == siren_ref for r in siren)
    for r in found:  # the same records as a built-in run: final metrics, per-phase memory, artifacts
        assert r.info.status == "FINISHED"
        for key in ("psnr", "ssim", "hfe", "sr", "mem/peak_mb", "mem/train_peak_mb", "mem/infer_peak_mb"):
            assert key in r.data.metrics, key
        arts = {a.path for a in client.list_artifacts(r.info.run_id)}
        assert {"images.pt", "metrics.json", "reconstruction.png"} <= arts
    # different filters, same data and steps: different outputs
    assert len({round(r.data.metrics["psnr"], 6) for r in found}) == 2


def test_one_table_from_both_families(sweep):
    tmp, uri, _ = sweep
    out = deqbench("table", "--experiment", "byo", "--rows", "family,siren.omega_0", "--metrics", "psnr,sr",
                   "--format", "csv", "--tracking-uri", uri, cwd=tmp)
    assert out.returncode == 0, out.stderr
    lines = [ln for ln in out.stdout.splitlines() if ln.startswith(("deq_inr", str(FAMILY_FILE)))]
    assert len(lines) == 2, out.stdout
    assert any(ln.startswith("deq_inr") for ln in lines)
    assert any(ln.startswith(f"{FAMILY_FILE}:SIREN,10,") for ln in lines)


def test_shipped_sweep_expands_both_families(tmp_path):
    out = deqbench("sweep", REPO / "examples/siren_sweep.yaml", "--dry-run", "--runs-dir", tmp_path, cwd=REPO)
    assert out.returncode == 0, out.stderr
    assert out.stdout.count("siren_family.py:SIREN") == 4 and out.stdout.count("deq_inr") >= 2


@pytest.fixture(autouse=True)
def _from_repo_root(monkeypatch):
    monkeypatch.chdir(REPO)  # the example names its file relative to the working directory


def test_user_section_is_validated_strictly():
    cfg = load_config(EXAMPLE, {"siren.omega_0": 12.5})
    assert cfg.siren.omega_0 == 12.5 and cfg.family == f"{FAMILY_FILE}:SIREN"
    with pytest.raises(ConfigError, match=r"unknown key 'siren.omega' .*valid keys in siren: omega_0"):
        load_config(EXAMPLE, {"siren.omega": 1.0})
    with pytest.raises(ConfigError, match=r"siren.omega_0: value -1.0 out of range"):
        load_config(EXAMPLE, {"siren.omega_0": -1.0})
    with pytest.raises(ConfigError, match="unknown key 'siren'"):  # a built-in family has no such section
        load_config(REPO / "configs/experiments/deq_inr_tiny.yaml", {"siren.omega_0": 1.0})


def test_bad_family_references_are_one_line_errors(tmp_path):
    for ref, words in [("nope", "unknown family 'nope'; valid: crr, deprox, deq_inr"),
                       ("no_such_module:X", "cannot import module 'no_such_module'"),
                       (f"{FAMILY_FILE}:NOPE", "has no attribute 'NOPE'"),
                       ("missing.py:X", "not found"),
                       (f"{FAMILY_FILE}:SirenConfig", "not a suite.families.Family")]:
        with pytest.raises(ConfigError, match=words):
            load_config(EXAMPLE, {"family": ref})
    broken = tmp_path / "broken.py"
    broken.write_text("raise RuntimeError('boom')\n")
    (tmp_path / "e.yaml").write_text(f"family: {broken}:F\n")
    out = deqbench("run", tmp_path / "e.yaml", cwd=tmp_path)
    assert out.returncode == 2 and "importing it failed: RuntimeError: boom" in out.stderr
    assert "Traceback" not in out.stderr


def test_entry_point_family(tmp_path, monkeypatch):
    """An installed package's family, found by its ``deqbench.families`` entry point name."""
    (tmp_path / "my_deq_family.py").write_text(textwrap.dedent(f"""
        from suite.families import get_family
        FAMILY = get_family({str(FAMILY_FILE) + ":SIREN"!r})
    """))
    dist = tmp_path / "my_deq_family-0.1.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: my-deq-family\nVersion: 0.1\n")
    (dist / "entry_points.txt").write_text("[deqbench.families]\nmy_siren = my_deq_family:FAMILY\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    from suite.families import FAMILIES, family_names

    monkeypatch.delitem(FAMILIES, "my_siren", raising=False)
    cfg = load_config(EXAMPLE, {"family": "my_siren", "siren.omega_0": 3.0})
    assert cfg.family == "my_siren" and cfg.siren.omega_0 == 3.0
    assert "my_siren" in family_names()
    FAMILIES.pop("my_siren", None)


def test_reports_label_and_group_a_user_family():
    from analysis.report import group_keys, output_columns

    ref = f"{FAMILY_FILE}:SIREN"
    assert [label for _, label, _ in output_columns(None, ref, "model")] == ["DEQ (SIREN filters)"]
    assert [label for _, label, _ in output_columns(None, "crr", "model")] == ["DEQ (stage 1)", "DEQ+CRR"]
    assert group_keys(ref, ["data.image", "deq.solver"]) == ("data.image", "deq.solver")  # as DEQ-INR: by image
    assert group_keys("deprox", ["deprox.kind", "mri.acceleration"]) == ("deprox.kind", "mri.acceleration")


@pytest.mark.slow
def test_spectral_report_covers_both_families(sweep):
    tmp, uri, _ = sweep
    out = deqbench("report", "spectral", "--experiment", "byo", "--out", tmp / "report", "--tracking-uri", uri,
                   cwd=tmp)
    assert out.returncode == 0, out.stderr
    rows = (tmp / "report" / "signal_characteristics.csv").read_text().splitlines()[1:]
    assert len(rows) == 2  # one image per family
    assert sum(f"{FAMILY_FILE}:SIREN" in r for r in rows) == 1 and sum(",deq_inr," in r for r in rows) == 1


@pytest.mark.slow
@pytest.mark.slurm
def test_user_family_on_the_local_slurm(slurm_cluster, tmp_path):
    """The same node job under submitit on the real local Slurm: the reference reaches the array task."""
    spec = {"name": "byo_slurm", "seeds": [0], "groups": [{"base": str(EXAMPLE), "set": SMALL}]}
    out, uri = run_sweep(tmp_path, spec, "--launcher", "submitit", "--launcher-config",
                         REPO / "configs/launchers/local_slurm.yaml")
    assert out.returncode == 0, out.stdout + out.stderr
    client = MlflowClient(uri)
    (run,) = client.search_runs([client.get_experiment_by_name("byo_slurm").experiment_id])
    assert run.info.status == "FINISHED" and run.data.params["family"] == f"{FAMILY_FILE}:SIREN"
    assert run.data.params["siren.omega_0"] == "30.0" and run.data.tags.get("slurm_job_id")


@pytest.mark.slow
def test_user_family_under_ray_next_to_a_builtin(tmp_path):
    """Ray Tune trials run the same node job: the user family and a built-in one, one sweep, one table."""
    out, uri = run_sweep(tmp_path, two_families("byo_ray"), "--launcher", "ray", "--launcher-config",
                         REPO / "configs/launchers/ray_local.yaml")
    assert out.returncode == 0, out.stdout + out.stderr
    assert "2 finished, 0 failed" in out.stdout
    client = MlflowClient(uri)
    runs = client.search_runs([client.get_experiment_by_name("byo_ray").experiment_id])
    assert sorted(r.data.params["family"] for r in runs) == sorted(["deq_inr", f"{FAMILY_FILE}:SIREN"])
    assert all(r.info.status == "FINISHED" for r in runs)
    table = deqbench("table", "--experiment", "byo_ray", "--rows", "family", "--metrics", "psnr",
                     "--tracking-uri", uri, cwd=tmp_path)
    assert table.returncode == 0, table.stderr
    psnr = {r.data.params["family"]: r.data.metrics["psnr"] for r in runs}
    for family, value in psnr.items():
        row = next(line for line in table.stdout.splitlines() if line.startswith(f"| {family} |"))
        assert f"{value:.2f}" in row
