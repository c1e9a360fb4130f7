"""Data sets, all as ``ImageSet``: images ``(N, C, H, W)`` float32 in [-1, 1] plus integer labels.

- ``digits``: scikit-learn's bundled 8x8 handwritten digits (1,797 images, offline), upsampled
  bilinearly to the **working resolution 16x16** (the default GAN's size: small enough for a
  laptop CPU, large enough for a DCGAN with two upsamplings and readable grids).
- ``mnist``: the IDX files of MNIST (``load_mnist``), read from a folder (``mnist_dir()``) or
  downloaded with checksums (``download_mnist``); 28x28, white strokes on black.
- a folder of PNG/JPEG images (``load_folder``), e.g. a user's own data set (no labels).
"""

from __future__ import annotations

import gzip
import os
import shutil
import tempfile
import warnings
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from .checkpoint import sha256_file
from .errors import ConfigError, DataError

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

    def subset(self, idx) -> ImageSet:
        idx = torch.as_tensor(idx)
        return ImageSet(self.images[idx], None if self.labels is None else self.labels[idx], self.name)

    def without(self, classes) -> ImageSet:
        """The images whose label is not in ``classes``."""
        if self.labels is None:
            raise DataError(f"{self.name} has no labels, so classes cannot be removed from it")
        keep = ~torch.isin(self.labels, torch.as_tensor(list(classes)))
        return self.subset(keep.nonzero().squeeze(1))

    def split(self, n_test: int, seed: int = 0) -> tuple[ImageSet, ImageSet]:
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


# ----------------------------------------------------------------------------------------
# Where shared data lives (never an absolute path in code, notebooks or tests)


def _repo_root() -> Path:
    return Path(__file__).resolve().parents[1]


def mnist_search_path() -> Path:
    """Where agu looks for MNIST's IDX files: ``$AGU_MNIST_DIR``, else ``<repo>/../shared/data/mnist``."""
    env = os.environ.get("AGU_MNIST_DIR")
    return Path(env) if env else _repo_root().parent / "shared" / "data" / "mnist"


def mnist_dir() -> Path | None:
    """The folder holding MNIST's IDX files (``mnist_search_path``); ``None`` if that folder does not exist."""
    d = mnist_search_path()
    return d if d.is_dir() else None


def third_party_search_path() -> Path:
    """Where agu looks for third-party checkpoints: ``$AGU_THIRD_PARTY_DIR``, else ``<repo>/../shared/data/third_party``."""
    env = os.environ.get("AGU_THIRD_PARTY_DIR")
    return Path(env) if env else _repo_root().parent / "shared" / "data" / "third_party"


def third_party_dir() -> Path | None:
    """The folder of third-party checkpoints (``third_party_search_path``); ``None`` if that folder does not exist."""
    d = third_party_search_path()
    return d if d.is_dir() else None


# ----------------------------------------------------------------------------------------
# MNIST (IDX files)

MNIST_SIZE = 28
IDX_IMAGES_MAGIC = 2051  # 0x00000803: unsigned bytes, 3 dimensions (N, rows, cols)
IDX_LABELS_MAGIC = 2049  # 0x00000801: unsigned bytes, 1 dimension (N,)
_MNIST_PREFIX = {"test": "t10k", "train": "train"}

#: file -> SHA-256 of the official ``.gz`` files (the same bytes on every mirror)
MNIST_SHA256 = {
    "train-images-idx3-ubyte.gz": "440fcabf73cc546fa21475e81ea370265605f56be210a4024d2ca8f203523609",
    "train-labels-idx1-ubyte.gz": "3552534a0a558bbed6aed32b30c495cca23d567ec52cac8be1a0730e8010255c",
    "t10k-images-idx3-ubyte.gz": "8d422c7b0a1c1c79245a5bcf07fe86e33eeafee792b84584aec276f5a2dbc4e6",
    "t10k-labels-idx1-ubyte.gz": "f7ae60f92e00ec6debd23a6088c31dbd2371eca3ffa0defaefb259924204aec6",
}
#: mirrors tried in order (yann.lecun.com itself often refuses downloads nowadays)
MNIST_MIRRORS = (
    "https://ossci-datasets.s3.amazonaws.com/mnist/",
    "https://storage.googleapis.com/cvdf-datasets/mnist/",
)


def _mnist_files(split: str) -> tuple[str, str]:
    if split not in _MNIST_PREFIX:
        raise ConfigError(f"unknown MNIST split {split!r}; valid: test, train")
    prefix = _MNIST_PREFIX[split]
    return f"{prefix}-images-idx3-ubyte", f"{prefix}-labels-idx1-ubyte"


def read_idx(path, magic: int) -> np.ndarray:
    """An IDX file (raw or ``.gz``) of unsigned bytes as a uint8 array of the shape in its header.

    Checks the magic number (2051 for image files, 2049 for label files) and that the number of
    bytes matches the header, so truncated downloads and swapped files are caught here.
    """
    path = Path(path)
    try:
        raw = path.read_bytes()
    except OSError as e:
        raise DataError(f"cannot read {path} ({e.strerror or e})") from None
    if path.suffix == ".gz":
        try:
            raw = gzip.decompress(raw)
        except (OSError, EOFError, zlib.error) as e:
            raise DataError(
                f"{path} is not a complete gzip file ({e}); the download was probably interrupted. "
                "Delete it and download it again (agu_lib.data.download_mnist checks checksums)"
            ) from None
    ndim = magic & 0xFF
    header = 4 + 4 * ndim
    if len(raw) < 4:
        raise DataError(f"{path} is too short for an IDX header ({len(raw)} bytes); it is truncated or not an IDX file")
    found = int.from_bytes(raw[:4], "big")
    if found != magic:
        kinds = {IDX_IMAGES_MAGIC: "an image file", IDX_LABELS_MAGIC: "a label file"}
        raise DataError(
            f"{path} has magic number {found}, expected {magic} ({kinds.get(magic, 'IDX')}); "
            f"it is {kinds.get(found, 'not an MNIST IDX file')}. Check that the file names are not swapped"
        )
    if len(raw) < header:
        raise DataError(f"{path} is too short for an IDX header ({len(raw)} bytes); it is truncated")
    dims = tuple(int.from_bytes(raw[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim))
    expected = header + int(np.prod(dims, dtype=object))
    if len(raw) != expected:
        what = "truncated" if len(raw) < expected else "longer than its header says"
        raise DataError(
            f"{path} is {what}: its header says {'x'.join(map(str, dims))} values ({expected} bytes) "
            f"but it holds {len(raw)} bytes. Download it again"
        )
    return np.frombuffer(raw, dtype=np.uint8, offset=header).reshape(dims)


def _find_idx(root: Path, stem: str) -> Path:
    for cand in (root / f"{stem}.gz", root / stem):
        if cand.is_file():
            return cand
    raise DataError(
        f"{root} has no {stem}.gz (or {stem}). Put the MNIST IDX files there, point $AGU_MNIST_DIR "
        "at the folder that holds them, or fetch them with agu_lib.data.download_mnist(folder, split)"
    )


def load_mnist(root=None, split: str = "test", size: int = MNIST_SIZE) -> ImageSet:
    """MNIST from its IDX files (``.gz`` or decompressed) as ``(N, 1, size, size)`` in [-1, 1].

    Arguments:
        root: folder holding ``t10k-images-idx3-ubyte[.gz]`` and ``t10k-labels-idx1-ubyte[.gz]``
            (``train-...`` for the training split); default ``mnist_dir()``.
        split: ``"test"`` (10,000 images) or ``"train"`` (60,000).
        size: side of the returned images; 28 keeps MNIST's own size, others resize bilinearly.
    """
    if root is None:
        root = mnist_dir()
        if root is None:
            raise DataError("no MNIST folder found: set $AGU_MNIST_DIR or pass root=, or use download_mnist")
    root = Path(root)
    if not root.is_dir():
        raise DataError(f"MNIST folder {root} does not exist")
    images_stem, labels_stem = _mnist_files(split)
    images_path, labels_path = _find_idx(root, images_stem), _find_idx(root, labels_stem)
    images = read_idx(images_path, IDX_IMAGES_MAGIC)  # (N, 28, 28) uint8
    labels = read_idx(labels_path, IDX_LABELS_MAGIC)  # (N,) uint8
    if images.shape[1:] != (MNIST_SIZE, MNIST_SIZE):
        raise DataError(f"{images_path} holds {images.shape[1]}x{images.shape[2]} images; MNIST's are 28x28")
    if len(images) == 0:
        raise DataError(f"{images_path} holds no images")
    if len(images) != len(labels):
        raise DataError(f"{images_path} holds {len(images)} images but {labels_path} {len(labels)} labels; they do not belong together")
    if labels.max() > 9:
        raise DataError(f"{labels_path} holds label {int(labels.max())}; MNIST labels are 0..9")
    x = torch.from_numpy(images.astype(np.float32) / 127.5 - 1.0).unsqueeze(1)  # (N, 1, 28, 28)
    return ImageSet(resize(x, size), torch.from_numpy(labels.astype(np.int64)), f"mnist-{split}")


def _urllib_fetch(url: str, dest: Path) -> None:
    import urllib.request

    with urllib.request.urlopen(url, timeout=60) as r, open(dest, "wb") as f:
        shutil.copyfileobj(r, f)


def download_mnist(cache_dir, split: str = "test", fetch: Callable[[str, Path], None] | None = None) -> Path:
    """Download the two ``.gz`` IDX files of an MNIST split into ``cache_dir`` and return it.

    Each file is checked against its official SHA-256 (``MNIST_SHA256``); files already there
    with the right checksum are kept. A download goes to a temporary file that is renamed into
    place only once its checksum matches, so ``cache_dir`` never holds a partial file.

    Arguments:
        cache_dir: folder to put the files in (created if needed); pass it to ``load_mnist``.
        split: ``"test"`` or ``"train"``.
        fetch: ``fetch(url, dest_path)`` writes the bytes at ``url`` to ``dest_path``; default urllib.
            Mirrors (``MNIST_MIRRORS``) are tried in order when a fetch raises ``OSError``.
    """
    fetch = fetch or _urllib_fetch
    cache_dir = Path(cache_dir)
    cache_dir.mkdir(parents=True, exist_ok=True)
    for stem in _mnist_files(split):
        name = f"{stem}.gz"
        dest, want = cache_dir / name, MNIST_SHA256[name]
        if dest.is_file() and sha256_file(dest) == want:
            continue
        fd, tmp_name = tempfile.mkstemp(prefix=f".{name}.", suffix=".part", dir=cache_dir)
        os.close(fd)
        tmp = Path(tmp_name)
        try:
            errors = []
            for mirror in MNIST_MIRRORS:
                try:
                    fetch(mirror + name, tmp)
                    break
                except OSError as e:  # network errors (urllib.error.URLError is an OSError)
                    errors.append(f"{mirror + name}: {e}")
            else:
                raise DataError(
                    f"could not download {name}: " + "; ".join(errors) + ". Without internet, copy the MNIST "
                    f".gz files into {cache_dir} by hand (or set $AGU_MNIST_DIR to a folder holding them)"
                )
            got = sha256_file(tmp)
            if got != want:
                raise DataError(
                    f"downloaded {name} has SHA-256 {got[:16]}..., expected {want[:16]}...: the download is "
                    "corrupt or a proxy changed it. Nothing was kept; try again or copy the file by hand"
                )
            os.replace(tmp, dest)
        finally:
            tmp.unlink(missing_ok=True)
    return cache_dir


# ----------------------------------------------------------------------------------------
# A folder of images

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")
_MODES = {1: "L", 3: "RGB"}


def check_images(x, image_shape, what: str) -> None:
    """``x`` must be a float tensor ``(n, *image_shape)`` with values in [-1, 1] (``DataError`` otherwise)."""
    shape = tuple(image_shape)
    if not isinstance(x, torch.Tensor) or x.ndim != 4 or tuple(x.shape[1:]) != shape:
        got = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
        raise DataError(f"{what} must be a tensor (n, {', '.join(map(str, shape))}), got {got}")
    if not x.is_floating_point() or not bool(torch.isfinite(x).all()):
        raise DataError(f"{what} must be finite floating-point images in [-1, 1]")
    if len(x) and (float(x.min()) < -1.01 or float(x.max()) > 1.01):
        raise DataError(f"{what} must lie in [-1, 1] (agu's image scale, whatever a GAN's own output_range), got values from {float(x.min()):.3g} to "
                        f"{float(x.max()):.3g}; images in 0..255 map to it by x / 127.5 - 1, in 0..1 by 2 x - 1")


def load_folder(path, image_shape, convert: bool = False) -> ImageSet:
    """The PNG/JPEG images directly inside ``path`` (sorted by name, no labels) as
    ``(N, C, H, W)`` in [-1, 1] (pixel values 0..255 map linearly to -1..1; nothing is inverted,
    so MNIST-like data should be white strokes on black).

    Arguments:
        path: folder of ``.png``/``.jpg``/``.jpeg`` files; other files and sub-folders are ignored.
        image_shape: ``(C, H, W)`` the GAN expects; C is 1 (grayscale, mode L) or 3 (RGB).
        convert: if False, an image of another size or channel count is an error naming the file;
            if True it is converted to L/RGB (alpha dropped) and resized bilinearly to H x W
            (aspect ratio not kept).

    A file that Pillow cannot decode (corrupt or not really an image) is **skipped with a
    warning** naming it, so one bad file among thousands does not stop a run; if no file can be
    read at all this is a ``DataError``.
    """
    from PIL import Image

    folder = Path(path)
    c, h, w = (int(s) for s in image_shape)
    if c not in _MODES:
        raise ConfigError(f"image_shape must have 1 (grayscale) or 3 (RGB) channels, got {c}")
    if not folder.is_dir():
        raise DataError(f"image folder {folder} does not exist (or is not a folder)")
    try:
        files = sorted(p for p in folder.iterdir() if p.is_file() and not p.name.startswith("."))
    except OSError as e:
        raise DataError(f"image folder {folder} cannot be read ({e.strerror or e}); check its permissions") from None
    candidates = [p for p in files if p.suffix.lower() in IMAGE_SUFFIXES]
    if not candidates:
        raise DataError(
            f"image folder {folder} holds no {'/'.join(IMAGE_SUFFIXES)} files ({len(files)} files found); "
            "put the images directly in it (sub-folders are not searched)"
        )
    mode, arrays, skipped = _MODES[c], [], []
    for f in candidates:
        try:
            with Image.open(f) as im:
                im.load()
                img = im.copy()
        except Exception as e:  # noqa: BLE001 -- Pillow raises many types on bad bytes; the file is untrusted input
            skipped.append(f"{f.name} ({type(e).__name__})")
            continue
        if img.mode in ("I;16", "I;16B", "I;16L", "I"):  # 16-bit grayscale: Pillow's convert would clip at 255; scale it
            img = Image.fromarray(np.clip(np.asarray(img, dtype=np.float64) / 257.0, 0, 255).round().astype(np.uint8), mode="L")
        if img.size != (w, h) or img.mode not in (mode, "1" if c == 1 else mode):
            if not convert:
                raise DataError(
                    f"{f} is {img.size[0]}x{img.size[1]} {img.mode} ({len(img.getbands())} channels); expected "
                    f"{w}x{h} {mode} ({c} channels). Pass convert=True (CLI: --convert) to convert and resize"
                )
            img = img.convert(mode)
            if img.size != (w, h):
                img = img.resize((w, h), Image.Resampling.BILINEAR)
        arr = np.asarray(img.convert(mode), dtype=np.uint8).reshape(h, w, c)
        arrays.append(arr.transpose(2, 0, 1))  # (C, H, W)
    if skipped:
        warnings.warn(f"{folder}: skipped {len(skipped)} unreadable image file(s): {', '.join(skipped[:10])}"
                      f"{' ...' if len(skipped) > 10 else ''}", stacklevel=2)
    if not arrays:
        raise DataError(f"none of the {len(candidates)} image files in {folder} could be read (all corrupt?)")
    x = torch.from_numpy(np.stack(arrays).astype(np.float32) / 127.5 - 1.0)  # (N, C, H, W)
    return ImageSet(x, None, folder.name)
