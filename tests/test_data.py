"""Data sets: digits, MNIST IDX files (reading, checks, download), image folders."""

from __future__ import annotations

import gzip
import io
import shutil
import tempfile
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from agu_lib.data import (
    IDX_IMAGES_MAGIC,
    IDX_LABELS_MAGIC,
    MNIST_SHA256,
    download_mnist,
    load_digits,
    load_folder,
    load_mnist,
    read_idx,
)
from agu_lib.errors import AguError, ConfigError, DataError

MNIST_TEST_COUNTS = [980, 1135, 1032, 1010, 982, 892, 958, 1028, 974, 1009]
IMAGES, LABELS = "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"


def idx_bytes(magic: int, array: np.ndarray) -> bytes:
    """An IDX file: magic, one big-endian uint32 per dimension, then the uint8 values."""
    header = magic.to_bytes(4, "big") + b"".join(int(d).to_bytes(4, "big") for d in array.shape)
    return header + array.astype(np.uint8).tobytes()


@pytest.fixture
def tiny_mnist(tmp_path) -> Path:
    """A folder with a 3-image MNIST-format test split (raw IDX files): pixels 0, 255, 128; labels 7, 0, 9."""
    images = np.stack([np.full((28, 28), v, np.uint8) for v in (0, 255, 128)])
    (tmp_path / IMAGES).write_bytes(idx_bytes(IDX_IMAGES_MAGIC, images))
    (tmp_path / LABELS).write_bytes(idx_bytes(IDX_LABELS_MAGIC, np.array([7, 0, 9])))
    return tmp_path


# ----------------------------------------------------------------------------------------
# digits


def test_digits_counts_and_range():
    d = load_digits()
    assert len(d) == 1797
    assert d.images.shape == (1797, 1, 16, 16) and d.images.dtype == torch.float32
    assert d.class_counts() == [178, 182, 177, 183, 181, 182, 181, 179, 174, 180]
    assert d.images.min() >= -1 and d.images.max() <= 1


# ----------------------------------------------------------------------------------------
# MNIST: real files


def test_mnist_test_split_gz(mnist_dir):
    d = load_mnist(mnist_dir, "test")
    assert d.images.shape == (10_000, 1, 28, 28) and d.images.dtype == torch.float32
    assert d.class_counts() == MNIST_TEST_COUNTS
    assert d.images.min().item() == -1.0 and d.images.max().item() == 1.0
    # MNIST is white strokes on black: the border is background (-1)
    assert (d.images[:, :, 0, :] == -1).float().mean() > 0.99


def test_mnist_test_split_raw_equals_gz(mnist_dir, tmp_path):
    for stem in (IMAGES, LABELS):
        (tmp_path / stem).write_bytes(gzip.decompress((mnist_dir / f"{stem}.gz").read_bytes()))
    raw, gz = load_mnist(tmp_path, "test"), load_mnist(mnist_dir, "test")
    assert raw.class_counts() == MNIST_TEST_COUNTS
    assert torch.equal(raw.images, gz.images) and torch.equal(raw.labels, gz.labels)


def test_mnist_default_folder_is_mnist_dir(mnist_dir, monkeypatch):
    monkeypatch.setenv("AGU_MNIST_DIR", str(mnist_dir))
    assert len(load_mnist()) == 10_000


# ----------------------------------------------------------------------------------------
# MNIST: synthetic files and what goes wrong


def test_mnist_pixels_map_to_minus_one_one(tiny_mnist):
    d = load_mnist(tiny_mnist, "test")
    assert d.images.shape == (3, 1, 28, 28)
    assert d.labels.tolist() == [7, 0, 9]
    assert d.images[0].unique().tolist() == [-1.0]
    assert d.images[1].unique().tolist() == [1.0]
    assert d.images[2].unique().item() == pytest.approx(128 / 127.5 - 1, abs=1e-6)
    assert load_mnist(tiny_mnist, "test", size=16).images.shape == (3, 1, 16, 16)


def test_mnist_missing_files(tmp_path):
    with pytest.raises(DataError, match="t10k-images-idx3-ubyte.gz.*AGU_MNIST_DIR"):
        load_mnist(tmp_path, "test")
    with pytest.raises(DataError, match="does not exist"):
        load_mnist(tmp_path / "nowhere")
    with pytest.raises(ConfigError, match="valid: test, train"):
        load_mnist(tmp_path, "validation")


def test_mnist_truncated_raw(tiny_mnist):
    path = tiny_mnist / IMAGES
    path.write_bytes(path.read_bytes()[:-100])
    with pytest.raises(DataError, match=r"truncated.*3x28x28.*Download it again"):
        load_mnist(tiny_mnist)


def test_mnist_too_long(tiny_mnist):
    path = tiny_mnist / LABELS
    path.write_bytes(path.read_bytes() + b"\0")
    with pytest.raises(DataError, match="longer than its header says"):
        load_mnist(tiny_mnist)


def test_mnist_truncated_gz(tiny_mnist):
    raw = (tiny_mnist / IMAGES).read_bytes()
    (tiny_mnist / IMAGES).unlink()
    (tiny_mnist / f"{IMAGES}.gz").write_bytes(gzip.compress(raw)[:-20])
    with pytest.raises(DataError, match=r"not a complete gzip file.*download"):
        load_mnist(tiny_mnist)


def test_mnist_swapped_files_wrong_magic(tiny_mnist):
    shutil.copy(tiny_mnist / LABELS, tiny_mnist / IMAGES)
    with pytest.raises(DataError, match=r"magic number 2049, expected 2051.*a label file.*swapped"):
        load_mnist(tiny_mnist)


def test_mnist_count_mismatch_and_bad_labels(tiny_mnist):
    (tiny_mnist / LABELS).write_bytes(idx_bytes(IDX_LABELS_MAGIC, np.array([1, 2])))
    with pytest.raises(DataError, match="3 images but .* 2 labels"):
        load_mnist(tiny_mnist)
    (tiny_mnist / LABELS).write_bytes(idx_bytes(IDX_LABELS_MAGIC, np.array([1, 2, 42])))
    with pytest.raises(DataError, match="label 42"):
        load_mnist(tiny_mnist)


def test_mnist_wrong_image_size(tiny_mnist):
    (tiny_mnist / IMAGES).write_bytes(idx_bytes(IDX_IMAGES_MAGIC, np.zeros((3, 32, 32))))
    with pytest.raises(DataError, match="32x32 images; MNIST's are 28x28"):
        load_mnist(tiny_mnist)


@settings(max_examples=80, deadline=None)
@given(data=st.binary(max_size=64), magic=st.sampled_from([IDX_IMAGES_MAGIC, IDX_LABELS_MAGIC]), gz=st.booleans())
def test_random_bytes_as_idx_raise_only_agu_errors(data, magic, gz):
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / ("f.gz" if gz else "f")
        path.write_bytes(gzip.compress(data) if gz and len(data) % 2 else data)
        try:
            read_idx(path, magic)
        except AguError:
            pass


@settings(max_examples=60, deadline=None)
@given(
    magic=st.sampled_from([IDX_IMAGES_MAGIC, IDX_LABELS_MAGIC, 2049 + 2, 0]),
    dims=st.lists(st.integers(0, 2**32 - 1) | st.integers(0, 30), min_size=1, max_size=3),
    payload=st.binary(max_size=200),
)
def test_random_idx_folders_raise_only_agu_errors(magic, dims, payload):
    """Plausible headers with random sizes and payloads, as both files of a split."""
    blob = magic.to_bytes(4, "big") + b"".join(d.to_bytes(4, "big") for d in dims) + payload
    with tempfile.TemporaryDirectory() as d:
        for stem in (IMAGES, LABELS):
            (Path(d) / stem).write_bytes(blob)
        try:
            load_mnist(d)
        except AguError:
            pass


# ----------------------------------------------------------------------------------------
# Download (offline: the fetcher is a stub)


def test_download_with_stub_fetcher(mnist_dir, tmp_path):
    urls = []

    def fetch(url, dest):
        urls.append(url)
        shutil.copy(mnist_dir / url.rsplit("/", 1)[1], dest)

    cache = tmp_path / "cache"
    assert download_mnist(cache, "test", fetch=fetch) == cache
    assert sorted(p.name for p in cache.iterdir()) == [f"{IMAGES}.gz", f"{LABELS}.gz"]  # no temp files left
    assert len(urls) == 2 and all(u.startswith("https://") for u in urls)
    assert load_mnist(cache).class_counts() == MNIST_TEST_COUNTS
    download_mnist(cache, "test", fetch=fetch)  # files already there and verified: no new fetch
    assert len(urls) == 2


def test_download_corrupt_bytes_rejected(tmp_path):
    def fetch(url, dest):
        Path(dest).write_bytes(b"<html>captive portal</html>")

    with pytest.raises(DataError, match=r"SHA-256.*Nothing was kept"):
        download_mnist(tmp_path, "test", fetch=fetch)
    assert list(tmp_path.iterdir()) == []  # the temporary file is gone, nothing half-written


def test_download_replaces_a_bad_cached_file(mnist_dir, tmp_path):
    (tmp_path / f"{IMAGES}.gz").write_bytes(b"truncated")
    download_mnist(tmp_path, "test", fetch=lambda url, dest: shutil.copy(mnist_dir / url.rsplit("/", 1)[1], dest))
    assert load_mnist(tmp_path).class_counts() == MNIST_TEST_COUNTS


def test_download_network_errors_try_mirrors(tmp_path):
    tried = []

    def fetch(url, dest):
        tried.append(url)
        raise OSError("network unreachable")

    with pytest.raises(DataError, match=r"could not download t10k-images.*network unreachable.*copy the MNIST"):
        download_mnist(tmp_path, "test", fetch=fetch)
    assert len(tried) >= 2 and len({u.rsplit("/", 1)[0] for u in tried}) == len(tried)
    assert list(tmp_path.iterdir()) == []


def test_download_knows_all_official_checksums():
    assert sorted(MNIST_SHA256) == sorted(f"{p}-{k}.gz" for p in ("t10k", "train")
                                          for k in ("images-idx3-ubyte", "labels-idx1-ubyte"))
    assert all(len(h) == 64 for h in MNIST_SHA256.values())
    with pytest.raises(ConfigError):
        download_mnist(".", "validation", fetch=lambda url, dest: None)


# ----------------------------------------------------------------------------------------
# Image folders


def save_png(path: Path, value: int, size=(28, 28), mode="L") -> None:
    color = value if mode == "L" else (value,) * len(mode)
    Image.new(mode, size, color).save(path)


def test_folder_loads_pngs_and_jpegs(tmp_path):
    save_png(tmp_path / "a.png", 0)
    save_png(tmp_path / "b.png", 255)
    Image.new("L", (28, 28), 128).save(tmp_path / "c.JPG", quality=100)
    (tmp_path / "notes.txt").write_text("ignored")
    d = load_folder(tmp_path, (1, 28, 28))
    assert d.images.shape == (3, 1, 28, 28) and d.labels is None and d.name == tmp_path.name
    assert d.images[0].unique().tolist() == [-1.0] and d.images[1].unique().tolist() == [1.0]
    assert d.images[2].mean().item() == pytest.approx(128 / 127.5 - 1, abs=0.02)


def test_folder_rgb(tmp_path):
    Image.new("RGB", (16, 16), (255, 0, 0)).save(tmp_path / "red.png")
    x = load_folder(tmp_path, (3, 16, 16)).images
    assert x.shape == (1, 3, 16, 16)
    assert x[0, :, 0, 0].tolist() == [1.0, -1.0, -1.0]


def test_folder_missing_or_empty(tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        load_folder(tmp_path / "nope", (1, 28, 28))
    with pytest.raises(DataError, match=r"holds no .png/.jpg/.jpeg files \(0 files found\)"):
        load_folder(tmp_path, (1, 28, 28))
    (tmp_path / "readme.md").write_text("x")
    with pytest.raises(DataError, match=r"\(1 files found\)"):
        load_folder(tmp_path, (1, 28, 28))
    with pytest.raises(ConfigError, match="1 .* or 3"):
        load_folder(tmp_path, (2, 28, 28))


def test_folder_corrupt_file_is_skipped_with_warning(tmp_path):
    save_png(tmp_path / "good.png", 255)
    (tmp_path / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"garbage" * 10)
    with pytest.warns(UserWarning, match=r"skipped 1 unreadable.*broken\.png"):
        d = load_folder(tmp_path, (1, 28, 28))
    assert len(d) == 1


def test_folder_only_corrupt_files(tmp_path):
    (tmp_path / "a.png").write_bytes(b"nope")
    (tmp_path / "b.jpg").write_bytes(b"")
    with pytest.warns(UserWarning), pytest.raises(DataError, match="none of the 2 image files"):
        load_folder(tmp_path, (1, 28, 28))


def test_folder_wrong_size_needs_convert(tmp_path):
    save_png(tmp_path / "a.png", 255)
    save_png(tmp_path / "big.png", 255, size=(64, 48))
    with pytest.raises(DataError, match=r"big\.png is 64x48 L .*expected 28x28 L .*convert=True \(CLI: --convert\)"):
        load_folder(tmp_path, (1, 28, 28))
    d = load_folder(tmp_path, (1, 28, 28), convert=True)
    assert d.images.shape == (2, 1, 28, 28)
    assert d.images.min().item() == pytest.approx(1.0)


def test_folder_wrong_channels_needs_convert(tmp_path):
    save_png(tmp_path / "rgba.png", 200, mode="RGBA")
    with pytest.raises(DataError, match=r"rgba\.png is 28x28 RGBA \(4 channels\); expected 28x28 L \(1 channels\)"):
        load_folder(tmp_path, (1, 28, 28))
    assert load_folder(tmp_path, (1, 28, 28), convert=True).images.shape == (1, 1, 28, 28)
    assert load_folder(tmp_path, (3, 16, 16), convert=True).images.shape == (1, 3, 16, 16)


def _png_bytes() -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.arange(28 * 28, dtype=np.uint8).reshape(28, 28)).save(buf, format="PNG")
    return buf.getvalue()


PNG = _png_bytes()


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    data=st.one_of(
        st.binary(max_size=256),
        st.binary(max_size=64).map(lambda b: b"\x89PNG\r\n\x1a\n" + b),
        st.integers(0, len(PNG)).map(lambda n: PNG[:n]),
        st.tuples(st.integers(0, len(PNG) - 1), st.integers(0, 255)).map(
            lambda t: PNG[: t[0]] + bytes([t[1]]) + PNG[t[0] + 1:]),
    ),
    suffix=st.sampled_from([".png", ".jpg"]),
    convert=st.booleans(),
)
def test_random_bytes_as_images_raise_only_agu_errors(data, suffix, convert):
    with tempfile.TemporaryDirectory() as d, warnings.catch_warnings():
        warnings.simplefilter("ignore")
        (Path(d) / f"x{suffix}").write_bytes(data)
        try:
            out = load_folder(d, (1, 28, 28), convert=convert)
        except AguError:
            return
        assert out.images.shape == (1, 1, 28, 28)
        assert out.images.min() >= -1 and out.images.max() <= 1
