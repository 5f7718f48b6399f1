"""Conservative Residual Refinement (CRR).

Stage 1 fits a :class:`~suite.models.deq_inr.DEQINR`; it is then frozen. Stage 2
fits a shallow :class:`Refiner` on (coordinates, frozen DEQ output) that predicts
the residual ``y_gt − y_deq``; the output is ``y_deq + refiner(x, y_deq)``. The
refiner's last layer starts at N(0, σ) (σ≈1e-5), so stage 2 starts exactly where
stage 1 ended. All tensors are real.
"""

from __future__ import annotations

import torch
from torch import nn

from suite.config import CRRConfig
from suite.models.deq_inr import DEQINR


class Refiner(nn.Module):
    """CRR's shallow residual refiner on (coordinate features, frozen DEQ output).

    Its last layer starts at N(0, ``init_std``) with zero bias, so at step 0 the
    refined output equals the DEQ output up to O(init_std).

    Args:
        hidden: width; n_layers: hidden layers; init_std: σ of the last layer.
        n_features: random Fourier features of the coordinates (0 disables).
        feature_scale: their frequency scale.
        in_dim: coordinate dimension; out_dim: channels of the DEQ output.
    """

    def __init__(
        self,
        hidden: int,
        n_layers: int,
        init_std: float,
        n_features: int,
        feature_scale: float,
        in_dim: int = 2,
        out_dim: int = 1,
    ) -> None:
        super().__init__()
        self.register_buffer("B", torch.randn(in_dim, n_features) * feature_scale)
        width = 2 * n_features + in_dim + out_dim
        layers: list[nn.Module] = []
        for _ in range(n_layers):
            layers += [nn.Linear(width, hidden), nn.GELU()]
            width = hidden
        self.body = nn.Sequential(*layers)
        self.last = nn.Linear(width, out_dim)
        nn.init.normal_(self.last.weight, 0.0, init_std)
        nn.init.zeros_(self.last.bias)

    def forward(self, x: torch.Tensor, y_deq: torch.Tensor) -> torch.Tensor:
        """``x`` ``(N, in_dim)``, ``y_deq`` ``(N, out_dim)`` → residual ``(N, out_dim)``."""
        proj = x @ self.B
        h = torch.cat([torch.sin(proj), torch.cos(proj), x, y_deq], dim=-1)
        return self.last(self.body(h))


class CRR(nn.Module):
    """A DEQ-INR plus its residual refiner.

    Args:
        deq: the stage-1 model (frozen by :meth:`freeze_deq`).
        crr: refiner settings.
        in_dim, out_dim: coordinate and output dimensions.
    """

    def __init__(self, deq: DEQINR, crr: CRRConfig, in_dim: int = 2, out_dim: int = 1) -> None:
        super().__init__()
        self.deq = deq
        self.refiner = Refiner(crr.hidden, crr.n_layers, crr.init_std, crr.n_features, crr.feature_scale, in_dim, out_dim)

    def freeze_deq(self) -> None:
        """Stops gradients into the DEQ and puts it in eval mode for good."""
        self.deq.requires_grad_(False)
        self.deq.eval()

    def train(self, mode: bool = True) -> "CRR":
        """Like ``nn.Module.train`` but a frozen DEQ stays in eval mode."""
        super().train(mode)
        if not any(p.requires_grad for p in self.deq.parameters()):
            self.deq.eval()
        return self

    def forward(self, x: torch.Tensor, y_deq: torch.Tensor | None = None) -> torch.Tensor:
        """Refined prediction.

        Args:
            x: ``(N, in_dim)`` coordinates.
            y_deq: ``(N, out_dim)`` cached frozen-DEQ output; computed when None.

        Returns:
            ``(N, out_dim)`` = ``y_deq + refiner(x, y_deq)``.
        """
        if y_deq is None:
            with torch.no_grad():
                y_deq = self.deq(x)[0]
        return y_deq + self.refiner(x, y_deq)
