"""DistributedDataParallel setup for the node job: one call, every launcher.

Where the rank comes from, first match wins:

* a process group already running (Ray Train's ``TorchTrainer`` starts one);
* ``RANK``/``WORLD_SIZE``/``MASTER_ADDR``/``MASTER_PORT`` in the environment
  (``torchrun``, ``slurm/templates/ddp_train.sbatch``);
* a submitit task (``SUBMITIT_EXECUTOR=slurm``): submitit's
  ``TorchDistributedEnvironment`` exports those variables (master = first node,
  a port derived from the job id);
* a bare ``srun`` step: ``SLURM_PROCID``/``SLURM_STEP_NUM_TASKS``/``SLURM_LOCALID``,
  master = first node of the step, port from the job id.

A single process (none of these, or a world of one) starts no process group.
Backend: NCCL when the cell trains on GPUs, gloo on CPU. As nanoGPT's
``train.py``, the whole thing is the dozen lines of :func:`setup`.
"""

from __future__ import annotations

import os
import subprocess
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class DistContext:
    """Where this process is: ``rank`` of ``world_size``, ``local_rank`` on its node.

    ``owned``: this module started the process group (and :func:`teardown` ends it).
    """

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    backend: str = ""
    owned: bool = False

    @property
    def is_main(self) -> bool:
        """Rank 0: logs, checkpoints and writes artifacts."""
        return self.rank == 0


def _export_slurm_env() -> None:
    """Sets ``RANK``... from a submitit task or a bare ``srun`` step (no-op outside Slurm steps)."""
    env = os.environ
    if "RANK" in env or int(env.get("SLURM_STEP_NUM_TASKS", env.get("SLURM_NTASKS", "1")) or 1) <= 1:
        return
    if "SLURM_STEP_NUM_TASKS" not in env:
        return  # the batch script itself, not a task of an srun step
    if env.get("SUBMITIT_EXECUTOR") == "slurm":
        from submitit.helpers import TorchDistributedEnvironment

        TorchDistributedEnvironment().export(set_cuda_visible_devices=False)
        return
    nodes = subprocess.run(["scontrol", "show", "hostnames", env["SLURM_STEP_NODELIST"]], capture_output=True,
                           text=True, check=True).stdout.split()
    job = int(env.get("SLURM_JOB_ID", "0"))
    env.update(RANK=env["SLURM_PROCID"], WORLD_SIZE=env["SLURM_STEP_NUM_TASKS"], LOCAL_RANK=env.get("SLURM_LOCALID", "0"),
               MASTER_ADDR=env.get("MASTER_ADDR", nodes[0]), MASTER_PORT=env.get("MASTER_PORT", str(20000 + job % 20000)))


def setup(use_cuda: bool | None = None, timeout_s: float | None = None) -> DistContext:
    """Starts the process group this process belongs to, if any.

    Args:
        use_cuda: train on GPUs (NCCL, one GPU per local rank); default: when
            CUDA is available.
        timeout_s: collective timeout (default ``$DEQBENCH_DIST_TIMEOUT_S`` or 600 s):
            a rank that died makes the others fail after this, not hang.

    Returns:
        This process's :class:`DistContext`.
    """
    if dist.is_available() and dist.is_initialized():  # Ray Train (or a caller) started it
        local = int(os.environ.get("LOCAL_RANK", "0"))
        return DistContext(dist.get_rank(), dist.get_world_size(), local, dist.get_backend(), owned=False)
    _export_slurm_env()
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return DistContext()
    rank, local = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    use_cuda = torch.cuda.is_available() if use_cuda is None else use_cuda
    backend = "nccl" if use_cuda else "gloo"
    if use_cuda:
        torch.cuda.set_device(local % max(1, torch.cuda.device_count()))
    timeout = timedelta(seconds=timeout_s or float(os.environ.get("DEQBENCH_DIST_TIMEOUT_S", "600")))
    dist.init_process_group(backend, init_method="env://", rank=rank, world_size=world, timeout=timeout)
    return DistContext(rank, world, local, backend, owned=True)


def teardown(ctx: DistContext) -> None:
    """Ends the process group :func:`setup` started (not one it found running)."""
    if ctx.owned and dist.is_initialized():
        dist.destroy_process_group()
