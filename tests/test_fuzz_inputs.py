"""Bad input, fuzzed (hypothesis): configs, sweeps, launcher configs and fastMRI files.

Each malformed input gets one clear line (the CLI's ``deqbench CMD: error: ...``,
exit 2) or, for data that only a running cell reads, a FAILED cell with a
one-line reason naming the file -- never a traceback, never a hang (a case
running over 30 s fails: :func:`no_hang`). Every property runs a bounded
number of examples with a deadline; the whole module
stays within about a minute on two cores. ``FUZZ_EXAMPLES`` scales the counts.
"""

from __future__ import annotations

import contextlib
import io
import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import h5py
import numpy as np
import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from jobs.cli import main
from suite.config import ConfigError, flatten, load_config, read_yaml

REPO = Path(__file__).resolve().parents[1]
EXPERIMENTS = sorted((REPO / "configs/experiments").glob("*_tiny.yaml"))
SCALE = float(os.environ.get("FUZZ_EXAMPLES", "1"))
CASES: dict[str, int] = {}  # property -> examples run (printed at the end of the module)


def fuzz(n: int, **kw):
    """``@settings`` for a bounded property: ``n`` examples (× ``$FUZZ_EXAMPLES``), a 20 s deadline each."""
    return settings(max_examples=max(1, int(n * SCALE)), deadline=20000, database=None, derandomize=True,
                    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow], **kw)


def _count(name: str) -> None:
    CASES[name] = CASES.get(name, 0) + 1


@pytest.fixture(scope="module", autouse=True)
def _report_cases():
    yield
    print(f"\nfuzz cases run: {sum(CASES.values())} ({', '.join(f'{k} {v}' for k, v in sorted(CASES.items()))})")


@contextlib.contextmanager
def no_hang(seconds: float = 30.0):
    """Fails the example if its block runs longer than ``seconds`` (a hang, not just a slow case)."""
    def hung(*_):
        raise TimeoutError(f"hung: over {seconds:g} s")
    previous = signal.signal(signal.SIGALRM, hung)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def one_line(text: str) -> bool:
    return len(text.strip().splitlines()) == 1


def cli(argv: list[str]) -> tuple[int, str, str]:
    """``deqbench ARGV`` in this process: exit code, stdout, stderr; an escaping exception fails the test."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err), no_hang():
        try:
            code = main(argv)
        except SystemExit as exc:  # argparse usage errors
            code = exc.code
    return code, out.getvalue(), err.getvalue()


# ------------------------------------------------------------------ values

scalars = (st.none() | st.booleans() | st.integers(-10**6, 10**12) | st.floats(allow_nan=True, allow_infinity=True)
           | st.text(max_size=12) | st.sampled_from(["", "camera", "anderson", "1e-3", "-1", "cuda", "synthetic"]))
values = st.recursive(scalars, lambda c: st.lists(c, max_size=3) | st.dictionaries(st.text(max_size=6) | st.integers(0, 3), c, max_size=3),
                      max_leaves=6)
junk_bytes = (st.text(max_size=200).map(lambda t: t.encode("utf-8", "replace")) | st.binary(max_size=200)
              | st.sampled_from([b"a: [1, 2", b"{", b"- 1\n- 2", b"a: b: c", b"\t x", b"name: x\nbase: [",
                                 b"!!python/object:os.system {}", b"\xff\xfe", b"42"]))


def _valid_keys(tree: dict) -> list[str]:
    return sorted(flatten(tree)) + sorted(tree)


@st.composite
def experiment_trees(draw) -> dict:
    """A shipped tiny experiment with 1-3 of its keys (or unknown ones) replaced, removed or mis-nested."""
    tree = read_yaml(draw(st.sampled_from(EXPERIMENTS)))
    keys = _valid_keys(tree) + ["train.epoch", "model.nonsense", "deq.solver.x", "resources.gpus", "family"]
    for _ in range(draw(st.integers(1, 3))):
        key = draw(st.sampled_from(keys))
        parts, node = key.split("."), tree
        for p in parts[:-1]:
            node = node.setdefault(p, {}) if isinstance(node, dict) else {}
        if not isinstance(node, dict):
            continue
        if draw(st.booleans()) and parts[-1] in node:
            del node[parts[-1]]
        elif parts[-1] == "family":
            node["family"] = draw(st.sampled_from(["crr", "deq_inr", "deprox", "Deprox", "nope", "", 3,
                                                   "missing_module_xyz:Fam", "missing.py:Fam", "suite.config:ConfigError"]))
        else:
            node[parts[-1]] = draw(values)
    return tree


def _write(path: Path, content) -> Path:
    path.write_text(content if isinstance(content, str) else yaml.safe_dump(content))
    return path


# ------------------------------------------------------------------ configs


@fuzz(120)
@given(tree=experiment_trees())
def test_malformed_experiment_config_is_one_line_or_valid(tmp_path_factory, tree):
    _count("experiment configs")
    path = _write(tmp_path_factory.mktemp("e") / "exp.yaml", tree)
    try:
        with no_hang():
            load_config(path)
    except ConfigError as err:
        assert one_line(str(err)), str(err)
    else:
        assert "nan" not in repr(flatten(tree)), "a NaN config value was accepted"


@fuzz(40)
@given(content=junk_bytes)
def test_unparsable_files_are_one_line(tmp_path_factory, content):
    _count("unparsable files")
    path = tmp_path_factory.mktemp("j") / "junk.yaml"
    path.write_bytes(content)
    try:
        read_yaml(path)
        return  # a YAML mapping after all: the other properties fuzz those
    except ConfigError:
        pass
    for argv in (["run", str(path)], ["sweep", str(path), "--dry-run"],
                 ["sweep", str(REPO / "configs/sweeps/smoke.yaml"), "--dry-run", "--launcher", "ray",
                  "--launcher-config", str(path)]):
        code, out, err = cli(argv)
        assert code == 2 and one_line(err) and err.startswith(f"deqbench {argv[0]}: error: "), (argv, code, err)
        assert "Traceback" not in out + err


@st.composite
def sweep_specs(draw, base: str) -> dict:
    spec = {"name": draw(st.sampled_from(["fz", "", None, 3, "a b"])),
            "base": draw(st.sampled_from([base, base, "missing.yaml", "", 1])),
            "set": draw(st.sampled_from([{}, {"train.epochs": 1}]) | st.dictionaries(
                st.sampled_from(["train.epochs", "data.size", "seed", "nope.x", "model", "train", 3]), values, max_size=2)),
            "axes": draw(st.none() | st.dictionaries(
                st.sampled_from(["data.image", "deq.solver", "train.lr", "x.y", "train", 1]),
                st.lists(values, max_size=3) | values, max_size=2)),
            "seeds": draw(st.sampled_from([[0], [0, 1], 0]) | values)}
    if draw(st.booleans()):
        spec["groups"] = draw(st.lists(st.fixed_dictionaries({}, optional={"seeds": values, "set": values, "axes": values,
                                                                          "bogus": values}), max_size=2) | values)
    if draw(st.booleans()):
        spec[draw(st.sampled_from(["extra", "Name", "seed"]))] = draw(values)
    return {k: v for k, v in spec.items() if draw(st.booleans()) or k in ("name", "base")}


@fuzz(80)
@given(data=st.data())
def test_malformed_sweep_is_one_line_or_dry_runs(tmp_path_factory, data):
    _count("sweeps")
    tmp = tmp_path_factory.mktemp("s")
    spec = data.draw(sweep_specs(str(REPO / "configs/experiments/deq_inr_tiny.yaml")))
    code, out, err = cli(["sweep", str(_write(tmp / "sweep.yaml", spec)), "--dry-run", "--runs-dir", str(tmp / "runs")])
    assert "Traceback" not in out + err
    assert code in (0, 2), (code, err)
    if code == 2:
        assert one_line(err) and err.startswith("deqbench sweep: error: "), err
    else:
        assert "dry run, nothing submitted" in out


@fuzz(60)
@given(data=st.data())
def test_malformed_launcher_config_is_one_line(tmp_path_factory, data):
    from jobs.launchers import ray_launcher
    from jobs.slurm_env import load_launcher_config

    _count("launcher configs")
    shipped = [read_yaml(p) for p in sorted((REPO / "configs/launchers").glob("*.yaml"))]
    base = dict(data.draw(st.sampled_from(shipped)))
    keys = sorted({k for c in shipped for k in c}) + ["slurm_partition", "bogus", "max_concurrent_trials",
                                                        "asha_reduction_factor", "scheduler", "mode"]
    for key in data.draw(st.lists(st.sampled_from(keys), min_size=1, max_size=3)):
        base[key] = data.draw(values)
    path = _write(tmp_path_factory.mktemp("l") / "launcher.yaml", base)
    for load in (lambda: load_launcher_config(path, check_cluster=False),
                 lambda: ray_launcher.load_config(type("A", (), {"launcher_config": str(path)}))):
        try:
            with no_hang():
                load()
        except (ValueError, TypeError, RuntimeError, FileNotFoundError) as err:  # what the CLI turns into exit 2
            assert one_line(str(err)) and str(path) in str(err), str(err)


# ------------------------------------------------------------------ fastMRI files

SHAPE, CROP = (20, 18), (16, 16)


@pytest.fixture(scope="module")
def good_volume(tmp_path_factory) -> Path:
    from suite.data.synth import write_synthetic_dataset

    (path,) = write_synthetic_dataset(tmp_path_factory.mktemp("fm"), n_volumes=1, n_slices=3, shape=SHAPE,
                                      recon_size=CROP, seed=0)
    return path


def _rewrite(path: Path, mutate) -> None:
    with h5py.File(path, "r+") as hf:
        mutate(hf)


def _replace(hf, key, array) -> None:
    attrs = dict(hf[key].attrs) if key in hf else {}
    if key in hf:
        del hf[key]
    hf.create_dataset(key, data=array)
    hf[key].attrs.update(attrs)


MUTATIONS = {
    "nan_kspace": lambda hf, r: _replace(hf, "kspace", np.where(r.random(hf["kspace"].shape) < 0.05, np.nan, hf["kspace"][()])),
    "inf_kspace": lambda hf, r: _replace(hf, "kspace", hf["kspace"][()] * np.where(r.random(hf["kspace"].shape) < 0.02, np.inf, 1)),
    "real_kspace": lambda hf, r: _replace(hf, "kspace", np.abs(hf["kspace"][()]).astype(r.choice(["float32", "int16", "uint8"]))),
    "bytes_kspace": lambda hf, r: _replace(hf, "kspace", np.array([b"abc"] * 3)),
    "kspace_2d": lambda hf, r: _replace(hf, "kspace", hf["kspace"][0]),
    "kspace_5d": lambda hf, r: _replace(hf, "kspace", hf["kspace"][()][:, None, None]),
    "kspace_small": lambda hf, r: _replace(hf, "kspace", hf["kspace"][:, : int(r.integers(0, 16)), :]),
    "kspace_no_slices": lambda hf, r: _replace(hf, "kspace", hf["kspace"][:0]),
    "no_kspace": lambda hf, r: hf.__delitem__("kspace"),
    "no_target": lambda hf, r: hf.__delitem__("reconstruction_esc"),
    "target_complex": lambda hf, r: _replace(hf, "reconstruction_esc", hf["reconstruction_esc"][()] * 1j),
    "target_bytes": lambda hf, r: _replace(hf, "reconstruction_esc", np.full((3, 16, 16), b"x")),
    "target_nan": lambda hf, r: _replace(hf, "reconstruction_esc", np.full((3, 16, 16), np.nan, np.float32)),
    "target_shape": lambda hf, r: _replace(hf, "reconstruction_esc", hf["reconstruction_esc"][: int(r.integers(0, 2)), :8]),
    "no_attrs": lambda hf, r: [hf.attrs.__delitem__(k) for k in list(hf.attrs)],
    "bad_max": lambda hf, r: hf.attrs.__setitem__("max", ["abc", np.nan, -1.0, 0.0, np.inf][int(r.integers(5))]),
    "max_array": lambda hf, r: hf.attrs.__setitem__("max", np.ones(3)),
    "bad_header": lambda hf, r: hf.__setitem__("ismrmrd_header", np.array(b"<ismrmrdHeader><encoding>")) if "ismrmrd_header" not in hf
    else _replace(hf, "ismrmrd_header", np.array(b"<not xml")),
}


@fuzz(80)
@given(mutations=st.lists(st.sampled_from(sorted(MUTATIONS) + ["truncate"]), min_size=1, max_size=2, unique=True),
       crop_mode=st.sampled_from(["image", "kspace"]), seed=st.integers(0, 2**16), cut=st.floats(0.0, 1.0))
def test_bad_fastmri_file_is_one_line_naming_the_file(tmp_path_factory, good_volume, mutations, crop_mode, seed, cut):
    from suite.data.fastmri import FastMRISliceDataset

    _count("fastMRI files")
    path = tmp_path_factory.mktemp("v") / "vol.h5"
    path.write_bytes(good_volume.read_bytes())
    rng = np.random.default_rng(seed)
    for name in mutations:
        if name == "truncate":
            data = path.read_bytes()
            path.write_bytes(data[: int(cut * len(data))])
            break
        with contextlib.suppress(Exception):  # an earlier mutation took what this one needs
            _rewrite(path, lambda hf: MUTATIONS[name](hf, rng))
    try:
        with no_hang():
            ds = FastMRISliceDataset([path], "singlecoil", slice_range=None, crop_size=CROP, crop_mode=crop_mode)
            items = [ds[i] for i in range(len(ds))]
    except (ValueError, FileNotFoundError) as err:
        assert one_line(str(err)) and str(path) in str(err), f"{mutations}: {err}"
        return
    for item in items:  # accepted: then every value served is finite
        for key in ("kspace", "image", "target", "target_complex", "mean", "std", "max_value"):
            assert bool(np.isfinite(item[key].numpy()).all()), f"{mutations}: non-finite {key} served"


def test_a_sweep_goes_on_past_a_cell_with_a_bad_fastmri_file(tmp_path):
    """End to end: a DE-Prox cell on a NaN k-space volume FAILS with one line naming the file; the other finishes."""
    from suite.data.synth import write_synthetic_dataset

    data = tmp_path / "mri"
    files = write_synthetic_dataset(data, n_volumes=3, n_slices=2, shape=(48, 48), recon_size=(32, 32), seed=0)
    with h5py.File(files[0], "r+") as hf:
        k = hf["kspace"][()]
        k[1, 3, 5] = np.nan
        del hf["kspace"]
        hf["kspace"] = k
    spec = {"name": "t_fuzz_sweep", "seeds": [0],
            "groups": [{"base": str(REPO / "configs/experiments/deq_inr_tiny.yaml"), "set": {"train.epochs": 1}},
                       {"base": str(REPO / "configs/experiments/deprox_tiny.yaml"),
                        "set": {"mri.root": str(data), "mri.val_volumes": 1, "mri.slice_start": 0, "mri.crop": [32, 32],
                                "mri.preload": False, "train.epochs": 1, "deprox.pretrain_epochs": 0}}]}
    _write(tmp_path / "s.yaml", spec)
    out = subprocess.run([sys.executable, "-m", "jobs.cli", "sweep", "s.yaml", "--workers", "1"], cwd=tmp_path,
                         capture_output=True, text=True, timeout=600)
    assert out.returncode == 1, out.stdout + out.stderr
    assert "Traceback" not in out.stdout + out.stderr
    (failed,) = [ln for ln in out.stdout.splitlines() if ln.strip().startswith("FAILED")]
    assert str(files[0]) in failed and re.search(r"non-finite|NaN", failed), failed
    print("\n" + failed)
    assert "1 finished, 1 failed" in out.stdout
