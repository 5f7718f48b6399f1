"""fastMRI volumes as a DE-Prox cell consumes them: split, synthetic set, batched slice store.

``load_deprox_data(cfg)`` splits ``mri.root`` (or the synthetic set it names,
written once by :func:`ensure_synthetic`) into training and validation
volumes and serves their slices through :class:`SliceStore` (see
:mod:`suite.data.fastmri` for what one slice holds).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Sequence

import torch
from torch.utils.data import default_collate

from suite.config import ExperimentConfig, MRIConfig
from suite.data.fastmri import FastMRISliceDataset, _list_files

_SYNTH_FORMAT = 1  # bump when suite.data.synth changes what it writes
_BATCH_KEYS = ("kspace", "mask", "sens_maps", "target_complex", "std")


class SliceStore:
    """The slices of a :class:`FastMRISliceDataset`, batched, grouped by volume.

    Args:
        dataset: the dataset.
        preload: read every slice once and keep it in memory.
    """

    def __init__(self, dataset: FastMRISliceDataset, preload: bool = False) -> None:
        self.dataset = dataset
        self._items: Optional[list[dict]] = [dataset[i] for i in range(len(dataset))] if preload else None
        groups: dict[str, list[int]] = {}
        for i, (path, _) in enumerate(dataset.examples):
            groups.setdefault(path.name, []).append(i)
        self._volumes = list(groups.items())

    def __len__(self) -> int:
        return len(self.dataset)

    def volumes(self) -> list[tuple[str, list[int]]]:
        """``(file name, slice indices)`` per volume, in file order."""
        return self._volumes

    def item(self, index: int) -> dict:
        """One served slice (see :mod:`suite.data.fastmri` for its keys)."""
        return self._items[index] if self._items is not None else self.dataset[index]

    def batch(self, indices: Sequence[int], device: torch.device) -> dict[str, torch.Tensor]:
        """Collated slices on ``device``.

        Returns:
            ``kspace (B, C, H, W, 2)``, ``mask (B, 1, 1, W, 1)``, ``target_complex
            (B, H, W, 2)``, ``std (B,)`` and, for multi-coil data, ``sens_maps (B, C, H, W, 2)``.
        """
        items = [{k: v for k, v in self.item(int(i)).items() if k in _BATCH_KEYS} for i in indices]
        return {k: v.to(device) for k, v in default_collate(items).items()}


@dataclass
class DEProxData:
    """Training and validation slices of a DE-Prox cell.

    Attributes:
        train: training slices (None for ``zero_filled``, which does not train).
        val: held-out validation volumes (all metrics are computed on them).
        train_files: the training volumes.
        val_files: the validation volumes.
    """

    train: Optional[SliceStore]
    val: SliceStore
    train_files: list[Path] = field(default_factory=list)
    val_files: list[Path] = field(default_factory=list)


def synthetic_dir(mri: MRIConfig) -> Path:
    """Cache directory of the synthetic set ``mri`` describes (same settings, same directory).

    Base: ``mri.synth_dir``, else ``$DEQBENCH_CACHE``, else ``~/.cache/deqbench``.
    """
    base = Path(mri.synth_dir or os.environ.get("DEQBENCH_CACHE") or Path.home() / ".cache" / "deqbench")
    spec = _synthetic_spec(mri)
    key = hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()[:12]
    return base.expanduser().absolute() / f"fastmri_synth_{key}"


def _synthetic_spec(mri: MRIConfig) -> dict[str, Any]:
    return {
        "format": _SYNTH_FORMAT, "volumes": mri.synth_volumes, "slices": mri.synth_slices,
        "coils": mri.synth_coils, "size": list(mri.synth_size), "recon_size": list(mri.crop),
        "anatomy": mri.synth_anatomy, "seed": mri.synth_seed,
    }


def ensure_synthetic(mri: MRIConfig) -> Path:
    """Writes the synthetic set once (atomically: concurrent cells may race) and returns its directory.

    The objects fit inside ``mri.crop`` (the synthetic reconstruction size).
    """
    from suite.data.synth import write_synthetic_dataset

    final = synthetic_dir(mri)
    if (final / "DONE").is_file():
        return final
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = final.with_name(f"{final.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}")
    try:
        write_synthetic_dataset(
            tmp, n_volumes=mri.synth_volumes, n_slices=mri.synth_slices, shape=tuple(mri.synth_size),
            n_coils=mri.synth_coils, seed=mri.synth_seed, recon_size=tuple(mri.crop), anatomy=mri.synth_anatomy,
        )
        (tmp / "DONE").write_text(json.dumps(_synthetic_spec(mri)))
        os.rename(tmp, final)
    except OSError:
        if not (final / "DONE").is_file():  # not a lost race: a real error
            raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return final


def _h5_files(root: str, key: str) -> list[Path]:
    """:func:`suite.data.fastmri._list_files` of ``root`` (``~`` expanded), its errors prefixed with the config key."""
    try:
        return _list_files(Path(root).expanduser())
    except (FileNotFoundError, ValueError) as err:
        raise type(err)(f"{key}: {err}") from None


def split_files(mri: MRIConfig, need_train: bool = True) -> tuple[list[Path], list[Path]]:
    """Training and validation volumes.

    ``mri.val_root`` set: all of ``mri.root`` trains, all of ``val_root``
    validates. Otherwise the last ``mri.val_volumes`` files of ``mri.root`` (by
    name) validate and the others train.

    Raises:
        FileNotFoundError: a path does not exist.
        ValueError: a directory has no ``.h5`` file, or no volume is left for training.
    """
    root = str(ensure_synthetic(mri)) if mri.root == "synthetic" else mri.root
    files = _h5_files(root, "mri.root")
    if mri.val_root:
        return files, _h5_files(mri.val_root, "mri.val_root")
    if need_train and len(files) <= mri.val_volumes:
        raise ValueError(
            f"mri.root {root!r} has {len(files)} volume(s); mri.val_volumes={mri.val_volumes} leaves none for "
            "training (add volumes, lower mri.val_volumes or set mri.val_root)"
        )
    n_val = min(mri.val_volumes, len(files))
    return files[: len(files) - n_val], files[len(files) - n_val :]


def _dataset(files: list[Path], mri: MRIConfig) -> FastMRISliceDataset:
    return FastMRISliceDataset(
        files, challenge=mri.challenge, slice_range=(mri.slice_start, mri.slice_stop), crop_size=tuple(mri.crop),
        crop_mode=mri.crop_mode, mask_type=mri.mask_type, accelerations=[mri.acceleration],
        center_fractions=[mri.center_fraction], use_seed=True, clamp=mri.clamp,
    )


def load_deprox_data(cfg: ExperimentConfig) -> DEProxData:
    """The data of a DE-Prox cell (``load_data`` for family ``deprox``).

    Every volume gets a fixed mask seeded by its file name, so training,
    evaluation and resumed runs see the same measurements.

    Raises:
        FileNotFoundError, ValueError: a missing path, or a volume the dataset
            refuses (no ``kspace``, wrong dtype or shape, slice range outside the
            volume, ...); messages name the file.
    """
    need_train = cfg.deprox.kind != "zero_filled"
    train_files, val_files = split_files(cfg.mri, need_train)
    train = SliceStore(_dataset(train_files, cfg.mri), cfg.mri.preload) if need_train else None
    val = SliceStore(_dataset(val_files, cfg.mri), cfg.mri.preload)
    return DEProxData(train, val, train_files, val_files)
