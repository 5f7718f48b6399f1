"""Single images for implicit neural representations.

Intensities are real, in [0, 1] on disk and in metrics; models see them mapped to
[-1, 1] (``to_model``/``from_model``), as TorchDEQ's deq-inr does. Coordinates
are an ``(H·W, 2)`` grid in [-1, 1]², row-major (y, x).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

SAMPLES = ("astronaut", "camera")


@dataclass(frozen=True)
class ImageData:
    """One image prepared for INR fitting.

    Attributes:
        name: the sample name or file path it came from.
        image: ``(1, 1, H, W)`` float32 intensities in [0, 1].
        coords: ``(H·W, 2)`` float32 coordinates in [-1, 1].
        target: ``(H·W, 1)`` float32 intensities mapped to [-1, 1].
    """

    name: str
    image: torch.Tensor
    coords: torch.Tensor
    target: torch.Tensor

    @property
    def shape(self) -> tuple[int, int]:
        """``(H, W)``."""
        return tuple(self.image.shape[-2:])  # type: ignore[return-value]

    def to(self, device: torch.device | str) -> "ImageData":
        """Copy on ``device``."""
        return ImageData(self.name, self.image.to(device), self.coords.to(device), self.target.to(device))


def _read(name: str) -> np.ndarray:
    import skimage.color
    import skimage.data
    import skimage.io

    if name in SAMPLES:
        img = getattr(skimage.data, name)()
    else:
        path = Path(name)
        if not path.is_file():
            raise ValueError(
                f"data.image: {name!r} is neither a bundled sample ({', '.join(SAMPLES)}) nor an existing file"
            )
        img = skimage.io.imread(path)
    img = np.asarray(img)
    if img.ndim == 3:
        img = skimage.color.rgb2gray(img[..., :3]) if img.shape[-1] >= 3 else img[..., 0]
    img = img.astype(np.float64)
    if img.max() > 1.0:
        img = img / 255.0
    return img


def load_image(name: str, size: int) -> torch.Tensor:
    """Loads a grey image resized (anti-aliased) to ``size`` × ``size``.

    Args:
        name: ``astronaut``, ``camera`` or an image file path.
        size: output side length in pixels.

    Returns:
        ``(1, 1, size, size)`` float32 tensor in [0, 1].
    """
    import skimage.transform

    img = _read(name)
    if img.shape != (size, size):
        img = skimage.transform.resize(img, (size, size), anti_aliasing=True, preserve_range=True)
    return torch.from_numpy(np.clip(img, 0.0, 1.0).astype(np.float32))[None, None]


def coordinate_grid(h: int, w: int) -> torch.Tensor:
    """Pixel-centre coordinates of an ``h`` × ``w`` image.

    Returns:
        ``(h·w, 2)`` float32 grid in [-1, 1], row-major, columns (y, x).
    """
    ys = torch.linspace(-1.0, 1.0, h)
    xs = torch.linspace(-1.0, 1.0, w)
    grid = torch.stack(torch.meshgrid(ys, xs, indexing="ij"), dim=-1)
    return grid.reshape(-1, 2)


def to_model(x: torch.Tensor) -> torch.Tensor:
    """[0, 1] → [-1, 1]."""
    return x * 2.0 - 1.0


def from_model(y: torch.Tensor) -> torch.Tensor:
    """[-1, 1] → [0, 1] (not clamped)."""
    return (y + 1.0) / 2.0


def pixels_to_image(y: torch.Tensor, h: int, w: int) -> torch.Tensor:
    """Model output ``(h·w, 1)`` in [-1, 1] → ``(1, 1, h, w)`` in [0, 1], clamped."""
    return from_model(y).clamp(0.0, 1.0).reshape(1, 1, h, w)


def image_data(name: str, size: int) -> ImageData:
    """Everything an INR fit needs for one image (see :class:`ImageData`)."""
    image = load_image(name, size)
    coords = coordinate_grid(size, size)
    target = to_model(image).reshape(-1, 1)
    return ImageData(name, image, coords, target)
