"""What both benchmarks share: the GANs, and one training step of each kind built from the
library's own step functions (``adapt.adapt_step``, ``unlearn.unlearn_step``), so the timed code
is the code the loops run.

A "variant" is a closure running one loop iteration (sample the batch, D step, G step, the
stage's penalty), on its own copy of the model and its own optimisers.
"""

from __future__ import annotations

import tempfile
from dataclasses import replace
from pathlib import Path

import torch

from agu_lib.adapt import AdaptConfig, adapt_step
from agu_lib.checkpoint import load_gan
from agu_lib.data import third_party_dir
from agu_lib.errors import CheckpointError
from agu_lib.foreign import import_gan
from agu_lib.losses import REPULSIONS, fisher_diagonal, flatten_params, param_distance, prepare_anchors
from agu_lib.models import GAN, build_gan, generator_params
from agu_lib.training import FlatParams, TrainNets, adam, augment, sample_batch, sample_index, sample_latent_batch
from agu_lib.unlearn import EWC, Repulsion, UnlearnConfig, unlearn_step


def write_json(result: dict, path) -> None:
    """Write a benchmark's result dict as JSON (creating the folder) and say so."""
    import json

    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {path}")


def load_gans(device, only: str | None = None) -> dict[str, tuple[GAN, str]]:
    """{name: (gan, where it came from)}: the shipped digits GAN and csinva's MNIST MLP GAN (when
    present); ``only`` loads just one of them."""
    gans = {}
    if only in (None, "digits"):
        try:
            gans["digits"] = (load_gan("digits", device=device), "shipped digits GAN (load_gan('digits'))")
        except CheckpointError:
            torch.manual_seed(0)
            gans["digits"] = (build_gan("dcgan", 32, (1, 16, 16), channels=64, d_channels=64).to(device),
                              "digits architecture, random weights (no shipped checkpoint found)")
    tp = third_party_dir()
    src = tp / "csinva_mnist_mlp_gan" if tp is not None else None
    if only in (None, "mnist_mlp") and src is not None and (src / "G--300.ckpt").is_file():
        with tempfile.TemporaryDirectory(prefix="agu-bench-") as tmp:  # needed only until it is loaded
            out = Path(tmp) / "mnist_mlp"
            import_gan("mlp", src / "G--300.ckpt", src / "D--300.ckpt", 64, (1, 28, 28), out)
            gans["mnist_mlp"] = (load_gan(out, device=device), "csinva MNIST MLP GAN (third party, imported)")
    return gans


def n_params(gan: GAN) -> int:
    return sum(p.numel() for p in generator_params(gan))


def fake_anchors(gan: GAN, k: int, rel: float = 0.05, seed: int = 0) -> torch.Tensor:
    """K stand-ins for adapted parameter vectors ``(K, P)``: theta_G moved by ``rel`` of each weight's
    scale. Step time does not depend on the values, so the benchmark needs no stage-1 run."""
    theta = flatten_params(generator_params(gan)).detach()
    gen = torch.Generator().manual_seed(seed)
    noise = torch.randn(k, theta.numel(), generator=gen).to(theta.device)
    return theta + rel * theta.abs().mean() * noise


class Variants:
    """The timed loop iterations for one GAN, all on the same batches' shapes."""

    def __init__(self, gan: GAN, device, batch1: int | None = None, batch2: int | None = None, amp: bool = False,
                 compile: bool = False, fisher_samples: int = 32):
        self.gan, self.device = gan, torch.device(device)
        self.acfg = replace(AdaptConfig(), amp=amp, compile=compile, **({"batch_size": batch1} if batch1 else {}))
        self.ucfg = replace(UnlearnConfig(), amp=amp, compile=compile, **({"batch_size": batch2} if batch2 else {}))
        self.pool_z = gan.sample_latents(512, seed=1)
        with torch.no_grad():
            pool = torch.cat([gan.generate(z) for z in self.pool_z.split(256)])
        self.pool = pool  # stand-in for the negatives/positives (samples of G) and, with pool_z, their latents
        self.theta_g = flatten_params(generator_params(gan)).detach()
        self.fisher = fisher_diagonal(gan.generator, gan.discriminator, gan.sample_latents(fisher_samples, seed=7919))
        self.fisher = self.fisher / self.fisher.mean().clamp_min(1e-30)

    def _setup(self, cfg, seed=0):
        model = self.gan.clone().train()
        nets = TrainNets(model, self.device, cfg.compile)
        flat = FlatParams(generator_params(model))
        return model, nets, flat, adam(model.generator.parameters(), cfg.g_lr), adam(model.discriminator.parameters(), cfg.d_lr), \
            torch.Generator().manual_seed(seed)

    def plain(self, stage: int):
        """Plain GAN fine-tuning (no penalty) with the settings (batch, augmentation) of stage 1 or 2."""
        base = self.acfg if stage == 1 else self.ucfg
        cfg = replace(self.ucfg, method="finetune", batch_size=base.batch_size, augment_shift=base.augment_shift,
                      instance_noise=base.instance_noise, g_lr=base.g_lr, d_lr=base.d_lr)
        return self._unlearn_variant(cfg, None)

    def stage1(self):
        cfg = self.acfg
        _, nets, flat, opt_g, opt_d, gen = self._setup(cfg)
        latent, dev = self.gan.latent_dim, self.device

        def step():
            real = augment(sample_batch(self.pool, cfg.batch_size, gen), cfg.augment_shift, cfg.instance_noise, gen)
            z = sample_latent_batch(cfg.batch_size, latent, gen, dev)
            # with_value=False: EWC's value is computed on the logged steps only (1 in log_every)
            return adapt_step(nets, opt_g, opt_d, real, z, flat, self.theta_g, self.fisher, cfg, gen, dev, with_value=False)

        return step

    def stage2(self, k: int, method: str = "el2", mode: str = "decoupled", distance: str | None = None):
        """Stage 2 with ``k`` adapted models and the default distance (``l2``: no weights), or ``distance="fisher"``."""
        cfg = replace(self.ucfg, method=method, repulsion_mode=mode, distance=distance or self.ucfg.distance)
        anchors = fake_anchors(self.gan, k)
        weights = None if cfg.distance == "l2" else self.fisher  # (the per-tensor weights cost the same as the Fisher's)
        d0 = param_distance(self.theta_g, anchors, weights)
        reg = Repulsion(prepare_anchors(anchors, self.theta_g, weights), 1.0 / d0, REPULSIONS[method],
                        {"alpha": cfg.alpha} if method == "el2" else {})
        return self._unlearn_variant(cfg, reg)

    def stage2_data_terms(self, k: int):
        """The whole default stage-2 step: repulsion from ``k`` models plus the data terms of the
        config (adapted samples as fakes for D, negatives' latents, keeping positives' latents) and
        the loop's update of G's weight average (``g_ema``)."""
        cfg = self.ucfg
        step2 = self.stage2(k)  # only for its Repulsion and buffers
        reg, flat, nets, opt_g, opt_d, gen = step2.parts
        latent, dev = self.gan.latent_dim, self.device
        ema = flat.read().clone() if cfg.g_ema > 0 else None

        def step():
            idx = sample_index(len(self.pool), cfg.batch_size, gen, dev)
            real = augment(self.pool[idx], cfg.augment_shift, cfg.instance_noise, gen)
            z = sample_latent_batch(cfg.batch_size, latent, gen, dev)
            keep = (self.pool_z[idx], self.pool[idx]) if cfg.preserve_weight > 0 else None
            neg = augment(sample_batch(self.pool, cfg.batch_size, gen), cfg.augment_shift, cfg.instance_noise, gen) \
                if cfg.negative_weight > 0 else None
            zn = self.pool_z[sample_index(len(self.pool), cfg.batch_size, gen, dev)] if cfg.negative_latent_weight > 0 else None
            out = unlearn_step(nets, opt_g, opt_d, real, z, flat, reg, cfg, gen, dev, negatives=neg, keep=keep, zneg=zn)
            if ema is not None:
                ema.lerp_(flat.read(), 1 - cfg.g_ema)
            return out

        return step

    def ewc2(self):
        return self._unlearn_variant(replace(self.ucfg, method="ewc"), EWC(self.theta_g, self.fisher))

    def _unlearn_variant(self, cfg, reg):
        _, nets, flat, opt_g, opt_d, gen = self._setup(cfg)
        latent, dev = self.gan.latent_dim, self.device

        def step():  # the regulariser only: the data terms are off (what the method's penalty costs)
            real = augment(sample_batch(self.pool, cfg.batch_size, gen), cfg.augment_shift, cfg.instance_noise, gen)
            z = sample_latent_batch(cfg.batch_size, latent, gen, dev)
            return unlearn_step(nets, opt_g, opt_d, real, z, flat, reg, cfg, gen, dev)

        step.parts = (reg, flat, nets, opt_g, opt_d, gen)
        return step
