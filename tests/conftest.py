"""Shared fixtures: tiny seeded models and the locations of shared data (skipped when absent).

Tests run offline on a CPU in seconds; shared data comes from ``$AGU_MNIST_DIR`` /
``$AGU_THIRD_PARTY_DIR`` (default ``<repo>/../shared/data/...``), never from absolute paths.
"""

from __future__ import annotations

import pytest
import torch

from agu_lib import cli
from agu_lib.data import mnist_dir as _mnist_dir
from agu_lib.data import third_party_dir as _third_party_dir
from agu_lib.feedback import PredicateOracle, collect
from agu_lib.models import build_gan

torch.set_num_threads(1)  # the test machines are small and shared
cli.DEFAULT_THREADS = 1  # the CLI's --threads default too (2 for users): the thresholds here were measured on one thread


@pytest.fixture(autouse=True)
def _one_thread_again():
    """A test that runs the CLI with --threads N must not leave the other tests on N threads."""
    yield
    torch.set_num_threads(1)


def make_tiny_gan(arch: str = "dcgan"):
    """A freshly initialised, seeded 16x16 grayscale GAN with latent_dim 8: a DCGAN with 8 channels, or an
    MLP with two hidden layers of 32 (``tests/test_gpu.py`` imports it)."""
    torch.manual_seed(0)
    if arch == "dcgan":
        return build_gan("dcgan", 8, (1, 16, 16), channels=8)
    return build_gan("mlp", 8, (1, 16, 16), g_hidden=(32, 32), d_hidden=(32, 32))


@pytest.fixture
def tiny_gan():
    """``make_tiny_gan()``: the DCGAN."""
    return make_tiny_gan()


def bright(x):
    """Negative = brighter than average (a predicate that splits a random GAN's samples)."""
    m = x.flatten(1).mean(1)
    return m > m.median()


@pytest.fixture
def feedback(tiny_gan):
    """64 samples of ``tiny_gan`` split by ``bright``: 32 negatives, 32 positives, with their latents."""
    return collect(tiny_gan, PredicateOracle(bright), 64, seed=0, min_negatives=8)


@pytest.fixture
def mnist_dir():
    """The folder with MNIST's IDX files; skips the test when there is none."""
    d = _mnist_dir()
    if d is None:
        pytest.skip("MNIST IDX files not found: set AGU_MNIST_DIR to a folder holding t10k-images-idx3-ubyte.gz etc.")
    return d


@pytest.fixture
def third_party_dir():
    """The folder with third-party checkpoints; skips the test when there is none."""
    d = _third_party_dir()
    if d is None:
        pytest.skip("third-party checkpoints not found: set AGU_THIRD_PARTY_DIR to the folder holding csinva_mnist_mlp_gan/")
    return d


@pytest.fixture
def evaluation_refused(monkeypatch):
    """The pipeline's evaluation context refuses the GAN (as for images outside its range on some latent),
    and any stage that runs before that refusal fails the test."""
    from agu_lib import pipeline
    from agu_lib.errors import ConfigError

    def refuse(*args, **kwargs):
        raise ConfigError("the generator's images reach [-1, 1.5] (1 of 20 samples leave it), outside its output range [-1, 1]")

    def no_stage(*args, **kwargs):
        raise AssertionError("a stage ran before the evaluation's check")

    monkeypatch.setattr(pipeline, "make_context", refuse)
    monkeypatch.setattr(pipeline, "adapt", no_stage)
    monkeypatch.setattr(pipeline, "retrain_from_scratch", no_stage)
