"""The CLI's parser and ``deqbench status`` of a local sweep import neither torch nor mlflow (seconds each),
also while cells have not ended: the store is then read through ``jobs.store_query``."""

import socket
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


def test_status_of_a_sweep_with_unfinished_cells_reads_the_sqlite_store_without_mlflow(tmp_path):
    from mlflow.tracking import MlflowClient

    from jobs.cells import expand_sweep, write_status

    spec = {"name": "t_light_open", "base": str(REPO / "configs/experiments/crr_tiny.yaml"), "seeds": [0, 1, 2]}
    (tmp_path / "s.yaml").write_text(yaml.safe_dump(spec))
    _, (ended_elsewhere, running, unstarted) = expand_sweep(tmp_path / "s.yaml", [], tmp_path / "runs", "")
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    client = MlflowClient(uri)
    exp = client.create_experiment("t_light_open")
    for c in (ended_elsewhere, running):
        Path(c.workdir).mkdir(parents=True)
        write_status(c.workdir, state="RUNNING")
        run = client.create_run(exp, tags={"cell_hash": c.hash})
        if c is ended_elsewhere:  # its node job ended before writing status.json: the store knows
            client.set_terminated(run.info.run_id, status="FINISHED")
    out = _python(f"from jobs.cli import main\nprint(main(['status', 's.yaml', '--runs-dir', 'runs', "
                  f"'--tracking-uri', {uri!r}]))", tmp_path)
    assert out.returncode == 0, out.stderr
    lines = out.stdout.strip().splitlines()
    assert any(ended_elsewhere.hash in ln and "FINISHED" in ln for ln in lines)
    assert any(running.hash in ln and "RUNNING" in ln for ln in lines)
    assert any(unstarted.hash in ln and "NOT_STARTED" in ln for ln in lines)
    assert lines[-3:] == ["3 cells: 1 finished, 1 not_started, 1 running", "0", "[]"]  # the store, read without mlflow


def test_status_with_an_unreachable_server_says_so_and_imports_no_mlflow(tmp_path):
    from jobs.cells import expand_sweep, write_status

    spec = {"name": "t_light_down", "base": str(REPO / "configs/experiments/crr_tiny.yaml"), "seeds": [0]}
    (tmp_path / "s.yaml").write_text(yaml.safe_dump(spec))
    _, (cell,) = expand_sweep(tmp_path / "s.yaml", [], tmp_path / "runs", "")
    Path(cell.workdir).mkdir(parents=True)
    write_status(cell.workdir, state="RUNNING")
    with socket.socket() as sock:  # a port nothing listens on: connection refused
        sock.bind(("127.0.0.1", 0))
        url = f"http://127.0.0.1:{sock.getsockname()[1]}"
    out = _python(f"from jobs.cli import main\nprint(main(['status', 's.yaml', '--runs-dir', 'runs', "
                  f"'--tracking-uri', {url!r}]))", tmp_path)  # STORE_PATIENCE_S: 5 s
    assert out.returncode == 0, out.stderr
    assert out.stderr.startswith("deqbench status: tracking store unreachable for 5 s") and out.stderr.count("\n") == 1
    assert "states from the cells' status.json only" in out.stderr
    assert out.stdout.strip().splitlines()[-3:] == ["1 cells: 1 running", "0", "[]"]
