"""DnCNN denoiser with conv-operator spectral normalisation.

Complex convention: complex images are real tensors ``(B, 2, H, W)`` with the
real part in channel 0 and the imaginary part in channel 1 (complex as
channels); the network itself is real and channel-agnostic.

Architecture (Zhang et al. 2017): ``depth`` 3x3 convolutions -- conv+ReLU,
``depth - 2`` x (conv [+ norm] + ReLU), conv -- of ``width`` channels; with
``residual=True`` (residual learning) the output is ``x - N(x)``, where ``N``
is the conv stack, which predicts the noise/artefact.

Spectral normalisation (``spectral_norm=True``, Ryu et al. 2019 "Plug-and-play
methods provably converge", Gouk et al. 2021): every convolution ``K`` is
rescaled to ``K / max(1, sigma / coeff)``, where ``sigma`` is the norm of the
convolution *operator* -- estimated by power iteration on ``K^T K`` applied to
a feature-map-shaped vector ``(1, C_in, H, W)`` with ``conv2d`` and
``conv_transpose2d`` (same padding), not the norm of the reshaped
``(C_out, C_in k k)`` weight matrix, which is a different number (the tests
compare both with a dense SVD of the convolution). The power-iteration vector is a buffer that persists across
steps (one iteration per training forward, warm-started). Its spatial size is
``sn_probe_size`` (default 32 x 32): the norm of a zero-padded convolution
grows with the grid towards the supremum of its symbol, which bounds it at
every size, and a 32 x 32 grid is already within ~0.3 % of that supremum (for
random 8- and 64-channel 3 x 3 kernels, checked against the circulant symbol
on a 256 x 256 grid), at a cost independent of the image size -- at 320 x 320
one iteration costs about two full 17 x 64 forward passes. With
``sn_probe_size=None`` the vector follows the input size instead (exact for
that size; on a change it restarts and is iterated ``n_resize_iter`` times). Because the estimate lags
the weights by one optimiser step and power iteration approaches the norm from
below -- slowly when training flattens the top of the spectrum -- the bound
holds up to the estimate's accuracy: after scaling the weights x10 and 20 Adam
steps at lr 1e-3 that push the gain up, every convolution measured <= 1.01;
at lr 1e-2 up to ~1.2 (``sn_power_iters=3`` does not cure it; ``sn_coeff < 1``
leaves a margin).

What the Lipschitz bound covers: convolutions are ``<= coeff``-Lipschitz and
ReLU is 1-Lipschitz, so without normalisation layers the conv stack ``N`` is
``coeff ** depth``-Lipschitz (<= 1 for ``coeff = 1``) and the residual network
``x - N(x)`` is at most ``1 + coeff ** depth``. GroupNorm / BatchNorm are NOT
1-Lipschitz in general (GroupNorm divides by a per-sample standard deviation,
which amplifies near-constant inputs without bound), so with ``norm`` set the
bound covers the convolutions only, not the network.
"""

from __future__ import annotations

from typing import Iterator, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils import parametrize

__all__ = ["DnCNN", "ConvOperatorSpectralNorm", "conv_operator_norm", "NORMS"]

NORMS = (None, "group", "batch")


def conv_operator_norm(
    weight: torch.Tensor,
    size: Sequence[int],
    padding: int,
    n_iter: int = 100,
    generator: Optional[torch.Generator] = None,
) -> float:
    """Operator norm of a stride-1 ``conv2d`` on ``size`` feature maps, by power iteration.

    Args:
        weight: ``(C_out, C_in, k, k)``.
        size: Spatial size ``(H, W)`` of the input feature maps.
        padding: Zero padding of the convolution.
        n_iter: Power iterations on ``K^T K``.
        generator: Optional RNG for the start vector.

    Returns:
        ``||K||_2`` estimate (a lower bound that converges from below).
    """
    w = weight.detach()
    v = torch.randn(1, w.shape[1], *size, dtype=w.dtype, device=w.device, generator=generator)
    v = v / v.norm()
    for _ in range(n_iter):
        v = F.conv_transpose2d(F.conv2d(v, w, padding=padding), w, padding=padding)
        v = v / (v.norm() + 1e-30)
    return float(F.conv2d(v, w, padding=padding).norm())


class ConvOperatorSpectralNorm(nn.Module):
    """Parametrisation ``W -> W / max(1, sigma(W) / coeff)`` with ``sigma`` the conv operator norm.

    Register with ``torch.nn.utils.parametrize.register_parametrization(conv,
    "weight", ConvOperatorSpectralNorm(conv))``. ``forward`` only *uses* the
    stored power-iteration vector ``u``; :meth:`power_iteration` initialises and
    updates it (callers decide when, so a DEQ solve sees one fixed function).
    Call it at least once before use (:class:`DnCNN` does).

    Args:
        conv: The stride-1 ``nn.Conv2d`` with odd kernel and "same" zero padding.
        coeff: Target Lipschitz constant of the convolution.
        n_init_iter: Power iterations from the random start vector.
        n_resize_iter: Power iterations after the input size changed (from a new
            random vector).
        size: Initial spatial size of ``u``.
    """

    def __init__(
        self,
        conv: nn.Conv2d,
        coeff: float = 1.0,
        n_init_iter: int = 50,
        n_resize_iter: int = 50,
        size: Sequence[int] = (8, 8),
    ) -> None:
        super().__init__()
        k = conv.kernel_size
        if conv.stride != (1, 1) or conv.dilation != (1, 1) or conv.groups != 1:
            raise ValueError("ConvOperatorSpectralNorm supports stride 1, dilation 1, groups 1 only")
        if k[0] != k[1] or k[0] % 2 == 0 or conv.padding != (k[0] // 2, k[0] // 2):
            raise ValueError(f"need an odd square kernel with 'same' padding, got kernel {k} padding {conv.padding}")
        if conv.padding_mode != "zeros":
            raise ValueError(f"need zero padding, got padding_mode {conv.padding_mode!r}")
        if not coeff > 0:
            raise ValueError(f"coeff must be > 0, got {coeff!r}")
        self.padding = k[0] // 2
        self.coeff = float(coeff)
        self.n_init_iter = int(n_init_iter)
        self.n_resize_iter = int(n_resize_iter)
        u = torch.randn(1, conv.in_channels, *size)
        self.register_buffer("u", u / u.norm())
        self.register_buffer("initialised", torch.tensor(False))

    @torch.no_grad()
    def power_iteration(self, weight: torch.Tensor, size: Optional[Sequence[int]] = None, n_iter: int = 1) -> None:
        """Advances ``u`` towards the top right-singular vector of the conv operator.

        Args:
            weight: The unnormalised weight ``(C_out, C_in, k, k)``.
            size: Spatial size of the probe; on a change ``u`` restarts from a random
                vector of that size and is iterated at least ``n_resize_iter`` times.
            n_iter: Iterations (at least ``n_init_iter`` the first time).
        """
        u = self.u.to(weight.dtype)
        resized = size is not None and tuple(u.shape[-2:]) != tuple(size)
        if resized:
            # a fresh start: interpolating the old vector would rescale the spatial
            # frequency at which the convolution's gain peaks (a poor warm start)
            u = torch.randn(1, u.shape[1], *size, dtype=u.dtype, device=u.device)
        if not bool(self.initialised):
            n_iter = max(n_iter, self.n_init_iter)
        elif resized:
            n_iter = max(n_iter, self.n_resize_iter)
        w = weight.detach()
        for _ in range(n_iter):
            u = F.conv_transpose2d(F.conv2d(u, w, padding=self.padding), w, padding=self.padding)
            u = u / (u.norm() + 1e-30)
        self.u = u
        self.initialised.fill_(True)

    def sigma(self, weight: torch.Tensor) -> torch.Tensor:
        """Differentiable operator-norm estimate ``||K u||`` for the stored unit ``u``."""
        return F.conv2d(self.u.to(weight.dtype), weight, padding=self.padding).norm()

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        # no lazy initialisation here: registration calls this once, and the owner
        # (DnCNN.prepare_spectral_norm) initialises u at its probe size.
        return weight / torch.clamp(self.sigma(weight) / self.coeff, min=1.0)

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):  # noqa: ANN001
        key = prefix + "u"
        if key in state_dict and state_dict[key].shape != self.u.shape:
            self.u = torch.empty_like(state_dict[key])  # u follows the input size
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)


class DnCNN(nn.Module):
    """DnCNN, optionally spectrally normalised, for complex-as-channels images.

    Args:
        in_channels: Input channels (2 for a complex image).
        out_channels: Output channels; must equal ``in_channels`` when ``residual``.
        depth: Number of convolutions (>= 2). Default 17.
        width: Hidden channels. Default 64.
        kernel_size: Odd kernel size. Default 3.
        residual: Output ``x - N(x)`` (residual learning) instead of ``N(x)``.
        spectral_norm: Normalise every convolution's operator norm to ``<= sn_coeff``.
        sn_coeff: Per-convolution Lipschitz target.
        sn_init_iter: Power iterations for a new probe vector and after the input
            size changed (the estimate is a lower bound that converges like 1/k on
            the clustered spectrum of a convolution; 50 gives <~0.5 %).
        sn_power_iters: Power iterations per training step.
        sn_probe_size: Spatial size ``(h, w)`` of the power-iteration vector, or
            ``None`` to follow the input size (see the module docstring).
        norm: ``None``, ``"group"`` or ``"batch"`` after each hidden convolution.
        num_groups: Groups of GroupNorm (must divide ``width``).
        bias: Convolution biases (hidden convolutions have none when ``norm`` is set).

    Shapes:
        ``forward``: ``(B, in_channels, H, W) -> (B, out_channels, H, W)``.

    Attributes:
        sn_update_on_forward: If True (default), each training-mode ``forward`` first
            advances every power iteration by ``sn_power_iters`` steps at the input's
            size. Models that call the network many times per step (DEQ, unrolled)
            switch this off and call :meth:`prepare_spectral_norm` once per step.
    """

    def __init__(
        self,
        in_channels: int = 2,
        out_channels: int = 2,
        depth: int = 17,
        width: int = 64,
        kernel_size: int = 3,
        residual: bool = True,
        spectral_norm: bool = True,
        sn_coeff: float = 1.0,
        sn_init_iter: int = 50,
        sn_power_iters: int = 1,
        sn_probe_size: Optional[Sequence[int]] = (32, 32),
        norm: Optional[str] = None,
        num_groups: int = 8,
        bias: bool = True,
    ) -> None:
        super().__init__()
        for name, value, low in (("in_channels", in_channels, 1), ("out_channels", out_channels, 1),
                                 ("depth", depth, 2), ("width", width, 1), ("kernel_size", kernel_size, 1)):
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise ValueError(f"{name} must be an integer >= {low}, got {value!r}")
        if kernel_size % 2 == 0:
            raise ValueError(f"kernel_size must be odd, got {kernel_size}")
        if norm not in NORMS:
            raise ValueError(f"unknown norm {norm!r}; valid: {', '.join(map(str, NORMS))}")
        if norm == "group" and width % num_groups:
            raise ValueError(f"num_groups {num_groups} must divide width {width}")
        if residual and in_channels != out_channels:
            raise ValueError(f"residual=True needs in_channels == out_channels, got {in_channels} and {out_channels}")
        self.residual = residual
        self.spectral_norm = spectral_norm
        self.norm = norm
        self.sn_update_on_forward = True
        self.sn_power_iters = int(sn_power_iters)
        if sn_probe_size is not None and (len(sn_probe_size) != 2 or min(sn_probe_size) < kernel_size):
            raise ValueError(f"sn_probe_size must be None or (h, w) >= kernel_size, got {sn_probe_size!r}")
        self.sn_probe_size = None if sn_probe_size is None else (int(sn_probe_size[0]), int(sn_probe_size[1]))

        pad = kernel_size // 2
        layers: list[nn.Module] = []
        chans = [in_channels] + [width] * (depth - 1) + [out_channels]
        for i in range(depth):
            hidden = 0 < i < depth - 1
            conv = nn.Conv2d(chans[i], chans[i + 1], kernel_size, padding=pad,
                             bias=bias and not (hidden and norm is not None))
            if spectral_norm:
                parametrize.register_parametrization(
                    conv, "weight", ConvOperatorSpectralNorm(conv, sn_coeff, sn_init_iter, sn_init_iter)
                )
            layers.append(conv)
            if hidden and norm == "group":
                layers.append(nn.GroupNorm(num_groups, width))
            elif hidden and norm == "batch":
                layers.append(nn.BatchNorm2d(width))
            if i < depth - 1:
                layers.append(nn.ReLU(inplace=False))
        self.body = nn.Sequential(*layers)

    def convs(self) -> Iterator[nn.Conv2d]:
        """The convolutions, input to output."""
        return (m for m in self.body if isinstance(m, nn.Conv2d))

    @torch.no_grad()
    def prepare_spectral_norm(self, size: Sequence[int], update: bool) -> None:
        """Initialises the power iterations (first use, at ``size``) and optionally advances them.

        Args:
            size: Spatial size ``(H, W)`` of the inputs (used when ``sn_probe_size`` is None).
            update: Advance every power iteration by ``sn_power_iters`` steps (and
                follow a changed input size); training does this once per step.
        """
        if not self.spectral_norm:
            return
        size = self.sn_probe_size or tuple(size)
        for conv in self.convs():
            sn = conv.parametrizations.weight[0]
            if update or not bool(sn.initialised):
                sn.power_iteration(conv.parametrizations.weight.original, size, self.sn_power_iters if update else 0)

    def update_spectral_norm(self, size: Optional[Sequence[int]] = None) -> None:
        """Advances every power iteration by ``sn_power_iters`` steps (no-op without spectral norm)."""
        if self.spectral_norm:
            conv = next(self.convs())
            current = tuple(conv.parametrizations.weight[0].u.shape[-2:])
            self.prepare_spectral_norm(size if size is not None else current, update=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``(B, C_in, H, W) -> (B, C_out, H, W)``."""
        self.prepare_spectral_norm(x.shape[-2:], update=self.training and self.sn_update_on_forward)
        out = self.body(x)
        return x - out if self.residual else out

    @torch.no_grad()
    def conv_operator_norms(self, size: Sequence[int], n_iter: int = 100) -> list[float]:
        """Fresh power-iteration estimates of each (normalised) convolution's operator norm.

        Args:
            size: Spatial size ``(H, W)`` of the feature maps.
            n_iter: Iterations per convolution.
        """
        self.prepare_spectral_norm(size, update=False)
        return [conv_operator_norm(conv.weight, size, conv.padding[0], n_iter) for conv in self.convs()]

    def lipschitz_upper_bound(self, size: Sequence[int], n_iter: int = 100) -> float:
        """Product bound on the Lipschitz constant, ReLU counted as 1-Lipschitz.

        Covers the conv stack ``N`` (returns ``prod ||K_i||``) or, with
        ``residual``, ``x - N(x)`` (returns ``1 + prod ||K_i||``). Normalisation
        layers are not covered (they are not Lipschitz-bounded in general):
        with ``norm`` set this raises ``ValueError``.
        """
        if self.norm is not None:
            raise ValueError(f"no Lipschitz bound with norm={self.norm!r}: normalisation layers are not 1-Lipschitz")
        prod = 1.0
        for value in self.conv_operator_norms(size, n_iter):
            prod *= value
        return 1.0 + prod if self.residual else prod
