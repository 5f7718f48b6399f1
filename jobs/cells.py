"""Sweeps and cells.

A sweep file names a base experiment, overrides, axes (cartesian product) and
seeds; ``groups`` lets one sweep hold cells of different experiments::

    name: crr_demo                    # the MLflow experiment
    base: ../experiments/crr.yaml     # relative to this file
    set: {data.size: 96}              # applied to every cell
    axes: {data.image: [astronaut, camera]}
    seeds: [0, 1]
    groups:                           # optional; each inherits the keys above
      - {base: ../experiments/deprox_tiny.yaml, axes: {}}

A cell is one fully resolved config (seed included) and its identity is the
hash of that config. Its work directory ``<runs>/<sweep>/<hash>/`` holds
``cell.json``, ``config.yaml``, ``status.json``, ``log.txt``, ``ckpt/`` and
``artifacts/``.
"""

from __future__ import annotations

import itertools
import json
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Iterable, Mapping

from suite.config import ConfigError, config_hash, load_config, merge, parse_overrides, read_yaml, to_dict

SWEEP_KEYS = ("name", "base", "set", "axes", "seeds", "groups", "description")


def runs_root(explicit: str | Path | None = None) -> Path:
    """Root of cell work directories: ``explicit``, else ``$DEQBENCH_RUNS``, else ``./runs``."""
    return Path(explicit or os.environ.get("DEQBENCH_RUNS", "runs")).absolute()


@dataclass(frozen=True)
class Cell:
    """One experiment to run: plain, picklable data (it travels to Slurm and Ray).

    Attributes:
        config: nested resolved config (seed and name included).
        hash: :func:`suite.config.config_hash` of it.
        experiment: MLflow experiment name (the sweep's name).
        workdir: absolute work directory.
        tracking_uri: MLflow tracking URI (absolute).
        label: short human label (also the MLflow run name), e.g. ``image=camera seed=1``.
    """

    config: dict[str, Any]
    hash: str
    experiment: str
    workdir: str
    tracking_uri: str
    label: str

    @property
    def world_size(self) -> int:
        """Processes this cell trains with (nodes × tasks per node)."""
        res = self.config.get("resources", {})
        return int(res.get("nodes", 1)) * int(res.get("tasks_per_node", 1))

    def save(self) -> Path:
        """Writes ``cell.json`` into the work directory and returns its path."""
        path = Path(self.workdir) / "cell.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(asdict(self), indent=2))
        return path

    @staticmethod
    def load(path: str | Path) -> "Cell":
        """Reads a ``cell.json``."""
        return Cell(**json.loads(Path(path).read_text()))


def _check_sweep_keys(spec: Mapping[str, Any], where: str) -> None:
    unknown = sorted(set(spec) - set(SWEEP_KEYS))
    if unknown:
        raise ConfigError(f"{where}: unknown sweep key {unknown[0]!r}; valid: {', '.join(SWEEP_KEYS)}")


def _seeds(value: Any, where: str) -> list[int]:
    if isinstance(value, int) and not isinstance(value, bool):
        return [value]
    if not isinstance(value, list) or not value or not all(isinstance(s, int) and not isinstance(s, bool) for s in value):
        raise ConfigError(f"{where}: seeds must be a non-empty list of ints, got {value!r}")
    return value


def _axes(value: Any, where: str) -> dict[str, list[Any]]:
    if value is None:
        return {}
    if not isinstance(value, dict) or not all(isinstance(k, str) and isinstance(v, list) and v for k, v in value.items()):
        raise ConfigError(f"{where}: axes must map dotted keys to non-empty lists, got {value!r}")
    return value


def short_label(point: dict[str, Any], seed: int) -> str:
    """A cell's label and MLflow run name, e.g. ``image=camera solver=anderson seed=1``: each sweep axis
    by the last part of its dotted key (the whole key where two axes, or one and ``seed``, share it)."""
    last = [k.rsplit(".", 1)[-1] for k in point]
    names = [n if last.count(n) == 1 and n != "seed" else k for k, n in zip(point, last)]
    return " ".join([f"{n}={v}" for n, v in zip(names, point.values())] + [f"seed={seed}"])


def expand_sweep(
    path: str | Path,
    overrides: Iterable[str] = (),
    runs_dir: str | Path | None = None,
    tracking_uri: str = "",
) -> tuple[str, list[Cell]]:
    """Expands a sweep file into validated cells.

    Args:
        path: sweep YAML.
        overrides: ``--set key=value`` items, applied to every cell last.
        runs_dir: root of work directories (see :func:`runs_root`).
        tracking_uri: MLflow URI recorded in each cell.

    Returns:
        The sweep name and its cells, in grid order, duplicates removed.

    Raises:
        ConfigError: an unknown sweep key, a bad axis or seed list, or any cell
            whose config does not validate (named with the axis values).
    """
    path = Path(path)
    spec = read_yaml(path)
    _check_sweep_keys(spec, str(path))
    name = spec.get("name")
    if not isinstance(name, str) or not name:
        raise ConfigError(f"{path}: a sweep needs a non-empty string 'name' (the MLflow experiment)")
    groups = spec.get("groups") or [{}]
    if not isinstance(groups, list):
        raise ConfigError(f"{path}: groups must be a list of mappings")
    cli = parse_overrides(overrides)
    root = runs_root(runs_dir) / name
    cells: dict[str, Cell] = {}
    for gi, group in enumerate(groups):
        where = f"{path} group {gi}" if len(groups) > 1 else str(path)
        _check_sweep_keys(group, where)
        g = {**{k: v for k, v in spec.items() if k != "groups"}, **group}
        base = g.get("base")
        data = read_yaml((path.parent / base).resolve()) if base else {}
        data = merge(data, g.get("set") or {})
        axes = _axes(g.get("axes"), where)
        for combo in itertools.product(*axes.values()):
            point = dict(zip(axes, combo))
            for seed in _seeds(g.get("seeds", [0]), where):
                label = short_label(point, seed)
                try:
                    cfg = load_config(merge(data, {**point, "seed": seed, "name": name}), cli)
                except ConfigError as err:
                    raise ConfigError(f"{where} cell [{label}]: {err}") from None
                h = config_hash(cfg)
                cells.setdefault(h, Cell(to_dict(cfg), h, name, str(root / h), tracking_uri, label))
    return name, list(cells.values())


def single_cell(path: str | Path, overrides: Iterable[str] = (), runs_dir: str | Path | None = None, tracking_uri: str = "") -> Cell:
    """The one cell of ``deqbench run EXPERIMENT.yaml``; its MLflow experiment is ``name``."""
    cfg = load_config(path, overrides)
    h = config_hash(cfg)
    return Cell(to_dict(cfg), h, cfg.name, str(runs_root(runs_dir) / cfg.name / h), tracking_uri, f"seed={cfg.seed}")


def write_status(workdir: str | Path, **fields: Any) -> None:
    """Merges ``fields`` into ``status.json`` atomically.

    Raises:
        OSError: ``cannot write PATH: No space left on device`` (or read-only, ...), one line.
    """
    path = Path(workdir) / "status.json"
    current = read_status(workdir)
    current.update(fields, updated=time.time())
    tmp = path.with_suffix(".tmp")
    try:
        tmp.write_text(json.dumps(current, indent=2, default=str))
        os.replace(tmp, path)
    except OSError as err:
        try:
            tmp.unlink(missing_ok=True)  # a partial file would hold the little space that is left
        except OSError:
            pass
        from suite.training.checkpoint import cannot_write  # torch: only on this error path

        raise OSError(cannot_write(path, err)) from None


def read_status(workdir: str | Path) -> dict[str, Any]:
    """Contents of ``status.json`` (empty when the cell never started)."""
    path = Path(workdir) / "status.json"
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return {}
