"""Launchers: ``get_launcher(name)`` → object with ``launch(cells, args)`` and ``dry_run(cells, args)``.

All of them run the same node job (:func:`jobs.node.run_cell`) per cell.
"""

from __future__ import annotations

import argparse
from typing import Any, Protocol

from jobs.cells import Cell
from suite.registry import Registry


class Launcher(Protocol):
    """A backend that runs cells."""

    def launch(self, cells: list[Cell], args: argparse.Namespace) -> list[dict[str, Any]] | None:
        """Runs ``cells``; returns their outcomes (None when it returns before they end)."""

    def dry_run(self, cells: list[Cell], args: argparse.Namespace) -> None:
        """Prints what would be submitted."""


LAUNCHERS: Registry[type] = Registry("launcher")


@LAUNCHERS.register("local")
class LocalLauncher:
    """Parallel local processes, one GPU set per cell on a GPU machine (see :mod:`jobs.launchers.local`)."""

    def launch(self, cells: list[Cell], args: argparse.Namespace) -> list[dict[str, Any]]:
        from jobs.launchers.local import submit

        return submit(cells, workers=getattr(args, "workers", None))

    def dry_run(self, cells: list[Cell], args: argparse.Namespace) -> None:
        from jobs.launchers.local import plan

        print("local launcher: each cell runs `python -m jobs.node <workdir>/cell.json` in a process of its own, "
              "forked from a server that has imported torch and mlflow (a DDP cell: under torchrun)")
        print(plan(cells, getattr(args, "workers", None))[3])


@LAUNCHERS.register("submitit")
class SubmititLauncher:
    """Slurm job arrays through submitit (see :mod:`jobs.launchers.submitit_launcher`)."""

    def launch(self, cells: list[Cell], args: argparse.Namespace) -> list[dict[str, Any]] | None:
        from jobs.launchers.submitit_launcher import launch

        return launch(cells, args)

    def dry_run(self, cells: list[Cell], args: argparse.Namespace) -> None:
        from jobs.launchers.submitit_launcher import dry_run

        dry_run(cells, args)


@LAUNCHERS.register("ray")
class RayLauncher:
    """Ray Tune, one trial per cell (see :mod:`jobs.launchers.ray_launcher`)."""

    def launch(self, cells: list[Cell], args: argparse.Namespace) -> list[dict[str, Any]] | None:
        from jobs.launchers.ray_launcher import launch

        return launch(cells, args)

    def dry_run(self, cells: list[Cell], args: argparse.Namespace) -> None:
        from jobs.launchers.ray_launcher import dry_run

        dry_run(cells, args)


def get_launcher(name: str) -> Launcher:
    """An instance of the launcher registered as ``name``."""
    return LAUNCHERS.get(name)()
