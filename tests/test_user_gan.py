"""A researcher's own GAN: any nn.Module pair, with batch norm, with a sigmoid at the end of D,
with a latent size and image shape of its own, registered and used from the command line through
``--import``."""

from __future__ import annotations

import sys
import textwrap
import warnings

import numpy as np
import pytest
import torch
from conftest import bright
from torch import nn

import agu_lib
from agu_lib import cli
from agu_lib.adapt import AdaptConfig, adapt
from agu_lib.checkpoint import load_gan, save_gan
from agu_lib.directions import extrapolate, mean_gan
from agu_lib.errors import ConfigError, TrainingError
from agu_lib.feedback import PredicateOracle, collect
from agu_lib.metrics import evaluate, generate_batched, make_context
from agu_lib.models import check_gan, evaluating, finetuning_mode
from agu_lib.pretrain import PretrainConfig, pretrain
from agu_lib.unlearn import UnlearnConfig, unlearn

SHAPE = (1, 12, 12)


class BNGenerator(nn.Module):
    """z (N, 6) -> Linear -> BatchNorm1d -> ReLU -> Linear -> tanh -> (N, 1, 12, 12)."""

    def __init__(self, latent_dim: int = 6):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(latent_dim, 32), nn.BatchNorm1d(32), nn.ReLU(), nn.Linear(32, 144), nn.Tanh())

    def forward(self, z):
        return self.net(z).view(-1, *SHAPE)


def bn_discriminator(sigmoid: bool = False) -> nn.Sequential:
    layers = [nn.Flatten(), nn.Linear(144, 32), nn.BatchNorm1d(32), nn.LeakyReLU(0.2), nn.Linear(32, 1)]
    return nn.Sequential(*layers, *([nn.Sigmoid()] if sigmoid else []))


def build_bn(latent_dim, image_shape):
    return BNGenerator(latent_dim), bn_discriminator()


agu_lib.register_architecture("test-bn", build_bn)


@pytest.fixture
def bn_gan():
    """A batch-norm GAN whose running statistics are not the initial ones (as after pre-training)."""
    torch.manual_seed(0)
    gan = agu_lib.GAN(BNGenerator(), bn_discriminator(), 6, SHAPE, arch="test-bn")
    with torch.no_grad():  # a few train-mode passes move the running statistics
        for _ in range(5):
            gan.generator(torch.randn(64, 6) * 2 + 1)
            gan.discriminator(torch.randn(64, *SHAPE))
    return gan.eval()


def test_a_discriminator_ending_in_sigmoid_is_refused_with_the_fix():
    with pytest.raises(ConfigError, match=r"ends in nn.Sigmoid.*del d\[-1\]"):
        agu_lib.GAN(BNGenerator(), bn_discriminator(sigmoid=True), 6, SHAPE)


def test_a_sigmoid_inside_forward_is_warned_about(bn_gan):
    class SigmoidD(nn.Module):
        def __init__(self):
            super().__init__()
            self.d = bn_discriminator()

        def forward(self, x):
            return torch.sigmoid(self.d(x))

    gan = agu_lib.GAN(bn_gan.generator, SigmoidD(), 6, SHAPE)
    with pytest.warns(UserWarning, match="all lie in \\[0, 1\\].*sigmoid"):
        check_gan(gan)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # raw logits: no warning
        check_gan(bn_gan)
        # an untrained D whose logits happen to lie in [0, 1] (about 0.5 here): they leave it on scaled images
        torch.manual_seed(0)
        fresh = nn.Sequential(nn.Flatten(), nn.Linear(144, 16), nn.LeakyReLU(0.2), nn.Linear(16, 1))
        with torch.no_grad():
            fresh[3].bias.fill_(0.5)
            fresh[3].weight.mul_(0.1)
        untrained = agu_lib.GAN(BNGenerator(), fresh, 6, SHAPE)
        out = untrained.discriminate(untrained.sample(16)).detach()
        assert bool(((out > 0.4) & (out < 0.6)).all())
        check_gan(untrained)


def test_shapes_that_do_not_fit_are_named(bn_gan):
    wrong_latent = agu_lib.GAN(bn_gan.generator, bn_gan.discriminator, 5, SHAPE)
    with pytest.raises(ConfigError, match="latent_dim 5"):
        check_gan(wrong_latent)
    wrong_shape = agu_lib.GAN(bn_gan.generator, bn_gan.discriminator, 6, (1, 10, 10))
    with pytest.raises(ConfigError, match="image_shape"):
        check_gan(wrong_shape)
    three = agu_lib.GAN(bn_gan.generator, nn.Sequential(nn.Flatten(), nn.Linear(144, 3)), 6, SHAPE)
    with pytest.raises(ConfigError, match="one\\s+raw logit per image"):
        adapt(three, torch.zeros(8, *SHAPE), AdaptConfig(iters=1, n_models=1), progress=False)


def test_sampling_is_per_latent_and_leaves_the_statistics_alone(bn_gan):
    bn_gan.train()  # even when the user left it in train mode
    stats = [b.clone() for b in bn_gan.buffers()]
    small, large = bn_gan.sample(8, seed=3), bn_gan.sample(64, seed=3)[:8]
    assert torch.equal(small, large)  # eval mode: an image does not depend on its batch
    collect(bn_gan, PredicateOracle(bright), 50, seed=0)
    assert all(torch.equal(a, b) for a, b in zip(stats, bn_gan.buffers()))
    assert bn_gan.training  # the caller's mode is restored
    with evaluating(bn_gan):
        assert not bn_gan.generator.net[1].training
    assert bn_gan.generator.net[1].training


def test_finetuning_mode_keeps_g_per_sample_and_d_as_trained(bn_gan):
    finetuning_mode(bn_gan)
    z = torch.randn(16, 6)
    with torch.no_grad():
        trained = bn_gan.generate(z)
    assert torch.allclose(trained, bn_gan.eval().generate(z))  # G's batch norm keeps its statistics
    finetuning_mode(bn_gan)
    assert bn_gan.discriminator[2].training and not bn_gan.generator.net[1].training


def test_adapt_leaves_the_callers_gan_as_it_was(bn_gan):
    bn_gan.train()
    before = {k: v.clone() for k, v in bn_gan.state_dict().items()}
    negatives = bn_gan.sample(40, seed=1)
    res = adapt(bn_gan, negatives, AdaptConfig(iters=5, n_models=1, n_negatives=8, batch_size=8), progress=False)
    assert bn_gan.training and all(torch.equal(v, bn_gan.state_dict()[k]) for k, v in before.items())
    assert not torch.equal(res.models[0].generator.net[0].weight, bn_gan.generator.net[0].weight)


def test_every_stage2_method_and_the_fisher_distance_run_with_batch_norm(bn_gan):
    """torch.func's per-sample gradients (the Fisher) fail on batch norm in train mode: they are
    taken in eval mode; the preserved positives start exactly at their targets."""
    fb = collect(bn_gan, PredicateOracle(bright), 80, seed=0)
    adapted = adapt(bn_gan, fb.negatives, AdaptConfig(iters=5, n_models=1, n_negatives=8, batch_size=8), progress=False).models
    for kwargs in ({"method": "ewc"}, {"method": "el2", "distance": "fisher"}, {"method": "finetune"}):
        res = unlearn(bn_gan, fb, adapted, UnlearnConfig(iters=3, batch_size=16, fisher_samples=4, **kwargs), progress=False)
        assert torch.isfinite(res.gan.sample(8)).all(), kwargs
    first = unlearn(bn_gan, fb, adapted, UnlearnConfig(iters=1, batch_size=16, log_every=1, negative_weight=0.0,
                                                        negative_latent_weight=0.0, g_lr=1e-12, d_lr=1e-12, g_ema=0.0),
                    progress=False)
    assert first.log[0]["g_adv"] > 0  # it ran; and beta_P's targets were made the way G trains:
    x_pos = fb.positives[:16]
    with torch.no_grad():
        assert torch.allclose(finetuning_mode(bn_gan.clone()).generate(fb.positive_latents[:16]), x_pos, atol=1e-6)


def test_extrapolation_keeps_the_original_statistics(bn_gan):
    fb = collect(bn_gan, PredicateOracle(bright), 80, seed=0)
    adapted = adapt(bn_gan, fb.negatives, AdaptConfig(iters=5, n_models=2, n_negatives=8, batch_size=8), progress=False).models
    far = extrapolate(bn_gan, mean_gan(adapted), 50.0)
    assert torch.equal(far.generator.net[1].running_var, bn_gan.generator.net[1].running_var)
    assert not torch.equal(far.generator.net[0].weight, bn_gan.generator.net[0].weight)
    assert torch.isfinite(far.sample(16)).all()


def test_non_finite_images_are_a_training_error_not_a_numpy_crash(bn_gan):
    broken = bn_gan.clone()
    with torch.no_grad():
        broken.generator.net[0].weight.fill_(float("nan"))
    with pytest.raises(TrainingError, match="NaN or inf"):
        generate_batched(broken, torch.randn(4, 6))


def test_a_metric_asked_for_by_name_says_what_it_needs(bn_gan):
    ctx = make_context(bn_gan, PredicateOracle(bright), n_eval=40)
    assert "fid_positives" not in evaluate(bn_gan, ctx)  # all that the context allows: no classifier, no FID
    with pytest.raises(ConfigError, match="'fid'.*needs a classifier"):
        evaluate(bn_gan, ctx, ["pul", "fid"])


def test_retraining_from_scratch_copies_statistics_and_uses_the_gans_latent_size(bn_gan):
    data = agu_lib.ImageSet(bn_gan.sample(64, seed=5), None, "samples")
    gan, _ = pretrain(data, PretrainConfig(iterations=3, batch_size=16, eval_every=3), progress=False, like=bn_gan)
    assert gan.latent_dim == 6
    assert not torch.equal(gan.generator.net[1].running_mean, torch.zeros(32))  # the average has G's statistics
    ad_hoc = agu_lib.GAN(bn_gan.generator, bn_gan.discriminator, 6, SHAPE)  # no registered architecture
    with pytest.raises(ConfigError, match="register_architecture"):
        pretrain(data, PretrainConfig(iterations=1), progress=False, like=ad_hoc)


def test_load_gan_returns_eval_mode(bn_gan, tmp_path):
    gan = load_gan(save_gan(bn_gan.train(), tmp_path / "g"))
    assert not gan.training and not gan.generator.net[1].training


def test_the_cli_loads_a_registered_architecture_through_import(bn_gan, tmp_path, capsys):
    """A GAN directory of a user architecture: without --import the CLI says how; with it, it runs."""
    module = tmp_path / "my_gan_module.py"
    module.write_text(textwrap.dedent("""
        import agu_lib
        from torch import nn

        class G(nn.Module):
            def __init__(self, latent_dim):
                super().__init__()
                self.net = nn.Sequential(nn.Linear(latent_dim, 32), nn.BatchNorm1d(32), nn.ReLU(), nn.Linear(32, 144), nn.Tanh())

            def forward(self, z):
                return self.net(z).view(-1, 1, 12, 12)

        def build(latent_dim, image_shape):
            d = nn.Sequential(nn.Flatten(), nn.Linear(144, 32), nn.BatchNorm1d(32), nn.LeakyReLU(0.2), nn.Linear(32, 1))
            return G(latent_dim), d

        agu_lib.register_architecture("my-cli-gan", build)
    """))
    torch.manual_seed(0)
    agu_lib.register_architecture("my-cli-gan", build_bn)  # (the same modules, registered here to save the GAN)
    mod_gan = agu_lib.GAN(BNGenerator(), bn_discriminator(), 6, SHAPE, arch="my-cli-gan")
    gan_dir = save_gan(mod_gan, tmp_path / "gan")
    agu_lib.models.ARCHITECTURES.pop("my-cli-gan")  # a fresh process: only the file registers it

    assert cli.main(["info", str(gan_dir)]) == 2
    err = capsys.readouterr().err
    assert "not registered" in err and "--import my_gan.py" in err
    assert cli.main(["info", str(gan_dir), "--import", str(tmp_path / "missing.py")]) == 2
    assert "no such file" in capsys.readouterr().err

    out = tmp_path / "run"
    code = cli.main(["run", str(gan_dir), "--bold", "50", "--out", str(out), "--import", str(module), "--device", "cpu",
                     "--quiet", "--n-samples", "200", "--n-eval", "40", "--adapt-iters", "3", "--iters", "3", "--k", "1"])
    assert code == 0, capsys.readouterr().err
    assert load_gan(out / "unlearned").arch == "my-cli-gan"


# ----------------------------------------------------------------------------------------
# pytorch/examples' DCGAN conventions: (N, nz, 1, 1) latents, a discriminator module ending in a sigmoid,
# [0, 1] generators, and the other ways a pre-trained pair can differ from agu's conventions


class ExamplesG(nn.Module):
    """pytorch/examples dcgan's generator at 12x12: ConvTranspose2d on latents (N, 6, 1, 1)."""

    def __init__(self, last=None):
        super().__init__()
        self.main = nn.Sequential(nn.ConvTranspose2d(6, 8, 3, 1, 0, bias=False), nn.BatchNorm2d(8), nn.ReLU(True),
                                  nn.ConvTranspose2d(8, 1, 4, 4, 0, bias=False), last if last is not None else nn.Tanh())

    def forward(self, z):
        return self.main(z)


class ExamplesD(nn.Module):
    """pytorch/examples dcgan's discriminator: probabilities out of ``self.main``, flattened to (N,)."""

    def __init__(self):
        super().__init__()
        self.main = nn.Sequential(nn.Conv2d(1, 8, 4, 4, 0), nn.LeakyReLU(0.2), nn.Conv2d(8, 1, 3, 1, 0), nn.Sigmoid())
        self.inputs = None  # a list: the range of every batch D sees (not under vmap: the Fisher)

    def forward(self, x):
        if self.inputs is not None:
            self.inputs.append((float(x.detach().min()), float(x.detach().max())))
        return self.main(x).view(-1, 1).squeeze(1)


def test_a_generator_of_4d_latents_is_told_about_latent_shape_and_runs_with_it():
    torch.manual_seed(0)
    d = ExamplesD()
    with pytest.raises(ConfigError, match=r"nn.Sigmoid \(main.3\).*del d.main\[-1\]"):
        agu_lib.GAN(ExamplesG(), d, 6, SHAPE, latent_shape=(6, 1, 1))
    del d.main[-1]
    with pytest.raises(ConfigError, match=r"latent_dim=6, latent_shape=\(6, 1, 1\)"):
        agu_lib.GAN(ExamplesG(), d, (6, 1, 1), SHAPE)
    plain = agu_lib.GAN(ExamplesG(), d, 6, SHAPE)
    with pytest.raises(ConfigError, match=r"takes latents of shape \(N, 6, 1, 1\).*latent_shape=\(6, 1, 1\)"):
        collect(plain, bright, 64, seed=0)  # (was torch's RuntimeError from the first batch)
    with pytest.raises(ConfigError, match=r"--latent-shape 6,1,1"):
        plain.sample(4)  # (agu sample showed torch's traceback)
    with pytest.raises(ConfigError, match=r"latent_shape=\(6, 1, 1\) instead of \(1, 1, 6\)"):
        check_gan(agu_lib.GAN(ExamplesG(), d, 6, SHAPE, latent_shape=(1, 1, 6)))
    assert agu_lib.GAN(ExamplesG(), d, np.int64(6), SHAPE, latent_shape=(np.int64(6), 1, 1)).latent_dim == 6
    with pytest.raises(ConfigError, match=r"check latent_shape \(6, 1, 1\): the generator fails on latents of that shape"):
        check_gan(agu_lib.GAN(BNGenerator(), bn_discriminator(), 6, SHAPE, latent_shape=(6, 1, 1)))
    gan = agu_lib.GAN(ExamplesG(), d, 6, SHAPE, latent_shape=(6, 1, 1))
    assert gan.generate(gan.sample_latents(3)).shape == (3, *SHAPE)
    fb = collect(gan, bright, 200, seed=0)
    adapted = adapt(gan, fb.negatives, AdaptConfig(iters=3, n_models=1, batch_size=8), progress=False).models
    out = unlearn(gan, fb, adapted, UnlearnConfig(iters=3, batch_size=16), progress=False).gan
    assert out.sample(4).shape == (4, *SHAPE) and out.latent_shape == (6, 1, 1)
    with pytest.raises(ConfigError, match="latent_shape must be"):
        agu_lib.GAN(ExamplesG(), d, 6, SHAPE, latent_shape=(5, 1, 1))


def test_a_zero_one_generator_is_refused_until_its_output_range_is_given(tmp_path):
    torch.manual_seed(0)
    d = ExamplesD()
    del d.main[-1]
    as_if = agu_lib.GAN(ExamplesG(nn.Sigmoid()), d, 6, SHAPE, latent_shape=(6, 1, 1))
    with pytest.raises(ConfigError, match=r"output_range=\(0, 1\).*--output-range 0,1.*state output_range=\(-1, 1\)"):
        collect(as_if, bright, 64, seed=0)  # (was scored as [-1, 1] images: PUL 100, FID 1264 against 272)
    agu_lib.register_architecture("test-examples-01", lambda latent_dim, image_shape: (ExamplesG(nn.Sigmoid()), d))
    try:
        with pytest.raises(ConfigError, match=r"output_range=\(0, 1\)"):  # not saved either: every stage would refuse it
            save_gan(agu_lib.build_gan("test-examples-01", 6, SHAPE, latent_shape=(6, 1, 1)), tmp_path / "g")
        assert not (tmp_path / "g").exists()
    finally:
        agu_lib.models.ARCHITECTURES.pop("test-examples-01")
    stated = agu_lib.GAN(ExamplesG(nn.Sigmoid()), d, 6, SHAPE, latent_shape=(6, 1, 1), output_range=(-1, 1))
    with pytest.warns(UserWarning, match=r"output_range=\(0, 1\)"):
        check_gan(stated)  # they may really be bright [-1, 1] images: said, not refused
    gan = agu_lib.GAN(ExamplesG(nn.Sigmoid()), d, 6, SHAPE, latent_shape=(6, 1, 1), output_range=(0, 1))
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)  # in range, on agu's scale: no warning
        check_gan(gan)
    with torch.no_grad(), evaluating(gan):
        native = gan.generator[1](gan.sample_latents(50).reshape(50, 6, 1, 1))  # the module given, in its own range
    x = gan.sample(50)
    assert torch.allclose(x, native * 2 - 1, atol=1e-6) and float(x.min()) < 0  # agu sees [-1, 1]
    d.inputs = []
    fb = collect(gan, bright, 200, seed=0)
    unlearn(gan, fb, None, UnlearnConfig(method="finetune", iters=2, batch_size=16, negative_source="flagged"), progress=False)
    assert d.inputs and all(lo >= 0 and hi <= 1 for lo, hi in d.inputs)  # D sees its own [0, 1] images
    wrong = agu_lib.GAN(ExamplesG(nn.Sigmoid()), d, 6, SHAPE, latent_shape=(6, 1, 1), output_range=(-1, 0))
    with pytest.raises(ConfigError, match=r"outside its output range \[-1, 0\]"):
        check_gan(wrong)
    with pytest.raises(ConfigError, match="output_range must be"):
        agu_lib.GAN(ExamplesG(), d, 6, SHAPE, output_range=(1, 0))


def test_a_generator_without_a_final_tanh_is_refused_before_its_samples_are():
    torch.manual_seed(0)
    loose = agu_lib.GAN(nn.Sequential(nn.Linear(6, 144), nn.Unflatten(1, SHAPE)), bn_discriminator(), 6, SHAPE)
    with pytest.raises(ConfigError, match=r"outside its output range \[-1, 1\].*Hardtanh"):
        collect(loose, bright, 64, seed=0)  # (adapt refused the GAN's own negatives with advice about 0..255)


class RareOutliers(BNGenerator):
    """tanh images, but 3 above them where z[0] > 2.5: about 0.6% of latents, none of check_gan's 16."""

    def forward(self, z):
        return super().forward(z) + 3.0 * (z[:, :1] > 2.5).float().view(-1, 1, 1, 1)


def test_images_outside_the_range_are_found_in_every_sample_feedback_and_evaluation_draw():
    torch.manual_seed(0)
    gan = agu_lib.GAN(RareOutliers(), bn_discriminator(), 6, SHAPE)
    check_gan(gan)  # its 16 samples are all inside [-1, 1]
    with pytest.raises(ConfigError, match=r"reach \[-0\.9\d*, 3\.8\d*\] \(20 of 2000 samples leave it\), outside its output range \[-1, 1\]"):
        collect(gan, bright, 2000, seed=0)
    with pytest.raises(ConfigError, match=r"\(\d+ of 2000 samples leave it\), outside its output range"):
        make_context(gan, bright, n_eval=2000)
    collect(gan, bright, 64, seed=0)  # none of these 64 latents has z[0] > 2.5: nothing to refuse


def test_float64_channels_last_and_old_spectral_norm_are_refused_with_the_fix(bn_gan):
    double = agu_lib.GAN(BNGenerator().double(), bn_discriminator().double(), 6, SHAPE)
    with pytest.raises(ConfigError, match=r"float64 weights.*gan.float\(\)"):
        check_gan(double)

    class HWC(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(6, 48)

        def forward(self, z):
            return torch.tanh(self.fc(z)).view(-1, 4, 4, 3)

    hwc = agu_lib.GAN(HWC(), nn.Sequential(nn.Flatten(), nn.Linear(48, 1)), 6, (3, 4, 4))
    with pytest.raises(ConfigError, match=r"\(4, 4, 3\), not image_shape \(3, 4, 4\).*permute"):
        check_gan(hwc)  # (was reshaped silently: scrambled pixels)
    old = agu_lib.GAN(BNGenerator(), nn.Sequential(nn.Flatten(), nn.utils.spectral_norm(nn.Linear(144, 1))), 6, SHAPE)
    with pytest.raises(ConfigError, match=r"discriminator.1 uses the old.*parametrizations.spectral_norm"):
        adapt(old, torch.zeros(8, *SHAPE), AdaptConfig(iters=1, n_models=1), progress=False)
    old.discriminator(torch.zeros(2, *SHAPE)).sum().backward()  # the hook's weight is now a non-leaf tensor
    with pytest.raises(ConfigError, match=r"discriminator.1 uses the old.*parametrizations.spectral_norm"):
        old.clone()  # (was torch's "Only Tensors created explicitly by the user ... deepcopy" error)
    new = agu_lib.GAN(BNGenerator(), nn.Sequential(nn.Flatten(), nn.utils.parametrizations.spectral_norm(nn.Linear(144, 1))),
                      6, SHAPE)
    adapt(new, torch.zeros(8, *SHAPE), AdaptConfig(iters=1, n_models=1, batch_size=8), progress=False)


def test_real_images_in_the_wrong_range_are_named(bn_gan):
    real = torch.rand(40, *SHAPE)  # [0, 1]: ToTensor's range
    with pytest.warns(UserWarning, match=r"2 \* x - 1"):
        make_context(bn_gan, bright, n_eval=20, real_images=real)
    with pytest.raises(agu_lib.errors.DataError, match="x / 127.5 - 1"):
        make_context(bn_gan, bright, n_eval=20, real_images=real * 255)


def test_latent_shape_and_output_range_are_saved_and_restored(tmp_path):
    def build_examples(latent_dim, image_shape):
        d = ExamplesD()
        del d.main[-1]
        return ExamplesG(nn.Sigmoid()), d

    agu_lib.register_architecture("test-examples", build_examples)
    try:
        torch.manual_seed(0)
        gan = agu_lib.build_gan("test-examples", 6, SHAPE, latent_shape=(6, 1, 1), output_range=(0, 1))
        loaded = load_gan(save_gan(gan, tmp_path / "g"))
        assert loaded.latent_shape == (6, 1, 1) and loaded.output_range == (0.0, 1.0)
        assert torch.equal(loaded.sample(8), gan.sample(8))
    finally:
        agu_lib.models.ARCHITECTURES.pop("test-examples")


def test_register_architecture_keeps_agus_own_and_wants_a_builder():
    with pytest.raises(ConfigError, match="one of agu's own"):
        agu_lib.register_architecture("dcgan", build_bn)  # (load_gan("digits") then failed as if its card were edited)
    with pytest.raises(ConfigError, match="must be callable"):
        agu_lib.register_architecture("test-not-callable", "build_bn")
    assert agu_lib.load_gan("digits").arch == "dcgan"


def test_import_gan_loads_pytorch_examples_checkpoints_into_a_registered_architecture(tmp_path, capsys):
    """pytorch/examples' netG.pth / netD.pth (its D ends in a sigmoid, its G takes (N, nz, 1, 1)): a file
    that registers the two classes (D without the sigmoid: same keys) turns them into a GAN directory."""
    module = tmp_path / "examples_gan.py"
    module.write_text(textwrap.dedent("""
        import agu_lib
        from torch import nn

        class G(nn.Module):
            def __init__(self):
                super().__init__()
                self.main = nn.Sequential(nn.ConvTranspose2d(6, 8, 3, 1, 0, bias=False), nn.BatchNorm2d(8), nn.ReLU(True),
                                          nn.ConvTranspose2d(8, 1, 4, 4, 0, bias=False), nn.Tanh())

            def forward(self, z):
                return self.main(z)

        class D(nn.Module):
            def __init__(self, sigmoid=False):
                super().__init__()
                self.main = nn.Sequential(nn.Conv2d(1, 8, 4, 4, 0), nn.LeakyReLU(0.2), nn.Conv2d(8, 1, 3, 1, 0),
                                          *([nn.Sigmoid()] if sigmoid else []))

            def forward(self, x):
                return self.main(x).view(-1, 1).squeeze(1)

        def build(latent_dim, image_shape):
            return G(), D()

        agu_lib.register_architecture("examples-dcgan", build)
    """))
    torch.manual_seed(0)
    g, d = ExamplesG(), ExamplesD()
    torch.save(g.state_dict(), tmp_path / "netG.pth")
    torch.save(d.state_dict(), tmp_path / "netD.pth")
    base = ["import-gan", "--arch", "examples-dcgan", "--generator", str(tmp_path / "netG.pth"), "--discriminator",
            str(tmp_path / "netD.pth"), "--latent-dim", "6", "--image-shape", "1,12,12", "--import", str(module)]
    try:
        assert cli.main([*base, "--out", str(tmp_path / "flat")]) == 2  # without --latent-shape: what to give
        assert "latent_shape=(6, 1, 1)" in capsys.readouterr().err and not (tmp_path / "flat").exists()
        assert cli.main([*base, "--latent-shape", "6,1,1", "--out", str(tmp_path / "gan")]) == 0, capsys.readouterr().err
        gan = load_gan(tmp_path / "gan")
        assert gan.latent_shape == (6, 1, 1) and gan.arch == "examples-dcgan"
        with torch.no_grad():
            g.eval()
            assert torch.equal(gan.sample(5), g(gan.sample_latents(5).reshape(5, 6, 1, 1)))  # the weights, as trained
        assert cli.main(["import-gan", "--arch", "nope", *base[3:], "--out", str(tmp_path / "x")]) == 2
        assert "not registered" in capsys.readouterr().err
    finally:
        agu_lib.models.ARCHITECTURES.pop("examples-dcgan", None)
        sys.modules.pop("examples_gan", None)
        agu_lib.models.IMPORTED[:] = [s for s in agu_lib.models.IMPORTED if s != str(module)]
        while str(tmp_path) in sys.path:
            sys.path.remove(str(tmp_path))


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message on a machine without CUDA")
def test_a_device_this_machine_lacks_is_named_in_python(bn_gan):
    with pytest.raises(ConfigError, match="no CUDA GPU is available here.*device='cpu'"):
        adapt(bn_gan, torch.zeros(8, *SHAPE), AdaptConfig(iters=1, n_models=1), device="cuda", progress=False)
    with pytest.raises(ConfigError, match="unknown device 'gpu'"):
        unlearn(bn_gan, torch.zeros(32, *SHAPE), None, UnlearnConfig(method="finetune", iters=1, negative_weight=0,
                                                                     preserve_weight=0, negative_latent_weight=0),
                device="gpu", progress=False)


class LatentRecorder(BNGenerator):
    """The batch-norm generator, keeping the range, sum, sum of squares and lower-quarter count of every
    latent batch it is given (not under vmap, the Fisher's per-sample gradients: no values there)."""

    def __init__(self, latent_dim: int = 6):
        super().__init__(latent_dim)
        self.seen = []  # (min, max, n, sum, sum of squares, count below -0.5)

    def forward(self, z):
        z_ = z.detach()
        try:
            self.seen.append((float(z_.min()), float(z_.max()), z_.numel(), float(z_.sum()), float((z_ ** 2).sum()),
                              int((z_ < -0.5).sum())))
        except RuntimeError:  # vmap's batched tensors have no values
            pass
        return super().forward(z)


def test_a_generator_trained_on_uniform_latents_gets_them_everywhere(tmp_path):
    """latent_prior="uniform": sampling, both stages and the metrics feed the generator U(-1, 1) latents
    (agu draws N(0, I) and maps it through erf(z / sqrt(2))); saved and restored with the GAN."""
    agu_lib.register_architecture("test-uniform", lambda latent_dim, image_shape: (LatentRecorder(latent_dim),
                                                                                   bn_discriminator()))
    try:
        torch.manual_seed(0)
        gan = agu_lib.build_gan("test-uniform", 6, SHAPE, latent_prior="uniform")
        g = gan.given_generator
        gan.sample(4000, seed=1)
        lo, hi, n, s, s2, below = (f(v[i] for v in g.seen) for i, f in enumerate((min, max, sum, sum, sum, sum)))
        assert -1 <= lo and hi <= 1 and n == 4000 * 6
        assert abs(s / n) < 0.02 and abs(s2 / n - 1 / 3) < 0.01 and abs(below / n - 0.25) < 0.01  # U(-1, 1)
        g.seen.clear()
        fb = collect(gan, bright, 200, seed=0)
        adapted = adapt(gan, fb.negatives, AdaptConfig(iters=3, n_models=1, batch_size=8), progress=False).models
        out = unlearn(gan, fb, adapted, UnlearnConfig(iters=3, batch_size=16), progress=False).gan
        evaluate(out, make_context(gan, bright, n_eval=64), ["pul"])
        assert len(g.seen) > 5 and all(-1 <= v[0] and v[1] <= 1 for v in g.seen)
        assert out.latent_prior == "uniform"
        data = agu_lib.ImageSet(gan.sample(32, seed=5), None, "samples")
        assert pretrain(data, PretrainConfig(iterations=1, batch_size=16, eval_every=1), progress=False,
                        like=gan)[0].latent_prior == "uniform"  # retraining from scratch: the same prior
        assert all(-1 <= v[0] and v[1] <= 1 for v in out.given_generator.seen[-3:])  # the unlearned GAN's own generator
        loaded = load_gan(save_gan(out, tmp_path / "g"))
        assert loaded.card["latent_prior"] == "uniform" and loaded.latent_prior == "uniform"
        assert torch.equal(loaded.sample(8), out.sample(8))
        plain = load_gan(save_gan(agu_lib.build_gan("test-uniform", 6, SHAPE), tmp_path / "plain"))
        assert "latent_prior" not in plain.card and plain.latent_prior == "normal"
        plain.sample(2000)
        assert min(v[0] for v in plain.given_generator.seen) < -2  # N(0, I) as before
    finally:
        agu_lib.models.ARCHITECTURES.pop("test-uniform")


def test_an_unknown_prior_or_an_own_sample_latents_is_refused_with_the_fix():
    with pytest.raises(ConfigError, match=r"latent_prior must be one of normal, uniform.*'uniform' is U\(-1, 1\)"):
        agu_lib.GAN(BNGenerator(), bn_discriminator(), 6, SHAPE, latent_prior="gaussian")

    class OwnLatents(agu_lib.GAN):
        def sample_latents(self, n, seed=0, device=None):
            return torch.rand(n, self.latent_dim) * 2 - 1

    with pytest.raises(ConfigError, match=r"OwnLatents overrides sample_latents.*latent_prior='uniform'"):
        OwnLatents(BNGenerator(), bn_discriminator(), 6, SHAPE)

    class Truncated(agu_lib.GAN):
        def generate(self, z):
            return super().generate(z.clamp(-2, 2))

    with pytest.raises(ConfigError, match=r"Truncated overrides generate, but agu's stages call gan.generator.*module"):
        Truncated(BNGenerator(), bn_discriminator(), 6, SHAPE)

    class Named(agu_lib.GAN):  # adding methods is fine
        def describe(self):
            return "mine"

    assert Named(BNGenerator(), bn_discriminator(), 6, SHAPE).describe() == "mine"


def test_a_module_that_raises_something_else_than_torch_is_named_in_one_line():
    class Picky(BNGenerator):
        def forward(self, z):
            raise ValueError("expects latents in [-1, 1]")

    class PickyD(nn.Module):
        def forward(self, x):
            assert x.shape[-1] == 28, "28x28 only"

    with pytest.raises(ConfigError, match=r"the generator fails on latents of shape \(16, 6\).*ValueError: expects latents"):
        check_gan(agu_lib.GAN(Picky(), bn_discriminator(), 6, SHAPE))
    with pytest.raises(ConfigError, match=r"the discriminator fails on images of shape \(16, 1, 12, 12\): AssertionError: 28x28"):
        check_gan(agu_lib.GAN(BNGenerator(), PickyD(), 6, SHAPE))


def test_run_and_table_leave_the_callers_gan_as_it_was(bn_gan, tmp_path):
    """run() and table() work on a copy: the caller's GAN keeps its mode (and its device) and every weight
    and batch-norm statistic (they used to move it to their device and switch it to eval mode)."""
    from agu_lib.classifier import load_classifier
    from agu_lib.pipeline import RunConfig, run, table

    gan = bn_gan.train()
    before = {k: v.clone() for k, v in gan.state_dict().items()}
    cfg = RunConfig(method="el2", n_samples=128, n_eval=16,
                    adapt=AdaptConfig(iters=2, batch_size=4, n_negatives=8, fisher_samples=4, n_models=1),
                    unlearn=UnlearnConfig(iters=3, batch_size=8, fisher_samples=4))
    run(gan, PredicateOracle(bright), tmp_path / "run", cfg, progress=False)
    assert gan.training and all(torch.equal(v, before[k]) for k, v in gan.state_dict().items())

    digits = load_gan("digits").train()  # (a batch-norm DCGAN) and its classifier
    before = {k: v.clone() for k, v in digits.state_dict().items()}
    table(digits, load_classifier("digits"), [1], [0], tmp_path / "table", RunConfig(**{**cfg.__dict__, "n_samples": 500}),
          methods=("extrapolate",), progress=False)
    assert digits.training and all(torch.equal(v, before[k]) for k, v in digits.state_dict().items())
