"""A researcher's own GAN through save_gan, load_gan and ``--import``: a GAN whose arch_kwargs do not
rebuild its modules is refused when saved (not when loaded), a builder that reads tensor values while
it builds (which the meta device cannot do) loads, and an imported file can import its sibling files."""

from __future__ import annotations

import json
import pickle
import sys
import textwrap

import pytest
import torch
from torch import nn

import agu_lib
from agu_lib import cli
from agu_lib.checkpoint import load_gan, save_gan
from agu_lib.errors import CheckpointError, ConfigError
from agu_lib.models import ARCHITECTURES, IMPORTED, build_gan

SHAPE = (1, 4, 4)
LATENT = 4


class WidthG(nn.Module):
    """z (N, 4) -> Linear(4, ngf) -> ReLU -> Linear(ngf, 16) -> tanh -> (N, 1, 4, 4): ``ngf`` is a builder argument."""

    def __init__(self, latent_dim: int, ngf: int):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(latent_dim, ngf), nn.ReLU(), nn.Linear(ngf, 16), nn.Tanh())

    def forward(self, z):
        return self.net(z).view(-1, *SHAPE)


class ValueReadingG(WidthG):
    """A WidthG that reads tensor values while it is built (``.item()``, ``int(t)``, ``.tolist()``)."""

    def __init__(self, latent_dim: int, width: int):
        widths = torch.tensor([width, 16])
        hidden, out = widths.tolist()
        assert int(widths[0]) == int(torch.tensor(hidden).item()) and out == 16
        super().__init__(latent_dim, hidden)


def small_d() -> nn.Sequential:
    return nn.Sequential(nn.Flatten(), nn.Linear(16, 1))


def build_width(latent_dim, image_shape, ngf=8):
    return WidthG(latent_dim, ngf), small_d()


def build_value_reading(latent_dim, image_shape, width=8):
    return ValueReadingG(latent_dim, width), small_d()


@pytest.fixture
def register():
    """``register(name, builder)``: an architecture registered for one test only."""
    names = []

    def register(name, builder):
        agu_lib.register_architecture(name, builder)
        names.append(name)

    yield register
    for name in names:
        ARCHITECTURES.pop(name, None)


def same_samples(a, b) -> bool:
    return torch.equal(a.sample(8, seed=1), b.sample(8, seed=1))


# ----------------------------------------------------------------------------------------
# B5: save_gan checks that arch and arch_kwargs rebuild the GAN's modules


def test_save_gan_refuses_modules_that_its_arch_kwargs_do_not_rebuild(register, tmp_path):
    register("own-width", build_width)
    torch.manual_seed(0)
    wrong_g = agu_lib.GAN(WidthG(LATENT, 16), small_d(), LATENT, SHAPE, arch="own-width", arch_kwargs={"ngf": 8})
    with pytest.raises(ConfigError, match=r"its generator is not what architecture 'own-width' builds with "
                                          r"arch_kwargs \{'ngf': 8\} \(net\.0\.weight is of shape \(16, 4\) in the "
                                          r"GAN but of shape \(8, 4\) when rebuilt\).*arch_kwargs must be the "
                                          r"arguments the modules were built with.*nothing was saved"):
        save_gan(wrong_g, tmp_path / "gan")
    wrong_d = agu_lib.GAN(WidthG(LATENT, 8), nn.Sequential(nn.Flatten(), nn.Linear(16, 2), nn.Linear(2, 1)), LATENT,
                          SHAPE, arch="own-width", arch_kwargs={"ngf": 8})
    with pytest.raises(ConfigError, match=r"its discriminator .*1\.weight is of shape \(2, 16\) in the GAN but of "
                                          r"shape \(1, 16\) when rebuilt"):
        save_gan(wrong_d, tmp_path / "gan")
    assert list(tmp_path.iterdir()) == []  # nothing written, no partial folder

    right = agu_lib.GAN(WidthG(LATENT, 16), small_d(), LATENT, SHAPE, arch="own-width", arch_kwargs={"ngf": 16})
    loaded = load_gan(save_gan(right, tmp_path / "gan"))
    assert loaded.arch_kwargs == {"ngf": 16} and same_samples(right, loaded)


def test_shipped_mlp_and_ad_hoc_gans_save_as_before(tmp_path):
    """(A guard for the check above: the GANs agu builds itself still save; an ad-hoc one keeps its error.)"""
    digits = load_gan("digits")
    assert same_samples(digits, load_gan(save_gan(digits, tmp_path / "digits")))
    torch.manual_seed(0)
    mlp = build_gan("mlp", 8, (1, 8, 8), g_hidden=[8], d_hidden=[6])
    assert same_samples(mlp, load_gan(save_gan(mlp, tmp_path / "mlp")))
    ad_hoc = agu_lib.GAN(WidthG(LATENT, 8), small_d(), LATENT, SHAPE)
    with pytest.raises(CheckpointError, match="no registered architecture.*register_architecture"):
        save_gan(ad_hoc, tmp_path / "ad-hoc")
    assert not (tmp_path / "ad-hoc").exists()


# ----------------------------------------------------------------------------------------
# B6: load_gan builds on the CPU a builder that cannot run on the meta device


def test_a_builder_that_reads_tensor_values_saves_and_loads(register, tmp_path):
    register("own-value-reading", build_value_reading)
    torch.manual_seed(0)
    gan = build_gan("own-value-reading", LATENT, SHAPE, width=12)
    rng = torch.get_rng_state()
    saved = save_gan(gan, tmp_path / "gan")
    assert torch.equal(rng, torch.get_rng_state())  # the check before saving (a CPU build here) draws nothing
    loaded = load_gan(saved)
    assert loaded.arch_kwargs == {"width": 12} and same_samples(gan, loaded)


def test_the_cpu_build_keeps_the_size_guard_and_blames_a_failing_builder(register, tmp_path):
    register("own-value-reading", build_value_reading)
    saved = save_gan(build_gan("own-value-reading", LATENT, SHAPE, width=12), tmp_path / "gan")
    card = json.loads((saved / "card.json").read_text())
    (saved / "card.json").write_text(json.dumps({**card, "arch_kwargs": {"width": 3 * 10**6}}))
    with pytest.raises(CheckpointError, match=r"card\.json describes a GAN that cannot be built: it has [\d,]+ "
                                              r"parameters but the weights hold only"):
        load_gan(saved)  # the 12-million-element weight the edited card asks for: far more than the files hold

    (saved / "card.json").write_text(json.dumps(card))

    def changed_builder(latent_dim, image_shape, width=8):
        raise ValueError(f"width {width} must be even")

    register("own-value-reading", changed_builder)  # the builder was changed after saving
    with pytest.raises(CheckpointError, match=r"architecture 'own-value-reading' fails to build with the "
                                              r"arch_kwargs \{'width': 12\} of its card\.json \(ValueError: width 12 "
                                              r"must be even\)\. Check that the builder registered as "
                                              r"'own-value-reading' is the one"):
        load_gan(saved)


# ----------------------------------------------------------------------------------------
# B7: --import my_gan.py can import the files beside it


@pytest.fixture
def my_gan_file(tmp_path, monkeypatch):
    """``my_gan.py`` that registers ``own-sibling-gan`` from the classes of its sibling ``own_gan_layers.py``,
    forgotten (module, registration, sys.path entry) after the test."""
    monkeypatch.setattr(sys, "path", list(sys.path))
    folder = tmp_path / "code"
    folder.mkdir()
    (folder / "own_gan_layers.py").write_text(textwrap.dedent("""
        from torch import nn

        class SiblingG(nn.Module):
            def __init__(self, latent_dim):
                super().__init__()
                self.net = nn.Sequential(nn.Linear(latent_dim, 8), nn.ReLU(), nn.Linear(8, 16), nn.Tanh())

            def forward(self, z):
                return self.net(z).view(-1, 1, 4, 4)
    """))
    (folder / "my_gan.py").write_text(textwrap.dedent("""
        import agu_lib
        from torch import nn

        from own_gan_layers import SiblingG

        def build(latent_dim, image_shape):
            return SiblingG(latent_dim), nn.Sequential(nn.Flatten(), nn.Linear(16, 1))

        agu_lib.register_architecture("own-sibling-gan", build)
    """))
    yield folder / "my_gan.py"
    ARCHITECTURES.pop("own-sibling-gan", None)
    for name in ("my_gan", "own_gan_layers"):
        sys.modules.pop(name, None)
    while str(folder / "my_gan.py") in IMPORTED:
        IMPORTED.remove(str(folder / "my_gan.py"))


def test_an_imported_file_can_import_its_sibling_files_here_and_in_workers(my_gan_file, tmp_path, capsys):
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    from agu_lib.models import import_architectures

    agu_lib.register_architecture("own-sibling-gan", build_width)  # (the same shapes, registered here to save the GAN)
    torch.manual_seed(0)
    gan_dir = save_gan(build_gan("own-sibling-gan", LATENT, SHAPE), tmp_path / "gan")
    ARCHITECTURES.pop("own-sibling-gan")  # a fresh process: only the file registers it

    assert cli.main(["info", str(gan_dir), "--import", str(my_gan_file)]) == 0, capsys.readouterr().err
    assert "own-sibling-gan" in capsys.readouterr().out
    assert sys.path[0] == str(my_gan_file.parent)
    gan = load_gan(gan_dir)
    assert type(gan.generator).__module__ == "own_gan_layers"

    # agu table --jobs: spawned workers import the same files (initializer) and unpickle the GAN's modules
    with ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn"), initializer=import_architectures,
                             initargs=([str(my_gan_file)],)) as pool:
        back = next(pool.map(pickle.loads, [pickle.dumps(gan.generator)]))
    assert type(back).__name__ == "SiblingG"
