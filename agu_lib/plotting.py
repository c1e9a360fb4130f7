"""Image grids (PNG via Pillow, no torchvision) and small matplotlib helpers."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch


def make_grid(images: torch.Tensor, nrow: int | None = None, pad: int = 1, scale: int = 1) -> np.ndarray:
    """Tile ``(N, C, H, W)`` images in [-1, 1] into a uint8 array ``(rows*H', cols*W', C)``
    (C = 1 or 3), with ``pad`` pixels between tiles and nearest-neighbour upscaling by ``scale``."""
    x = ((images.detach().float().cpu().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    n, c, h, w = x.shape
    if scale > 1:
        x = x.repeat_interleave(scale, 2).repeat_interleave(scale, 3)
        h, w = h * scale, w * scale
    nrow = nrow or math.ceil(math.sqrt(n))
    rows = math.ceil(n / nrow)
    grid = torch.full((c, rows * (h + pad) + pad, nrow * (w + pad) + pad), 255, dtype=torch.uint8)
    for i in range(n):
        r, col = divmod(i, nrow)
        grid[:, pad + r * (h + pad): pad + r * (h + pad) + h, pad + col * (w + pad): pad + col * (w + pad) + w] = x[i]
    return grid.permute(1, 2, 0).numpy()


def save_grid(images: torch.Tensor, path, nrow: int | None = None, scale: int | None = None) -> Path:
    """Save a grid PNG of ``(N, C, H, W)`` images; small images are upscaled to be readable."""
    from PIL import Image

    h = images.shape[-1]
    scale = scale or max(1, 64 // h)
    arr = make_grid(images, nrow=nrow, scale=scale)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(arr[..., 0] if arr.shape[2] == 1 else arr).save(path)
    return path
