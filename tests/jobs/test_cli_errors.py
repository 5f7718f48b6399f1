"""Bad input on the command line: one line naming the file, line and column, exit code 2, no traceback."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from jobs.cli import main

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture
def broken(tmp_path):
    path = tmp_path / "broken.yaml"
    path.write_text("name: x\nfamily: [crr\n")
    return path


def _one_line_error(capsys, argv):
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "Traceback" not in err
    return err


def test_malformed_experiment_names_file_line_and_column(capsys, broken, tmp_path):
    err = _one_line_error(capsys, ["run", str(broken), "--runs-dir", str(tmp_path / "runs")])
    assert err.startswith("deqbench run: error: ") and f"{broken}: malformed YAML at line 3, column 1" in err


def test_malformed_sweep_and_launcher_config(capsys, tmp_path):
    sweep = tmp_path / "s.yaml"
    sweep.write_text("name: s\n  base: x\n")
    err = _one_line_error(capsys, ["sweep", str(sweep), "--dry-run"])
    assert f"{sweep}: malformed YAML at line 2, column 7" in err
    launcher = tmp_path / "l.yaml"
    launcher.write_text("partition: [debug\n")
    err = _one_line_error(capsys, ["sweep", str(REPO / "configs/sweeps/smoke.yaml"), "--launcher", "submitit",
                                   "--launcher-config", str(launcher), "--dry-run"])
    assert f"{launcher}: malformed YAML at line 2" in err


@pytest.mark.parametrize("text, what", [("- a\n- b\n", "expected a mapping at the top level, got list"),
                                        (b"\xff\xfe\x00", "cannot be read as a YAML text file")])
def test_non_mapping_and_binary_files(capsys, tmp_path, text, what):
    path = tmp_path / "x.yaml"
    path.write_bytes(text if isinstance(text, bytes) else text.encode())
    assert what in _one_line_error(capsys, ["run", str(path), "--runs-dir", str(tmp_path / "runs")])


def test_missing_file(capsys, tmp_path):
    assert "config file not found" in _one_line_error(capsys, ["run", str(tmp_path / "nope.yaml")])


def test_version():
    out = subprocess.run([sys.executable, "-m", "jobs.cli", "--version"], capture_output=True, text=True, cwd=REPO)
    assert out.returncode == 0 and out.stdout.startswith("deqbench ") and out.stdout.split()[1][0].isdigit()
