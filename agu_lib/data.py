"""Data sets, all as ``ImageSet``: images ``(N, C, H, W)`` float32 in [-1, 1] plus integer labels.

- ``digits``: scikit-learn's bundled 8x8 handwritten digits (1,797 images, offline), upsampled
  bilinearly to the **working resolution 16x16** (the default GAN's size: small enough for a
  laptop CPU, large enough for a DCGAN with two upsamplings and readable grids).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from .errors import DataError

DIGITS_SIZE = 16  # working resolution of the digits data set and the shipped GAN


@dataclass
class ImageSet:
    """Images ``(N, C, H, W)`` float32 in [-1, 1], labels ``(N,)`` int64 (or None), and a name."""

    images: torch.Tensor
    labels: torch.Tensor | None
    name: str

    def __len__(self) -> int:
        return len(self.images)

    @property
    def image_shape(self) -> tuple[int, int, int]:
        return tuple(self.images.shape[1:])

    def subset(self, idx) -> "ImageSet":
        idx = torch.as_tensor(idx)
        return ImageSet(self.images[idx], None if self.labels is None else self.labels[idx], self.name)

    def without(self, classes) -> "ImageSet":
        """The images whose label is not in ``classes``."""
        if self.labels is None:
            raise DataError(f"{self.name} has no labels, so classes cannot be removed from it")
        keep = ~torch.isin(self.labels, torch.as_tensor(list(classes)))
        return self.subset(keep.nonzero().squeeze(1))

    def split(self, n_test: int, seed: int = 0) -> tuple["ImageSet", "ImageSet"]:
        """A seeded random (train, test) split with ``n_test`` test images."""
        if not 0 < n_test < len(self):
            raise DataError(f"n_test must be between 1 and {len(self) - 1}, got {n_test}")
        perm = torch.randperm(len(self), generator=torch.Generator().manual_seed(seed))
        return self.subset(perm[n_test:]), self.subset(perm[:n_test])

    def class_counts(self, n_classes: int = 10) -> list[int]:
        return torch.bincount(self.labels, minlength=n_classes).tolist()


def resize(images: torch.Tensor, size: int) -> torch.Tensor:
    """Bilinear resize of ``(N, C, H, W)`` images to ``size x size`` (no-op if already that size)."""
    if images.shape[-1] == size and images.shape[-2] == size:
        return images
    return F.interpolate(images, size=(size, size), mode="bilinear", align_corners=False).clamp(-1, 1)


def load_digits(size: int = DIGITS_SIZE) -> ImageSet:
    """scikit-learn's 8x8 digits (1,797 images, 10 classes), as ``(1797, 1, size, size)`` in [-1, 1]."""
    from sklearn.datasets import load_digits as _sk_digits

    d = _sk_digits()
    x = torch.from_numpy(d.images.astype(np.float32) / 16.0 * 2.0 - 1.0).unsqueeze(1)  # (N, 1, 8, 8)
    return ImageSet(resize(x, size), torch.from_numpy(d.target.astype(np.int64)), "digits")
