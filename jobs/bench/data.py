"""``deqbench bench data``: fastMRI slice loading, the suite's dataset against fastMRI's.

Writes synthetic multi-coil fastMRI-format volumes
(:func:`suite.data.synth.write_synthetic_dataset`) and reads every slice, in
one process and side by side, through

- ``suite``: :class:`suite.data.fastmri.FastMRISliceDataset` -- crop in image
  space (inverse FFT, crop, FFT back), column mask, zero-filled RSS image and
  instance normalisation, ACS coil-sensitivity maps, SENSE-combined complex
  target: everything a physics-based model (DE-Prox) needs;
- ``fastmri+suite transform``: ``fastmri.data.SliceDataset`` reading the same
  files, with the suite's transform (:meth:`FastMRISliceDataset.transform`):
  the same work, fastMRI's reading path -- the like-for-like comparison;
- ``suite (crop_mode=kspace)``: the suite cropping k-space instead of the
  image (one inverse FFT + FFT pair less; full field of view, targets
  recomputed);
- ``fastmri+UnetDataTransform``: fastMRI's U-Net transform (mask, one
  inverse FFT, crop, RSS, normalisation): less work, no k-space or maps out;
- ``fastmri+VarNetDataTransform``: fastMRI's VarNet transform (mask only; the
  full uncropped k-space goes to the network, which estimates the maps itself);
- ``fastmri (no transform)``: reading only.

All use the same mask function (``random``, same accelerations, seeded per
volume). Throughput is slices per second from the median over ``repeats``
passes (wall clock and thread CPU time); within a pass the pipelines take
turns slice by slice, so load drifts hit them alike. A ``cProfile`` of one suite pass
(thread CPU clock) shows where its time goes. Finally the time ``DataLoader`` takes per batch
is set against one training step of a small DE-Prox model built directly from
:mod:`suite.models.deprox` at the same resolution (goal: loading is never the
bottleneck).
"""

from __future__ import annotations

import cProfile
import os
import pstats
import statistics
import tempfile
import time
from typing import Any, Callable, Dict, List, Tuple

import numpy as np
import torch

from jobs.bench._common import merge_config, print_table

DEFAULTS: Dict[str, Any] = {
    "repeats": 5,
    "threads": 1,
    "seed": 0,
    "volumes": 4,
    "slices": 16,
    "coils": 8,
    "shape": [384, 320],
    "crop": [320, 320],
    "mask": {"type": "random", "accelerations": [4, 8], "center_fractions": [0.08, 0.04]},
    "profile_top": 14,
    "step": {
        "enabled": True,
        "batch": 1,
        "batches": 3,
        "denoiser": {"depth": 6, "width": 16, "norm": "group"},
        "f_max_iter": 10,
        "b_max_iter": 10,
        "eta": 1.0,
    },
    "goals": {"ratio": 1.0, "loader_fraction": 0.1},
}


def _merge(cfg: Dict[str, Any], defaults: Dict[str, Any], where: str = "bench data") -> Dict[str, Any]:
    """Defaults overlaid with ``cfg``; unknown keys refused (:func:`jobs.bench._common.merge_config`)."""
    return merge_config(cfg, defaults, where)


def _validate(cfg: Dict[str, Any]) -> None:
    for key in ("repeats", "volumes", "slices"):
        if isinstance(cfg[key], bool) or not isinstance(cfg[key], int) or cfg[key] < 1:
            raise ValueError(f"{key} must be an integer >= 1, got {cfg[key]!r}")
    if isinstance(cfg["coils"], bool) or not isinstance(cfg["coils"], int) or cfg["coils"] < 2:
        raise ValueError(f"coils must be an integer >= 2 (multi-coil data), got {cfg['coils']!r}")
    for key in ("shape", "crop"):
        if len(cfg[key]) != 2:
            raise ValueError(f"{key} must be [H, W], got {cfg[key]!r}")
    if cfg["crop"][0] > cfg["shape"][0] or cfg["crop"][1] > cfg["shape"][1]:
        raise ValueError(f"crop {cfg['crop']} must fit inside shape {cfg['shape']}")


def build_pipelines(root: str, cfg: Dict[str, Any]) -> Dict[str, Tuple[Any, float]]:
    """The datasets to compare over the files in ``root``, each with its construction time in seconds."""
    from fastmri.data import transforms as T
    from fastmri.data.mri_data import SliceDataset

    from suite.data.fastmri import FastMRISliceDataset, make_mask_func

    mk = cfg["mask"]

    def mask_func() -> Any:
        return make_mask_func(mk["type"], mk["accelerations"], mk["center_fractions"])

    def timed(factory: Callable[[], Any]) -> Tuple[Any, float]:
        start = time.perf_counter()
        ds = factory()
        return ds, time.perf_counter() - start

    out: Dict[str, Tuple[Any, float]] = {}
    out["suite"] = timed(lambda: FastMRISliceDataset(
        root, challenge="multicoil", slice_range=None, crop_size=tuple(cfg["crop"]),
        mask_type=mk["type"], accelerations=mk["accelerations"], center_fractions=mk["center_fractions"]))
    out["suite (crop_mode=kspace)"] = timed(lambda: FastMRISliceDataset(
        root, challenge="multicoil", slice_range=None, crop_size=tuple(cfg["crop"]), crop_mode="kspace",
        mask_type=mk["type"], accelerations=mk["accelerations"], center_fractions=mk["center_fractions"]))
    suite_ds = out["suite"][0]

    def suite_transform(kspace: np.ndarray, mask: Any, target: np.ndarray, attrs: Dict, fname: str,
                        slice_num: int) -> Dict:
        # what FastMRISliceDataset.__getitem__ does after reading
        return suite_ds.transform(T.to_tensor(kspace.astype(np.complex64)), target,
                                  float(attrs["max"]) if "max" in attrs else None, fname, slice_num)

    out["fastmri+suite transform"] = timed(lambda: SliceDataset(root, "multicoil", transform=suite_transform))
    out["fastmri+UnetDataTransform"] = timed(lambda: SliceDataset(
        root, "multicoil", transform=T.UnetDataTransform("multicoil", mask_func=mask_func(), use_seed=True)))
    out["fastmri+VarNetDataTransform"] = timed(lambda: SliceDataset(
        root, "multicoil", transform=T.VarNetDataTransform(mask_func=mask_func(), use_seed=True)))
    out["fastmri (no transform)"] = timed(lambda: SliceDataset(root, "multicoil", transform=None))
    return out


def interleaved_pass(datasets: Dict[str, Any]) -> Dict[str, Tuple[float, float]]:
    """One pass over every slice, the pipelines taking turns slice by slice.

    Returns per pipeline the wall and thread-CPU seconds summed over the slices.
    Alternating per slice exposes every pipeline to the same load drifts.
    """
    totals = {name: [0.0, 0.0] for name in datasets}
    n = min(len(ds) for ds in datasets.values())
    for i in range(n):
        for name, ds in datasets.items():
            wall, cpu = time.perf_counter(), time.thread_time()
            ds[i]
            totals[name][0] += time.perf_counter() - wall
            totals[name][1] += time.thread_time() - cpu
    return {name: (t[0], t[1]) for name, t in totals.items()}


def profile_suite(ds: Any, top: int) -> List[Tuple[str, float, int]]:
    """``cProfile`` of one pass over ``ds``: ``(function, cumulative ms per slice, calls per slice)``, largest first.

    The profiler's clock is the thread's CPU time (robust to other processes;
    the profiler's own overhead inflates Python-heavy functions). Only functions of the suite, fastMRI, h5py and torch's FFT/linalg entry
    points are listed; cumulative times nest (a caller includes its callees).
    """
    prof = cProfile.Profile(time.thread_time)
    prof.enable()
    for i in range(len(ds)):
        ds[i]
    prof.disable()
    stats = pstats.Stats(prof).stats  # type: ignore[attr-defined]
    n = len(ds)
    rows = []
    for (path, _, func), (_, ncalls, _, cumtime, _) in stats.items():
        norm = path.replace(os.sep, "/")
        if "/suite/" in norm:
            where = "suite." + norm.rsplit("/suite/", 1)[1].replace("/", ".").removesuffix(".py")
        elif "/fastmri/" in norm:
            where = "fastmri." + norm.rsplit("/fastmri/", 1)[1].replace("/", ".").removesuffix(".py")
        elif "/h5py/" in norm and func in ("__getitem__", "__init__", "close", "__exit__"):
            where = "h5py." + norm.rsplit("/h5py/", 1)[1].replace("/", ".").removesuffix(".py")
        elif path == "~" and any(k in func for k in ("fft", "linalg", "astype")):
            where = ""
        else:
            continue
        rows.append((f"{where}.{func}" if where else func, 1e3 * cumtime / n, round(ncalls / n)))
    rows.sort(key=lambda r: -r[1])
    return rows[:top]


def loader_vs_step(ds: Any, cfg: Dict[str, Any]) -> Dict[str, float]:
    """Median seconds per ``DataLoader`` batch and per DE-Prox training step on those batches (thread CPU and wall)."""
    from torch.utils.data import DataLoader

    from suite.models.deprox import DEProx, build_dncnn_denoiser, last_to_chan
    from suite.physics.mri import make_mri_physics

    st = cfg["step"]
    dn = st["denoiser"]
    model = DEProx(build_dncnn_denoiser(dn["depth"], dn["width"], dn["norm"]), eta=st["eta"],
                   f_max_iter=st["f_max_iter"], b_max_iter=st["b_max_iter"])
    opt = torch.optim.Adam(model.parameters(), lr=1e-4)
    model.train()
    loader = DataLoader(ds, batch_size=st["batch"], shuffle=True, num_workers=0,
                        generator=torch.Generator().manual_seed(cfg["seed"]))
    it = iter(loader)
    load_cpu, load_wall, step_cpu, step_wall, nsteps = [], [], [], [], []
    for i in range(st["batches"] + 1):  # the first is a warm-up
        c, w = time.thread_time(), time.perf_counter()
        batch = next(it)
        lc, lw = time.thread_time() - c, time.perf_counter() - w
        c, w = time.thread_time(), time.perf_counter()
        physics = make_mri_physics(batch["mask"], batch["sens_maps"])
        x_hat, info = model(batch["kspace"], physics)
        loss = torch.mean((x_hat - last_to_chan(batch["target_complex"])) ** 2)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sc, sw = time.thread_time() - c, time.perf_counter() - w
        if i:
            load_cpu.append(lc)
            load_wall.append(lw)
            step_cpu.append(sc)
            step_wall.append(sw)
            nsteps.append(float(info["nstep"].mean()))
    return {"load_cpu": statistics.median(load_cpu), "load_wall": statistics.median(load_wall),
            "step_cpu": statistics.median(step_cpu), "step_wall": statistics.median(step_wall),
            "nstep": statistics.median(nsteps)}


def main(cfg: Dict[str, Any]) -> int:
    """Run the benchmark described by ``configs/bench/data.yaml``.

    Args:
        cfg: Parsed YAML: ``repeats``, ``threads``, ``seed``, ``volumes``,
            ``slices``, ``coils``, ``shape`` (k-space ``[H, W]``), ``crop``,
            ``mask`` (``type``, ``accelerations``, ``center_fractions``),
            ``profile_top``, ``step`` (``enabled``, ``batch``, ``batches``,
            ``denoiser``, ``f_max_iter``, ``b_max_iter``, ``eta``), ``goals``
            (``ratio``: suite throughput / like-for-like fastMRI throughput to
            reach; ``loader_fraction``: largest loader time / step time).
            Missing keys take :data:`DEFAULTS`.

    Returns:
        0 when every pipeline served every slice, 1 otherwise.
    """
    from suite.data.synth import write_synthetic_dataset

    cfg = _merge(cfg or {}, DEFAULTS)
    _validate(cfg)
    if cfg["threads"] is not None:
        torch.set_num_threads(int(cfg["threads"]))
    reps = cfg["repeats"]
    with tempfile.TemporaryDirectory(prefix="deqbench_data_") as root:
        start = time.perf_counter()
        paths = write_synthetic_dataset(root, n_volumes=cfg["volumes"], n_slices=cfg["slices"],
                                        shape=tuple(cfg["shape"]), n_coils=cfg["coils"], seed=cfg["seed"],
                                        recon_size=tuple(cfg["crop"]))
        size_mb = sum(p.stat().st_size for p in paths) / 2**20
        load = os.getloadavg()
        print(f"{len(paths)} volumes x {cfg['slices']} slices, {cfg['coils']} coils, k-space "
              f"{cfg['shape'][0]}x{cfg['shape'][1]} -> crop {cfg['crop'][0]}x{cfg['crop'][1]} ({size_mb:.0f} MiB, "
              f"written in {time.perf_counter() - start:.0f} s); torch threads {torch.get_num_threads()}; "
              f"median of {reps} passes (pipelines alternating per slice); load average {load[0]:.1f} {load[1]:.1f} {load[2]:.1f}",
              flush=True)
        pipes = build_pipelines(root, cfg)
        lengths = {name: len(ds) for name, (ds, _) in pipes.items()}
        ok = len(set(lengths.values())) == 1
        if not ok:
            print(f"pipelines disagree on the number of slices: {lengths}")
        for name, (ds, _) in pipes.items():
            ds[0]  # warm-up: imports, page cache
        times: Dict[str, List[Tuple[float, float]]] = {name: [] for name in pipes}
        for _ in range(reps):
            for name, t in interleaved_pass({name: ds for name, (ds, _) in pipes.items()}).items():
                times[name].append(t)
        n = lengths["suite"]
        header = ["pipeline", "slices/s (wall)", "slices/s (CPU)", "ms/slice (CPU)", "CPU spread", "suite / this",
                  "init ms"]
        rows, rate = [], {}
        for name, (_, init_s) in pipes.items():
            wall = statistics.median(t[0] for t in times[name])
            cpu = statistics.median(t[1] for t in times[name])
            rate[name] = n / cpu
            cpus = [t[1] for t in times[name]]
            rows.append([name, f"{n / wall:.1f}", f"{n / cpu:.1f}", f"{1e3 * cpu / n:.1f}",
                         f"{100 * (max(cpus) - min(cpus)) / cpu:.0f}%", "", f"{1e3 * init_s:.0f}"])
        for row in rows:
            row[5] = f"{rate['suite'] / rate[row[0]]:.2f}x"
        print()
        print_table(header, rows)
        print("CPU spread: (max - min) / median of a pass's thread CPU time")

        print("\nwhere the suite's time goes (cProfile on thread CPU time, one pass; cumulative ms per slice, "
              "nested):")
        for func, ms, calls in profile_suite(pipes["suite"][0], cfg["profile_top"]):
            print(f"  {ms:8.2f} ms  x{calls:<3d} {func}")

        step = loader_vs_step(pipes["suite"][0], cfg) if cfg["step"]["enabled"] else None

    like = rate["suite"] / rate["fastmri+suite transform"]
    print()
    print(f"suite / fastmri SliceDataset with the same transform (CPU throughput): {like:.2f}x "
          f"(goal >= {cfg['goals']['ratio']:g}: {'met' if like >= cfg['goals']['ratio'] else 'NOT met'})")
    for ref in ("fastmri+UnetDataTransform", "fastmri+VarNetDataTransform"):
        print(f"suite / {ref} (less work, see module docstring): {rate['suite'] / rate[ref]:.2f}x")
    if step is not None:
        st = cfg["step"]
        frac = step["load_cpu"] / step["step_cpu"]
        print(f"DataLoader batch ({st['batch']} slice(s)) {1e3 * step['load_cpu']:.0f} ms CPU / "
              f"{1e3 * step['load_wall']:.0f} ms wall vs DE-Prox step (DnCNN {st['denoiser']['depth']}x"
              f"{st['denoiser']['width']}, f/b_max_iter {st['f_max_iter']}/{st['b_max_iter']}, forward nstep "
              f"{step['nstep']:.0f}) {step['step_cpu']:.2f} s CPU / {step['step_wall']:.2f} s wall: "
              f"loader / step = {frac:.3f} (goal <= {cfg['goals']['loader_fraction']:g}: "
              f"{'met' if frac <= cfg['goals']['loader_fraction'] else 'NOT met'})")
    return 0 if ok else 1
