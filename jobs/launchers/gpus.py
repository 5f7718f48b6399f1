"""GPUs on one machine for the local launcher: find them, hand them to cells, never oversubscribe.

Which devices exist: ``CUDA_VISIBLE_DEVICES`` when it is set (a comma list of
indices or UUIDs such as ``GPU-8f2c…``/``MIG-…``, kept as opaque ids; an empty
value means none and, as CUDA does, the list ends at the first negative entry,
so ``-1`` means none), else ``torch.cuda.device_count()`` (ids ``0``…``n-1``).

Which cells want GPUs: ``train.device`` decides, as :func:`jobs.node._wants_cuda`
does in the cell's own process — ``cuda`` always, ``auto`` when this machine has
GPUs, ``cpu`` never. ``resources.gpus_per_node`` is the Slurm request and does
not change this: a sweep written for a cluster (``device: auto``,
``gpus_per_node: 1``) still runs on a laptop's CPU.

How many: a GPU cell gets one device per rank, ``world_size`` of them; its
process sees only those (``CUDA_VISIBLE_DEVICES=2,3``) and rank ``LOCAL_RANK``
uses the ``LOCAL_RANK``-th of them (:func:`jobs.distributed.setup`).
"""

from __future__ import annotations

import os
import threading
from typing import Any, Mapping, Sequence


def parse_visible_devices(value: str) -> list[str]:
    """Device ids listed in a ``CUDA_VISIBLE_DEVICES`` value.

    Args:
        value: e.g. ``"0,1,2,3"``, ``"GPU-8f2c...,GPU-11ab..."``, ``""`` (none), ``"-1"`` (none).

    Returns:
        The ids in order, blanks dropped, cut at the first negative entry (CUDA ignores the rest).
    """
    ids: list[str] = []
    for item in (part.strip() for part in value.split(",")):
        if not item:
            continue
        if item.startswith("-"):
            break
        ids.append(item)
    return ids


def discover_devices(env: Mapping[str, str] | None = None) -> tuple[list[str], str]:
    """The GPUs this machine offers, and where that answer came from.

    Args:
        env: the environment to read (default ``os.environ``).

    Returns:
        ``(ids, source)``: ``source`` is ``"CUDA_VISIBLE_DEVICES"`` or ``"torch"``.
    """
    env = os.environ if env is None else env
    if "CUDA_VISIBLE_DEVICES" in env:
        return parse_visible_devices(env["CUDA_VISIBLE_DEVICES"]), "CUDA_VISIBLE_DEVICES"
    try:
        import torch  # lazily: a CPU sweep with the variable set never pays for it

        count = torch.cuda.device_count()
    except Exception:  # noqa: BLE001 - no usable CUDA build or driver: no GPUs
        count = 0
    return [str(i) for i in range(count)], "torch"


def wants_gpus(config: Mapping[str, Any], have_gpus: bool) -> bool:
    """Whether a cell with this resolved ``config`` trains on GPUs (see the module docstring)."""
    device = config.get("train", {}).get("device", "auto")
    return device == "cuda" or (device == "auto" and have_gpus)


class DevicePool:
    """A thread-safe set of device ids: :meth:`acquire` ``n`` of them, :meth:`release` them back.

    ``acquire`` waits until ``n`` ids are free at once, so the ids handed out at
    any moment are disjoint and never more than exist.
    """

    def __init__(self, ids: Sequence[str]) -> None:
        self.ids = list(ids)
        self._free = list(ids)
        self._cond = threading.Condition()

    def __len__(self) -> int:
        return len(self.ids)

    def acquire(self, n: int, timeout: float | None = None) -> list[str]:
        """Takes ``n`` free ids, waiting for them.

        Args:
            n: how many (a cell's ``world_size``).
            timeout: seconds to wait at most (default: as long as it takes).

        Returns:
            The ids, lowest first in the pool's order.

        Raises:
            ValueError: ``n`` exceeds the devices that exist (waiting would never end).
            TimeoutError: ``timeout`` passed first.
        """
        if n > len(self.ids):
            raise ValueError(f"needs {n} GPU{'s' if n != 1 else ''} (one per rank) but {len(self.ids)} "
                             f"exist{'s' if len(self.ids) == 1 else ''} on this machine")
        with self._cond:
            if not self._cond.wait_for(lambda: len(self._free) >= n, timeout):
                raise TimeoutError(f"{n} GPUs not free within {timeout} s")
            taken = sorted(self._free, key=self.ids.index)[:n]
            for dev in taken:
                self._free.remove(dev)
            return taken

    def release(self, ids: Sequence[str]) -> None:
        """Gives ``ids`` (from :meth:`acquire`) back and wakes the cells waiting for them."""
        with self._cond:
            self._free.extend(ids)
            self._cond.notify_all()

    def free(self) -> list[str]:
        """The ids nobody holds now."""
        with self._cond:
            return list(self._free)
