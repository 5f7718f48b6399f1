"""A small real MLflow store (sqlite) with a 2 images × 2 solvers × 3 seeds sweep.

The sweep ``abl`` has:
- cells astronaut×anderson, astronaut×fixed_point, camera×anderson, 3 seeds each;
- no run at all for camera×fixed_point (the missing combination);
- astronaut×anderson seed 2 FAILED, with a PSNR of 99 that would win if counted.

Every logged number is kept in ``store.runs`` so that tests compute their
expectations independently (with numpy) from what was logged. Tests take
everything from the ``store`` fixture (the tests folder is not a package, so
they cannot import this module).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pytest

EXPERIMENT = "abl"
OTHER_EXPERIMENT = "other-sweep"
IMAGES = ("astronaut", "camera")
SOLVERS = ("anderson", "fixed_point")
SEEDS = (0, 1, 2)
MISSING = ("camera", "fixed_point")
FAILED = ("astronaut", "anderson", 2)
METRICS = ("psnr", "nmse", "hfe", "solver/fwd_nstep")

# per-cell centres, chosen so that the best PSNR (higher) and the best NMSE
# (lower) are in different rows of the anderson column
CENTRES = {
    ("astronaut", "anderson"): {"psnr": 30.0, "nmse": 0.020, "hfe": 12.0, "solver/fwd_nstep": 14.0},
    ("astronaut", "fixed_point"): {"psnr": 28.0, "nmse": 0.040, "hfe": 9.0, "solver/fwd_nstep": 30.0},
    ("camera", "anderson"): {"psnr": 33.0, "nmse": 0.050, "hfe": 15.0, "solver/fwd_nstep": 11.0},
}


@dataclass
class LoggedRun:
    """What the fixture logged for one run."""

    run_id: str
    image: str
    solver: str
    seed: int
    status: str
    params: dict[str, str]
    tags: dict[str, str]
    final: dict[str, float]  # metric -> last logged value
    final_step: dict[str, int]


@dataclass
class Store:
    uri: str
    root: Path
    experiment: str = EXPERIMENT
    other_experiment: str = OTHER_EXPERIMENT
    missing: tuple[str, str] = MISSING
    runs: list[LoggedRun] = field(default_factory=list)

    def finals(self, image: str, solver: str, metric: str, include_failed: bool = False) -> np.ndarray:
        """Final values of a metric over the seeds of one cell, as logged."""
        return np.array(
            [
                r.final[metric]
                for r in self.runs
                if r.image == image and r.solver == solver and metric in r.final
                and (include_failed or r.status == "FINISHED")
            ],
            dtype=float,
        )


@pytest.fixture(scope="session")
def store(tmp_path_factory: pytest.TempPathFactory) -> Store:
    """Create the sqlite store once per test session (first init takes a few seconds)."""
    from mlflow.entities import Metric, Param
    from mlflow.tracking import MlflowClient

    root = tmp_path_factory.mktemp("mlflow_store")
    uri = f"sqlite:///{root}/mlflow.db"
    client = MlflowClient(tracking_uri=uri)
    exp_id = client.create_experiment(EXPERIMENT, artifact_location=str(root / "artifacts"))
    store = Store(uri=uri, root=root, experiment=EXPERIMENT)
    rng = np.random.default_rng(1234)
    now = int(time.time() * 1000)

    for image in IMAGES:
        for solver in SOLVERS:
            if (image, solver) == MISSING:
                continue
            for seed in SEEDS:
                failed = (image, solver, seed) == FAILED
                params = {
                    "family": "deq_inr",
                    "seed": str(seed),
                    "data.image": image,
                    "data.size": "33",
                    "model.solver": solver,
                    "model.filter": "fourier",
                    "model.kind": "deq_inr",
                    "crr.init_std": "1e-05",
                    # only camera runs set it: an Int64 column with missing values
                    "data.acceleration": "4" if image == "camera" else "None",
                    "train.ift": "True",
                }
                tags = {
                    "cell_hash": f"{image[:3]}-{solver[:3]}-{seed}",
                    "family": "deq_inr",
                    "git_commit": "0123abc",
                    "host": "testhost",
                    "world_size": "1",
                }
                final = {
                    m: float(c + rng.normal(scale=0.05 * abs(c)))
                    for m, c in CENTRES[(image, solver)].items()
                }
                final["solver/fwd_nstep"] = float(round(final["solver/fwd_nstep"]))
                if failed:
                    final["psnr"] = 99.0
                if solver == "anderson":  # a metric only some runs have
                    final["noise/0.05/psnr"] = final["psnr"] - 1.5
                steps = {m: 2 for m in final}
                metrics = []
                for m, v in final.items():
                    # a per-epoch series: earlier epochs worse, the last is final
                    for step in range(3):
                        val = v if step == 2 else v - (3 - step) * 0.7
                        metrics.append(Metric(m, val, now + step, step))
                run = client.create_run(exp_id, start_time=now, tags=tags, run_name=f"{image}-{solver}-{seed}")
                run_id = run.info.run_id
                client.log_batch(
                    run_id,
                    metrics=metrics,
                    params=[Param(k, v) for k, v in params.items()],
                )
                client.set_terminated(run_id, status="FAILED" if failed else "FINISHED")
                now += 10
                store.runs.append(
                    LoggedRun(run_id, image, solver, seed, "FAILED" if failed else "FINISHED",
                              params, tags, final, steps)
                )

    other = client.create_experiment(OTHER_EXPERIMENT, artifact_location=str(root / "artifacts2"))
    run = client.create_run(other, tags={"cell_hash": "x"})
    client.log_batch(run.info.run_id, metrics=[Metric("psnr", 1.0, now, 0)], params=[Param("seed", "0")])
    client.set_terminated(run.info.run_id, status="FINISHED")
    return store
