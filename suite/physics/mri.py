"""Cartesian MRI forward operators and coil-sensitivity estimation.

Complex convention (the whole module): a complex tensor is a real tensor whose
last dimension has size 2 holding (real, imaginary) -- fastMRI's convention.
Images are ``(B, H, W, 2)``, k-space is ``(B, C, H, W, 2)`` with ``C`` coils
(``C = 1`` for single-coil data), sampling masks are real, broadcastable to
``(B, C, H, W, 1)`` (fastMRI's column masks are ``(B, 1, 1, W, 1)``), and
sensitivity maps are ``(B, C, H, W, 2)``.

The Fourier transform is fastMRI's centred, orthonormal ``fft2c``/``ifft2c``
(unitary), so with a binary mask and maps normalised to ``sum_c |S_c|^2 <= 1``
every operator here has ``||A|| <= 1``; a gradient step
``x - eta * A^H (A x - y)`` is then non-expansive for ``0 < eta <= 2``.

Operators follow deepinv's ``LinearPhysics``: ``A`` (image -> masked k-space),
``A_adjoint``, and ``forward`` = ``A`` plus optional k-space noise::

    physics = make_mri_physics(batch["mask"], batch.get("sens_maps"))
    y = physics(x)                 # (B, C, H, W, 2)
    x_zf = physics.A_adjoint(y)    # (B, H, W, 2)
"""

from __future__ import annotations

from typing import Optional, Union

import torch
from torch import nn

import fastmri
from fastmri import complex_conj, complex_mul

__all__ = [
    "MRIOperator",
    "SingleCoilMRI",
    "MultiCoilMRI",
    "make_mri_physics",
    "estimate_sensitivity_maps",
    "acs_bounds",
    "sense_combine",
    "complex_inner",
]


def _check_complex(t: torch.Tensor, name: str, ndim: int) -> None:
    """Raises ``ValueError`` unless ``t`` is real with ``ndim`` dims and a last dim of 2."""
    if not torch.is_tensor(t):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.is_complex():
        raise ValueError(
            f"{name} must be real with a trailing (real, imag) dim of size 2 "
            f"(fastMRI convention), got complex dtype {t.dtype}; use torch.view_as_real"
        )
    if t.ndim != ndim or t.shape[-1] != 2:
        raise ValueError(
            f"{name} must have {ndim} dims ending in 2 (real, imag), got shape {tuple(t.shape)}"
        )


def _as_mask5(mask: torch.Tensor) -> torch.Tensor:
    """Returns ``mask`` as a float tensor with 5 dims ``(B|1, C|1, H|1, W, 1)``.

    Args:
        mask: Real sampling mask whose last dim is 1 and which has at most 5 dims,
            e.g. fastMRI's ``(1, 1, W, 1)`` or a batch ``(B, 1, 1, W, 1)``.

    Raises:
        ValueError: the mask is complex, has a last dim other than 1, or more than 5 dims.
    """
    if not torch.is_tensor(mask):
        raise TypeError(f"mask must be a torch.Tensor, got {type(mask).__name__}")
    if mask.is_complex() or mask.ndim == 0 or mask.ndim > 5 or mask.shape[-1] != 1:
        raise ValueError(
            "mask must be real with at most 5 dims and a last dim of 1, broadcastable to "
            f"(B, C, H, W, 1); got shape {tuple(mask.shape)} dtype {mask.dtype}"
        )
    mask = mask.to(torch.get_default_dtype()) if not mask.is_floating_point() else mask
    return mask.reshape((1,) * (5 - mask.ndim) + tuple(mask.shape))


def complex_inner(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Batched complex inner product ``<a, b> = sum conj(b) * a`` per batch element.

    Args:
        a: ``(B, ..., 2)``.
        b: same shape as ``a``.

    Returns:
        ``(B, 2)``: real and imaginary part of ``<a, b>`` for each batch element.
    """
    prod = complex_mul(a, complex_conj(b))
    return prod.flatten(1, -2).sum(1)


def add_kspace_noise(y: torch.Tensor, mask: torch.Tensor, sigma: float,
                     gen: Optional[torch.Generator] = None) -> torch.Tensor:
    """``y + sigma * n * mask``, ``n ~ N(0, I)`` on real and imaginary parts (sampled entries only).

    Args:
        y: k-space ``(B, C, H, W, 2)``.
        mask: ``(B, 1, 1, W, 1)`` (or broadcastable).
        sigma: noise level ``>= 0``; 0 returns ``y`` itself.
        gen: CPU generator (reproducible noise, drawn on the CPU and moved to
            ``y``'s device); None: torch's global RNG on ``y``'s device.

    Returns:
        Noisy k-space, shape of ``y``.
    """
    if sigma == 0:
        return y
    n = torch.randn_like(y) if gen is None else torch.randn(y.shape, generator=gen, dtype=y.dtype).to(y.device)
    return y + sigma * n * mask.to(y.dtype)


class MRIOperator(nn.Module):
    """Base class: ``forward(x) = A(x) + noise``; subclasses define ``A`` and ``A_adjoint``.

    Args:
        noise_sigma: Standard deviation of the Gaussian noise added by ``forward`` to
            the real and to the imaginary part of every *sampled* k-space entry.
    """

    def __init__(self, noise_sigma: float = 0.0) -> None:
        super().__init__()
        if not isinstance(noise_sigma, (int, float)) or noise_sigma < 0:
            raise ValueError(f"noise_sigma must be a number >= 0, got {noise_sigma!r}")
        self.noise_sigma = float(noise_sigma)

    def A(self, x: torch.Tensor) -> torch.Tensor:  # noqa: N802 (deepinv naming)
        """Image ``(B, H, W, 2)`` -> masked k-space ``(B, C, H, W, 2)``."""
        raise NotImplementedError

    def A_adjoint(self, y: torch.Tensor) -> torch.Tensor:  # noqa: N802
        """Masked k-space ``(B, C, H, W, 2)`` -> image ``(B, H, W, 2)``."""
        raise NotImplementedError

    def A_adjoint_A(self, x: torch.Tensor) -> torch.Tensor:  # noqa: N802
        """Normal operator ``A^H A x`` on an image ``(B, H, W, 2)``."""
        return self.A_adjoint(self.A(x))

    def data_fidelity_grad(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """Gradient of ``0.5 ||A x - y||^2``: ``A^H (A x - y)``, shape ``(B, H, W, 2)``."""
        return self.A_adjoint(self.A(x) - y)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Simulated measurement ``A x + mask * sigma * n``, ``n ~ N(0, I)``; ``(B, C, H, W, 2)``."""
        return add_kspace_noise(self.A(x), self.mask, self.noise_sigma)


class SingleCoilMRI(MRIOperator):
    """Single-coil Cartesian MRI: ``A x = M F x`` with one coil dimension of size 1.

    Args:
        mask: Real sampling mask broadcastable to ``(B, 1, H, W, 1)``, e.g.
            fastMRI's ``(1, 1, W, 1)`` or a batch ``(B, 1, 1, W, 1)``. Stored as a buffer.
        noise_sigma: See :class:`MRIOperator`.
    """

    def __init__(self, mask: torch.Tensor, noise_sigma: float = 0.0) -> None:
        super().__init__(noise_sigma)
        self.register_buffer("mask", _as_mask5(mask))

    def A(self, x: torch.Tensor) -> torch.Tensor:  # noqa: N802
        """Image ``(B, H, W, 2)`` -> masked k-space ``(B, 1, H, W, 2)``."""
        _check_complex(x, "x", 4)
        return fastmri.fft2c(x).unsqueeze(1) * self.mask.to(x.dtype)

    def A_adjoint(self, y: torch.Tensor) -> torch.Tensor:  # noqa: N802
        """Masked k-space ``(B, 1, H, W, 2)`` -> zero-filled image ``(B, H, W, 2)``."""
        _check_complex(y, "y", 5)
        if y.shape[1] != 1:
            raise ValueError(f"single-coil k-space must have 1 coil, got shape {tuple(y.shape)}")
        return fastmri.ifft2c(y * self.mask.to(y.dtype)).squeeze(1)


class MultiCoilMRI(MRIOperator):
    """Multi-coil (SENSE) Cartesian MRI: ``(A x)_c = M F (S_c x)``.

    Adjoint: ``A^H y = sum_c conj(S_c) F^{-1}(M y_c)``.

    Args:
        mask: Real sampling mask broadcastable to ``(B, C, H, W, 1)``. Stored as a buffer.
        sens_maps: Coil sensitivities ``(B, C, H, W, 2)`` (or ``(C, H, W, 2)`` for one
            image), e.g. from :func:`estimate_sensitivity_maps`. Stored as a buffer.
        noise_sigma: See :class:`MRIOperator`.
    """

    def __init__(self, mask: torch.Tensor, sens_maps: torch.Tensor, noise_sigma: float = 0.0) -> None:
        super().__init__(noise_sigma)
        if torch.is_tensor(sens_maps) and sens_maps.ndim == 4:
            sens_maps = sens_maps.unsqueeze(0)
        _check_complex(sens_maps, "sens_maps", 5)
        self.register_buffer("mask", _as_mask5(mask))
        self.register_buffer("sens_maps", sens_maps)

    def A(self, x: torch.Tensor) -> torch.Tensor:  # noqa: N802
        """Image ``(B, H, W, 2)`` -> masked multi-coil k-space ``(B, C, H, W, 2)``."""
        _check_complex(x, "x", 4)
        coil_images = complex_mul(self.sens_maps.to(x.dtype), x.unsqueeze(1))
        return fastmri.fft2c(coil_images) * self.mask.to(x.dtype)

    def A_adjoint(self, y: torch.Tensor) -> torch.Tensor:  # noqa: N802
        """Masked k-space ``(B, C, H, W, 2)`` -> coil-combined image ``(B, H, W, 2)``."""
        _check_complex(y, "y", 5)
        coil_images = fastmri.ifft2c(y * self.mask.to(y.dtype))
        return sense_combine(coil_images, self.sens_maps.to(y.dtype))


def make_mri_physics(
    mask: torch.Tensor,
    sens_maps: Optional[torch.Tensor] = None,
    noise_sigma: float = 0.0,
) -> Union[SingleCoilMRI, MultiCoilMRI]:
    """Builds the operator for one batch: single-coil without maps, SENSE with maps.

    Args:
        mask: ``(B, 1, 1, W, 1)`` (or anything :class:`SingleCoilMRI` accepts).
        sens_maps: ``(B, C, H, W, 2)`` or ``None`` for single-coil data.
        noise_sigma: See :class:`MRIOperator`.

    Returns:
        The operator, on ``mask``'s device.
    """
    if sens_maps is None:
        return SingleCoilMRI(mask, noise_sigma)
    return MultiCoilMRI(mask, sens_maps, noise_sigma)


def sense_combine(coil_images: torch.Tensor, sens_maps: torch.Tensor) -> torch.Tensor:
    """Coil combination ``sum_c conj(S_c) x_c``.

    Args:
        coil_images: ``(B, C, H, W, 2)`` (or ``(C, H, W, 2)``).
        sens_maps: same shape as ``coil_images``.

    Returns:
        ``(B, H, W, 2)`` (or ``(H, W, 2)``).
    """
    return complex_mul(complex_conj(sens_maps), coil_images).sum(dim=-4)


def acs_bounds(mask_row: torch.Tensor) -> tuple[int, int]:
    """Half-open column range ``[lo, hi)`` of the fully sampled centre (ACS) of a mask.

    The ACS is the run of sampled columns that contains the centre column
    ``W // 2`` (where the centred FFT puts the zero frequency).

    Args:
        mask_row: ``(W,)`` real mask of one image.

    Raises:
        ValueError: the centre column is not sampled.
    """
    m = mask_row.detach().reshape(-1) > 0
    width = m.numel()
    centre = width // 2
    if not bool(m[centre]):
        raise ValueError(
            f"the k-space centre column {centre} of {width} is not sampled; "
            "cannot estimate sensitivity maps without a fully sampled centre (ACS)"
        )
    lo, hi = centre, centre + 1
    while lo > 0 and bool(m[lo - 1]):
        lo -= 1
    while hi < width and bool(m[hi]):
        hi += 1
    return lo, hi


def estimate_sensitivity_maps(
    kspace: torch.Tensor,
    mask: Optional[torch.Tensor] = None,
    num_low_frequencies: Optional[int] = None,
    threshold: float = 0.05,
    eps: float = 1e-12,
) -> torch.Tensor:
    """Coil sensitivities from the fully sampled k-space centre (ACS).

    Keeps only the ACS columns of each coil's k-space, transforms them to
    low-resolution coil images ``x_c`` and divides by their root-sum-of-squares:
    ``S_c = x_c / sqrt(sum_c |x_c|^2)``. Hence ``sum_c |S_c|^2 = 1`` wherever the
    low-resolution RSS is at least ``threshold`` times its maximum; elsewhere
    (background) ``S_c = 0``.

    Args:
        kspace: ``(B, C, H, W, 2)`` or ``(C, H, W, 2)`` k-space (undersampled is fine:
            only the ACS columns are used).
        mask: Sampling mask broadcastable to ``(B, 1, 1, W, 1)``; the ACS is the run of
            sampled columns around the centre column. Ignored if
            ``num_low_frequencies`` is given.
        num_low_frequencies: ACS width in columns, centred as fastMRI's
            ``MaskFunc.calculate_center_mask`` does.
        threshold: Relative RSS level below which a pixel counts as background.
        eps: RSS values at or below ``eps`` also count as background.

    Returns:
        Sensitivity maps with the shape of ``kspace``.

    Raises:
        ValueError: neither ``mask`` nor ``num_low_frequencies`` is given, the ACS is
            empty, or ``threshold`` is outside ``[0, 1)``.
    """
    unbatched = kspace.ndim == 4
    if unbatched:
        kspace = kspace.unsqueeze(0)
    _check_complex(kspace, "kspace", 5)
    if not 0.0 <= threshold < 1.0:
        raise ValueError(f"threshold must be in [0, 1), got {threshold!r}")
    batch, _, _, width, _ = kspace.shape
    bounds: list[tuple[int, int]] = []
    if num_low_frequencies is not None:
        n = int(num_low_frequencies)
        if not 0 < n <= width:
            raise ValueError(f"num_low_frequencies must be in [1, {width}], got {num_low_frequencies!r}")
        pad = (width - n + 1) // 2
        bounds = [(pad, pad + n)] * batch
    elif mask is not None:
        m5 = _as_mask5(mask)
        cols = m5.reshape(m5.shape[0], -1, m5.shape[-2])[:, 0, :]  # (B|1, W)
        cols = cols.expand(batch, width)
        bounds = [acs_bounds(cols[b]) for b in range(batch)]
    else:
        raise ValueError("estimate_sensitivity_maps needs a mask or num_low_frequencies")

    acs = torch.zeros_like(kspace)
    for b, (lo, hi) in enumerate(bounds):
        acs[b, :, :, lo:hi] = kspace[b, :, :, lo:hi]
    low_res = fastmri.ifft2c(acs)  # (B, C, H, W, 2)
    rss = fastmri.rss_complex(low_res, dim=1)  # (B, H, W)
    peak = rss.flatten(1).amax(dim=1).view(batch, 1, 1)
    support = (rss >= threshold * peak) & (rss > eps)
    denom = torch.where(support, rss, torch.ones_like(rss)).unsqueeze(1).unsqueeze(-1)
    maps = low_res / denom * support.unsqueeze(1).unsqueeze(-1).to(low_res.dtype)
    return maps.squeeze(0) if unbatched else maps
