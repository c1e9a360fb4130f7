"""Stage 2 — unlearning: train the original GAN on positives with a repulsion term that pushes
its generator away from the adapted parameters theta_N^k (and the fine-tuning baselines, which
are the same loop with another regulariser).

    theta_P, phi_P = argmin_theta max_phi  L_adv(theta, phi; positives) + gamma * L_repulsion(theta)

with L_repulsion a function of the distances d_k = sum_i w_i (theta_i - theta_N,k,i)^2, maximal at
theta_N (``losses.REPULSIONS``). Distances (``distance``):

- ``fisher``: w = F / mean(F), the Fisher of G at theta_G, so the distance counts the
  parameters that move the output. Plain L2 repulsion mostly pushes output-irrelevant weights
  (Adam normalises each parameter's step, so every weight moves as fast as any other).
- ``l2`` (default): w = 1, the plain squared L2 of the paper's equation. With the decoupled step
  below it moves theta exactly along theta - theta_N; the weighted distances rescale each
  coordinate's step by w_i (mean 1), and the Fisher's heavy tail (max/mean ~ 1e3) makes that step
  unstable unless ``repulsion_lr`` is small.
- ``per_tensor``: w = 1/(T n_t), the mean of per-tensor mean squared differences of the paper's code.

With ``normalize_distance`` (default) d_k is divided by its value at the start, d_k(theta_G), so
alpha and gamma mean the same for every model: d = 1 at the start for every k.

How the repulsion enters the update (``repulsion_mode``):

- ``decoupled`` (default): the adversarial loss goes through Adam; the repulsion is a separate
  plain gradient step, theta <- theta - eta * gamma * dL_rep/dtheta * d0_k / 2, which with the
  normalised distance is theta <- theta + eta * gamma * sum_k c_k * w * (theta - theta_N,k) where
  c_k = -dL_rep/dd_k (EL2: alpha exp(-alpha d_k); NL2: 1; IL2: 1/d_k^2). It keeps the *direction*
  theta - theta_N, which is the extrapolation direction of the paper's motivating observation.
  (As with AdamW's decoupled weight decay: inside Adam, each coordinate of a penalty gradient is
  divided by its own running RMS, so the repulsion degenerates into a push of equal size on
  every weight, sign(theta - theta_N), and in our trials did no better than fine-tuning.)
- ``loss``: the paper's form, gamma * L_rep added to G's loss and optimised by Adam with it.

Data terms (beyond the paper; on by default, ``PAPER_STAGE2`` turns them off). In our runs D
stays near chance on positives vs G's samples (the negatives are a few percent of them): the
adversarial signal that should remove them is weak, whatever the regulariser, and the paper's
stage 2 removed 31-71% of the class in 1,000 steps. Three terms give it data that stage 1 and the
feedback already hold:

    L_D += beta_N * E_{x ~ G_N}[softplus(D(x))]          samples of the adapted GANs are fakes (negative data augmentation)
    L_G += beta_Z * E_{z in Z_neg}[softplus(-D(G(z)))]   the flagged negatives' own latents, once more
    L_G += beta_P * mean (G(z_pos) - x_pos)^2             the positives' latents keep their images (x_pos = G_orig(z_pos))

(``negative_weight``, ``negative_latent_weight``, ``preserve_weight``; they apply to every stage-2
method alike, so a table with them still isolates the regulariser.) With them (3 seeds, 1,000
steps, one adapted model): digits PUL 89 / 91 / 63 for classes 1 / 4 / 8 instead of 49 / 65 / 31,
with better FID and less collateral; MNIST class 1: 98.6 instead of 70.5. With preserve_weight,
G's learning rate can be 10x higher (1e-3) without losing the positives. Stage 1's K = 5 adapted
models (the default, as in the paper's code) give beta_N more varied negatives: over 3 seeds,
digits PUL 93 / 96 / 81 and MNIST class 7 78 instead of 72, at a higher FID to the original's
positives on digits (ratio 0.67 / 0.28 / 0.55 instead of 0.50 / 0.18 / 0.39). The repulsion adds
little on top of the terms (with today's defaults fine-tuning with the same terms is 0-1.1 points
lower): README.md.

The unlearned G is an average (``g_ema``, default 0.99): ema <- b_t ema + (1 - b_t) theta after
every step, b_t = min(g_ema, (1 + t) / (10 + t)), and the result takes the average's weights (D
keeps its last ones). GAN weights keep oscillating around where the game settles; the average
of the last ~100 steps is the usual remedy (as in StyleGAN's and BigGAN's generators), and here it
lowered the FID to the original's positives without giving up PUL: digits class 8 (one set of
adapted models, stage-2 seeds 0 / 1 / 2) PUL 79.1 / 78.0 / 80.8 and ratio 0.41 / 0.28 / 0.31 with the
average, against 79.1 and 0.41 for seed 0 without it; classes 1 / 4 (seed 0): 94.5 / 95.5 and 0.57 / 0.20
against 91.3 / 94.8 and 0.63 / 0.25. With it, the default feedback draw is 20,000 samples
(``RunConfig.n_samples``; the paper's code draws 5,000): beta_Z removed 97-98% of the class on the
flagged latents it trained on but only ~80% on fresh ones, and four times as many flagged latents
raised MNIST class 7 from PUL 81 to 91 (3 seeds, ratio 0.16 to 0.10) and digits class 8 from 80 to 86
(ratio 0.30 to 0.43: on digits more PUL costs some FID). The tables with both (3 seeds, stage 1
included): digits EL2 PUL 95.4 / 99.1 / 89.9 for classes 1 / 4 / 8, ratio 0.65 / 0.37 / 0.77; MNIST
99.1 / 88.1, ratio 0.08 / 0.11.

What D learns to call fake under beta_N (``negative_source``): ``adapted`` (default) takes
``negative_pool`` samples of the adapted GANs; ``flagged`` the flagged negatives themselves (the
original G's images the oracle labelled: negative data augmentation with the user's own flags; no
stage 1 needed for the fine-tuning baselines); ``both`` the two together. The flagged images remove
more of the class, on the MNIST MLP GAN at no cost (EL2, 3 seeds, stage 1 included: class 7 PUL 95.2,
FID-to-positives ratio 0.10, TV 0.043 against 88.1 / 0.11 / 0.055 with the default), but on the digits
DCGAN they move the positives about twice as far (PUL 99.3 / 99.8 / 96.2 on classes 1 / 4 / 8 at ratios
1.33 / 0.56 / 2.08, against 95.4 / 99.1 / 89.9 at 0.65 / 0.37 / 0.77), so the default stays ``adapted``.

One more term, off by default (``detector_weight``, beta_H):

    L_G += beta_H * E_z[softplus(h(G(z)))]               h: a copy of D trained once to tell the known negatives from the positives

It pushes every sample, not only the flagged latents, away from what h calls negative. It raises
PUL but costs quality: digits class 8, seed 0, K = 5: beta_H 1 / 3 / 10 gave PUL 85 / 88 / 90
against 79 without, and FID-to-positives ratios 0.71 / 1.02 / 1.52 against 0.41.

And one for D, off by default too (``flagged_fake_weight``, beta_F):

    L_D += beta_F * E_{z in Z_neg}[softplus(D(G(z)))]     G's current images of the flagged latents are fakes

beta_Z asks G to make, on the flagged latents, images that D calls real; without beta_F, D never sees those
images as fakes, so any image D has not learned to reject will do, often the nearest other class. With it the
flagged latents play the GAN game in full. The tables (EL2, 3 seeds, stage 1 included, ``results/*-flagged-fakes/``)
against the defaults: digits PUL 97.8 / 99.8 / 94.0 (classes 1 / 4 / 8) against 95.4 / 99.1 / 89.9 and FID to
real data 48.8 / 61.0 / 61.4 against 55.8 / 68.0 / 62.7, but ratio to the original's positives 1.05 / 0.47 /
2.00 against 0.65 / 0.37 / 0.77; MNIST class 7 PUL 95.3, ratio 0.05, TV 0.029 against 88.1 / 0.11 / 0.055
(class 1: 99.4 / 0.07 / 0.073 against 99.1 / 0.08 / 0.067). Like ``negative_source`` flagged, more removal
for drift of the digits positives, so it stays off.
"""

from __future__ import annotations

import copy
import json
import math
import time
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from tqdm.auto import tqdm

from .checkpoint import load_training_state, save_training_state
from .data import check_images
from .distributed import broadcast_, is_main_process
from .errors import CheckpointError, ConfigError, DataError, TrainingError
from .feedback import Feedback
from .losses import (
    REPULSIONS,
    AnchorSet,
    anchor_distances,
    anchor_pull,
    d_logistic_loss,
    detector_loss,
    ewc_penalty_half_grad,
    fisher_diagonal,
    flatten_params,
    g_nonsaturating_loss,
    param_distance,
    per_tensor_weights,
    prepare_anchors,
    preserve_loss,
    repulsion_slopes,
)
from .models import GAN, check_gan, finetuning_mode, generator_params
from .training import (
    MAX_SEED,
    FlatParams,
    LossLog,
    TrainNets,
    adam,
    as_device,
    augment,
    autocast,
    check_ema,
    check_int,
    check_positive,
    d_step,
    ema_decay,
    g_backward,
    sample_batch,
    sample_index,
    sample_latent_batch,
)

REPULSION_METHODS = tuple(REPULSIONS)  # el2, nl2, il2
FINETUNE_METHODS = ("finetune", "ewc")  # baselines: no regulariser / EWC towards theta_G
DISTANCES = ("fisher", "l2", "per_tensor")
REPULSION_MODES = ("decoupled", "loss")
NEGATIVE_SOURCES = ("adapted", "flagged", "both")  # what D learns to call fake under beta_N
MAX_FIRST_PUSH = 0.5  # the decoupled repulsion may not move theta by more than half of theta - theta_N in one step
RUNAWAY_DISTANCE = 100.0  # a normalised distance to theta_N this large at the end: the repulsion ran away (a warning)


@dataclass
class UnlearnConfig:
    """Stage-2 settings; defaults are used unchanged for every class and both shipped GANs."""

    method: str = "el2"  # el2 | nl2 | il2 (repulsion) or finetune | ewc (baselines)
    gamma: float = 1.0  # repulsion weight (> 0)
    alpha: float = 1.0  # EL2 sharpness: exp(-alpha d); with normalised d, 1 = "decays over the starting distance"
    distance: str = "l2"  # l2 | fisher | per_tensor (see module docstring); l2 = the paper's equation
    repulsion_mode: str = "decoupled"  # decoupled (own plain-gradient step) | loss (inside Adam, as in the paper)
    repulsion_lr: float = 0.005  # eta of the decoupled step: share of (theta - theta_N) added per step at gamma 1
    normalize_distance: bool = True  # d_k / d_k(theta_G): gamma and alpha transfer across models
    ewc_lambda: float = 10.0  # for method "ewc": weight of sum_i F_i (theta_i - theta_G,i)^2 (normalised F)
    iters: int = 1000  # training steps
    batch_size: int = 64
    g_lr: float = 1e-3  # with preserve_weight keeping the positives, G can move fast where D finds negatives
    d_lr: float = 1e-3  # large: D must learn quickly that negatives are not among the positives
    instance_noise: float = 0.0  # std of noise on D's inputs (positives are plentiful: none needed)
    # Data terms beyond the paper's stage 2 (module docstring, "Data terms"); PAPER_STAGE2 turns them off:
    negative_weight: float = 3.0  # beta_N: extra fakes for D (negative_source: samples of the adapted GANs by default)
    negative_pool: int = 2000  # samples drawn once from the adapted GANs for negative_weight
    negative_source: str = "adapted"  # beta_N's fakes: adapted (samples of G_N) | flagged (the feedback's negatives) | both
    negative_latent_weight: float = 3.0  # beta_Z: G's adversarial loss again on the flagged negatives' latents
    flagged_fake_weight: float = 0.0  # beta_F (opt-in): D learns G's current images of the flagged latents as fakes
    preserve_weight: float = 100.0  # beta_P: mean (G(z_pos) - x_pos)^2 on the positives' own latents
    detector_weight: float = 0.0  # beta_H: G's samples away from what a detector h (a copy of D trained on the feedback) calls negative
    detector_iters: int = 500  # training steps of the detector h (batch 64, once, before stage 2)
    g_ema: float = 0.99  # the unlearned G is an exponential moving average of G's weights (decay per step; 0: the last step's)
    augment_shift: int = 0
    fisher_samples: int = 32  # latents for the Fisher (distance "fisher", method "ewc")
    log_every: int = 50
    checkpoint_every: int = 100  # steps between resumable checkpoints (only when unlearn() gets a state_dir, as in agu run)
    seed: int = 0
    amp: bool = False  # bf16 autocast on CUDA for the adversarial part (penalties stay fp32)
    compile: bool = False  # torch.compile G and D (worth it for long runs on a GPU; the first steps compile)

    def fakes_from_adapted(self) -> bool:
        """Whether beta_N's fakes include samples of the adapted GANs (so stage 2 needs them)."""
        return self.negative_weight > 0 and self.negative_source in ("adapted", "both")

    def fakes_from_flagged(self) -> bool:
        """Whether beta_N's fakes include the flagged negatives themselves (so stage 2 needs their images)."""
        return self.negative_weight > 0 and self.negative_source in ("flagged", "both")

    def first_push(self, n_adapted: int) -> float | None:
        """The decoupled repulsion's first step as a share of theta - theta_N (normalised distances start at
        d = 1, where the slope c = -dL_rep/dd is alpha e^-alpha for EL2 and 1 for NL2 and IL2); None when
        the step is not that (the paper's in-Adam form, or unnormalised distances)."""
        if self.method not in REPULSION_METHODS or self.repulsion_mode != "decoupled" or not self.normalize_distance:
            return None
        slope = self.alpha * math.exp(-self.alpha) if self.method == "el2" else 1.0
        return self.gamma * self.repulsion_lr * max(n_adapted, 1) * slope

    def validate(self, n_adapted: int) -> None:
        valid = REPULSION_METHODS + FINETUNE_METHODS
        if self.method not in valid:
            raise ConfigError(f"unknown unlearning method {self.method!r}; valid: {', '.join(valid)}")
        if self.repulsion_mode not in REPULSION_MODES:
            raise ConfigError(f"unknown repulsion_mode {self.repulsion_mode!r}; valid: {', '.join(REPULSION_MODES)}")
        if self.distance not in DISTANCES:
            raise ConfigError(f"unknown distance {self.distance!r}; valid: {', '.join(DISTANCES)}")
        if self.negative_source not in NEGATIVE_SOURCES:
            raise ConfigError(f"unknown negative_source {self.negative_source!r}; valid: {', '.join(NEGATIVE_SOURCES)} "
                              "(what D learns to call fake: samples of the adapted GANs, the flagged negatives, or both)")
        if self.method in REPULSION_METHODS:
            if not (isinstance(self.gamma, (int, float)) and not isinstance(self.gamma, bool) and math.isfinite(self.gamma)):
                raise ConfigError(f"gamma must be a finite number > 0, got {self.gamma!r}")
            if self.gamma <= 0:
                raise ConfigError(
                    f"gamma must be > 0, got {self.gamma}: the repulsion term is maximal at the adapted parameters, "
                    "so a negative gamma turns repulsion into attraction towards the negative-only GAN (the paper's "
                    "public code ships -0.1 for two data sets: a bug). Use a positive gamma, e.g. 1"
                )
            if n_adapted < 1:
                raise ConfigError(f"method {self.method} needs at least one adapted GAN (run stage 1 first)")
            check_positive("alpha", self.alpha)
            check_positive("repulsion_lr", self.repulsion_lr)
            push = self.first_push(n_adapted)
            if push is not None and push > MAX_FIRST_PUSH:
                raise ConfigError(
                    f"gamma {self.gamma:g} is far too large for {self.method}: the first repulsion step alone would move G "
                    f"by {push:.2g} times its distance to the adapted GANs (gamma * repulsion_lr * K * slope; at most "
                    f"{MAX_FIRST_PUSH} is stable), and training would blow the generator up. Use gamma <= "
                    f"{self.gamma * MAX_FIRST_PUSH / push:.3g}; the default is 1"
                )
        for name in ("iters", "batch_size", "fisher_samples", "log_every", "checkpoint_every", "detector_iters"):
            check_int(f"unlearn: {name}", getattr(self, name))
        check_int("unlearn: augment_shift", self.augment_shift, minimum=0)
        check_int("unlearn: seed", self.seed, minimum=0, maximum=MAX_SEED)
        for name in ("g_lr", "d_lr"):
            check_positive(f"unlearn: {name}", getattr(self, name))
        check_int("unlearn: negative_pool", self.negative_pool)
        check_ema("unlearn: g_ema", self.g_ema, "the unlearned G")
        for name in ("ewc_lambda", "instance_noise", "negative_weight", "negative_latent_weight", "flagged_fake_weight",
                     "preserve_weight", "detector_weight"):
            check_positive(f"unlearn: {name}", getattr(self, name), allow_zero=True)


# The paper's stage 2 exactly: no data terms, no weight average, and the G learning rate it was tuned with here.
# ``UnlearnConfig(**PAPER_STAGE2)``, ``agu run/table --paper-stage2``.
DATA_TERMS_OFF = {"negative_weight": 0.0, "negative_latent_weight": 0.0, "flagged_fake_weight": 0.0, "preserve_weight": 0.0}
PAPER_STAGE2 = {**DATA_TERMS_OFF, "g_lr": 1e-4, "g_ema": 0.0}


@dataclass
class UnlearnResult:
    gan: GAN  # the unlearned GAN (theta_P, phi_P)
    log: list[dict] = field(default_factory=list)  # rows of mean losses (and distances)
    config: dict = field(default_factory=dict)
    earlier_seconds: float = 0.0  # a resumed run: the seconds its training loop ran before the interruption


def distance_weights(gan: GAN, kind: str, seed: int, fisher_samples: int) -> torch.Tensor | None:
    """The per-parameter weights w of ``param_distance`` for a distance kind (None = plain L2)."""
    params = generator_params(gan)
    if kind == "l2":
        return None
    if kind == "per_tensor":
        return per_tensor_weights(params)
    fisher = fisher_diagonal(gan.generator, gan.discriminator, gan.sample_latents(fisher_samples, seed=seed + 7919))
    return fisher / fisher.mean().clamp_min(1e-30)


def check_same_architecture(gan: GAN, adapted: list[GAN]) -> None:
    """Every adapted GAN must have the original's generator: the same parameter names and shapes."""
    shapes = [(n, tuple(p.shape)) for n, p in gan.generator.named_parameters()]
    for k, a in enumerate(adapted):
        if not isinstance(a, GAN):
            raise ConfigError(f"adapted[{k}] is a {type(a).__name__}, not a GAN (give the GANs that adapt() returned)")
        theirs = [(n, tuple(p.shape)) for n, p in a.generator.named_parameters()]
        if theirs != shapes:
            diff = next(((x, y) for x, y in zip(shapes, theirs) if x != y), (len(shapes), len(theirs)))
            raise ConfigError(f"adapted GAN {k} does not have the original's generator (first difference: {diff[0]} vs "
                              f"{diff[1]}): stage 2 needs GANs adapted from this one (agu adapt on the same GAN)")


def check_data_terms(cfg: UnlearnConfig, positives, adapted, positive_latents, negative_latents, latent_dim: int,
                     negatives=None) -> None:
    """The data terms need their data: adapted GANs and/or the flagged negatives' images (beta_N, by
    ``negative_source``), the positives' latents (beta_P, one per positive), the flagged negatives'
    latents (beta_Z). ``ConfigError`` saying what is missing."""
    if cfg.fakes_from_adapted() and not adapted:
        raise ConfigError(f"negative_weight > 0 with negative_source {cfg.negative_source!r} takes samples of the adapted "
                          "GANs as fakes for D, and none were given: run stage 1 first and pass its GANs (agu run does; "
                          "agu unlearn --adapted DIR), take the flagged negatives instead (--negative-source flagged), or "
                          "set negative_weight to 0 (--negative-weight 0)")
    if cfg.fakes_from_flagged():
        shape = tuple(positives.shape[1:])
        if negatives is None or negatives.ndim != 4 or tuple(negatives.shape[1:]) != shape or len(negatives) == 0:
            got = "none" if negatives is None else f"shape {tuple(negatives.shape)}"
            raise ConfigError(f"negative_source {cfg.negative_source!r} takes the flagged negatives (n, "
                              f"{', '.join(map(str, shape))}) as fakes for D, got {got}. Pass the Feedback of "
                              "feedback.collect as the positives (agu run does) or the images as negatives=, or use "
                              "--negative-source adapted")
    if cfg.detector_weight > 0 and negative_latents is None and not adapted:
        raise ConfigError("detector_weight > 0 trains the detector on known negatives: the flagged negatives (their latents, "
                          "negative_latents) or samples of the adapted GANs, and neither was given. Pass the Feedback of "
                          "feedback.collect and/or the adapted GANs, or set detector_weight to 0 (--detector-weight 0)")
    checks = [("preserve_weight", "positive_latents", positive_latents, len(positives)),
              ("negative_latent_weight", "negative_latents", negative_latents, None),
              ("flagged_fake_weight", "negative_latents", negative_latents, None)]
    if cfg.detector_weight > 0 and negative_latents is not None:  # the detector generates the flagged negatives from them
        checks.append(("detector_weight", "negative_latents", negative_latents, None))
    for weight, name, z, want in checks:
        bad = z is None or z.ndim != 2 or z.shape[1] != latent_dim or len(z) == 0 or (want is not None and len(z) != want)
        if getattr(cfg, weight) > 0 and bad:
            got = "none" if z is None else f"shape {tuple(z.shape)}"
            raise ConfigError(
                f"{weight} > 0 needs {name} ({want if want is not None else 'n'}, {latent_dim}), the latents the feedback "
                f"samples were generated from, got {got}. Pass the Feedback of feedback.collect as the positives (agu run "
                f"does), or set {weight} to 0 (--{weight.replace('_', '-')} 0; images from a folder have no latents)")


def negative_fakes(cfg: UnlearnConfig, adapted: list[GAN], flagged: torch.Tensor | None, device) -> torch.Tensor:
    """The fakes of beta_N, fixed for the run (``negative_source``): ``negative_pool`` samples of the
    adapted GANs, the flagged negatives themselves (the original G's images the oracle flagged), or both."""
    parts = []
    if cfg.fakes_from_flagged():
        parts.append(flagged.to(device))
    if cfg.fakes_from_adapted():
        parts.append(adapted_samples(adapted, cfg.negative_pool, cfg.seed, device))
    return torch.cat(parts)


@torch.no_grad()
def adapted_samples(adapted: list[GAN], n: int, seed: int, device) -> torch.Tensor:
    """``n`` samples drawn once from the adapted GANs (in equal parts): the negatives D learns to call fake."""
    per = -(-n // len(adapted))
    return torch.cat([a.to(device).eval().generate(a.sample_latents(per, seed=seed + 104729 + k, device=device))
                      for k, a in enumerate(adapted)])[:n]


def train_detector(like: torch.nn.Module, negatives: torch.Tensor, positives: torch.Tensor, iters: int, seed: int,
                   device, batch_size: int = 64, lr: float = 1e-3) -> torch.nn.Module:
    """The detector h of the beta_H term: a copy of ``like`` (the GAN's D, so it fits any image
    shape and starts from features of these images) trained to give ``negatives`` a positive
    logit and ``positives`` a negative one, min_h E_neg[softplus(-h)] + E_pos[softplus(h)], on
    balanced batches; then frozen. Every process trains the same h (its own seeded generator, no
    sharding; rank 0's weights are broadcast)."""
    h = copy.deepcopy(like).to(device).train().requires_grad_(True)
    opt = adam(h.parameters(), lr)
    gen = torch.Generator().manual_seed(seed + 15485863)
    half = batch_size // 2
    with torch.enable_grad():
        for _ in range(iters):
            xn = negatives[torch.randint(0, len(negatives), (half,), generator=gen).to(negatives.device)]
            xp = positives[torch.randint(0, len(positives), (half,), generator=gen).to(positives.device)]
            loss = d_logistic_loss(h(xn).reshape(-1), h(xp).reshape(-1))  # negatives play "real": logit > 0
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
    h.eval().requires_grad_(False)
    for p in h.parameters():
        broadcast_(p.data)
    return h


@dataclass
class Repulsion:
    """Stage 2's repulsion, prepared once: the adapted parameters in matvec form, s_k = 1 / d_k(theta_G)
    (or 1) and L_rep. ``evaluate`` reads theta and returns, as tensors (no host sync),
    L_rep(d), the normalised distances d_k = s_k d_k(theta) (K,), c_k = -dL_rep/dd_k (K,) and
    w*(theta - theta_G) (P,) for ``losses.anchor_pull``."""

    anchors: AnchorSet
    scale: torch.Tensor  # (K,) s_k
    fn: object  # L_rep (losses.REPULSIONS)
    kwargs: dict

    def evaluate(self, flat: FlatParams):
        d, wu = anchor_distances(flat.read(), self.anchors, *flat.scratch)
        d = d * self.scale
        value, c = repulsion_slopes(d, self.fn, **self.kwargs)
        return value, d, c, wu


@dataclass
class EWC:
    """The EWC baseline's fixed vectors: theta_G and the (normalised) Fisher, both (P,)."""

    anchor: torch.Tensor
    fisher: torch.Tensor


def repulsion_step(flat: FlatParams, rep: Repulsion, rate: float):
    """The decoupled repulsion step, in place on G's parameters:

        theta <- theta + rate * sum_k c_k * w * (theta - theta_N,k),   c_k = -dL_rep/dd_k (normalised d_k)

    (two matvecs over the (K, P) anchors, ``losses.anchor_pull``). Returns (L_rep, mean normalised
    distance) before the step, as tensors (no host sync)."""
    value, d, c, wu = rep.evaluate(flat)
    flat.add_(anchor_pull(wu, rep.anchors, c, out=wu), alpha=rate)
    return value, d.mean()


def unlearn_step(nets: TrainNets, opt_g, opt_d, real, z, flat: FlatParams, reg, cfg: UnlearnConfig, gen, device, *,
                 negatives=None, keep=None, zneg=None, detector=None):
    """One step of stage 2 on a batch (``real``: positives, already augmented; ``z``: latents): D's step,
    then G's with the configured regulariser ``reg`` (a ``Repulsion``, an ``EWC`` or None). The data
    terms, when on: ``negatives`` (augmented samples of the adapted GANs: fakes for D), ``keep``
    (latents and images of positives: G must keep them), ``zneg`` (latents of flagged negatives),
    ``detector`` (the frozen h of the opt-in beta_H term, applied to the batch G makes for L_adv).
    Returns the losses ``(d_loss, g_adv, reg, distance)``, detached, on the device."""
    aug = lambda x: augment(x, cfg.augment_shift, cfg.instance_noise, gen)

    # D step: max_phi L_adv
    d_loss = d_step(nets, opt_d, real, z, aug, device, cfg.amp, negatives, cfg.negative_weight,
                    zneg, cfg.flagged_fake_weight)  # (+ beta_F * E_{z_neg}[softplus(D(G(z_neg)))])

    # G step: min_theta L_adv + gamma * L_repulsion   (or + lambda * EWC, or nothing). A penalty's
    # gradient is added to the adversarial one by hand (fp32, no autograd graph through theta)
    extra = (lambda fake: cfg.detector_weight * detector_loss(detector(fake).reshape(-1))) if detector is not None else None
    g_adv = g_backward(nets, opt_g, z, aug, device, cfg.amp, extra)
    if keep is not None:  # + beta_P * mean (G(z_pos) - x_pos)^2, accumulated into G's gradients
        z_pos, x_pos = keep
        with autocast(device, cfg.amp):
            keep_loss = preserve_loss(nets.generate(z_pos).float(), x_pos)
        (cfg.preserve_weight * keep_loss).backward()
    if zneg is not None and cfg.negative_latent_weight > 0:  # + beta_Z * E_{z_neg}[softplus(-D(G(z_neg)))]
        with nets.d_frozen(), autocast(device, cfg.amp):
            neg_loss = g_nonsaturating_loss(nets.discriminate(aug(nets.generate(zneg))))
        (cfg.negative_latent_weight * neg_loss.float()).backward()
    value = dist = torch.zeros((), device=device)
    if cfg.method == "ewc":  # d(lambda EWC)/dtheta = 2 lambda F (theta - theta_G)
        ewc, half = ewc_penalty_half_grad(flat.read(), reg.anchor, reg.fisher, *flat.scratch)
        flat.add_to_grad_(half, alpha=2 * cfg.ewc_lambda, views=flat.scratch_views[1])
        value = dist = cfg.ewc_lambda * ewc
    elif reg is not None and cfg.repulsion_mode == "loss":  # d(gamma L_rep)/dtheta = -gamma sum_k 2 s_k c_k w (theta - theta_N,k)
        rep, d, c, wu = reg.evaluate(flat)
        flat.add_to_grad_(anchor_pull(wu, reg.anchors, 2 * reg.scale * c, out=wu), alpha=-cfg.gamma)
        value, dist = cfg.gamma * rep, d.mean()
    opt_g.step()
    if reg is not None and cfg.method in REPULSION_METHODS and cfg.repulsion_mode == "decoupled":
        rep, dist = repulsion_step(flat, reg, cfg.gamma * cfg.repulsion_lr)  # after Adam's step
        value = cfg.gamma * rep
    return d_loss, g_adv, value, dist


def save_state(state_dir, step: int, cfg: UnlearnConfig, model: GAN, opt_g, opt_d, gen: torch.Generator, log: LossLog,
               ema: torch.Tensor | None = None, seconds: float = 0.0) -> None:
    """A resumable checkpoint after ``step`` (0-based): weights, Adam states, random generator
    states, the losses so far, G's weight average (``ema``, when on), the seconds the training loop
    has run. Refuses to checkpoint a diverged model (``TrainingError``)."""
    pending = log.pending(step)  # checks the unflushed losses are finite
    params = list(model.generator.parameters()) + list(model.discriminator.parameters())
    if not bool(torch.isfinite(flatten_params(params)).all()):
        raise TrainingError(f"unlearn ({cfg.method}): the parameters became NaN or Inf by step {step + 1}. Likely cause: "
                            "a learning rate or gamma too large for this model. Lower them; checkpoints saved so far are intact")
    save_training_state(
        state_dir, {"generator": model.generator, "discriminator": model.discriminator}, {"opt_g": opt_g, "opt_d": opt_d},
        {"gen": gen.get_state(), "torch_rng": torch.get_rng_state(), "pending_losses": pending,
         **({"g_ema": ema} if ema is not None else {})},
        {"stage": "unlearn", "step": step + 1, "log_rows": log.rows, "config": asdict(cfg), "seconds": seconds},
    )


def load_state(state_dir, cfg: UnlearnConfig, model: GAN, opt_g, opt_d, gen: torch.Generator, log: LossLog, device,
               ema: torch.Tensor | None = None) -> tuple[int, float]:
    """Load a checkpoint of ``save_state`` if ``state_dir`` holds one (``ema``: filled in place);
    returns the step to continue from and the seconds the loop had run until then ((0, 0.0): none)."""
    if not (Path(state_dir) / "card.json").is_file():
        return 0, 0.0
    try:
        tensors, card = load_training_state(
            state_dir, {"generator": model.generator, "discriminator": model.discriminator}, {"opt_g": opt_g, "opt_d": opt_d})
    except CheckpointError as e:
        raise CheckpointError(f"the stage-2 checkpoint in {state_dir} is damaged ({str(e).split('; ')[0]}): run without "
                              "--resume to start over") from None
    ignore = ("checkpoint_every",)
    saved, now = card.get("config") or {}, json.loads(json.dumps(asdict(cfg)))
    default = json.loads(json.dumps(asdict(UnlearnConfig())))  # a setting added since the checkpoint had its default
    differ = sorted(k for k in set(saved) | set(now) if k not in ignore and saved.get(k, default.get(k)) != now.get(k))
    if differ:
        raise ConfigError(f"the checkpoint in {state_dir} was made with other stage-2 settings (differ: {', '.join(differ)}); "
                          "resume with the same settings, or run without --resume to start over")
    gen.set_state(tensors["gen"])
    torch.set_rng_state(tensors["torch_rng"])
    log.restore(card["log_rows"], tensors["pending_losses"], device)
    if ema is not None:
        if "g_ema" not in tensors:
            raise CheckpointError(f"the checkpoint in {state_dir} has no weight average of G (made by an older agu, or "
                                  "with g_ema 0): run without --resume to start over")
        ema.copy_(tensors["g_ema"])
    return int(card["step"]), float(card.get("seconds", 0.0))  # (an older agu's checkpoint has no seconds)


def min_positives(cfg: UnlearnConfig) -> int:
    """The fewest positives stage 2 trains on: a quarter of a batch."""
    return cfg.batch_size // 4


def unlearn(
    gan: GAN,
    positives: torch.Tensor | Feedback,
    adapted: list[GAN] | None = None,
    config: UnlearnConfig | None = None,
    device=None,
    progress: bool = True,
    state_dir=None,
    positive_latents: torch.Tensor | None = None,
    negative_latents: torch.Tensor | None = None,
    negatives: torch.Tensor | None = None,
) -> UnlearnResult:
    """Train a copy of ``gan`` on ``positives`` ``(n, C, H, W)`` with the configured regulariser.

    ``positives`` may be the ``Feedback`` of ``feedback.collect`` (its positives, with the latents of
    its positives and negatives for the data terms), or images alone with the latents given as
    ``positive_latents`` / ``negative_latents`` (or the data terms that need them set to 0).
    ``negatives``: the flagged negatives' images (from the ``Feedback`` when given), D's fakes under
    ``negative_source`` "flagged" or "both".
    ``adapted`` are the stage-1 GANs (needed by the repulsion methods). ``gan`` is not changed.
    ``state_dir``: a folder for resumable checkpoints, written every ``checkpoint_every`` steps;
    if it already holds one (made with the same settings), training continues from it and ends
    exactly where an uninterrupted run would (on the CPU).
    """
    cfg = config or UnlearnConfig()
    if isinstance(positives, Feedback):
        positive_latents = positives.positive_latents if positive_latents is None else positive_latents
        negative_latents = positives.negative_latents if negative_latents is None else negative_latents
        negatives = positives.negatives if negatives is None else negatives
        positives = positives.positives
    if not isinstance(cfg, UnlearnConfig):
        raise ConfigError(f"config must be an UnlearnConfig, got {type(cfg).__name__} (e.g. UnlearnConfig(**your_dict))")
    adapted = [adapted] if isinstance(adapted, GAN) else list(adapted or [])
    cfg.validate(len(adapted))
    check_same_architecture(gan, adapted)
    device = as_device(device) if device is not None else gan.device
    check_images(positives, gan.image_shape, "positives")
    if negatives is not None:
        check_images(negatives, gan.image_shape, "negatives")
    if len(positives) < min_positives(cfg):
        raise DataError(f"unlearn needs a pool of at least {min_positives(cfg)} positives (a quarter of batch_size), got "
                        f"only {len(positives)}; draw more samples")
    check_data_terms(cfg, positives, adapted, positive_latents, negative_latents, gan.latent_dim, negatives)

    # --- setup: fixed things computed once, held on the device --------------------------
    torch.manual_seed(cfg.seed)
    gen = torch.Generator().manual_seed(cfg.seed)
    check_gan(gan)
    model = gan.clone().to(device).eval()  # eval mode for the Fisher (per-sample gradients); trained below
    theta_g = flatten_params(generator_params(model)).detach()  # (P,)
    repulsive = cfg.method in REPULSION_METHODS
    if repulsive:
        anchors = broadcast_(torch.stack([flatten_params(generator_params(a.to(device))).detach() for a in adapted]))  # (K, P)
        weights = distance_weights(model, cfg.distance, cfg.seed, cfg.fisher_samples)
        if weights is not None and cfg.repulsion_mode == "decoupled":
            weights = weights / weights.mean()  # the decoupled step moves coordinate i by rate * w_i * (...): mean(w) = 1
        weights = broadcast_(weights) if weights is not None else None  # (P,), rank 0's
        d0 = param_distance(theta_g, anchors, weights)  # (K,) distances at the start
        if not bool((d0 > 0).all()):
            raise ConfigError("an adapted GAN equals the original (distance 0): stage 1 did not move it; adapt again")
        scale = 1.0 / d0 if cfg.normalize_distance else torch.ones_like(d0)
        reg_kwargs = {"alpha": cfg.alpha} if cfg.method == "el2" else {}
        reg = Repulsion(prepare_anchors(anchors, theta_g, weights), scale, REPULSIONS[cfg.method], reg_kwargs)
    elif cfg.method == "ewc":
        reg = EWC(theta_g, broadcast_(distance_weights(model, "fisher", cfg.seed, cfg.fisher_samples)))
    else:
        reg = None
    pool = positives.to(device)
    z_pos = positive_latents.to(device) if cfg.preserve_weight > 0 else None  # (n_pos, latent_dim)
    uses_zneg = cfg.negative_latent_weight > 0 or cfg.flagged_fake_weight > 0
    z_neg = negative_latents.to(device) if uses_zneg else None  # (n_neg, latent_dim)
    neg_pool = negative_fakes(cfg, adapted, negatives, device) if cfg.negative_weight > 0 else None
    detector = None
    if cfg.detector_weight > 0:  # h: negatives = the flagged ones (G_orig(z_neg)) and samples of the adapted GANs
        with torch.no_grad():  # (model is still theta_G here, in eval mode)
            known = [model.generate(negative_latents.to(device))] if negative_latents is not None else []
        if adapted:
            reuse = neg_pool is not None and cfg.negative_source == "adapted"
            known.append(neg_pool if reuse else adapted_samples(adapted, cfg.negative_pool, cfg.seed, device))
        detector = train_detector(gan.discriminator, torch.cat(known), pool, cfg.detector_iters, cfg.seed, device)
    log = LossLog(["d_loss", "g_adv", "reg", "distance"], cfg.log_every, f"unlearn ({cfg.method})")
    opt_g = adam(model.generator.parameters(), cfg.g_lr)
    opt_d = adam(model.discriminator.parameters(), cfg.d_lr)
    ema = theta_g.clone() if cfg.g_ema > 0 else None  # (P,) G's weight average, starting at theta_G
    start, earlier = load_state(state_dir, cfg, model, opt_g, opt_d, gen, log, device, ema) if state_dir is not None \
        else (0, 0.0)
    bar = tqdm(range(start, cfg.iters), initial=start, total=cfg.iters, desc=f"unlearn {cfg.method}",
               disable=not progress, leave=False)
    finetuning_mode(model)  # train mode; G's batch norm (if any) keeps its statistics, as the targets of beta_P were made
    nets = TrainNets(model, device, cfg.compile)  # what the steps call: DDP / compiled when asked
    flat = FlatParams(generator_params(model))  # theta as one (P,) vector, buffers allocated once

    # --- train: the GAN game on the positives plus the regulariser on G -----------------
    t_loop = time.perf_counter()
    for step in bar:
        idx = sample_index(len(pool), cfg.batch_size, gen, device)  # positives (and their latents for beta_P)
        x = pool[idx]
        real = augment(x, cfg.augment_shift, cfg.instance_noise, gen)
        z = sample_latent_batch(cfg.batch_size, gan.latent_dim, gen, device)
        keep = (z_pos[idx], x) if z_pos is not None else None
        neg = augment(sample_batch(neg_pool, cfg.batch_size, gen), cfg.augment_shift, cfg.instance_noise, gen) \
            if neg_pool is not None else None
        zn = z_neg[sample_index(len(z_neg), cfg.batch_size, gen, device)] if z_neg is not None else None
        d_loss, g_adv, reg_value, dist = unlearn_step(nets, opt_g, opt_d, real, z, flat, reg, cfg, gen, device,
                                                      negatives=neg, keep=keep, zneg=zn, detector=detector)
        row = log.add(step, d_loss, g_adv, reg_value, dist)
        if ema is not None:  # ema <- b * ema + (1 - b) * theta
            ema.lerp_(flat.read(), 1 - ema_decay(cfg.g_ema, step))
        if row and progress:
            bar.set_postfix(d=f"{row['d_loss']:.3f}", g=f"{row['g_adv']:.3f}", reg=f"{row['reg']:.3g}")
        if state_dir is not None and (step + 1) % cfg.checkpoint_every == 0 and step + 1 < cfg.iters and is_main_process():
            save_state(state_dir, step, cfg, model, opt_g, opt_d, gen, log, ema, earlier + time.perf_counter() - t_loop)
    log.flush(cfg.iters - 1)
    if ema is not None:  # the unlearned G is the average (D keeps its last weights)
        flat.write_(ema)
    flat.release()

    # --- done -----------------------------------------------------------------------------
    model.eval()
    end = log.rows[-1].get("distance") if repulsive and log.rows else None
    if end is not None and end > RUNAWAY_DISTANCE:
        warnings.warn(f"unlearn ({cfg.method}, gamma {cfg.gamma:g}): the repulsion ran away: G ended {end:.3g} times as "
                      "far from the adapted GANs as it started (squared distance, normalised): expect broken samples "
                      "(check FID); lower gamma" + (" (NL2's push never weakens: EL2 is the bounded one)"
                                                    if cfg.method == "nl2" else ""), stacklevel=2)
    model.provenance = {**gan.provenance, "stage": "unlearned", "unlearn_config": asdict(cfg)}
    return UnlearnResult(model, log.rows, asdict(cfg), earlier)
