"""Pre-training the default GAN on the digits (the "pre-trained GAN" the method starts from).

``pretrain(dataset, config, classifier, device, progress) -> (gan, report)`` reads top to
bottom: set up, train, evaluate every ``eval_every`` iterations, keep the best snapshot.

A GAN trained on 1,797 tiny images drifts toward a few classes if trained long, so the loop
watches **class coverage**: every ``eval_every`` iterations it classifies the (EMA) generator's
samples on a fixed latent set with the digits classifier, keeps the snapshot with the best
coverage score, and stops once the targets (every class share within ``share_range``, mean
top-class confidence >= ``min_confidence``) have held for ``patience`` evaluations in a row.
"""

from __future__ import annotations

import copy
import math
import time
from dataclasses import asdict, dataclass

import torch
from tqdm.auto import tqdm

from .data import ImageSet
from .errors import ConfigError, TrainingError
from .losses import d_logistic_loss, d_r1_penalty, g_nonsaturating_loss
from .models import ARCHITECTURES, GAN, build_gan, evaluating
from .training import as_device


@dataclass
class PretrainConfig:
    # architecture (models.build_gan); dcgan at 16x16: (64,4,4) -> (32,8,8) -> (16,16,16) -> (1,16,16)
    arch: str = "dcgan"
    latent_dim: int = 32  # size of z; 32 is plenty for 10 classes of 16x16 digits
    channels: int = 64  # dcgan: G's widest layer
    d_channels: int = 64  # dcgan: D's widest layer
    hidden: tuple[int, ...] = (256, 256)  # mlp: the hidden widths of G and of D (those of csinva's MNIST MLP GAN)
    # optimisation (Adam, betas as in StyleGAN2 / DCGAN practice)
    iterations: int = 6000  # upper bound; early stopping ends near 4000 with the defaults
    batch_size: int = 64
    lr_g: float = 5e-4  # 2e-4 (DCGAN's) also works but needs ~1.5x the iterations; 1e-3 gains little
    lr_d: float = 5e-4
    beta1: float = 0.5
    beta2: float = 0.99
    r1_gamma: float = 1.0  # weight of the R1 penalty on real images (0 = off); stabilises D
    r1_every: int = 4  # lazy R1: apply every k iterations with weight k * r1_gamma (StyleGAN2)
    ema_beta: float = 0.995  # EMA of G's weights; the EMA generator is the one saved and evaluated
    # coverage checks with the classifier
    eval_every: int = 250  # iterations between evaluations
    eval_samples: int = 2000  # fixed latents used for every evaluation
    eval_seed: int = 12345  # seed of those latents (differs from the seed used by the tests)
    share_range: tuple[float, float] = (0.06, 0.14)  # target per-class share (a margin inside 5%..15%)
    min_confidence: float = 0.92  # target mean top-class probability (a margin above 0.9)
    patience: int = 6  # stop after the targets held for this many evaluations in a row
    min_iterations: int = 1000  # never stop before this
    seed: int = 0  # seeds init, batches and noise: two runs with the same seed are identical on CPU


def architecture_kwargs(cfg: PretrainConfig) -> dict:
    """The builder's arguments for ``cfg.arch``: the widths that belong to that architecture."""
    if cfg.arch == "dcgan":
        if min(cfg.channels, cfg.d_channels) < 4:
            raise ConfigError(f"dcgan widths must be at least 4 (G halves its channels at each upsampling), got channels "
                              f"{cfg.channels} and d_channels {cfg.d_channels}: e.g. 64")
        return {"channels": cfg.channels, "d_channels": cfg.d_channels}
    if cfg.arch == "mlp":
        if not cfg.hidden or any(int(w) < 1 for w in cfg.hidden):
            raise ConfigError(f"hidden widths must be positive integers, got {list(cfg.hidden)}: e.g. (256, 256)")
        return {"g_hidden": [int(w) for w in cfg.hidden], "d_hidden": [int(w) for w in cfg.hidden]}
    raise ConfigError(f"pretrain builds agu's own architectures, dcgan or mlp, not {cfg.arch!r}; "
                      "for another, pass like= a GAN of it (its builder registered with agu_lib.register_architecture)")


def coverage(classifier, images: torch.Tensor) -> dict:
    """Class shares and confidence of ``images`` ``(N, C, H, W)`` under ``classifier``.

    Returns ``{"shares": [n_classes floats], "confidence": mean top-class probability}``.
    """
    p = classifier.predict_proba(images).cpu()
    shares = torch.bincount(p.argmax(1), minlength=classifier.n_classes).float() / len(p)
    return {"shares": [round(float(s), 4) for s in shares], "confidence": round(float(p.max(1).values.mean()), 4)}


def coverage_score(cov: dict, share_range=(0.05, 0.15), min_confidence: float = 0.9) -> tuple:
    """A sortable score (higher is better): (all targets met, number met, worst slack).

    The targets are one per class (share within ``share_range``) and one for the mean
    confidence (>= ``min_confidence``); a target's slack is its distance to the bound (negative
    when violated), so the tie-break favours the snapshot furthest inside all bounds.
    """
    lo, hi = share_range
    slacks = [min(s - lo, hi - s) for s in cov["shares"]] + [cov["confidence"] - min_confidence]
    met = sum(s >= 0 for s in slacks)
    return (met == len(slacks), met, round(min(slacks), 4))


def pretrain(
    dataset: ImageSet,
    config: PretrainConfig | None = None,
    classifier=None,
    device="cpu",
    progress: bool = True,
    like: GAN | None = None,
) -> tuple[GAN, dict]:
    """Train a GAN on ``dataset`` with coverage-based early stopping.

    ``like``: train a fresh GAN of this GAN's architecture (arch, latent dim, arch_kwargs) instead of
    the one described by ``config`` (used by the retraining baseline, e.g. for an imported MLP GAN).

    Arguments:
        dataset: training images ``(N, C, H, W)`` in [-1, 1] (labels unused).
        config: a ``PretrainConfig`` (defaults: the shipped digits GAN).
        classifier: an agu ``Classifier`` for images of ``dataset``'s shape, used for the coverage
            checks; ``None`` disables them (the last snapshot is returned).
        device: where to train.
        progress: show a tqdm bar.

    Returns the GAN (generator = EMA generator of the best snapshot, on ``device``) and a report:
    ``{"config", "best_iteration", "best", "stopped_at", "stopped_early", "seconds", "history"}``
    where ``history`` lists ``{"iteration", "shares", "confidence", "d_loss", "g_loss"}`` per evaluation.
    """
    cfg = config or PretrainConfig()
    if cfg.iterations < 1 or cfg.batch_size < 1 or cfg.eval_every < 1:
        raise ConfigError("iterations, batch_size and eval_every must be positive")
    if not 0.0 <= cfg.ema_beta < 1.0:
        raise ConfigError(f"ema_beta must be in [0, 1), got {cfg.ema_beta}")
    if classifier is not None:
        classifier.check_shape(dataset.image_shape)
    device = as_device(device)
    t0 = time.perf_counter()

    # ---- setup: models, optimisers, fixed evaluation latents (all seeded)
    torch.manual_seed(cfg.seed)
    gen = torch.Generator().manual_seed(cfg.seed)  # batches and noise are drawn on the CPU
    if like is not None:
        if like.arch not in ARCHITECTURES:
            raise ConfigError(f"training from scratch builds a fresh GAN of the same architecture, but this GAN's ({like.arch!r}) "
                              "is not registered: register its builder with agu_lib.register_architecture and give the GAN "
                              "arch= and arch_kwargs=")
        gan = build_gan(like.arch, like.latent_dim, like.image_shape, latent_shape=like.latent_shape,
                        output_range=like.output_range, latent_prior=like.latent_prior, **like.arch_kwargs).to(device)
    else:
        gan = build_gan(cfg.arch, cfg.latent_dim, dataset.image_shape, **architecture_kwargs(cfg)).to(device)
    latent_dim = gan.latent_dim
    G, D = gan.generator, gan.discriminator
    G_ema = copy.deepcopy(G).requires_grad_(False)
    opt_g = torch.optim.Adam(G.parameters(), lr=cfg.lr_g, betas=(cfg.beta1, cfg.beta2))
    opt_d = torch.optim.Adam(D.parameters(), lr=cfg.lr_d, betas=(cfg.beta1, cfg.beta2))
    real_all = dataset.images.to(device)
    z_eval = torch.randn(cfg.eval_samples, latent_dim, generator=torch.Generator().manual_seed(cfg.eval_seed)).to(device)

    history: list[dict] = []
    best = {"score": None, "iteration": 0, "G": None, "D": None, "coverage": None}
    streak = 0  # evaluations in a row with the targets met
    stopped_early = False
    bar = tqdm(range(1, cfg.iterations + 1), desc="pretrain", disable=not progress)
    for it in bar:
        # ---- D step: L_D = softplus(-D(x)) + softplus(D(G(z)))  [+ lazy R1 on reals]
        idx = torch.randint(len(real_all), (cfg.batch_size,), generator=gen).to(device)
        real = real_all[idx]
        z = torch.randn(cfg.batch_size, latent_dim, generator=gen).to(device)
        with torch.no_grad():
            fake = G(z).reshape(real.shape)
        d_loss = d_logistic_loss(D(real).reshape(-1), D(fake).reshape(-1))
        opt_d.zero_grad(set_to_none=True)
        d_loss.backward()
        opt_d.step()
        if cfg.r1_gamma > 0 and it % cfg.r1_every == 0:
            real_r1 = real.detach().requires_grad_(True)
            r1 = d_r1_penalty(D(real_r1).reshape(-1), real_r1)
            opt_d.zero_grad(set_to_none=True)
            (0.5 * cfg.r1_gamma * cfg.r1_every * r1).backward()
            opt_d.step()

        # ---- G step: L_G = softplus(-D(G(z)))  (non-saturating)
        z = torch.randn(cfg.batch_size, latent_dim, generator=gen).to(device)
        g_loss = g_nonsaturating_loss(D(G(z).reshape(real.shape)).reshape(-1))
        opt_g.zero_grad(set_to_none=True)
        g_loss.backward()
        opt_g.step()

        # ---- EMA of G's weights: theta_ema <- beta * theta_ema + (1 - beta) * theta (buffers, e.g. batch
        # norm's running statistics, are copied)
        with torch.no_grad():
            for p_ema, p in zip(G_ema.parameters(), G.parameters()):
                p_ema.lerp_(p, 1.0 - cfg.ema_beta)
            for b_ema, b in zip(G_ema.buffers(), G.buffers()):
                b_ema.copy_(b)

        # ---- evaluate coverage on the fixed latents; keep the best snapshot; stop early
        if it % cfg.eval_every == 0 or it == cfg.iterations:
            d_val, g_val = d_loss.item(), g_loss.item()
            if not (math.isfinite(d_val) and math.isfinite(g_val)):
                raise TrainingError(f"pretraining diverged at iteration {it} (d_loss {d_val}, g_loss {g_val}); lower the learning rates")
            entry = {"iteration": it, "d_loss": round(d_val, 4), "g_loss": round(g_val, 4)}
            if classifier is not None:
                with torch.no_grad(), evaluating(G_ema):
                    x_eval = torch.cat([G_ema(zb).reshape(-1, *dataset.image_shape) for zb in z_eval.split(1024)])
                entry.update(coverage(classifier, x_eval))
                score = coverage_score(entry, cfg.share_range, cfg.min_confidence)
                streak = streak + 1 if score[0] else 0
                bar.set_postfix(met=score[1], slack=score[2], conf=entry["confidence"], refresh=False)
            else:
                score = (it,)  # no classifier: the latest snapshot is the best
            history.append(entry)
            if best["score"] is None or score > best["score"]:
                best.update(score=score, iteration=it, coverage=entry,
                            G=copy.deepcopy(G_ema.state_dict()), D=copy.deepcopy(D.state_dict()))
            if classifier is not None and streak >= cfg.patience and it >= cfg.min_iterations:
                stopped_early = True
                break
    bar.close()

    # ---- the result: the best snapshot (EMA generator + its discriminator)
    gan.generator.load_state_dict(best["G"])
    gan.discriminator.load_state_dict(best["D"])
    gan.eval()
    report = {
        "config": asdict(cfg),
        "best_iteration": best["iteration"],
        "best": best["coverage"],
        "stopped_at": it,
        "stopped_early": stopped_early,
        "seconds": round(time.perf_counter() - t0, 1),
        "history": history,
    }
    return gan, report
