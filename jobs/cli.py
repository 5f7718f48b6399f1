"""``deqbench`` command line. Heavy imports happen inside the commands.

Every command says where its outputs went. Tracking store: ``--tracking-uri``,
else ``$MLFLOW_TRACKING_URI``, else ``sqlite:///mlflow.db`` here.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any, Callable


def _csv(text: str) -> list[str]:
    return [t.strip() for t in text.split(",") if t.strip()]


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--tracking-uri", default=None, help="MLflow store (default: $MLFLOW_TRACKING_URI or sqlite:///mlflow.db)")


def _launch_opts(p: argparse.ArgumentParser) -> None:
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config key (dotted), applied last; repeatable")
    p.add_argument("--runs-dir", default=None, help="root of cell work directories (default: $DEQBENCH_RUNS or ./runs)")
    _common(p)


def _print_outcomes(outcomes: list[dict[str, Any]]) -> int:
    failed = [o for o in outcomes if o["state"] != "FINISHED"]
    for o in sorted(outcomes, key=lambda o: o["label"]):
        res = o.get("results") or {}
        extra = f"psnr={res['psnr']:.2f} dB" if "psnr" in res else (o.get("error") or "")
        why = f"[{o['reason']}] " if o.get("reason") and o["state"] != "FINISHED" else ""
        print(f"  {o['state']:<9} {o['hash']}  {o['label']}  {why}{extra}")
    print(f"{len(outcomes) - len(failed)} finished, {len(failed)} failed")
    return 1 if failed else 0


def cmd_run(a: argparse.Namespace) -> int:
    from jobs import tracking
    from jobs.cells import single_cell
    from jobs.node import run_cell

    uri = tracking.resolve_tracking_uri(a.tracking_uri)
    cell = single_cell(a.experiment, a.overrides, a.runs_dir, uri)
    print(f"running {cell.config['family']} cell {cell.hash} ({cell.label}) → {cell.workdir}", flush=True)
    out = run_cell(cell)
    code = _print_outcomes([out])
    print(f"MLflow: experiment {cell.experiment!r} in {uri} (browse: deqbench ui)")
    return code


def cmd_sweep(a: argparse.Namespace) -> int:
    from jobs import tracking
    from jobs.cells import expand_sweep
    from jobs.launchers import get_launcher

    uri = tracking.resolve_tracking_uri(a.tracking_uri)
    name, cells = expand_sweep(a.sweep, a.overrides, a.runs_dir, uri)
    launcher = get_launcher(a.launcher)
    if a.dry_run:
        print(f"sweep {name!r}: {len(cells)} cells (dry run, nothing submitted)")
        for c in cells:
            print(f"  {c.hash}  {c.config['family']:<8} {c.label}  → {c.workdir}")
        launcher.dry_run(cells, a)
        return 0
    done = tracking.finished_hashes(uri, name)
    todo = [c for c in cells if c.hash not in done]
    print(f"sweep {name!r}: {len(cells)} cells, {len(cells) - len(todo)} already finished, {len(todo)} to run "
          f"({a.launcher} launcher)", flush=True)
    if not todo:
        print("nothing to run: every cell of this sweep has FINISHED (delete its runs to redo them)")
        return 0
    outcomes = launcher.launch(todo, a)
    code = _print_outcomes(outcomes) if outcomes is not None else 0
    print(f"work dirs: {Path(cells[0].workdir).parent}")
    print(f"MLflow: experiment {name!r} in {uri} — browse with: deqbench ui")
    return code


def cmd_status(a: argparse.Namespace) -> int:
    from jobs import tracking
    from jobs.status import sweep_status, watch

    uri = tracking.resolve_tracking_uri(a.tracking_uri)
    show = lambda: sweep_status(a.sweep, a.runs_dir, uri, as_json=a.json)  # noqa: E731
    if a.watch is not None:
        if a.watch <= 0:
            raise ValueError(f"--watch {a.watch:g}: the refresh period must be > 0 seconds")
        return watch(show, a.watch, clear=not a.json and sys.stdout.isatty())
    text, counts = show()
    print(text)
    return 1 if counts.get("FAILED") else 0  # exit codes as for a sweep: 1 when a cell failed


def cmd_cancel(a: argparse.Namespace) -> int:
    from jobs import tracking
    from jobs.launchers.cancel import cancel_command

    print(cancel_command(a.sweep, a.runs_dir, tracking.resolve_tracking_uri(a.tracking_uri), a.wait_s))
    return 0


def cmd_table(a: argparse.Namespace) -> int:
    from analysis.table import table_command
    from jobs import tracking

    uri = None if a.source else tracking.resolve_tracking_uri(a.tracking_uri)
    text = table_command(a.experiment, _csv(a.rows), _csv(a.cols or ""), _csv(a.metrics), a.format, out=a.out,
                         tracking_uri=uri, source=a.source, decimals=a.decimals, agg=a.agg, ci=a.ci,
                         bold=a.bold)
    print(text)
    if a.out:
        print(f"table written to {a.out}")
    return 0


def cmd_export(a: argparse.Namespace) -> int:
    from analysis.export import export_runs
    from jobs import tracking

    path = export_runs(a.experiment, Path(a.out), tracking_uri=tracking.resolve_tracking_uri(a.tracking_uri))
    print(f"runs of {a.experiment!r} exported to {path}")
    return 0


def cmd_report(a: argparse.Namespace) -> int:
    from analysis.report import report_command
    from jobs import tracking

    paths = report_command(a.kind, a.experiment, Path(a.out), run_id=a.run,
                           tracking_uri=tracking.resolve_tracking_uri(a.tracking_uri))
    for p in paths:
        print(f"report written to {p}")
    return 0


def cmd_data(a: argparse.Namespace) -> int:
    from suite.data.synth import synth_command

    print(synth_command(a.out, volumes=a.volumes, slices=a.slices, coils=a.coils, size=tuple(a.size), seed=a.seed,
                        recon_size=tuple(a.recon_size) if a.recon_size else None, anatomy=a.anatomy))
    return 0


def cmd_bench(a: argparse.Namespace) -> int:
    import importlib

    from suite.config import read_yaml

    if a.config and not Path(a.config).is_file():
        raise ValueError(f"--config {a.config!r}: no such benchmark config file")
    cfg_path = Path(a.config or f"configs/bench/{a.name}.yaml")
    cfg = read_yaml(cfg_path) if cfg_path.is_file() else {}
    import pkgutil

    import jobs.bench

    names = sorted(m.name for m in pkgutil.iter_modules(jobs.bench.__path__) if not m.name.startswith("_"))
    if a.name not in names:
        raise ValueError(f"unknown benchmark {a.name!r}; available: {', '.join(names)}")
    mod = importlib.import_module(f"jobs.bench.{a.name}")
    return int(mod.main(cfg) or 0)


def cmd_ui(a: argparse.Namespace) -> int:
    import os
    import subprocess

    from jobs import tracking, ui

    uri = tracking.resolve_tracking_uri(a.tracking_uri)
    shown = ui.prepare(uri, a.experiment)  # model-training experiments with a headline-metrics view
    base = ui.base_url(a.host, a.port)
    print(f"MLflow UI for {uri} at {base} (Ctrl-C to stop)", flush=True)
    for name, exp_id, n in shown:
        print(f"  runs of {name!r} ({n} runs): {ui.runs_url(base, exp_id)}", flush=True)
    if not shown:
        print("  no runs yet: run a sweep (deqbench sweep FILE), then restart deqbench ui for its link", flush=True)
    cmd = [sys.executable, "-m", "mlflow", "ui", "--backend-store-uri", uri, "--host", a.host, "--port", str(a.port),
           "--workers", str(a.workers)]
    # MLflow's GenAI job runner (8 more processes) is off unless asked for:
    # the UI starts sooner (17-21 s instead of 27-45 s on 2 busy cores)
    no_jobs = {"MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
    return subprocess.call(cmd, env={**no_jobs, **os.environ, "MLFLOW_TRACKING_URI": uri})


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("deqbench")
    except PackageNotFoundError:  # running from a source tree that was not installed
        return "unknown (not installed)"


class _VersionAction(argparse.Action):
    """``--version``: reads the installed version (importlib.metadata) only when asked, not on every start."""

    def __init__(self, option_strings: list[str], dest: str, **kwargs: Any) -> None:
        super().__init__(option_strings, dest, nargs=0, default=argparse.SUPPRESS,
                         help="show the program's version number and exit")

    def __call__(self, parser: argparse.ArgumentParser, *_: Any) -> None:
        print(f"deqbench {_version()}")
        parser.exit()


def build_parser() -> argparse.ArgumentParser:
    """The ``deqbench`` argument parser."""
    from analysis.table import BOLD_CHOICES, FORMATS  # choices come from the registries (light imports)
    from jobs.launchers import LAUNCHERS

    p = argparse.ArgumentParser(prog="deqbench", description="Benchmark Deep Equilibrium models in imaging.")
    p.add_argument("--version", action=_VersionAction)
    sub = p.add_subparsers(dest="command", required=True)

    s = sub.add_parser("run", help="run one experiment in this process")
    s.add_argument("experiment", help="experiment YAML, e.g. configs/experiments/crr.yaml")
    _launch_opts(s)
    s.set_defaults(func=cmd_run)

    s = sub.add_parser("sweep", help="expand a sweep and launch its unfinished cells")
    s.add_argument("sweep", help="sweep YAML, e.g. configs/sweeps/crr_demo.yaml")
    s.add_argument("--launcher", default="local", choices=LAUNCHERS.names())
    s.add_argument("--launcher-config", default=None, help="launcher YAML, e.g. configs/launchers/local_slurm.yaml")
    s.add_argument("--workers", type=int, default=None, help="local launcher: concurrent cells (default: one per GPU when cells train on GPUs, else one per core)")
    s.add_argument("--dry-run", action="store_true", help="print the cells (and sbatch script) and submit nothing")
    s.add_argument("--no-wait", action="store_true", help="submitit: return once submitted")
    _launch_opts(s)
    s.set_defaults(func=cmd_sweep)

    s = sub.add_parser("status", help="pending/running/finished/failed cells of a sweep, with live progress")
    s.add_argument("sweep")
    s.add_argument("--runs-dir", default=None)
    s.add_argument("--json", action="store_true", help="one JSON object (per refresh with --watch) for scripts")
    s.add_argument("--watch", type=float, nargs="?", const=5.0, default=None, metavar="SECONDS",
                   help="refresh every SECONDS (default 5) until every cell has ended, or Ctrl-C")
    _common(s)
    s.set_defaults(func=cmd_status)

    s = sub.add_parser("cancel", help="stop a sweep on any launcher; its cells end KILLED and resume on a rerun")
    s.add_argument("sweep")
    s.add_argument("--runs-dir", default=None)
    s.add_argument("--wait-s", type=float, default=60.0,
                   help="how long to wait for running cells to checkpoint and stop (default 60)")
    _common(s)
    s.set_defaults(func=cmd_cancel)

    s = sub.add_parser("table", help="ablation table (mean ± std over seeds, best in bold)")
    s.add_argument("--experiment", required=True, help="MLflow experiment (the sweep's name)")
    s.add_argument("--rows", required=True, help="comma-separated config keys, e.g. data.image")
    s.add_argument("--cols", default="", help="comma-separated config keys (may be empty)")
    s.add_argument("--metrics", required=True, help="comma-separated metric names, e.g. stage1/psnr,psnr,crr/gain_db")
    s.add_argument("--format", default="md", choices=FORMATS)
    s.add_argument("--decimals", type=int, default=2)
    s.add_argument("--out", default=None, help="also write the table to this file")
    s.add_argument("--source", default=None, help="read an exported .parquet/.csv instead of MLflow")
    s.add_argument("--agg", default="last", metavar="last|best|METRIC=last|best,...",
                   help="a run's value: its last logged value (default) or the best of its series "
                        "(max/min by the metric's direction); per metric, e.g. psnr=best,loss=last")
    s.add_argument("--ci", action="store_true",
                   help="show mean ± 95%% t-interval half-width over seeds instead of ± std")
    s.add_argument("--bold", default="best", choices=BOLD_CHOICES,
                   help="best: the best mean per column (default); tied: also every cell not "
                        "significantly worse (one-sided Welch t-test over seeds, p >= 0.05)")
    _common(s)
    s.set_defaults(func=cmd_table)

    s = sub.add_parser("export", help="runs of an experiment to long-format parquet/CSV")
    s.add_argument("--experiment", required=True)
    s.add_argument("--out", required=True, help="file ending in .parquet or .csv")
    _common(s)
    s.set_defaults(func=cmd_export)

    s = sub.add_parser("report", help="figures and reports from runs")
    s.add_argument("kind", choices=["spectral"])
    s.add_argument("--experiment", required=True)
    s.add_argument("--run", default=None, help="one run id (default: every finished run)")
    s.add_argument("--out", required=True, help="output directory")
    _common(s)
    s.set_defaults(func=cmd_report)

    s = sub.add_parser("data", help="data utilities")
    dsub = s.add_subparsers(dest="data_command", required=True)
    d = dsub.add_parser("synth", help="write synthetic fastMRI-format volumes")
    d.add_argument("--out", required=True)
    d.add_argument("--volumes", type=int, default=4)
    d.add_argument("--slices", type=int, default=8)
    d.add_argument("--coils", type=int, default=0, help="0: single-coil; N: multi-coil with N coils")
    d.add_argument("--size", type=int, nargs=2, default=[640, 368], metavar=("H", "W"), help="k-space matrix")
    d.add_argument("--recon-size", type=int, nargs=2, default=None, metavar=("H", "W"), help="target size (320 320)")
    d.add_argument("--anatomy", default="knee", choices=["knee", "brain"])
    d.add_argument("--seed", type=int, default=0)
    d.set_defaults(func=cmd_data)

    s = sub.add_parser("bench", help="run a benchmark defined in configs/bench/NAME.yaml")
    s.add_argument("name")
    s.add_argument("--config", default=None, help="benchmark YAML (default: configs/bench/NAME.yaml)")
    s.set_defaults(func=cmd_bench)

    s = sub.add_parser("ui", help="MLflow UI on the tracking store (127.0.0.1); prints the link to each sweep's runs")
    s.add_argument("--host", default="127.0.0.1")
    s.add_argument("--port", type=int, default=5000)
    s.add_argument("--workers", type=int, default=1,
                   help="server processes (default 1: starts fast; MLflow's own default is 4)")
    s.add_argument("--experiment", default=None,
                   help="the sweep's experiment to open (default: print a link per experiment with runs)")
    _common(s)
    s.set_defaults(func=cmd_ui)
    return p


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``deqbench`` console script."""
    args = build_parser().parse_args(argv)
    func: Callable[[argparse.Namespace], int] = args.func
    try:
        return func(args)
    except (ValueError, TypeError, FileNotFoundError, RuntimeError) as err:
        print(f"deqbench {args.command}: error: {err}", file=sys.stderr)
        return 2
    except Exception as err:
        if not type(err).__module__.startswith("mlflow."):
            raise
        # The store refused (credentials, permissions, a bad request): its first line says why. mlflow is not
        # imported to catch its exception by class: status and table --help must stay light.
        first = (str(err).strip().splitlines() or [type(err).__name__])[0]
        print(f"deqbench {args.command}: error: tracking store: {first}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
