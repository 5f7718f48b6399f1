"""Which runs a spectral report shows and how it names them, and its sweep-wide tables.

Runs are grouped by what they reconstruct (:func:`image_labels`: the family's
:attr:`~suite.families.Family.group_keys`, else the image) and one run stands
for each group (:func:`representative_runs`). The sweep-wide tables (noise
robustness, solver iterations, memory against K) feed :mod:`analysis.figures`.
Used by :mod:`analysis.report`.
"""

from __future__ import annotations

import re
from typing import TYPE_CHECKING, Any, Mapping, Sequence

import numpy as np

from analysis.run_images import metric_history
from suite.families import find_family

if TYPE_CHECKING:  # pragma: no cover
    import pandas as pd
    from matplotlib.figure import Figure

GROUP_KEYS = ("data.image", "data.volume", "data.file", "data.path")
"""Params that name the image a DEQ-INR/CRR run fits; the first present wins."""
SECONDARY_GROUP_KEYS = ("deq.solver", "deq.grad", "model.filter")
"""DEQ-INR/CRR params that also tell runs of one image apart, where they vary."""
MODEL_KEYS = ("deprox.kind", "model.kind", "model.name", "family", "tag.family")
"""Params (and tag) that name a run's model, first non-empty wins."""
SOLVER_KEYS = ("deq.solver", "model.solver")
UNROLL_K_KEYS = ("model.unroll_k", "model.n_iter", "model.k", "unroll.k", "deprox.n_iter", "deprox.unroll_k")
"""Params holding an unrolled network's number of iterations K, first present wins."""
EXPERIMENT_FIGURES = ("noise_robustness", "solver_iterations", "memory_vs_k")
_NOISE_RE = re.compile(r"^noise/(?P<sigma>[^/]+)/(?P<metric>psnr|ssim)$")


def _present(value: Any) -> bool:
    """False for None, NaN, NaT and pd.NA (what a missing param or metric reads as)."""
    import pandas as pd

    if value is None:
        return False
    na = pd.isna(value)
    return not (np.ndim(na) == 0 and bool(na))


def _first(row: Mapping[str, Any], keys: Sequence[str]) -> Any:
    return next((row[k] for k in keys if k in row and _present(row[k]) and str(row[k]) != ""), None)


def family_of(row: Mapping[str, Any]) -> str | None:
    """A run's family (param ``family``, else tag ``family``)."""
    value = _first(row, ("family", "tag.family"))
    return None if value is None else str(value)


def group_keys(family: str | None, columns: Sequence[str]) -> tuple[str, ...]:
    """The params that say what a run of ``family`` reconstructs, the naming one first.

    Args:
        family: the run's family.
        columns: the columns of the runs table.

    Returns:
        the family's :attr:`~suite.families.Family.group_keys`, or else the first of
        :data:`GROUP_KEYS` then :data:`SECONDARY_GROUP_KEYS`; only those present
        in ``columns``; empty when the naming one is absent.
    """
    fam = find_family(family)
    if fam is not None and fam.group_keys:
        keys = fam.group_keys
    else:
        first = next((k for k in GROUP_KEYS if k in columns), None)
        keys = (first, *SECONDARY_GROUP_KEYS) if first else ()
    if not keys or keys[0] not in columns:
        return ()
    return tuple(k for k in keys if k in columns)


def image_labels(runs: "pd.DataFrame") -> list[str]:
    """What each run reconstructs, as a label; runs with one label form one group.

    The value of the family's naming param — the image (``data.image``) for
    DEQ-INR and CRR, the model kind (``deprox.kind``) for DE-Prox — followed by
    ``name=value`` for each other group param (:func:`group_keys`) that varies
    among the experiment's runs of that family and naming value: ``camera``,
    ``camera, solver=anderson``, ``deq, acceleration=4``, ``unrolled, unroll_k=5``.
    A run without the naming param is ``run-<id prefix>``. When the experiment
    mixes families the family is appended, e.g. ``camera (deq_inr)``.

    Args:
        runs: wide table of :func:`analysis.runs.load_runs`.

    Returns:
        One label per row.
    """
    records = runs.to_dict("records")
    families = [family_of(r) for r in records]
    columns = list(runs.columns)
    labels = []
    for rec, fam in zip(records, families):
        keys = group_keys(fam, columns)
        if not keys or not _present(rec.get(keys[0])):
            labels.append(f"run-{str(rec['run_id'])[:8]}")
            continue
        name = str(rec[keys[0]])
        same = [r for r, f in zip(records, families) if f == fam and str(r.get(keys[0])) == name]
        varying = [k for k in keys[1:] if len({str(r.get(k)) for r in same}) > 1]
        labels.append(name + "".join(f", {k.rsplit('.', 1)[-1]}={rec.get(k)}" for k in varying))
    if len(set(families)) > 1:
        labels = [f"{lab} ({fam})" for lab, fam in zip(labels, families)]
    return labels


def model_label(row: Mapping[str, Any]) -> str:
    """A run's model: the first of :data:`MODEL_KEYS` it has, else ``"unknown"``."""
    value = _first(row, MODEL_KEYS)
    return "unknown" if value is None else str(value)


def _seed_order(seed: Any) -> tuple[int, float]:
    """Sort key of a seed: numeric seeds first, smallest first; missing ones last."""
    try:
        return (0, float(seed)) if _present(seed) else (1, 0.0)
    except (TypeError, ValueError):
        return (1, 0.0)


def representative_runs(runs: "pd.DataFrame") -> "pd.DataFrame":
    """One run per image (label of :func:`image_labels`): the seed-0 run.

    Where a group has no seed 0, its smallest seed stands in; where a seed was
    run more than once (a re-run), the newest run counts, as in
    :mod:`analysis.table`.

    Args:
        runs: wide table of :func:`analysis.runs.load_runs` (FINISHED runs).

    Returns:
        The chosen rows, ordered by label, with an added ``image`` column.
    """
    df = runs.assign(image=image_labels(runs))
    chosen = []
    for _, part in df.groupby("image", sort=True):
        seeds = part["seed"] if "seed" in part.columns else [None] * len(part)
        starts = part["start_time"] if "start_time" in part.columns else [None] * len(part)
        order = sorted(
            zip(part.index, seeds, starts),
            key=lambda t: (_seed_order(t[1]), -(t[2].value if _present(t[2]) else 0)),
        )
        chosen.append(order[0][0])
    return df.loc[chosen].reset_index(drop=True)


# --------------------------------------------------------------------- sweep-wide tables


def _is_unrolled(label: str) -> bool:
    return "unroll" in label.lower()


def _is_baseline(label: str) -> bool:
    low = label.lower()
    return "zero" in low or low in ("zf", "adjoint")


def noise_table(runs: "pd.DataFrame") -> "pd.DataFrame":
    """Noise-robustness values in long form.

    Args:
        runs: wide table (FINISHED runs); metrics ``noise/<sigma>/psnr`` and ``noise/<sigma>/ssim``.

    Returns:
        Columns ``model``, ``run_id``, ``sigma`` (float), ``metric``, ``value``;
        one row per run and logged metric (empty when none). ``model`` is the
        run's :func:`image_labels` label (its configuration less the seed, e.g.
        ``deq, acceleration=4`` or ``unrolled, unroll_k=5``), so seeds average and
        configurations do not.
    """
    import pandas as pd

    cols = [(c, _NOISE_RE.match(c)) for c in runs.columns]
    rows = []
    for rec, label in zip(runs.to_dict("records"), image_labels(runs)):
        for col, m in cols:
            if m is None or not _present(rec[col]):
                continue
            try:
                sigma = float(m["sigma"])
            except ValueError:
                continue
            rows.append({"model": label, "run_id": rec["run_id"], "sigma": sigma,
                         "metric": m["metric"], "value": float(rec[col])})
    return pd.DataFrame(rows, columns=["model", "run_id", "sigma", "metric", "value"])


def solver_table(runs: "pd.DataFrame", client: Any) -> "pd.DataFrame":
    """Per-epoch solver iterations of every DEQ run, in long form.

    Unrolled and zero-filled runs are left out (their "iterations" are fixed).

    Args:
        runs: wide table (FINISHED runs).
        client: an ``MlflowClient`` (histories of ``solver/fwd_nstep`` and ``solver/bwd_nstep``).

    Returns:
        Columns ``solver``, ``direction`` (``forward``/``backward``), ``run_id``,
        ``step``, ``nstep``; one row per logged epoch.
    """
    import pandas as pd

    rows = []
    for rec in runs.to_dict("records"):
        label = model_label(rec)
        if _is_unrolled(label) or _is_baseline(label):
            continue
        solver = _first(rec, SOLVER_KEYS)
        for key, direction in (("solver/fwd_nstep", "forward"), ("solver/bwd_nstep", "backward")):
            if key not in rec or not _present(rec[key]):
                continue
            for step, value in metric_history(client, rec["run_id"], key):
                rows.append({"solver": "unknown" if solver is None else str(solver), "direction": direction,
                             "run_id": rec["run_id"], "step": step, "nstep": value})
    return pd.DataFrame(rows, columns=["solver", "direction", "run_id", "step", "nstep"])


def memory_tables(runs: "pd.DataFrame") -> tuple["pd.DataFrame", "pd.DataFrame"]:
    """Peak memory of unrolled runs by K, and of the DEQ runs of the same families.

    Args:
        runs: wide table (FINISHED runs) with ``mem/peak_mb``.

    Returns:
        ``(unrolled, deq)``: ``unrolled`` has ``model``, ``k``, ``mem_mb``,
        ``run_id`` (runs whose model names "unroll" and that have a K param,
        :data:`UNROLL_K_KEYS`); ``deq`` has ``model``, ``mem_mb``, ``run_id``
        (other non-baseline runs of a family that has unrolled runs).
    """
    import pandas as pd

    unrolled, deq = [], []
    if "mem/peak_mb" in runs.columns:
        records = [r for r in runs.to_dict("records") if _present(r["mem/peak_mb"])]
        for rec in records:
            label = model_label(rec)
            k = _first(rec, UNROLL_K_KEYS)
            if _is_unrolled(label) and k is not None:
                unrolled.append({"model": label, "k": int(k), "mem_mb": float(rec["mem/peak_mb"]),
                                 "run_id": rec["run_id"], "family": _first(rec, ("family", "tag.family"))})
        families = {u["family"] for u in unrolled}
        for rec in records:
            label = model_label(rec)
            family = _first(rec, ("family", "tag.family"))
            if not _is_unrolled(label) and not _is_baseline(label) and family in families:
                deq.append({"model": label, "mem_mb": float(rec["mem/peak_mb"]), "run_id": rec["run_id"]})
    return (pd.DataFrame(unrolled, columns=["model", "k", "mem_mb", "run_id"]),
            pd.DataFrame(deq, columns=["model", "mem_mb", "run_id"]))


def experiment_figures(runs: "pd.DataFrame", client: Any) -> tuple[dict[str, "Figure"], list[str]]:
    """The sweep-wide figures whose data exist, and what was skipped (with why).

    Returns:
        ``({name: figure}, skipped)``, names from :data:`EXPERIMENT_FIGURES`.
    """
    from analysis import figures as F

    figs: dict[str, Figure] = {}
    skipped: list[str] = []
    noise = noise_table(runs)
    if len(noise):
        figs["noise_robustness"] = F.noise_figure(noise)
    else:
        skipped.append("noise_robustness: no run logged noise/<sigma>/psnr or noise/<sigma>/ssim")
    solver = solver_table(runs, client)
    if len(solver):
        figs["solver_iterations"] = F.solver_figure(solver)
    else:
        skipped.append("solver_iterations: no DEQ run logged solver/fwd_nstep")
    unrolled, deq = memory_tables(runs)
    if len(unrolled):
        figs["memory_vs_k"] = F.memory_figure(unrolled, deq)
    else:
        skipped.append(f"memory_vs_k: no unrolled run with mem/peak_mb and a K param ({', '.join(UNROLL_K_KEYS)})")
    return figs, skipped
