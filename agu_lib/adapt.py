"""Stage 1 — negative adaptation: fine-tune copies of the pre-trained GAN on a few negatives,
with an EWC penalty that keeps the generator near theta_G where the Fisher says it matters.

    theta_N, phi_N = argmin_theta max_phi  L_adv(theta, phi; negatives) + lambda * sum_i F_i (theta_i - theta_G,i)^2
"""

from __future__ import annotations

import warnings
from dataclasses import asdict, dataclass, field

import torch
from tqdm.auto import tqdm

from .data import check_images
from .distributed import broadcast_
from .errors import ConfigError, DataError
from .losses import ewc_penalty_half_grad, fisher_diagonal, flatten_params
from .models import GAN, check_gan, finetuning_mode, generator_params
from .training import (
    MAX_SEED,
    FlatParams,
    LossLog,
    TrainNets,
    adam,
    as_device,
    augment,
    check_ema,
    check_int,
    check_positive,
    d_step,
    ema_decay,
    g_backward,
    sample_batch,
    sample_latent_batch,
)

MIN_NEGATIVES = 8  # fewest negatives agu run / agu adapt accept (n_negatives when that is smaller)


@dataclass
class AdaptConfig:
    """Stage-1 settings. Defaults work on the shipped digits GAN and on csinva's MNIST MLP GAN."""

    iters: int = 1000  # training steps per adapted model (paper's code: ~2000 at batch 16 on MNIST)
    batch_size: int = 16  # as in the paper's code
    n_negatives: int = 32  # negatives per adapted model (paper's code: ~20 on MNIST)
    n_models: int = 5  # K adapted models, each from its own draw of negatives (as the paper's code); digits class 8 PUL 81 vs 63 with 1
    g_lr: float = 2e-3  # G must travel far from theta_G in few steps ...
    d_lr: float = 1e-3  # ... and D must learn the negatives fast (it is at chance against the pre-trained G)
    ewc_lambda: float = 0.1  # lambda with the mean-normalised Fisher; 1 kept the digits GAN at <60% negatives
    fisher_samples: int = 32  # latents for the Fisher estimate (paper's code: 32)
    fisher_normalize: bool = True  # F / mean(F): scale-free penalty (the raw Fisher's scale varies by 1e6 across models)
    instance_noise: float = 0.0  # std of Gaussian noise on D's inputs; 0.05-0.3 slowed adaptation of the conv GAN
    augment_shift: int = 0  # random translation (pixels) of D's inputs, real and fake (off: it slowed adaptation)
    log_every: int = 50  # steps between loss readouts (one host sync each)
    seed: int = 0
    amp: bool = False  # bf16 autocast on CUDA for the adversarial part (penalties stay fp32)
    compile: bool = False  # torch.compile G and D (worth it for long runs on a GPU; the first steps compile)
    g_ema: float = 0.0  # the adapted G is an average of G's weights (decay per step, as stage 2's g_ema); 0: the last step's

    def validate(self) -> None:
        for name in ("iters", "batch_size", "n_negatives", "n_models", "fisher_samples", "log_every"):
            check_int(f"adapt: {name}", getattr(self, name))
        for name in ("g_lr", "d_lr"):
            check_positive(f"adapt: {name}", getattr(self, name))
        for name in ("ewc_lambda", "instance_noise"):
            check_positive(f"adapt: {name}", getattr(self, name), allow_zero=True)
        check_int("adapt: augment_shift", self.augment_shift, minimum=0)
        check_int("adapt: seed", self.seed, minimum=0, maximum=MAX_SEED)
        check_ema("adapt: g_ema", self.g_ema, "the adapted G")


@dataclass
class AdaptResult:
    models: list[GAN]  # the K adapted GANs (theta_N^k, phi_N^k)
    fisher: torch.Tensor  # (P,) the Fisher used by the penalty (normalised if asked)
    logs: list[list[dict]] = field(default_factory=list)  # per model: rows of mean losses
    config: dict = field(default_factory=dict)


def adapt_step(nets: TrainNets, opt_g, opt_d, real, z, flat: FlatParams, anchor, fisher, cfg: AdaptConfig, gen, device,
               with_value: bool = True):
    """One step of stage 1 on a batch (``real``: negatives, already augmented; ``z``: latents):
    D's step, then G's. Returns the losses ``(d_loss, g_adv, ewc)``, detached, on the device
    (``ewc`` is None unless ``with_value``: the loop asks for it on the steps it logs)."""
    aug = lambda x: augment(x, cfg.augment_shift, cfg.instance_noise, gen)

    # D step: max_phi L_adv
    d_loss = d_step(nets, opt_d, real, z, aug, device, cfg.amp)

    # G step: min_theta L_adv + lambda * EWC(theta). EWC's gradient, 2 F (theta - theta_G), is added
    # to the adversarial one by hand (fp32, no autograd graph through the (P,) vector); EWC's value
    # only on the logged steps
    g_adv = g_backward(nets, opt_g, z, aug, device, cfg.amp)
    ewc, half = ewc_penalty_half_grad(flat.read(), anchor, fisher, *flat.scratch, with_value=with_value)
    flat.add_to_grad_(half, alpha=2 * cfg.ewc_lambda, views=flat.scratch_views[1])  # + lambda * 2 F (theta - theta_G)
    opt_g.step()
    return d_loss, g_adv, ewc


def adapt(
    gan: GAN,
    negatives: torch.Tensor,
    config: AdaptConfig | None = None,
    device=None,
    progress: bool = True,
) -> AdaptResult:
    """Adapt ``config.n_models`` copies of ``gan`` to ``negatives`` ``(n, C, H, W)`` in [-1, 1].

    Model k trains on its own random draw of ``n_negatives`` from the pool (all of it when the
    pool is smaller). ``gan`` itself is not changed.
    """
    cfg = config or AdaptConfig()
    if not isinstance(cfg, AdaptConfig):
        raise ConfigError(f"config must be an AdaptConfig, got {type(cfg).__name__} (e.g. AdaptConfig(**your_dict))")
    cfg.validate()
    device = as_device(device) if device is not None else gan.device
    check_images(negatives, gan.image_shape, "negatives")
    if len(negatives) < 2:
        raise DataError(f"adapt needs at least 2 negatives, got {len(negatives)}; give more negative images "
                        f"(agu run asks for {MIN_NEGATIVES}; {cfg.n_negatives} = n_negatives are used when there are that many)")
    if len(negatives) < cfg.n_negatives:
        warnings.warn(f"adapt: {len(negatives)} negatives, fewer than n_negatives = {cfg.n_negatives}: each adapted model "
                      "trains on all of them (more negatives give a better adapted GAN)", stacklevel=2)

    # --- setup: fixed things computed once --------------------------------------------
    torch.manual_seed(cfg.seed)
    gen = torch.Generator().manual_seed(cfg.seed)
    check_gan(gan)
    original = gan.clone().to(device).eval()  # (a copy: the caller's GAN keeps its device and mode)
    anchor = flatten_params(generator_params(original)).detach()  # theta_G, (P,)
    z_fisher = original.sample_latents(cfg.fisher_samples, seed=cfg.seed + 7919)
    fisher = broadcast_(fisher_diagonal(original.generator, original.discriminator, z_fisher))  # (P,), rank 0's
    if cfg.fisher_normalize:
        fisher = fisher / fisher.mean().clamp_min(1e-30)
    pool = negatives.to(device)

    models, logs = [], []
    for k in range(cfg.n_models):
        draw = torch.randperm(len(pool), generator=gen)[: cfg.n_negatives]
        real_set = pool[draw.to(device)]
        model = finetuning_mode(original.clone())  # train mode; G's batch norm (if any) keeps its statistics
        nets = TrainNets(model, device, cfg.compile)  # what the steps call: DDP / compiled when asked
        flat = FlatParams(generator_params(model))  # theta as one (P,) vector, buffers allocated once
        ema = anchor.clone() if cfg.g_ema > 0 else None  # (P,) G's weight average, starting at theta_G
        opt_g = adam(model.generator.parameters(), cfg.g_lr)
        opt_d = adam(model.discriminator.parameters(), cfg.d_lr)
        log = LossLog(["d_loss", "g_adv", "ewc"], cfg.log_every, f"adapt (model {k + 1}/{cfg.n_models})", last=("ewc",))
        bar = tqdm(range(cfg.iters), desc=f"adapt {k + 1}/{cfg.n_models}", disable=not progress, leave=False)

        # --- train: the GAN game on the negatives, EWC on G -------------------------------
        unlogged = torch.zeros((), device=device)  # the EWC column on the steps that do not compute it
        for step in bar:
            real = augment(sample_batch(real_set, cfg.batch_size, gen), cfg.augment_shift, cfg.instance_noise, gen)
            z = sample_latent_batch(cfg.batch_size, gan.latent_dim, gen, device)
            logged = (step + 1) % cfg.log_every == 0 or step == cfg.iters - 1  # EWC's value: only on the logged steps
            d_loss, g_adv, ewc = adapt_step(nets, opt_g, opt_d, real, z, flat, anchor, fisher, cfg, gen, device, logged)
            row = log.add(step, d_loss, g_adv, ewc if ewc is not None else unlogged)
            if ema is not None:  # ema <- b * ema + (1 - b) * theta
                ema.lerp_(flat.read(), 1 - ema_decay(cfg.g_ema, step))
            if row and progress:
                bar.set_postfix(d=f"{row['d_loss']:.3f}", g=f"{row['g_adv']:.3f}", ewc=f"{row['ewc']:.2e}")
        log.flush(cfg.iters - 1)
        if ema is not None:  # the adapted G is the average (D keeps its last weights)
            flat.write_(ema)
        flat.release()

        # --- save: keep the adapted model ---------------------------------------------------
        model.eval()
        model.provenance = {**gan.provenance, "stage": "adapted", "adapt_model": k, "adapt_config": asdict(cfg)}
        models.append(model)
        logs.append(log.rows)
    return AdaptResult(models, fisher, logs, asdict(cfg))
