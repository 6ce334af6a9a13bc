"""Image transforms for histology patches: stain math, HED stain jitter and train/eval pipelines.

The train pipeline follows the MoMA reference recipe (flips + timm RandAugment, then
``ToTensor`` + ``Normalize`` with ImageNet statistics); the eval pipeline only resizes and
normalizes. Stain colour conversion uses the Ruifrok & Johnston (2001) H&E-DAB matrix, written
with numpy so that no scikit-image dependency is needed.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
import torch
from PIL import Image
from timm.data.auto_augment import rand_augment_transform
from timm.data.constants import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from torchvision import transforms as T

__all__ = [
    "AUGMENTS",
    "HED_FROM_RGB",
    "RGB_FROM_HED",
    "StainJitter",
    "build_transform",
    "hed_to_rgb",
    "rgb_to_hed",
]

AUGMENTS = ("randaugment", "flip", "none")


def _ruifrok_matrix() -> np.ndarray:
    """Rows are the unit optical-density vectors of hematoxylin, eosin and DAB."""
    rows = np.array([[0.65, 0.70, 0.29], [0.07, 0.99, 0.11], [0.27, 0.57, 0.78]])
    return rows / np.linalg.norm(rows, axis=1, keepdims=True)


RGB_FROM_HED: np.ndarray = _ruifrok_matrix()
HED_FROM_RGB: np.ndarray = np.linalg.inv(RGB_FROM_HED)


def rgb_to_hed(rgb: np.ndarray) -> np.ndarray:
    """Convert uint8 RGB (..., 3) to float HED stain concentrations (optical-density units)."""
    od = -np.log((rgb.astype(np.float32) + 1.0) / 256.0)
    return od @ HED_FROM_RGB.astype(np.float32)


def hed_to_rgb(hed: np.ndarray) -> np.ndarray:
    """Convert HED stain concentrations (..., 3) back to uint8 RGB."""
    od = hed @ RGB_FROM_HED.astype(np.float32)
    rgb = 256.0 * np.exp(-od) - 1.0
    return np.clip(np.rint(rgb), 0, 255).astype(np.uint8)


class StainJitter:
    """Random HED stain augmentation (Tellez et al. 2018): ``hed * alpha + beta`` per stain.

    ``alpha ~ U(1 - sigma, 1 + sigma)`` and ``beta ~ U(-sigma, sigma)`` are drawn independently
    for each of the three stain channels. Accepts and returns ``PIL.Image`` (RGB) or uint8 arrays.
    Randomness comes from torch (seeded per DataLoader worker) or the given ``generator``.
    """

    def __init__(self, sigma: float, generator: torch.Generator | None = None) -> None:
        if sigma < 0:
            raise ValueError(f"StainJitter sigma must be >= 0, got {sigma}")
        self.sigma = float(sigma)
        self.generator = generator

    def _uniform(self, low: float, high: float) -> np.ndarray:
        u = torch.rand(3, generator=self.generator, dtype=torch.float64).numpy()
        return (low + (high - low) * u).astype(np.float32)

    def __call__(self, img: Image.Image | np.ndarray) -> Image.Image | np.ndarray:
        is_pil = isinstance(img, Image.Image)
        arr = np.asarray(img.convert("RGB")) if is_pil else np.asarray(img)
        if self.sigma == 0:
            return img
        alpha = self._uniform(1 - self.sigma, 1 + self.sigma)
        beta = self._uniform(-self.sigma, self.sigma)
        out = hed_to_rgb(rgb_to_hed(arr) * alpha + beta)
        return Image.fromarray(out) if is_pil else out

    def __repr__(self) -> str:
        return f"{type(self).__name__}(sigma={self.sigma})"


def _augment_ops(augment: str, image_size: int, mean: Sequence[float]) -> list[Callable]:
    """Geometric/photometric train-time augmentations for the given ``augment`` mode."""
    if augment not in AUGMENTS:
        raise ValueError(f"unknown augment {augment!r}; expected one of {AUGMENTS}")
    if augment == "none":
        return []
    ops: list[Callable] = [T.RandomHorizontalFlip(), T.RandomVerticalFlip()]
    if augment == "randaugment":
        hparams = {
            "translate_const": int(image_size * 0.45),
            "img_mean": tuple(round(255 * m) for m in mean),
        }
        ops.append(rand_augment_transform("rand-n2-m10", hparams))
    return ops


def build_transform(
    image_size: int,
    train: bool,
    augment: str = "randaugment",
    stain_jitter: float = 0.0,
    mean: Sequence[float] = IMAGENET_DEFAULT_MEAN,
    std: Sequence[float] = IMAGENET_DEFAULT_STD,
) -> Callable:
    """Return a PIL-image -> normalized ``(3, image_size, image_size)`` float tensor transform.

    ``train=True`` adds augmentation (``augment`` in ``AUGMENTS``) and, when ``stain_jitter > 0``,
    a :class:`StainJitter` step; ``train=False`` is deterministic (resize, tensor, normalize).
    """
    if image_size < 1:
        raise ValueError(f"image_size must be positive, got {image_size}")
    ops: list[Callable] = []
    if train:
        if stain_jitter > 0:
            ops.append(StainJitter(stain_jitter))
        ops.extend(_augment_ops(augment, image_size, mean))
    ops.append(T.Resize((image_size, image_size), antialias=True))
    ops.extend([T.ToTensor(), T.Normalize(mean=tuple(mean), std=tuple(std))])
    return T.Compose(ops)
