"""The GAN abstraction and the built-in architectures."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from agu_lib.checkpoint import load_gan, save_gan
from agu_lib.errors import ConfigError
from agu_lib.models import ARCHITECTURES, GAN, build_gan, generator_params, register_architecture


@pytest.mark.parametrize("size", [16, 28, 32])
@pytest.mark.parametrize("channels", [1, 3])
def test_dcgan_shapes_and_range(size, channels):
    torch.manual_seed(0)
    gan = build_gan("dcgan", 8, (channels, size, size), channels=8)
    with torch.no_grad():
        x = gan.generate(gan.sample_latents(3, seed=0))
        assert x.shape == (3, channels, size, size)
        assert x.min() >= -1 and x.max() <= 1
        assert gan.discriminate(x).shape == (3,)


def test_dcgan_bad_size():
    with pytest.raises(ConfigError, match="16, 28 or 32"):
        build_gan("dcgan", 8, (1, 17, 17))
    with pytest.raises(ConfigError, match="square"):
        build_gan("dcgan", 8, (1, 16, 32))


def test_mlp_shapes_and_range():
    gan = build_gan("mlp", 4, (1, 28, 28), g_hidden=[16], d_hidden=[8, 8])
    with torch.no_grad():
        x = gan.generate(gan.sample_latents(5, seed=1))
        assert x.shape == (5, 1, 28, 28) and x.min() >= -1 and x.max() <= 1
        assert gan.discriminate(x).shape == (5,)
    # layer layout the foreign importer relies on: Linear at layers.0, 2, 4, ...
    assert [k for k in gan.generator.state_dict() if k.endswith("weight")] == ["layers.0.weight", "layers.2.weight"]


def test_sample_latents_deterministic(tiny_gan):
    a, b = tiny_gan.sample_latents(4, seed=5), tiny_gan.sample_latents(4, seed=5)
    assert a.shape == (4, 8) and torch.equal(a, b)
    assert not torch.equal(a, tiny_gan.sample_latents(4, seed=6))
    assert torch.equal(tiny_gan.sample(4, seed=5), tiny_gan.sample(4, seed=5))


def test_user_modules_wrapped():
    """Any generator/discriminator pair works, including flat outputs and (N, 1) logits."""
    g = nn.Sequential(nn.Linear(3, 2 * 5 * 5), nn.Tanh())  # flat (N, 50)
    d = nn.Sequential(nn.Flatten(), nn.Linear(2 * 5 * 5, 1))  # (N, 1)
    gan = GAN(g, d, latent_dim=3, image_shape=(2, 5, 5))
    x = gan.generate(gan.sample_latents(6))
    assert x.shape == (6, 2, 5, 5)
    assert gan.discriminate(x).shape == (6,)
    assert len(generator_params(gan)) == 2
    with pytest.raises(ConfigError, match=r"\(C, H, W\)"):
        GAN(g, d, 3, (50,))


def test_clone_is_independent(tiny_gan):
    c = tiny_gan.clone()
    with torch.no_grad():
        next(c.generator.parameters()).add_(1.0)
    assert not torch.equal(next(c.generator.parameters()), next(tiny_gan.generator.parameters()))


def test_unknown_arch_lists_valid_names():
    with pytest.raises(ConfigError, match=r"unknown architecture 'vae'; valid: .*dcgan, mlp"):
        build_gan("vae", 8, (1, 16, 16))
    with pytest.raises(ConfigError, match="bad arguments for architecture 'dcgan'"):
        build_gan("dcgan", 8, (1, 16, 16), depth=3)


class _TinyG(nn.Module):
    def __init__(self, latent_dim, image_shape, width):
        super().__init__()
        self.image_shape = image_shape
        self.net = nn.Sequential(nn.Linear(latent_dim, width), nn.ReLU(), nn.Linear(width, 1 * 4 * 4), nn.Tanh())

    def forward(self, z):
        return self.net(z).view(-1, *self.image_shape)


def _tiny_builder(latent_dim, image_shape, width=6):
    return _TinyG(latent_dim, image_shape, width), nn.Sequential(nn.Flatten(), nn.Linear(16, 1))


@pytest.fixture
def tiny_arch():
    register_architecture("tiny-test", _tiny_builder)
    yield "tiny-test"
    ARCHITECTURES.pop("tiny-test", None)


def test_registered_arch_saves_and_loads(tiny_arch, tmp_path):
    torch.manual_seed(0)
    gan = build_gan(tiny_arch, 3, (1, 4, 4), width=5)
    save_gan(gan, tmp_path / "g")
    loaded = load_gan(tmp_path / "g")
    z = gan.sample_latents(2)
    with torch.no_grad():
        assert torch.equal(loaded.generate(z), gan.generate(z))
    assert loaded.arch == tiny_arch and loaded.arch_kwargs == {"width": 5}
