"""Importing third-party checkpoints: the shared MNIST MLP GAN, wrappers, refusals, the CLI."""

from __future__ import annotations

import hashlib
import itertools
import os
import pickle

import pytest
import torch
import torch.nn.functional as F

from agu_lib.checkpoint import load_gan, save_gan
from agu_lib.cli import main
from agu_lib.errors import CheckpointError, ConfigError
from agu_lib.foreign import import_gan
from agu_lib.models import build_gan


def mlp_state(sizes, seed=0) -> dict[str, torch.Tensor]:
    """A foreign-style Sequential state dict: Linear layers at 0, 2, 4, ... with the given sizes."""
    gen = torch.Generator().manual_seed(seed)
    sd = {}
    for j, (a, b) in enumerate(itertools.pairwise(sizes)):
        sd[f"{2 * j}.weight"] = torch.randn(b, a, generator=gen) * 0.1
        sd[f"{2 * j}.bias"] = torch.randn(b, generator=gen) * 0.1
    return sd


@pytest.fixture
def foreign_pair(tmp_path):
    """Small foreign MLP G (4 -> 8 -> 16) and D (16 -> 6 -> 1) saved with torch.save, for 1x4x4 images."""
    g, d = tmp_path / "G.pt", tmp_path / "D.pt"
    torch.save(mlp_state([4, 8, 16], seed=1), g)
    torch.save(mlp_state([16, 6, 1], seed=2), d)
    return g, d


def test_import_small_mlp_matches_foreign_forward(foreign_pair, tmp_path):
    g_path, d_path = foreign_pair
    out = import_gan("mlp", g_path, d_path, 4, (1, 4, 4), tmp_path / "gan")
    gan = load_gan(out)
    assert gan.arch_kwargs == {"g_hidden": [8], "d_hidden": [6]}
    g, d = torch.load(g_path), torch.load(d_path)
    z = gan.sample_latents(3, seed=0)
    # foreign G: Linear, ReLU, Linear, Tanh; foreign D: Linear, LeakyReLU(0.2), Linear, (Sigmoid)
    x_ref = torch.tanh(F.linear(F.relu(F.linear(z, g["0.weight"], g["0.bias"])), g["2.weight"], g["2.bias"]))
    with torch.no_grad():
        x = gan.generate(z)
        torch.testing.assert_close(x, x_ref.view(3, 1, 4, 4))
        logit_ref = F.linear(F.leaky_relu(F.linear(x.flatten(1), d["0.weight"], d["0.bias"]), 0.2), d["2.weight"], d["2.bias"])
        torch.testing.assert_close(gan.discriminate(x), logit_ref.squeeze(1))


def test_import_shared_mnist_mlp_gan(third_party_dir, tmp_path):
    src = third_party_dir / "csinva_mnist_mlp_gan"
    g_path, d_path = src / "G--300.ckpt", src / "D--300.ckpt"
    out = import_gan("mlp", g_path, d_path, 64, (1, 28, 28), tmp_path / "mnist-mlp", provenance={"license": "MIT"})
    gan = load_gan(out)
    assert gan.arch_kwargs == {"g_hidden": [256, 256], "d_hidden": [256, 256]}  # read from the weights
    with torch.no_grad():
        x = gan.generate(gan.sample_latents(4, seed=0))
        assert x.shape == (4, 1, 28, 28)
        assert x.min() >= -1 and x.max() <= 1
        # trained MNIST generator: mostly black background with some white strokes
        assert (x < -0.9).float().mean() > 0.5 and (x > 0.5).float().mean() > 0.03
        assert gan.discriminate(x).shape == (4,)
    prov = gan.card["provenance"]
    assert prov["license"] == "MIT"
    assert "G--300.ckpt" in prov["imported_from"] and "D--300.ckpt" in prov["imported_from"]
    assert prov["source_files"]["generator"]["sha256"] == hashlib.sha256(g_path.read_bytes()).hexdigest()
    assert prov["source_files"]["discriminator"]["sha256"] == hashlib.sha256(d_path.read_bytes()).hexdigest()
    assert any("Sigmoid" in n for n in prov["notes"])


@pytest.mark.parametrize("wrap", ["state_dict", "model", "G_and_D", "module_prefix"])
def test_wrapped_state_dicts(foreign_pair, tmp_path, wrap):
    g, d = (torch.load(p) for p in foreign_pair)
    if wrap == "G_and_D":  # one file with both
        both = tmp_path / "both.pt"
        torch.save({"G": g, "D": d, "epoch": 300}, both)
        g_path = d_path = both
    else:
        g_path, d_path = tmp_path / "g2.pt", tmp_path / "d2.pt"
        if wrap == "module_prefix":
            torch.save({f"module.{k}": v for k, v in g.items()}, g_path)
            torch.save({f"module.{k}": v for k, v in d.items()}, d_path)
        else:
            torch.save({wrap: g, "epoch": 3}, g_path)
            torch.save({wrap: d, "epoch": 3}, d_path)
    gan = load_gan(import_gan("mlp", g_path, d_path, 4, (1, 4, 4), tmp_path / "gan"))
    torch.testing.assert_close(gan.generator.state_dict()["layers.2.weight"], g["2.weight"])


class _OpenFile:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (open, (str(self.marker), "w"))


class _Shell:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


@pytest.mark.parametrize("payload", [_OpenFile, _Shell])
@pytest.mark.parametrize("how", ["pickle", "torch.save"])
def test_malicious_pickle_refused_and_never_run(foreign_pair, tmp_path, payload, how):
    marker = tmp_path / "pwned"
    evil = tmp_path / "evil.ckpt"
    obj = {"0.weight": torch.zeros(2, 2), "x": payload(marker)}
    if how == "pickle":
        evil.write_bytes(pickle.dumps(obj, protocol=2))
    else:
        torch.save(obj, evil)
    with pytest.raises(CheckpointError, match="refused: the file holds Python objects other than tensors.*never unpickles code"):
        import_gan("mlp", evil, foreign_pair[1], 4, (1, 4, 4), tmp_path / "gan")
    assert not marker.exists()
    assert not (tmp_path / "gan").exists()


def test_not_a_state_dict(foreign_pair, tmp_path):
    d_path = foreign_pair[1]
    for obj, what in [([torch.zeros(2)], "list"), (torch.zeros(2), "Tensor")]:
        torch.save(obj, tmp_path / "x.pt")
        with pytest.raises(CheckpointError, match=f"holds a {what}, not a state dict"):
            import_gan("mlp", tmp_path / "x.pt", d_path, 4, (1, 4, 4), tmp_path / "gan")
    torch.save({"epoch": 3, "lr": 0.1}, tmp_path / "x.pt")
    with pytest.raises(CheckpointError, match=r"without a generator state dict \(keys: \['epoch', 'lr'\]\)"):
        import_gan("mlp", tmp_path / "x.pt", d_path, 4, (1, 4, 4), tmp_path / "gan")


def test_unreadable_files(foreign_pair, tmp_path):
    g_path, d_path = foreign_pair
    with pytest.raises(CheckpointError, match="does not exist"):
        import_gan("mlp", tmp_path / "none.pt", d_path, 4, (1, 4, 4), tmp_path / "gan")
    trunc = tmp_path / "trunc.pt"
    trunc.write_bytes(g_path.read_bytes()[:200])
    with pytest.raises(CheckpointError, match="not a readable PyTorch checkpoint|refused"):
        import_gan("mlp", trunc, d_path, 4, (1, 4, 4), tmp_path / "gan")
    trunc.write_bytes(b"")
    with pytest.raises(CheckpointError, match="not a readable PyTorch checkpoint"):
        import_gan("mlp", trunc, d_path, 4, (1, 4, 4), tmp_path / "gan")


def test_mismatched_shapes_name_the_layers(foreign_pair, tmp_path):
    d_path = foreign_pair[1]
    bad = mlp_state([4, 8, 16])
    bad["2.weight"] = torch.zeros(16, 9)
    torch.save(bad, tmp_path / "bad.pt")
    with pytest.raises(CheckpointError, match="layer 0 outputs 8 values but layer 2 takes 9"):
        import_gan("mlp", tmp_path / "bad.pt", d_path, 4, (1, 4, 4), tmp_path / "gan")
    bad = mlp_state([4, 8, 16])
    bad["2.bias"] = torch.zeros(3)
    torch.save(bad, tmp_path / "bad.pt")
    with pytest.raises(CheckpointError, match=r"layer 2 is not a Linear layer with bias"):
        import_gan("mlp", tmp_path / "bad.pt", d_path, 4, (1, 4, 4), tmp_path / "gan")
    torch.save({"fc.weight": torch.zeros(16, 4)}, tmp_path / "bad.pt")
    with pytest.raises(CheckpointError, match="'fc.weight'.*is this an mlp checkpoint"):
        import_gan("mlp", tmp_path / "bad.pt", d_path, 4, (1, 4, 4), tmp_path / "gan")


def test_wrong_latent_dim_or_image_shape(foreign_pair, tmp_path):
    g_path, d_path = foreign_pair
    with pytest.raises(CheckpointError, match="first layer takes 4 inputs, but latent_dim is 5"):
        import_gan("mlp", g_path, d_path, 5, (1, 4, 4), tmp_path / "gan")
    with pytest.raises(CheckpointError, match=r"last layer gives 16 outputs, but C\*H\*W of image_shape \(3, 4, 4\) is 48"):
        import_gan("mlp", g_path, d_path, 4, (3, 4, 4), tmp_path / "gan")
    torch.save(mlp_state([16, 6, 2]), tmp_path / "d2.pt")
    with pytest.raises(CheckpointError, match=r"discriminator's last layer gives 2 outputs, but one logit per image is 1"):
        import_gan("mlp", g_path, tmp_path / "d2.pt", 4, (1, 4, 4), tmp_path / "gan")
    with pytest.raises(CheckpointError, match=r"discriminator's first layer takes 4 inputs, but C\*H\*W"):
        import_gan("mlp", g_path, g_path, 4, (1, 4, 4), tmp_path / "gan")
    with pytest.raises(ConfigError, match="not registered; known: dcgan, .*--import my_gan.py"):
        import_gan("stylegan", g_path, d_path, 4, (1, 4, 4), tmp_path / "gan")
    assert not (tmp_path / "gan").exists()


def test_non_finite_weights(foreign_pair, tmp_path):
    sd = mlp_state([4, 8, 16])
    sd["0.weight"][0, 0] = float("nan")
    torch.save(sd, tmp_path / "nan.pt")
    with pytest.raises(CheckpointError, match=r"non-finite.*0\.weight"):
        import_gan("mlp", tmp_path / "nan.pt", foreign_pair[1], 4, (1, 4, 4), tmp_path / "gan")


def test_refuses_to_overwrite_a_foreign_folder(foreign_pair, tmp_path):
    precious = tmp_path / "photos"
    precious.mkdir()
    (precious / "a.jpg").write_bytes(b"x")
    with pytest.raises(CheckpointError, match="not an agu checkpoint directory"):
        import_gan("mlp", *foreign_pair, 4, (1, 4, 4), precious)
    assert (precious / "a.jpg").read_bytes() == b"x"
    out = import_gan("mlp", *foreign_pair, 4, (1, 4, 4), tmp_path / "gan")
    import_gan("mlp", *foreign_pair, 4, (1, 4, 4), out)  # replacing an agu GAN directory is fine


def test_import_dcgan_with_agu_key_names(tmp_path):
    torch.manual_seed(0)
    src = build_gan("dcgan", 8, (1, 16, 16), channels=16, d_channels=8)
    torch.save(src.generator.state_dict(), tmp_path / "g.pt")
    torch.save({"state_dict": src.discriminator.state_dict()}, tmp_path / "d.pt")
    gan = load_gan(import_gan("dcgan", tmp_path / "g.pt", tmp_path / "d.pt", 8, (1, 16, 16), tmp_path / "gan"))
    assert gan.arch_kwargs == {"channels": 16, "d_channels": 8}
    z = src.sample_latents(2)
    with torch.no_grad():
        torch.testing.assert_close(gan.generate(z), src.generate(z))
        torch.testing.assert_close(gan.discriminate(src.generate(z)), src.discriminate(src.generate(z)))
    with pytest.raises(CheckpointError, match="latent_dim is 9"):
        import_gan("dcgan", tmp_path / "g.pt", tmp_path / "d.pt", 9, (1, 16, 16), tmp_path / "gan2")
    torch.save(mlp_state([8, 16]), tmp_path / "m.pt")
    with pytest.raises(CheckpointError, match="agu's own DCGAN key names"):
        import_gan("dcgan", tmp_path / "m.pt", tmp_path / "d.pt", 8, (1, 16, 16), tmp_path / "gan2")


def test_cli_import_gan_end_to_end(third_party_dir, tmp_path, capsys):
    src = third_party_dir / "csinva_mnist_mlp_gan"
    out = tmp_path / "mnist-mlp"
    rc = main(["import-gan", "--arch", "mlp", "--generator", str(src / "G--300.ckpt"), "--discriminator",
               str(src / "D--300.ckpt"), "--latent-dim", "64", "--image-shape", "1,28,28", "--out", str(out),
               "--source", "github.com/csinva/gan-vae-pretrained-pytorch"])
    assert rc == 0
    assert "imported mlp GAN" in capsys.readouterr().out
    gan = load_gan(out)
    assert gan.image_shape == (1, 28, 28) and gan.card["provenance"]["source"].startswith("github.com/csinva")
    assert gan.sample(2).shape == (2, 1, 28, 28)


def test_cli_import_gan_small_files(foreign_pair, tmp_path, capsys):
    g, d = foreign_pair
    rc = main(["import-gan", "--arch", "mlp", "--generator", str(g), "--discriminator", str(d),
               "--latent-dim", "4", "--image-shape", "1,4,4", "--out", str(tmp_path / "gan")])
    assert rc == 0
    assert load_gan(tmp_path / "gan").arch_kwargs == {"g_hidden": [8], "d_hidden": [6]}


@pytest.mark.parametrize("shape", ["1,28", "a,b,c", "0,28,28", "1,28,28,1", ""])
def test_cli_bad_image_shape(foreign_pair, tmp_path, capsys, shape):
    g, d = foreign_pair
    rc = main(["import-gan", "--arch", "mlp", "--generator", str(g), "--discriminator", str(d),
               "--latent-dim", "4", "--image-shape", shape, "--out", str(tmp_path / "gan")])
    err = capsys.readouterr().err
    assert rc == 2
    assert "--image-shape must be C,H,W" in err and "e.g. 1,28,28" in err
    assert "Traceback" not in err
    assert not (tmp_path / "gan").exists()


def test_cli_import_error_is_one_line(foreign_pair, tmp_path, capsys):
    g, d = foreign_pair
    rc = main(["import-gan", "--arch", "mlp", "--generator", str(g), "--discriminator", str(d),
               "--latent-dim", "7", "--image-shape", "1,4,4", "--out", str(tmp_path / "gan")])
    err = capsys.readouterr().err
    assert rc == 2 and err.startswith("agu import-gan: error:") and "latent_dim is 7" in err
    assert "Traceback" not in err


def test_save_gan_of_imported_is_plain_agu(foreign_pair, tmp_path):
    """An imported GAN is an ordinary agu GAN: it can be trained, re-saved and re-loaded."""
    gan = load_gan(import_gan("mlp", *foreign_pair, 4, (1, 4, 4), tmp_path / "a"))
    gan2 = load_gan(save_gan(gan, tmp_path / "b"))
    assert gan2.card["provenance"] == gan.card["provenance"]


def test_cli_import_gan_of_uniform_latents(foreign_pair, tmp_path, capsys):
    """--latent-prior uniform: the imported generator is fed erf(z / sqrt(2)), U(-1, 1), for agu's z ~ N(0, I)."""
    g_path, d_path = foreign_pair
    rc = main(["import-gan", "--arch", "mlp", "--generator", str(g_path), "--discriminator", str(d_path),
               "--latent-dim", "4", "--image-shape", "1,4,4", "--latent-prior", "uniform", "--out", str(tmp_path / "gan")])
    assert rc == 0 and "latents U(-1, 1)" in capsys.readouterr().out
    gan = load_gan(tmp_path / "gan")
    assert gan.latent_prior == "uniform" and gan.card["latent_prior"] == "uniform"
    g = torch.load(g_path)
    z = gan.sample_latents(3, seed=0)
    u = torch.erf(z / 2 ** 0.5)
    x_ref = torch.tanh(F.linear(F.relu(F.linear(u, g["0.weight"], g["0.bias"])), g["2.weight"], g["2.bias"]))
    with torch.no_grad():
        torch.testing.assert_close(gan.generate(z), x_ref.view(3, 1, 4, 4))
    with pytest.raises(SystemExit):
        main(["import-gan", "--arch", "mlp", "--generator", str(g_path), "--discriminator", str(d_path),
              "--latent-dim", "4", "--image-shape", "1,4,4", "--latent-prior", "gauss", "--out", str(tmp_path / "g2")])
    assert "--latent-prior: invalid choice: 'gauss' (choose from 'normal', 'uniform')" in capsys.readouterr().err


def test_a_generator_released_alone_gets_a_fresh_seeded_discriminator(foreign_pair, tmp_path, capsys):
    """No discriminator file: G as released, D freshly initialised from a seed (the caller's random state untouched)."""
    g_path, _ = foreign_pair
    state = torch.random.get_rng_state()
    import_gan("mlp", g_path, None, 4, (1, 4, 4), tmp_path / "a")
    assert torch.equal(torch.random.get_rng_state(), state)
    a = load_gan(tmp_path / "a")
    b = load_gan(import_gan("mlp", g_path, None, 4, (1, 4, 4), tmp_path / "b"))
    c = load_gan(import_gan("mlp", g_path, None, 4, (1, 4, 4), tmp_path / "c", fresh_discriminator_seed=1))
    assert a.arch_kwargs == {"g_hidden": [8], "d_hidden": [8]}
    same = lambda x, y: all(torch.equal(v, y.discriminator.state_dict()[k]) for k, v in x.discriminator.state_dict().items())
    assert same(a, b) and not same(a, c)
    g = torch.load(g_path)
    z = a.sample_latents(3, seed=0)
    x_ref = torch.tanh(F.linear(F.relu(F.linear(z, g["0.weight"], g["0.bias"])), g["2.weight"], g["2.bias"]))
    with torch.no_grad():
        torch.testing.assert_close(a.generate(z), x_ref.view(3, 1, 4, 4))
    prov = a.card["provenance"]
    assert prov["source_files"]["discriminator"] == {"fresh": True, "seed": 0}
    assert any("freshly initialised (torch.manual_seed(0))" in n for n in prov["notes"])
    assert not any("Sigmoid" in n for n in prov["notes"])

    torch.manual_seed(0)
    src = build_gan("dcgan", 8, (1, 16, 16), channels=16, d_channels=8)
    torch.save(src.generator.state_dict(), tmp_path / "g.pt")
    dc = load_gan(import_gan("dcgan", tmp_path / "g.pt", None, 8, (1, 16, 16), tmp_path / "dc"))
    assert dc.arch_kwargs == {"channels": 16}  # D as wide as G
    with pytest.raises(ConfigError, match="latent_prior must be one of normal, uniform, got 'unifrom'"):
        import_gan("mlp", g_path, None, 4, (1, 4, 4), tmp_path / "bad", latent_prior="unifrom")
    with pytest.raises(ConfigError, match="fresh_discriminator_seed"):
        import_gan("mlp", g_path, None, 4, (1, 4, 4), tmp_path / "bad", fresh_discriminator_seed=2**70)
    assert not (tmp_path / "bad").exists()
    with torch.no_grad():
        torch.testing.assert_close(dc.generate(z.new_zeros(2, 8)), src.generate(z.new_zeros(2, 8)))

    args = ["import-gan", "--arch", "mlp", "--generator", str(g_path), "--latent-dim", "4", "--image-shape", "1,4,4"]
    assert main([*args, "--out", str(tmp_path / "n")]) == 2
    assert "--fresh-discriminator" in capsys.readouterr().err and not (tmp_path / "n").exists()
    assert main([*args, "--discriminator", str(foreign_pair[1]), "--fresh-discriminator", "--out", str(tmp_path / "n")]) == 2
    assert "not both" in capsys.readouterr().err
    assert main([*args, "--fresh-discriminator", "--seed", "3", "--out", str(tmp_path / "cli")]) == 0
    assert "a fresh discriminator (seed 3)" in capsys.readouterr().out
    assert load_gan(tmp_path / "cli").card["provenance"]["source_files"]["discriminator"] == {"fresh": True, "seed": 3}
