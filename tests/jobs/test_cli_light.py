"""The CLI's parser and ``deqbench status`` of a local sweep import neither torch nor mlflow (seconds each)."""

import subprocess
import sys
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[2]
HEAVY = "print(sorted(m for m in ('torch', 'mlflow') if m in sys.modules))"


def _python(code: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", f"import sys\n{code}\n{HEAVY}"], cwd=cwd, capture_output=True,
                          text=True, timeout=120)


def test_the_parser_imports_neither_torch_nor_mlflow(tmp_path):
    out = _python("import jobs.cli\njobs.cli.build_parser()", tmp_path)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip().splitlines()[-1] == "[]"


def test_status_of_an_ended_local_sweep_reads_status_json_only(tmp_path):
    from jobs.cells import expand_sweep, write_status

    spec = {"name": "t_light", "base": str(REPO / "configs/experiments/crr_tiny.yaml"), "seeds": [0, 1]}
    (tmp_path / "s.yaml").write_text(yaml.safe_dump(spec))
    _, (done, failed) = expand_sweep(tmp_path / "s.yaml", [], tmp_path / "runs", "")
    for c in (done, failed):
        Path(c.workdir).mkdir(parents=True)
    write_status(done.workdir, state="FINISHED")
    write_status(failed.workdir, state="FAILED", error="ValueError: bad", reason="ValueError")
    out = _python("from jobs.cli import main\nprint(main(['status', 's.yaml', '--runs-dir', 'runs']))", tmp_path)
    assert out.returncode == 0, out.stderr
    lines = out.stdout.strip().splitlines()
    assert any(done.hash in ln and "FINISHED" in ln for ln in lines)
    assert any(failed.hash in ln and "FAILED" in ln and "ValueError: bad" in ln for ln in lines)
    assert lines[-3:] == ["2 cells: 1 failed, 1 finished", "1", "[]"]  # exit code 1: a cell failed
    assert not (tmp_path / "mlflow.db").exists()  # the store was not even opened
