"""``deqbench bench profile``: where the time of a DE-Prox training step goes.

One training step of :class:`suite.models.deprox.DEProx` (IFT, Anderson):
forward, MSE loss, ``backward()``, Adam step, on a single-coil phantom.

1. Phase split (thread CPU time, median over ``repeats`` steps, robust to
   other processes on the machine): the forward solve (torchdeq's solver, no
   graph), the one graph-building call of ``f`` at the fixed point, the
   backward solve (vector-Jacobian products through ``f``), the IFT
   re-evaluation of ``f`` in backward, the rest of backward (gradients of the
   weights), the optimiser step; and, across phases, the time inside the
   denoiser's forward calls. Solvers are timed by wrapping torchdeq's solver
   registry before the model is built; the denoiser by forward hooks.
2. Top operators by self CPU time from ``torch.profiler`` (``record_shapes``)
   over one step.
3. Optional variants (``variants``), timed side by side with the baseline,
   interleaved step by step: e.g. ``hook_ift`` (torchdeq's hook-based IFT,
   which reuses the forward graph of ``f`` for the backward solve instead of
   re-evaluating ``f``) and ``channels_last`` (the denoiser's activations in
   NHWC memory format, oneDNN's preferred layout for convolutions on CPU),
   which give the same gradient, and ``phantom`` (DEProx's phantom gradient,
   ``ift=False, grad=phantom_steps``: no backward solve, an approximate
   gradient), an algorithmic rather than a code change.
"""

from __future__ import annotations

import copy
import os
import statistics
import time
from contextlib import contextmanager
from typing import Any, Callable, Dict, Iterator, List, Tuple

import torch
from torch import nn

from jobs.bench._common import merge_config, print_table

VARIANTS = ("baseline", "hook_ift", "channels_last", "phantom")
EXACT_VARIANTS = ("hook_ift", "channels_last")  # same gradient as the baseline; "phantom" approximates it

DEFAULTS: Dict[str, Any] = {
    "repeats": 5,
    "threads": 1,
    "seed": 0,
    "image": {"size": 64, "batch": 1, "acceleration": 4, "center_fraction": 0.08},
    "denoiser": {"depth": 17, "width": 32, "norm": "group"},
    "eta": 1.0,
    "deq": {"solver": "anderson", "f_max_iter": 30, "b_max_iter": 30, "f_tol": 1.0e-3, "b_tol": 1.0e-4},
    "warmup_steps": 2,
    "top_ops": 15,
    "variants": ["hook_ift", "channels_last", "phantom"],
    "phantom_steps": 5,
}


def _merge(cfg: Dict[str, Any], defaults: Dict[str, Any], where: str = "bench profile") -> Dict[str, Any]:
    """Defaults overlaid with ``cfg``; unknown keys refused (:func:`jobs.bench._common.merge_config`)."""
    return merge_config(cfg, defaults, where)


def _validate(cfg: Dict[str, Any]) -> None:
    if isinstance(cfg["repeats"], bool) or not isinstance(cfg["repeats"], int) or cfg["repeats"] < 1:
        raise ValueError(f"repeats must be an integer >= 1, got {cfg['repeats']!r}")
    bad = [v for v in cfg["variants"] if v not in VARIANTS[1:]]
    if bad:
        raise ValueError(f"unknown variant(s) {bad}; valid: {', '.join(VARIANTS[1:])}")


class PhaseClock:
    """Accumulates thread CPU time of labelled regions, and of the denoiser's forward calls per phase."""

    def __init__(self) -> None:
        self.phase = "forward"
        self.cpu: Dict[str, float] = {}
        self.calls: Dict[str, int] = {}
        self._den_start: List[float] = []

    def reset(self) -> None:
        self.cpu.clear()
        self.calls.clear()
        self.phase = "forward"

    def add(self, key: str, seconds: float, calls: int = 1) -> None:
        self.cpu[key] = self.cpu.get(key, 0.0) + seconds
        self.calls[key] = self.calls.get(key, 0) + calls

    @contextmanager
    def region(self, key: str) -> Iterator[None]:
        start = time.thread_time()
        try:
            yield
        finally:
            self.add(key, time.thread_time() - start)

    def attach(self, denoiser: nn.Module) -> None:
        """Times every forward call of ``denoiser``, keyed by phase and grad mode."""

        def pre(module: nn.Module, inp: Any) -> None:
            self._den_start.append(time.thread_time())

        def post(module: nn.Module, inp: Any, out: Any) -> None:
            mode = "graph" if torch.is_grad_enabled() else "no-graph"
            self.add(f"denoiser {self.phase} ({mode})", time.thread_time() - self._den_start.pop())

        denoiser.register_forward_pre_hook(pre)
        denoiser.register_forward_hook(post)


@contextmanager
def timed_solvers(clock: PhaseClock) -> Iterator[None]:
    """While active, torchdeq solvers looked up by name are timed into ``clock`` ("solve <phase>").

    Models must be built inside (torchdeq resolves solver names at construction).
    """
    import torchdeq.solver as solver_pkg

    saved = dict(solver_pkg._solvers)

    def wrap(fn: Callable) -> Callable:
        def solver(*args: Any, **kwargs: Any) -> Any:
            with clock.region(f"solve {clock.phase}"):
                return fn(*args, **kwargs)

        return solver

    for name in ("anderson", "broyden", "fixed_point_iter"):
        solver_pkg._solvers[name] = wrap(saved[name])
    try:
        yield
    finally:
        solver_pkg._solvers.clear()
        solver_pkg._solvers.update(saved)


class ChannelsLast(nn.Module):
    """Runs ``module`` on NHWC (channels-last) activations; input and output stay NCHW-contiguous."""

    def __init__(self, module: nn.Module) -> None:
        super().__init__()
        self.module = module.to(memory_format=torch.channels_last)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.module(x.contiguous(memory_format=torch.channels_last)).contiguous()

    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(self.__dict__["_modules"]["module"], name)

    def __setattr__(self, name: str, value: Any) -> None:
        if name == "sn_update_on_forward":
            setattr(self.module, name, value)
        else:
            super().__setattr__(name, value)


def build_model(base: nn.Module, cfg: Dict[str, Any], variant: str) -> Tuple[nn.Module, nn.Module]:
    """A DE-Prox model on a copy of ``base`` for ``variant``; returns ``(model, denoiser)``."""
    from torchdeq import get_deq

    from suite.models.deprox import DEProx

    den = copy.deepcopy(base)
    dq = cfg["deq"]
    if variant == "channels_last":
        den = ChannelsLast(den)
    model = DEProx(den, eta=cfg["eta"], solver=dq["solver"], f_max_iter=dq["f_max_iter"],
                   b_max_iter=dq["b_max_iter"], f_tol=dq["f_tol"], b_tol=dq["b_tol"],
                   ift=variant != "phantom", grad=int(cfg["phantom_steps"]))
    if variant == "hook_ift":
        model.deq = get_deq(core="indexing", f_solver=dq["solver"], b_solver=dq["solver"],
                            f_max_iter=dq["f_max_iter"], b_max_iter=dq["b_max_iter"], f_tol=float(dq["f_tol"]),
                            b_tol=float(dq["b_tol"]), f_stop_mode="rel", b_stop_mode="rel", ift=True, hook_ift=True)
    model.train()
    return model, den


def check_variants(cfg: Dict[str, Any], variants: List[str], size: int = 32) -> Dict[str, float]:
    """Relative difference ``||g_v - g|| / ||g||`` of each variant's weight gradient to the baseline's.

    Checked where both are well defined: on a contractive DE-Prox map (a DnCNN
    without residual connection or normalisation, every convolution scaled to
    operator norm <= 0.8, so ``R`` and hence ``f`` contract) with forward and
    backward solves converged to 1e-6, on a ``size`` x ``size`` problem. (On
    the benchmark's randomly initialised model the solves do not converge and
    the gradients are not comparable.)
    """
    from jobs.bench.memory import make_problem
    from suite.models.dncnn import DnCNN

    im, dn = cfg["image"], cfg["denoiser"]
    torch.manual_seed(cfg["seed"])
    y, target, physics = make_problem(size, 1, im["acceleration"], im["center_fraction"], cfg["seed"])
    den = DnCNN(2, 2, depth=dn["depth"], width=dn["width"], residual=False, norm=None, sn_coeff=0.8)
    den.prepare_spectral_norm((size, size), update=False)  # one start vector shared by every copy
    tight = dict(cfg, deq=dict(cfg["deq"], f_max_iter=60, b_max_iter=60, f_tol=1e-6, b_tol=1e-6))
    grads = {}
    for name in ["baseline"] + list(variants):
        model, _ = build_model(den, tight, name)
        x_hat, _ = model(y, physics)
        torch.mean((x_hat - target) ** 2).backward()
        grads[name] = torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None])
    ref = grads["baseline"]
    return {name: float((grads[name] - ref).norm() / ref.norm()) for name in variants}


def train_step(model: nn.Module, opt: torch.optim.Optimizer, y: torch.Tensor, physics: nn.Module,
               target: torch.Tensor, clock: PhaseClock) -> Dict[str, float]:
    """One step; returns solver statistics. Regions go to ``clock``."""
    clock.phase = "forward"
    with clock.region("step"):
        with clock.region("forward"):
            x_hat, info = model(y, physics)
            loss = torch.mean((x_hat - target) ** 2)
        clock.phase = "backward"
        with clock.region("backward"):
            opt.zero_grad(set_to_none=True)
            loss.backward()
        clock.phase = "optimiser"
        with clock.region("optimiser"):
            opt.step()
    bwd = getattr(model, "last_backward_info", {}) or {}
    return {"fwd_nstep": float(info["nstep"].mean()),
            "bwd_nstep": float(bwd["nstep"].mean()) if "nstep" in bwd else float("nan")}


def phase_table(clocks: List[Dict[str, float]], calls: Dict[str, int]) -> List[List[str]]:
    """Rows ``[part, CPU ms, share of step, calls]`` from per-step clock readings (medians)."""

    def med(key: str) -> float:
        return statistics.median(c.get(key, 0.0) for c in clocks)

    step = med("step")
    parts = [
        ("forward", "forward (model call + loss)"),
        ("solve forward", "  forward solve (torchdeq, no graph)"),
        ("denoiser forward (no-graph)", "    denoiser calls inside it"),
        ("denoiser forward (graph)", "  f(z*) with graph (1 call)"),
        ("backward", "backward"),
        ("solve backward", "  backward solve (VJPs through f)"),
        ("denoiser backward (graph)", "  IFT re-evaluation of f (denoiser forward)"),
        ("optimiser", "optimiser step"),
    ]
    rows = [["step", f"{1e3 * step:.0f}", "100%", ""]]
    for key, label in parts:
        value = med(key)
        rows.append([label, f"{1e3 * value:.0f}", f"{100 * value / step:.0f}%", str(calls.get(key, ""))])
    rest_fwd = med("forward") - med("solve forward") - med("denoiser forward (graph)")
    rest_bwd = med("backward") - med("solve backward") - med("denoiser backward (graph)")
    rows.insert(5, ["  rest of forward (spectral norm, A^H y, loss)", f"{1e3 * rest_fwd:.0f}",
                    f"{100 * rest_fwd / step:.0f}%", ""])
    rows.insert(9, ["  rest (weight gradients through f(z*))", f"{1e3 * rest_bwd:.0f}",
                    f"{100 * rest_bwd / step:.0f}%", ""])
    den = sum(med(k) for k in clocks[0] if k.startswith("denoiser"))
    rows.append(["all denoiser forward calls", f"{1e3 * den:.0f}", f"{100 * den / step:.0f}%",
                 str(sum(v for k, v in calls.items() if k.startswith("denoiser")))])
    return rows


def main(cfg: Dict[str, Any]) -> int:
    """Run the benchmark described by ``configs/bench/profile.yaml``.

    Args:
        cfg: Parsed YAML: ``repeats``, ``threads``, ``seed``, ``image`` (``size``,
            ``batch``, ``acceleration``, ``center_fraction``), ``denoiser``
            (``depth``, ``width``, ``norm``), ``eta``, ``deq`` (``solver``,
            ``f_max_iter``, ``b_max_iter``, ``f_tol``, ``b_tol``),
            ``warmup_steps``, ``top_ops``, ``variants`` (from ``hook_ift``,
            ``channels_last``, ``phantom``), ``phantom_steps``. Missing keys take
            :data:`DEFAULTS`.

    Returns:
        0 when every exact variant (``hook_ift``, ``channels_last``) gives the baseline's weight gradients on a
        contractive map (relative difference <= 1e-3, :func:`check_variants`),
        1 otherwise.
    """
    from torch.profiler import ProfilerActivity, profile

    from jobs.bench.memory import make_problem
    from suite.models.deprox import build_dncnn_denoiser

    cfg = _merge(cfg or {}, DEFAULTS)
    _validate(cfg)
    if cfg["threads"] is not None:
        torch.set_num_threads(int(cfg["threads"]))
    torch.manual_seed(cfg["seed"])
    im, dn, dq = cfg["image"], cfg["denoiser"], cfg["deq"]
    y, target, physics = make_problem(im["size"], im["batch"], im["acceleration"], im["center_fraction"], cfg["seed"])
    base = build_dncnn_denoiser(dn["depth"], dn["width"], dn["norm"])
    base.prepare_spectral_norm((im["size"], im["size"]), update=False)  # one start vector shared by every copy
    load = os.getloadavg()
    print(f"DE-Prox training step: single-coil {im['size']}x{im['size']}, batch {im['batch']}, DnCNN "
          f"{dn['depth']}x{dn['width']} norm={dn['norm']}, {dq['solver']} f/b_max_iter {dq['f_max_iter']}/"
          f"{dq['b_max_iter']}, f_tol {dq['f_tol']:g}, b_tol {dq['b_tol']:g}; torch threads "
          f"{torch.get_num_threads()}; median of {cfg['repeats']} steps (thread CPU time); load average "
          f"{load[0]:.1f} {load[1]:.1f} {load[2]:.1f}", flush=True)

    names = ["baseline"] + list(cfg["variants"])
    clock = PhaseClock()
    with timed_solvers(clock):
        built = {name: build_model(base, cfg, name) for name in names}
    models = {name: m for name, (m, _) in built.items()}
    for name, (_, den) in built.items():
        clock.attach(den if name != "channels_last" else den.module)
    opts = {name: torch.optim.Adam(m.parameters(), lr=1e-4) for name, m in models.items()}

    ok = True
    for name, rel in check_variants(cfg, names[1:]).items():
        if name not in EXACT_VARIANTS:
            print(f"  {name}: gradient relative difference to the IFT gradient on a contractive map {rel:.1e} "
                  "(an approximation by design)")
            continue
        agree = rel <= 1e-3
        ok &= agree
        print(f"  {name}: gradient relative difference to baseline on a contractive map {rel:.1e} "
              f"({'agree' if agree else 'DIFFER'})")

    for _ in range(cfg["warmup_steps"]):
        for name, model in models.items():
            train_step(model, opts[name], y, physics, target, clock)
    readings: Dict[str, List[Dict[str, float]]] = {name: [] for name in names}
    calls: Dict[str, Dict[str, int]] = {}
    stats: Dict[str, List[Dict[str, float]]] = {name: [] for name in names}
    for _ in range(cfg["repeats"]):
        for name, model in models.items():  # interleaved: load drifts hit every variant alike
            clock.reset()
            stats[name].append(train_step(model, opts[name], y, physics, target, clock))
            readings[name].append(dict(clock.cpu))
            calls[name] = dict(clock.calls)

    base_stats = stats["baseline"]
    print(f"\nphase split of the baseline step (forward nstep {statistics.median(s['fwd_nstep'] for s in base_stats):.0f}"
          f", backward nstep {statistics.median(s['bwd_nstep'] for s in base_stats):.0f}):")
    print_table(["part", "CPU ms", "share", "calls"], phase_table(readings["baseline"], calls["baseline"]))

    clock.reset()
    with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
        train_step(models["baseline"], opts["baseline"], y, physics, target, clock)
    print(f"\ntop {cfg['top_ops']} operators by self CPU time (torch.profiler, one baseline step):")
    table = prof.key_averages(group_by_input_shape=True).table(
        sort_by="self_cpu_time_total", row_limit=cfg["top_ops"], max_name_column_width=32,
        max_shapes_column_width=60)
    print(table)

    if len(names) > 1:
        print("variants, side by side (same initial weights, steps interleaved):")
        base_ms = statistics.median(r["step"] for r in readings["baseline"])
        rows = []
        for name in names:
            ms = statistics.median(r["step"] for r in readings[name])
            st = stats[name]
            rows.append([name, f"{1e3 * ms:.0f}", f"{base_ms / ms:.2f}x",
                         f"{statistics.median(s['fwd_nstep'] for s in st):.0f}",
                         f"{statistics.median(s['bwd_nstep'] for s in st):.0f}"])
        print_table(["variant", "CPU ms/step", "speed-up", "fwd nstep", "bwd nstep"], rows)
        for name in names[1:]:
            ms = statistics.median(r["step"] for r in readings[name])
            print(f"{name} speed-up over baseline: {base_ms / ms:.2f}x")
    return 0 if ok else 1
