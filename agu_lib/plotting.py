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


MARK = "agu"  # what save_grid writes into an image (PNG "Software" text, JPEG comment)


def save_grid(images: torch.Tensor, path, nrow: int | None = None, scale: int | None = None) -> Path:
    """Save a grid image (PNG, or JPEG by the suffix) of ``(N, C, H, W)`` images, marked as agu's
    (``written_by_agu``); small images are upscaled to be readable. The file is written beside
    ``path`` and then moved there, so an interrupted save leaves any earlier image whole."""
    import os
    import tempfile

    from PIL import Image, PngImagePlugin

    from .checkpoint import current_umask

    h = images.shape[-1]
    scale = scale or max(1, 64 // h)
    arr = make_grid(images, nrow=nrow, scale=scale)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    image = Image.fromarray(arr[..., 0] if arr.shape[2] == 1 else arr)
    fmt = "JPEG" if path.suffix.lower() in (".jpg", ".jpeg") else "PNG"
    if fmt == "PNG":
        info = PngImagePlugin.PngInfo()
        info.add_text("Software", MARK)
        mark = {"pnginfo": info}
    else:
        mark = {"comment": MARK}
    tmp = None
    try:
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")  # a new name: no file of yours
        os.close(fd)
        os.chmod(tmp, 0o666 & ~current_umask())  # mkstemp makes 0600; the image should be like any new file
        image.save(tmp, format=fmt, **mark)
        os.replace(tmp, path)
    except OSError as e:  # named by the path asked for, not by the temporary file beside it
        raise OSError(e.errno, e.strerror or str(e), str(path)) from None
    finally:
        if tmp is not None:
            Path(tmp).unlink(missing_ok=True)
    return path


def written_by_agu(path) -> bool:
    """Whether ``path`` is an image that ``save_grid`` wrote (it carries agu's mark)."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as image:
            mark = image.info.get("Software", image.info.get("comment"))
    except (OSError, UnidentifiedImageError, ValueError):
        return False
    return mark in (MARK, MARK.encode())
