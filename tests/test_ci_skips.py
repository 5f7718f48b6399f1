"""Under ``CI=true`` a skip of a test that needs a real tool (``slurm``, ``latex``, ``browser``) fails.

Runs pytest in a subprocess on a scratch folder holding this suite's
``tests/conftest.py`` and three skipping tests: one per way a test skips
(``skipif``, ``pytest.skip`` in a fixture, ``pytest.skip`` in the body).
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

CONFTEST = Path(__file__).resolve().parent / "conftest.py"
TESTS = '''
import pytest

@pytest.fixture
def cluster():
    pytest.skip("no cluster here")

@pytest.mark.latex
@pytest.mark.skipif(True, reason="no pdflatex here")
def test_latex():
    pass

@pytest.mark.slurm
def test_slurm(cluster):
    pass

@pytest.mark.browser
def test_browser():
    pytest.skip("no chromium here")

@pytest.mark.skipif(True, reason="an ordinary skip")
def test_other():
    pass

@pytest.mark.browser
@pytest.mark.xfail(reason="expected")
def test_xfail():
    assert False
'''


def run_pytest(folder: Path, ci: str | None) -> tuple[int, str]:
    env = {k: v for k, v in os.environ.items() if k != "CI"}
    if ci is not None:
        env["CI"] = ci
    proc = subprocess.run([sys.executable, "-m", "pytest", "-rA", "-p", "no:cacheprovider", str(folder)],
                          capture_output=True, text=True, env=env, cwd=folder, timeout=120)
    return proc.returncode, proc.stdout + proc.stderr


@pytest.fixture
def scratch(tmp_path: Path) -> Path:
    shutil.copy(CONFTEST, tmp_path / "conftest.py")
    (tmp_path / "test_tools.py").write_text(TESTS)
    return tmp_path


@pytest.mark.parametrize("ci", [None, "false"])
def test_outside_ci_they_skip(scratch: Path, ci: str | None) -> None:
    code, out = run_pytest(scratch, ci)
    assert code == 0, out
    assert re.search(r"\b4 skipped, 1 xfailed\b", out), out


def test_under_ci_their_skips_fail(scratch: Path) -> None:
    code, out = run_pytest(scratch, "true")
    assert code == 1, out
    for name, reason in (("test_latex", "no pdflatex here"), ("test_slurm", "no cluster here"),
                         ("test_browser", "no chromium here")):
        assert re.search(rf"(ERROR|FAILED) test_tools.py::{name}\b", out), out
        assert reason in out, out
    assert "CI=true: a latex test may not skip" in out
    assert re.search(r"\b1 skipped\b", out) and "SKIPPED [1] test_tools.py" in out  # test_other still skips
    assert "1 xfailed" in out, out
