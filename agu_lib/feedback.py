"""Feedback: who says which generated samples are negative (carry the feature to forget).

An oracle is any callable ``images (N, C, H, W) -> bool tensor (N,)`` (True = negative).

- ``ClassifierOracle``: a classifier plays the user (the paper's experiments).
- ``PredicateOracle``: any function of an image batch, for feature-level cases ("bold strokes").
- ``ManualOracle``: a person picked sample indices (the notebook picker), for one known batch.

``collect(gan, oracle, ...)`` draws samples once and returns the negatives and positives.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch

from .errors import ConfigError, FeedbackError
from .models import check_gan, check_output_range, evaluating


class ClassifierOracle:
    """Negative = the classifier's top class is in ``forget`` with probability >= ``threshold``.

    Arguments:
        classifier: an agu ``Classifier`` (``predict_proba``).
        forget: class indices to forget, e.g. ``[7]``.
        threshold: minimum probability of the forgotten class(es) to call a sample negative.
    """

    def __init__(self, classifier, forget, threshold: float = 0.5):
        forget = [int(c) for c in (forget if hasattr(forget, "__iter__") else [forget])]
        if not forget:
            raise ConfigError("give at least one class to forget")
        bad = [c for c in forget if not 0 <= c < classifier.n_classes]
        if bad:
            raise ConfigError(f"classes {bad} do not exist; the classifier knows classes 0..{classifier.n_classes - 1}")
        if not 0.0 < threshold < 1.0:
            raise ConfigError(f"threshold must be in (0, 1), got {threshold}")
        self.classifier, self.forget, self.threshold = classifier, forget, threshold
        self.description = f"classifier: class {'/'.join(map(str, forget))} with p >= {threshold}"

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        p = self.classifier.predict_proba(images)
        return (p[:, self.forget].sum(1) >= self.threshold).cpu()


class PredicateOracle:
    """Negative = ``fn(images)`` is True; ``fn`` maps ``(N, C, H, W)`` to a bool tensor ``(N,)``."""

    def __init__(self, fn: Callable[[torch.Tensor], torch.Tensor], description: str = "predicate"):
        self.fn, self.description = fn, description

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        out = torch.as_tensor(self.fn(images)).reshape(-1).bool().cpu()
        if out.shape[0] != images.shape[0]:
            raise FeedbackError(f"the predicate returned {out.shape[0]} answers for {images.shape[0]} images")
        return out


def ink_mass(images: torch.Tensor) -> torch.Tensor:
    """Mean brightness per image ``(N,)`` with images in [-1, 1] mapped to [0, 1] (stroke thickness)."""
    return ((images.float() + 1) / 2).flatten(1).mean(1).cpu()


def bold_strokes(reference: torch.Tensor, percentile: float = 80.0) -> PredicateOracle:
    """"Bold strokes": ink mass above the ``percentile`` of the reference images' ink mass."""
    if isinstance(percentile, bool) or not isinstance(percentile, (int, float)) or not 0 <= percentile < 100:
        raise ConfigError(f"percentile must be a number in [0, 100), got {percentile!r}: "
                          "80 calls the boldest fifth of the samples negative")
    cut = float(torch.quantile(ink_mass(reference), percentile / 100.0))
    return PredicateOracle(lambda x: ink_mass(x) > cut, f"bold strokes: ink mass > {cut:.4f} (p{percentile:g})")


class ManualOracle:
    """A person marked ``indices`` of one batch of images as negative (e.g. in the notebook picker).

    It answers only for that batch: call it with the same images it was made for.
    """

    def __init__(self, images: torch.Tensor, indices):
        self.images = images
        self.indices = sorted({int(i) for i in indices})
        if any(not 0 <= i < len(images) for i in self.indices):
            raise ConfigError(f"indices must be in 0..{len(images) - 1}, got {self.indices}")
        self.description = f"manual: {len(self.indices)} of {len(images)} samples"

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        if images.shape != self.images.shape or not torch.equal(images.cpu(), self.images.cpu()):
            raise FeedbackError("a ManualOracle answers only for the batch it was made for; pick again on the new samples")
        mask = torch.zeros(len(images), dtype=torch.bool)
        mask[self.indices] = True
        return mask


@dataclass
class Feedback:
    """Samples drawn once from a GAN and split by an oracle. Images on the CPU."""

    negatives: torch.Tensor  # (n_neg, C, H, W)
    positives: torch.Tensor  # (n_pos, C, H, W)
    negative_share: float  # share of negatives among all drawn samples
    positive_latents: torch.Tensor | None = None  # (n_pos, latent_dim): the latents behind the positives
    negative_latents: torch.Tensor | None = None  # (n_neg, latent_dim)


@torch.no_grad()
def collect(gan, oracle, n_samples: int, seed: int, min_negatives: int = 0, batch_size: int = 1024) -> Feedback:
    """Draw ``n_samples`` from ``gan`` (seeded), label them with ``oracle``, split.

    Raises ``FeedbackError`` when fewer than ``min_negatives`` negatives come out, naming the
    measured share and what to do.
    """
    if not isinstance(n_samples, int) or isinstance(n_samples, bool) or n_samples < 1:
        raise ConfigError(f"n_samples must be a positive integer, got {n_samples!r}")
    check_gan(gan)  # one small batch first: a GAN that does not fit agu's conventions says so here
    z = gan.sample_latents(n_samples, seed)  # as gan.sample, keeping the latents
    with evaluating(gan):  # each latent's image on its own, whatever the batch (batch norm)
        x = torch.cat([gan.generate(zb) for zb in z.split(batch_size)]).cpu()
    z = z.cpu()
    check_output_range(gan, x)  # every sample, beyond check_gan's few
    neg = oracle(x)
    if not isinstance(neg, torch.Tensor) or neg.dtype != torch.bool or neg.shape != (n_samples,):
        got = f"{neg.dtype} {tuple(neg.shape)}" if isinstance(neg, torch.Tensor) else type(neg).__name__
        raise ConfigError(f"the oracle must return one bool per image, a bool tensor ({n_samples},), got {got}: "
                          "True marks a negative (what to forget)")
    neg = neg.cpu()
    share = float(neg.float().mean())
    if int(neg.sum()) < min_negatives:
        enough = math.ceil(1.5 * min_negatives / share) if share > 0 else 10 * n_samples  # samples for ~1.5x the minimum
        if isinstance(oracle, ClassifierOracle):
            looser = "lower the oracle's threshold (--threshold; ClassifierOracle(..., threshold=))"
        else:
            looser = "loosen the oracle (for bold strokes a lower percentile: --bold; bold_strokes(..., percentile=))"
        raise FeedbackError(
            f"the GAN produced {int(neg.sum())} negatives in {n_samples} samples (measured share {share:.2%}), "
            f"fewer than the {min_negatives} needed. Draw more samples (--n-samples {enough}; in Python "
            f"collect(..., n_samples={enough})), {looser}, or pick negatives yourself and give them as a folder "
            "of images (agu adapt --negatives DIR, then agu unlearn --adapted; in Python adapt(gan, images)). "
            "A share this small can also mean the GAN hardly ever makes what you want to forget: look at its "
            "samples (agu sample) and check the class"
        )
    return Feedback(x[neg], x[~neg], share, z[~neg], z[neg])
