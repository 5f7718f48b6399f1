"""``deqbench bench memory``: memory of a DE-Prox training step, DEQ against unrolled.

One training step -- forward, MSE loss, ``loss.backward()`` -- of
:class:`suite.models.deprox.DEProx` (implicit differentiation, Anderson) and
of :class:`suite.models.deprox.Unrolled` with ``K`` iterations, on the same
single-coil measurement and the same denoiser weights, in one process.

Three measurements per step (CPU; no CUDA allocator to ask):

- ``peak``: the peak of bytes allocated *during the step* and still alive
  (tensors alive before it -- weights, inputs -- are not counted), from the
  allocation and free events of ``torch.profiler.profile(profile_memory=True)``
  (every CPU allocation through PyTorch's allocator; oneDNN's internal scratch
  memory is not included). Split at the start of ``backward()`` into a
  forward and a backward peak.
- ``saved``: bytes of the tensors autograd saves for backward (one count per
  storage, weights and inputs excluded), via
  ``torch.autograd.graph.saved_tensors_hooks``, during the forward and during
  the backward (torchdeq's IFT backward evaluates the map once more, with a
  graph, at the fixed point).
- ``solver buffers``: the history the torchdeq solver allocates up front --
  Anderson's ``X, F`` of shape ``(B, m, D)`` each (``D = 2 H W``, the
  flattened state) plus its ``(B, m+1, m+1)`` system -- measured by
  instrumenting the ``torch.zeros`` calls inside ``torchdeq.solver.anderson``
  / ``broyden`` (a proxy module that records each allocation's bytes), per
  solve, and checked against the formula :func:`solver_buffer_elements`.
  These buffers are part of ``peak`` (they are allocated during the step);
  they are not autograd memory.

With ``hook_ift`` the DEQ is also measured with torchdeq's hook-based IFT
(``get_deq(hook_ift=True)``, swapped into the model), which solves the
backward system through the forward pass's graph of ``f`` instead of
evaluating ``f`` again: what that would save. (DEProx does not use it:
torchdeq keeps one hook per DEQ module, and two forward passes before one
``backward()`` make that backward recurse without end.)

The DEQ runs with a tolerance it cannot reach in float32, so it uses all of
its ``f_max_iter`` (and ``b_max_iter = f_max_iter``) iterations: its memory
is reported against the iteration count, which is the claim to test. Every
number is the median over ``repeats`` steps (memory is deterministic; the
spread is printed). The CPU time of an unprofiled step is shown too
(``time.thread_time``, robust to other processes sharing the cores).
"""

from __future__ import annotations

import statistics
import time
from contextlib import contextmanager
from typing import Any, Dict, Iterator, List, Optional, Tuple

import numpy as np
import torch
from torch import nn

from jobs.bench._common import merge_config, print_table

DEFAULTS: Dict[str, Any] = {
    "repeats": 3,
    "threads": 1,
    "seed": 0,
    "image": {"size": 64, "batch": 1, "acceleration": 4, "center_fraction": 0.08},
    "denoiser": {"depth": 17, "width": 32, "norm": "group"},
    "eta": 1.0,
    "iterations": [5, 10, 20, 40],
    "deq": {"solver": "anderson", "anderson_m": 6, "tol": 1.0e-9},
    "hook_ift": True,
    "time_steps": True,
    "goals": {"at_k": 20, "max_ratio": 0.2, "flat_tolerance": 0.1},
}


def _merge(cfg: Dict[str, Any], defaults: Dict[str, Any], where: str = "bench memory") -> Dict[str, Any]:
    """Defaults overlaid with ``cfg``; unknown keys refused (:func:`jobs.bench._common.merge_config`)."""
    return merge_config(cfg, defaults, where)


def _validate(cfg: Dict[str, Any]) -> None:
    for key in ("repeats",):
        if isinstance(cfg[key], bool) or not isinstance(cfg[key], int) or cfg[key] < 1:
            raise ValueError(f"{key} must be an integer >= 1, got {cfg[key]!r}")
    its = cfg["iterations"]
    if not isinstance(its, list) or not its or any(isinstance(k, bool) or not isinstance(k, int) or k < 3 for k in its):
        raise ValueError(f"iterations must be a non-empty list of integers >= 3, got {its!r}")
    if cfg["goals"]["at_k"] not in its:
        raise ValueError(f"goals.at_k {cfg['goals']['at_k']!r} must be one of iterations {its}")
    if cfg["deq"]["solver"] not in ("anderson", "broyden", "fixed_point_iter"):
        raise ValueError(f"deq.solver {cfg['deq']['solver']!r}; valid: anderson, broyden, fixed_point_iter")


def make_problem(size: int, batch: int, acceleration: int, center_fraction: float, seed: int
                 ) -> Tuple[torch.Tensor, torch.Tensor, nn.Module]:
    """A single-coil knee-phantom measurement.

    Returns:
        ``y (B, 1, H, W, 2)``, target ``(B, 2, H, W)`` and the physics operator.
    """
    from suite.data.fastmri import make_mask_func
    from suite.data.synth import make_phantom_volume
    from suite.physics.mri import make_mri_physics

    rng = np.random.default_rng(seed)
    vol = make_phantom_volume(rng, batch, (size, size), (size, size), "knee")  # (B, H, W) complex
    x = torch.from_numpy(np.stack([vol.real, vol.imag], axis=-1).astype(np.float32))  # (B, H, W, 2)
    mask, _ = make_mask_func("random", [acceleration], [center_fraction])((1, 1, size, 1), seed=seed)
    physics = make_mri_physics(mask.float())
    y = physics.A(x)
    return y, x.permute(0, 3, 1, 2).contiguous(), physics


class SavedBytes:
    """Counts the bytes of tensors autograd saves for backward, one count per storage.

    Storages in ``exclude`` (weights, inputs: alive anyway, never freed during the step) are
    not counted.
    """

    def __init__(self, exclude: List[torch.Tensor]) -> None:
        self.exclude = {t.untyped_storage().data_ptr() for t in exclude}
        self.seen: Dict[str, Dict[int, int]] = {}

    @contextmanager
    def phase(self, name: str) -> Iterator[None]:
        seen = self.seen.setdefault(name, {})

        def pack(t: torch.Tensor) -> torch.Tensor:
            storage = t.untyped_storage()
            ptr = storage.data_ptr()
            if ptr not in self.exclude:
                seen[ptr] = max(seen.get(ptr, 0), storage.nbytes())
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            yield

    def mb(self, name: str) -> float:
        return sum(self.seen.get(name, {}).values()) / 2**20


class CallCounter:
    """Counts a module's forward calls, with and without gradient tracking."""

    def __init__(self, module: nn.Module) -> None:
        self.grad = 0
        self.no_grad = 0
        self.handle = module.register_forward_hook(self._hook)

    def _hook(self, module: nn.Module, inp: Any, out: Any) -> None:
        if torch.is_grad_enabled():
            self.grad += 1
        else:
            self.no_grad += 1

    def reset(self) -> None:
        self.grad = self.no_grad = 0


class _TorchProxy:
    """Stands in for the ``torch`` module inside a solver module; records ``torch.zeros`` bytes."""

    def __init__(self, log: List[int]) -> None:
        self._log = log

    def zeros(self, *args: Any, **kwargs: Any) -> torch.Tensor:
        out = torch.zeros(*args, **kwargs)
        self._log.append(out.numel() * out.element_size())
        return out

    def __getattr__(self, name: str) -> Any:
        return getattr(torch, name)


@contextmanager
def solver_allocations() -> Iterator[List[List[int]]]:
    """Records, per solver call, the bytes of the buffers torchdeq's solvers allocate with ``torch.zeros``.

    Yields a list that receives one list of byte counts per Anderson or Broyden
    call. The solvers are wrapped in torchdeq's registry, which ``get_deq``
    reads at construction: build the models inside the context.
    """
    import torchdeq.solver as solver_pkg
    import torchdeq.solver.anderson as anderson_mod
    import torchdeq.solver.broyden as broyden_mod

    calls: List[List[int]] = []
    modules = {"anderson": (anderson_mod, anderson_mod.anderson_solver),
               "broyden": (broyden_mod, broyden_mod.broyden_solver)}
    saved_registry = dict(solver_pkg._solvers)

    def wrap(mod: Any, fn: Any) -> Any:
        def solver(*args: Any, **kwargs: Any) -> Any:
            log: List[int] = []
            mod.torch = _TorchProxy(log)  # type: ignore[assignment]
            calls.append(log)
            try:
                return fn(*args, **kwargs)
            finally:
                mod.torch = torch

        return solver

    try:
        for name, (mod, fn) in modules.items():
            solver_pkg._solvers[name] = wrap(mod, fn)
        yield calls
    finally:
        solver_pkg._solvers.clear()
        solver_pkg._solvers.update(saved_registry)
        for mod, _ in modules.values():
            mod.torch = torch


def _allocation_events(prof: Any) -> Tuple[np.ndarray, np.ndarray, Optional[int]]:
    """Memory allocated during a profile and still alive, after each allocation event.

    Only blocks allocated inside this profile count: the free of an older block
    is ignored (the allocator may still report its size from an earlier
    profiling session). The events' ``total_allocated`` field is not used: on
    CPU it drifts upward with the number of operations even when every block
    is freed.

    Returns:
        Event times (ns), live bytes after each event, and the start time of the
        ``bench::backward`` region (``None`` if absent).
    """
    from torch._C._profiler import _EventType

    events, bwd_start = [], None
    stack = list(prof.profiler.kineto_results.experimental_event_tree())
    while stack:
        node = stack.pop()
        if node.tag == _EventType.Allocation:
            events.append((node.start_time_ns, node.extra_fields.alloc_size, node.extra_fields.ptr))
        elif node.name == "bench::backward":
            bwd_start = node.start_time_ns
        stack.extend(node.children)
    events.sort(key=lambda e: e[0])
    live: Dict[int, int] = {}
    total = 0
    totals = np.empty(len(events), dtype=np.float64)
    for i, (_, size, ptr) in enumerate(events):
        if size > 0:
            live[ptr] = size
            total += size
        elif ptr in live:
            total -= live.pop(ptr)
        totals[i] = total
    return np.array([e[0] for e in events], dtype=np.int64), totals, bwd_start


def solver_buffer_elements(solver: str, batch: int, dim: int, m: int, max_iter: int) -> int:
    """Elements of the history a torchdeq solver allocates for a ``(batch, dim)`` state.

    ``anderson``: ``X, F (B, m, D)`` and ``H (B, m+1, m+1)``, ``y (B, m+1, 1)``;
    ``broyden``: ``Us (B, D, max_iter)`` and ``VTs (B, max_iter, D)``;
    ``fixed_point_iter``: no history.
    """
    if solver == "anderson":
        return 2 * batch * m * dim + batch * (m + 1) ** 2 + batch * (m + 1)
    if solver == "broyden":
        return 2 * batch * dim * max_iter
    return 0


def measure_step(model: nn.Module, y: torch.Tensor, physics: nn.Module, target: torch.Tensor,
                 counter: CallCounter, solver_calls: List[List[int]]) -> Dict[str, float]:
    """Profiles one training step; memory in MiB (see the module docstring).

    ``solver_calls`` is the list yielded by :func:`solver_allocations` (the model
    must have been built inside it); the step's solver buffers are read from it.
    """
    from torch.profiler import ProfilerActivity, profile, record_function

    model.zero_grad(set_to_none=True)
    counter.reset()
    n_calls = len(solver_calls)
    # buffers are not excluded: the spectral-norm vectors are replaced (newly allocated) every training step
    saved = SavedBytes([*model.parameters(), y, target, *physics.buffers()])
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        with saved.phase("forward"):
            x_hat, _ = model(y, physics)
            loss = torch.mean((x_hat - target) ** 2)
        with record_function("bench::backward"), saved.phase("backward"):
            loss.backward()
    times, totals, bwd_start = _allocation_events(prof)
    if not times.size or bwd_start is None:
        raise RuntimeError("the profiler recorded no allocation events; cannot measure memory")
    fwd = totals[times < bwd_start]
    bwd = totals[times >= bwd_start]
    return {
        "peak": totals.max() / 2**20,
        "peak_fwd": (fwd.max() if fwd.size else 0.0) / 2**20,
        "peak_bwd": (bwd.max() if bwd.size else 0.0) / 2**20,
        "end_fwd": (fwd[-1] if fwd.size else 0.0) / 2**20,
        "saved_fwd": saved.mb("forward"),
        "saved_bwd": saved.mb("backward"),
        "calls_grad": float(counter.grad),
        "calls_nograd": float(counter.no_grad),
        "solver_calls": float(len(solver_calls) - n_calls),
        "solver_mb": max((sum(c) for c in solver_calls[n_calls:]), default=0) / 2**20,
    }


def cpu_time_step(model: nn.Module, y: torch.Tensor, physics: nn.Module, target: torch.Tensor) -> float:
    """Thread CPU seconds of one unprofiled training step."""
    model.zero_grad(set_to_none=True)
    start = time.thread_time()
    x_hat, _ = model(y, physics)
    torch.mean((x_hat - target) ** 2).backward()
    return time.thread_time() - start


def _median(rows: List[Dict[str, float]], key: str) -> float:
    return statistics.median(r[key] for r in rows)


def _spread(rows: List[Dict[str, float]], key: str) -> float:
    values = [r[key] for r in rows]
    return max(values) - min(values)


def main(cfg: Dict[str, Any]) -> int:
    """Run the benchmark described by ``configs/bench/memory.yaml``.

    Args:
        cfg: Parsed YAML: ``repeats``, ``threads``, ``seed``, ``image`` (``size``,
            ``batch``, ``acceleration``, ``center_fraction``), ``denoiser``
            (``depth``, ``width``, ``norm``), ``eta``, ``iterations`` (``K`` of the
            unrolled model and ``f_max_iter = b_max_iter`` of the DEQ), ``deq``
            (``solver``, ``anderson_m``, ``tol``), ``hook_ift`` (also measure
            torchdeq's hook-based IFT), ``time_steps``, ``goals``
            (``at_k``, ``max_ratio`` of DEQ / unrolled peak there,
            ``flat_tolerance``: largest relative growth of the DEQ peak over
            ``iterations``). Missing keys take :data:`DEFAULTS`.

    Returns:
        0 when the instrumented solver buffers agree with the formula in every
        DEQ step, 1 otherwise (goals are reported, not enforced).
    """
    import copy
    import os

    from torchdeq import get_deq

    from suite.models.deprox import DEProx, Unrolled, build_dncnn_denoiser

    cfg = _merge(cfg or {}, DEFAULTS)
    _validate(cfg)
    if cfg["threads"] is not None:
        torch.set_num_threads(int(cfg["threads"]))
    torch.manual_seed(cfg["seed"])
    im, dn, dq = cfg["image"], cfg["denoiser"], cfg["deq"]
    y, target, physics = make_problem(im["size"], im["batch"], im["acceleration"], im["center_fraction"], cfg["seed"])
    base = build_dncnn_denoiser(dn["depth"], dn["width"], dn["norm"])
    base.prepare_spectral_norm((im["size"], im["size"]), update=False)  # one start vector shared by every copy
    batch, dim = target.shape[0], target[0].numel()
    load = os.getloadavg()
    print(
        f"DE-Prox step, single-coil {im['size']}x{im['size']}, batch {batch}, DnCNN {dn['depth']}x{dn['width']} "
        f"norm={dn['norm']}, torch threads {torch.get_num_threads()}, median of {cfg['repeats']} repeats; "
        f"load average {load[0]:.1f} {load[1]:.1f} {load[2]:.1f}"
    )

    results: Dict[Tuple[str, int], Dict[str, float]] = {}
    ok = True
    with solver_allocations() as solver_calls:
        for k in cfg["iterations"]:
            for kind in ("unrolled", "deq") + (("deq_hook",) if cfg["hook_ift"] else ()):
                den = copy.deepcopy(base)
                if kind == "unrolled":
                    model: nn.Module = Unrolled(den, eta=cfg["eta"], n_iter=k)
                else:
                    model = DEProx(den, eta=cfg["eta"], solver=dq["solver"], f_max_iter=k, b_max_iter=k,
                                   f_tol=dq["tol"], b_tol=dq["tol"], ift=True)
                    if kind == "deq_hook":
                        model.deq = get_deq(core="indexing", f_solver=dq["solver"], b_solver=dq["solver"],
                                            f_max_iter=k, b_max_iter=k, f_tol=dq["tol"], b_tol=dq["tol"],
                                            f_stop_mode="rel", b_stop_mode="rel", ift=True, hook_ift=True)
                model.train()
                counter = CallCounter(den)
                measure_step(model, y, physics, target, counter, solver_calls)  # warm-up (spectral norm, allocator)
                rows = [measure_step(model, y, physics, target, counter, solver_calls) for _ in range(cfg["repeats"])]
                res = {key: _median(rows, key) for key in rows[0]}
                res["peak_spread"] = _spread(rows, "peak")
                if kind != "unrolled":
                    expected = solver_buffer_elements(dq["solver"], batch, dim, dq["anderson_m"], k)
                    res["solver_formula_mb"] = expected * target.element_size() / 2**20
                    if abs(res["solver_mb"] - res["solver_formula_mb"]) > 1e-9 or res["solver_calls"] != 2:
                        print(f"solver-buffer check FAILED at f_max_iter {k}: measured {res['solver_mb']:.4f} MiB "
                              f"in {res['solver_calls']:.0f} solves, formula {res['solver_formula_mb']:.4f} MiB")
                        ok = False
                if cfg["time_steps"]:
                    res["cpu_s"] = statistics.median(
                        cpu_time_step(model, y, physics, target) for _ in range(cfg["repeats"])
                    )
                counter.handle.remove()
                results[(kind, k)] = res

    header = ["model", "K / f_max_iter", "peak MiB", "fwd peak", "bwd peak", "saved fwd", "saved bwd",
              "solver buf", "R calls (grad/no-grad)"] + (["CPU s/step"] if cfg["time_steps"] else [])
    table: List[List[str]] = []
    for (kind, k), r in results.items():
        row = [
            {"unrolled": "unrolled", "deq": f"DEQ IFT {dq['solver']}",
             "deq_hook": f"DEQ hook-IFT {dq['solver']}"}[kind],
            str(k), f"{r['peak']:.1f}", f"{r['peak_fwd']:.1f}", f"{r['peak_bwd']:.1f}",
            f"{r['saved_fwd']:.1f}", f"{r['saved_bwd']:.1f}",
            f"{r['solver_mb']:.2f}", f"{int(r['calls_grad'])}/{int(r['calls_nograd'])}",
        ]
        if cfg["time_steps"]:
            row.append(f"{r['cpu_s']:.2f}")
        table.append(row)
    print()
    print_table(header, table)
    spreads = max(r["peak_spread"] for r in results.values())
    print(f"largest spread of the peak over repeats: {spreads:.2f} MiB")

    its = cfg["iterations"]
    deq_peaks = [results[("deq", k)]["peak"] for k in its]
    unr_peaks = [results[("unrolled", k)]["peak"] for k in its]
    per_iter = (results[("unrolled", its[-1])]["saved_fwd"] - results[("unrolled", its[0])]["saved_fwd"]) / max(
        its[-1] - its[0], 1)
    growth = max(deq_peaks) / min(deq_peaks) - 1.0
    k_goal = cfg["goals"]["at_k"]
    ratio = results[("deq", k_goal)]["peak"] / results[("unrolled", k_goal)]["peak"]
    print()
    print(f"unrolled: {per_iter:.2f} MiB of saved activations per iteration (one denoiser graph); "
          f"peak {unr_peaks[0]:.1f} -> {unr_peaks[-1]:.1f} MiB for K {its[0]} -> {its[-1]}")
    print(f"DEQ: peak {min(deq_peaks):.1f}..{max(deq_peaks):.1f} MiB for f_max_iter {its[0]}..{its[-1]} "
          f"(growth {100 * growth:.1f}%); solver history {results[('deq', its[0])]['solver_mb']:.3f} MiB per solve "
          f"(measured; formula {results[('deq', its[0])]['solver_formula_mb']:.3f} MiB), 2 solves per step")
    flat_goal = cfg["goals"]["flat_tolerance"]
    ratio_goal = cfg["goals"]["max_ratio"]
    print(f"goal DEQ peak flat in f_max_iter (growth <= {100 * flat_goal:.0f}%): "
          f"{'met' if growth <= flat_goal else 'NOT met'}")
    print(f"goal DEQ peak <= {ratio_goal:g} x unrolled at K = {k_goal}: {'met' if ratio <= ratio_goal else 'NOT met'}")
    if cfg["hook_ift"]:
        hook = results[("deq_hook", k_goal)]["peak"] / results[("unrolled", k_goal)]["peak"]
        print(f"DEQ with torchdeq's hook-based IFT (reuses the forward graph of f in backward; not DEProx's "
              f"default) / unrolled at K = {k_goal}: {hook:.3f} ({1 / hook:.1f}x less)")
    print(f"DEQ / unrolled peak memory at K = {k_goal}: {ratio:.3f} ({1 / ratio:.1f}x less)")
    return 0 if ok else 1
