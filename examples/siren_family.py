"""A user's own family: DEQ-INR with SIREN-like sine filters, benchmarked next to the built-ins.

Everything but the model comes from the built-in ``deq_inr`` family (data,
training loop, evaluation, report labels); the model swaps the Fourier filter
bank for sine filters ``u_i = sin(omega_0 * (W_i x + b_i))`` with SIREN's
initialisation (Sitzmann et al. 2020: ``W ~ U(-1/d, 1/d)`` for ``d`` input
dimensions), and the family has its own config section ``siren``, validated as
strictly as the built-in ones.

Use it from YAML (the path is taken from the directory you run ``deqbench`` in)::

    family: examples/siren_family.py:SIREN
    siren: {omega_0: 30.0}

or install it under the entry-point group ``deqbench.families``
(``siren = "examples.siren_family:SIREN"``) and write ``family: siren``.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

import torch
from torch import nn

from suite.families import get_family
from suite.models.deq_inr import DEQINR


@dataclass(frozen=True)
class SirenConfig:
    """Section ``siren``: the frequency factor of the sine filters (``metadata`` gives its allowed range)."""

    omega_0: float = field(default=30.0, metadata={"min": 0.0, "max": 1e4})


class SineFilters(nn.Module):
    """``n_filters`` sine filters ``(N, in_dim) -> n_filters x (N, hidden)``: ``sin(omega_0 (W x + b))``."""

    def __init__(self, in_dim: int, hidden: int, n_filters: int, omega_0: float) -> None:
        super().__init__()
        self.n_filters, self.omega_0 = n_filters, omega_0
        self.linear = nn.Linear(in_dim, hidden * n_filters)
        with torch.no_grad():
            self.linear.weight.uniform_(-1.0 / in_dim, 1.0 / in_dim)
            self.linear.bias.uniform_(-1.0 / in_dim, 1.0 / in_dim)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return torch.sin(self.omega_0 * self.linear(x)).chunk(self.n_filters, dim=-1)


def build_siren(cfg) -> nn.Module:
    """The suite's DEQ-INR (solver, recipe, head from ``model``/``deq``) with sine filters."""
    model = DEQINR(cfg.model, cfg.deq)
    model.filters = SineFilters(2, cfg.model.hidden, cfg.model.n_layers + 1, cfg.siren.omega_0)
    return model


SIREN = replace(
    get_family("deq_inr"),
    name="siren",
    sections={"siren": SirenConfig},
    build_model=build_siren,
    final_label="DEQ (SIREN filters)",
)
