"""Metrics in a registry: each takes the GAN under test and an ``EvalContext`` (everything fixed,
computed once: the evaluation latents, the original GAN's samples and labels, the real data's
feature statistics) and returns a dict of named floats.

FID here is computed in the feature space of agu's classifier (its 128-d penultimate layer),
not Inception's: no Inception weights are available offline. Every output names the network
(``ctx.feature_network``); numbers are comparable within agu, not with Inception FIDs.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import torch

from .data import check_images
from .errors import ConfigError, DataError, TrainingError
from .losses import flatten_params
from .models import GAN, check_gan, check_output_range, evaluating, generator_params

# ----------------------------------------------------------------------------------------
# Building blocks


@torch.no_grad()
def generate_batched(gan: GAN, z: torch.Tensor, batch_size: int = 1024) -> torch.Tensor:
    """Images for latents ``z`` on the CPU, in batches, without grad, in eval mode. A GAN whose
    images are not finite (NaN or inf: it diverged) raises ``TrainingError``."""
    gan_device = gan.device
    with evaluating(gan):
        x = torch.cat([gan.generate(zb.to(gan_device)).float().cpu() for zb in z.split(batch_size)])
    if not bool(torch.isfinite(x).all()):
        raise TrainingError(f"the GAN's images contain NaN or inf ({int((~torch.isfinite(x)).sum())} values): its "
                            "weights diverged, so there is nothing to evaluate; lower the learning rate, gamma or the iterations")
    return x


def feature_stats(features: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    """Mean ``(d,)`` and covariance ``(d, d)`` of features ``(n, d)``, float64."""
    f = features.double().numpy()
    return f.mean(0), np.cov(f, rowvar=False)


# FID = ||mu1 - mu2||^2 + Tr(S1 + S2 - 2 (S1 S2)^(1/2))
def frechet_distance(mu1, s1, mu2, s2) -> float:
    """Fréchet distance between two Gaussians; Tr (S1 S2)^(1/2) via the symmetric form
    S1^(1/2) S2 S1^(1/2), whose eigenvalues are real and >= 0."""
    w, v = np.linalg.eigh(s1)
    sqrt_s1 = (v * np.sqrt(np.clip(w, 0, None))) @ v.T
    m = sqrt_s1 @ s2 @ sqrt_s1
    tr_sqrt = np.sqrt(np.clip(np.linalg.eigvalsh((m + m.T) / 2), 0, None)).sum()
    return float(((mu1 - mu2) ** 2).sum() + np.trace(s1) + np.trace(s2) - 2 * tr_sqrt)


def fid_from_features(a: torch.Tensor, b: torch.Tensor) -> float:
    """FID between two sets of features; a squared distance, so rounding below 0 (two nearly equal
    sets) is returned as 0."""
    return max(0.0, frechet_distance(*feature_stats(a), *feature_stats(b)))


def knn_precision_recall(real: torch.Tensor, fake: torch.Tensor, k: int = 3) -> tuple[float, float]:
    """Improved precision/recall (Kynkäänniemi et al. 2019) with k-NN balls in feature space:
    precision = share of fakes inside some real ball, recall = share of reals inside some fake ball."""

    def radii(x):
        d = torch.cdist(x, x)
        return d.kthvalue(k + 1, dim=1).values  # k-th neighbour, excluding self

    real, fake = real.float(), fake.float()
    r_real, r_fake = radii(real), radii(fake)
    d = torch.cdist(fake, real)  # (n_fake, n_real)
    precision = (d <= r_real.unsqueeze(0)).any(1).float().mean()
    recall = (d.T <= r_fake.unsqueeze(0)).any(1).float().mean()
    return float(precision), float(recall)


def class_shares(labels: torch.Tensor, n_classes: int, exclude=()) -> torch.Tensor:
    """Shares ``(n_classes,)`` of each class among the labels not in ``exclude`` (excluded = 0)."""
    keep = ~torch.isin(labels, torch.as_tensor(list(exclude), dtype=labels.dtype))
    counts = torch.bincount(labels[keep], minlength=n_classes).double()
    return counts / counts.sum().clamp_min(1)


# TV = 1/2 sum_c |p_c - q_c| over the retained classes' shares (the forgotten ones excluded on both sides)
def retained_tv_between(labels_a: torch.Tensor, labels_b: torch.Tensor, n_classes: int, forget) -> float:
    return float(0.5 * (class_shares(labels_a, n_classes, forget) - class_shares(labels_b, n_classes, forget)).abs().sum())


@torch.no_grad()
def positives_elsewhere(original: GAN, oracle: Callable, n: int, seed: int, max_rounds: int = 20) -> torch.Tensor:
    """``n`` positive samples of ``original`` (images the oracle does not flag) on latents other than
    the evaluation ones: drawn ``n`` at a time with seeds ``seed``, ``seed + 1``, ... Fewer than ``n``
    when the GAN almost only makes negatives (``max_rounds`` draws)."""
    kept, have = [], 0
    for r in range(max_rounds):
        x = generate_batched(original, original.sample_latents(n, seed=seed + r, device="cpu"))
        x = x[~oracle(x).cpu()]
        kept.append(x)
        have += len(x)
        if have >= n:
            break
    return torch.cat(kept)[:n]


# ----------------------------------------------------------------------------------------
# The fixed evaluation context


@dataclass
class EvalContext:
    """Everything the metrics compare against, computed once by ``make_context``."""

    original: GAN
    oracle: Callable  # images -> bool (negative)
    z: torch.Tensor  # (n_eval, latent_dim) evaluation latents, CPU
    classifier: object | None = None  # agu Classifier: labels and FID features
    forget: list[int] = field(default_factory=list)
    real_features: torch.Tensor | None = None  # features of real data without the forgotten class
    retrained: GAN | None = None  # GAN retrained from scratch without the class (Ret-FID)
    adapted: list[GAN] = field(default_factory=list)
    feature_network: str = "none"
    n_pr: int = 2000  # samples used for precision/recall (k-NN is quadratic)
    seed: int = 1234  # of the evaluation latents (the retrained GAN's reference latents: seed + 1)
    # caches filled by make_context
    orig_negative: torch.Tensor | None = None  # (n_eval,) bool
    orig_labels: torch.Tensor | None = None
    orig_features: torch.Tensor | None = None
    retrained_features: torch.Tensor | None = None
    floor_features: torch.Tensor | None = None  # the original's positives on other latents (metric "floor")
    floor_labels: torch.Tensor | None = None
    _current: dict = field(default_factory=dict)  # per-GAN cache: images/labels/features


FLOOR_SEED_OFFSET = 2**20  # latents of metric "floor": far from every other seed agu draws with (training.MAX_SEED)


def check_real_images(images: torch.Tensor, image_shape) -> None:
    """Real images for FID must be ``(n, *image_shape)`` in [-1, 1], as G's (``DataError`` otherwise); all of
    them >= 0 is the mark of [0, 1] images (ToTensor's range): a warning, as their FID would be wrong."""
    check_images(images, image_shape, "real_images")
    if len(images) and float(images.min()) >= 0:
        warnings.warn(f"real_images all lie in [{float(images.min()):.3g}, {float(images.max()):.3g}]: agu's images are in "
                      "[-1, 1]; if these are [0, 1] images, pass 2 * x - 1, or FID and precision/recall are wrong", stacklevel=3)


def make_context(
    original: GAN,
    oracle: Callable,
    n_eval: int = 5000,
    seed: int = 1234,
    classifier=None,
    forget=(),
    real_images: torch.Tensor | None = None,
    retrained: GAN | None = None,
    adapted: list[GAN] | None = None,
) -> EvalContext:
    """Fix the evaluation latents and compute the original GAN's labels/features and the real
    data's features once. ``real_images``: real data **without** the forgotten class."""
    if n_eval < 10:
        raise ConfigError(f"n_eval must be at least 10, got {n_eval}")
    check_gan(original)
    if real_images is not None:
        check_real_images(real_images, original.image_shape)
    z = original.sample_latents(n_eval, seed=seed, device="cpu")
    x = generate_batched(original, z)
    check_output_range(original, x)  # every evaluation sample, beyond check_gan's few
    ctx = EvalContext(original, oracle, z, classifier, [int(c) for c in forget], adapted=list(adapted or []), seed=seed)
    ctx.orig_negative = oracle(x)
    if classifier is not None:
        classifier.check_shape(original.image_shape)
        ctx.orig_labels = classifier.predict(x).cpu()
        ctx.orig_features = classifier.features(x).cpu()
        name = classifier.meta.get("dataset", "?")
        ctx.feature_network = f"agu SmallCNN classifier ({name}), penultimate layer, {ctx.orig_features.shape[1]}-d"
        if real_images is not None:
            ctx.real_features = classifier.features(real_images).cpu()
        x_floor = positives_elsewhere(original, oracle, n_eval, seed + FLOOR_SEED_OFFSET)
        check_enough_positives(int((~ctx.orig_negative).sum()), len(x_floor), n_eval)
        ctx.floor_features = classifier.features(x_floor).cpu()
        ctx.floor_labels = classifier.predict(x_floor).cpu()
    if retrained is not None:
        attach_retrained(ctx, retrained)
    return ctx


def check_enough_positives(on_latents: int, elsewhere: int, n_eval: int) -> None:
    """The FIDs to the original's positives need at least 2 of them (a mean and a covariance), on the
    evaluation latents and on the floor's other latents: ``DataError`` with what to do otherwise (numpy's
    own error, "Eigenvalues did not converge", says nothing of the cause)."""
    if min(on_latents, elsewhere) < 2:
        raise DataError(
            f"the original GAN made only {on_latents} positive(s) (images the oracle does not flag) on the {n_eval} "
            f"evaluation latents ({elsewhere} on {n_eval} others): the FID to its positives needs at least 2. The oracle "
            "flags nearly everything this GAN makes: check the class or the predicate (agu sample shows the GAN's "
            "samples), or evaluate on more latents (--n-eval; in Python make_context(..., n_eval))")


def attach_retrained(ctx: EvalContext, retrained: GAN) -> None:
    """Give ``ctx`` the GAN retrained from scratch without the class (``retrained``, trained after the
    context was made): Ret-FID compares with its samples on latents other than the evaluation ones."""
    check_gan(retrained)
    ctx.retrained = retrained
    if ctx.classifier is not None:
        z_ref = retrained.sample_latents(len(ctx.z), seed=ctx.seed + 1, device="cpu")  # other latents: Ret-FID(retrained) > 0
        ctx.retrained_features = ctx.classifier.features(generate_batched(retrained, z_ref)).cpu()


def _outputs(gan: GAN, ctx: EvalContext) -> dict:
    """Images, oracle answers, labels and features of ``gan`` on the evaluation latents (cached per call of evaluate)."""
    if gan is ctx.original:  # computed once by make_context
        return {"gan": gan, "negative": ctx.orig_negative, "labels": ctx.orig_labels, "features": ctx.orig_features}
    if ctx._current.get("gan") is not gan:
        x = generate_batched(gan, ctx.z)
        out = {"gan": gan, "images": x, "negative": ctx.oracle(x)}
        if ctx.classifier is not None:
            out["labels"] = ctx.classifier.predict(x).cpu()
            out["features"] = ctx.classifier.features(x).cpu()
        ctx._current = out
    return ctx._current


# ----------------------------------------------------------------------------------------
# The registry

METRICS: dict[str, Callable[[GAN, EvalContext], dict]] = {}
METRIC_NEEDS: dict[str, str] = {}  # name -> what the context must hold for the metric to give a value


def metric(name: str, needs: str = ""):
    def register(fn):
        METRICS[name] = fn
        METRIC_NEEDS[name] = needs
        return fn

    return register


# PUL = 100 * (N_orig - N_new) / N_orig on the same latents
@metric("pul")
def pul(gan: GAN, ctx: EvalContext) -> dict:
    n_orig = int(ctx.orig_negative.sum())
    n_new = int(_outputs(gan, ctx)["negative"].sum())
    value = 100.0 * (n_orig - n_new) / n_orig if n_orig > 0 else float("nan")
    return {"pul": value, "negatives_original": float(n_orig), "negatives": float(n_new)}


@metric("negative_share")
def negative_share(gan: GAN, ctx: EvalContext) -> dict:
    return {
        "negative_share": float(_outputs(gan, ctx)["negative"].float().mean()),
        "negative_share_original": float(ctx.orig_negative.float().mean()),
    }


@metric("fid", needs="a classifier (the feature network)")
def fid(gan: GAN, ctx: EvalContext) -> dict:
    """FID vs real data without the class, vs the original GAN's positive samples (and its two parts, below),
    vs the retrained GAN."""
    if ctx.classifier is None:
        return {}
    f = _outputs(gan, ctx)["features"]
    kept = ~ctx.orig_negative  # the latents where the original made positives: their images should stay
    positives = ctx.orig_features[kept]
    out = {"fid_positives": fid_from_features(f, positives)}
    # Where fid_positives comes from. kept: the GAN's images on those latents alone (0 when they did not move;
    # the drift of what should stay). replaced: the FID with the kept latents' images exactly the original's,
    # so only the images that replace the negatives differ (what the replacements alone cost).
    out["fid_positives_kept"] = fid_from_features(f[kept], positives)
    out["fid_positives_replaced"] = fid_from_features(torch.where(kept[:, None], ctx.orig_features, f), positives)
    if ctx.real_features is not None:
        out["fid_real"] = fid_from_features(f, ctx.real_features)
    if ctx.retrained_features is not None:
        out["ret_fid"] = fid_from_features(f, ctx.retrained_features)
    return out


# retained_tv_between(before, after) on the evaluation latents, and its two parts
@metric("retained_tv", needs="a classifier (the class labels)")
def retained_tv(gan: GAN, ctx: EvalContext) -> dict:
    if ctx.classifier is None:
        return {}
    n = ctx.classifier.n_classes
    labels, kept = _outputs(gan, ctx)["labels"], ~ctx.orig_negative
    tv = lambda a, b: retained_tv_between(a, b, n, ctx.forget)
    # and its two parts, as for fid_positives. kept: on the latents where the original made positives alone
    # (their images changing class); replaced: with those latents' labels the original's, so only the classes
    # that the images replacing the negatives took count.
    out = {"retained_tv": tv(ctx.orig_labels, labels),
           "retained_tv_kept": tv(ctx.orig_labels[kept], labels[kept]),
           "retained_tv_replaced": tv(ctx.orig_labels, torch.where(kept, ctx.orig_labels, labels))}
    out.update({f"share_{c}": float(s) for c, s in enumerate(class_shares(labels, n))})
    return out


# The floor of the two paired measures above: the original GAN's own positives drawn on other
# latents, i.e. a GAN with exactly the distribution the unlearned one should have, but other images.
# FID-to-positives is estimated from ~5,000 samples, so even this GAN scores well above 0 (on the
# shipped digits GAN 0.07-0.31 times the original's own FID-to-positives): a GAN gets below the
# floor only by keeping each positive latent's image. Reported for the original GAN only.
@metric("floor", needs="a classifier, and is reported for the original GAN only")
def floor(gan: GAN, ctx: EvalContext) -> dict:
    if ctx.classifier is None or ctx.floor_features is None or len(ctx.floor_features) < 2 or gan is not ctx.original:
        return {}  # (fewer than 2: the GAN almost only makes negatives)
    return {"fid_positives_floor": fid_from_features(ctx.floor_features, ctx.orig_features[~ctx.orig_negative]),
            "retained_tv_floor": retained_tv_between(ctx.orig_labels, ctx.floor_labels, ctx.classifier.n_classes, ctx.forget)}


@metric("precision_recall", needs="a classifier and real images (make_context(real_images=...))")
def precision_recall(gan: GAN, ctx: EvalContext) -> dict:
    if ctx.classifier is None or ctx.real_features is None:
        return {}
    gen = torch.Generator().manual_seed(0)
    real = ctx.real_features[torch.randperm(len(ctx.real_features), generator=gen)[: ctx.n_pr]]
    fake = _outputs(gan, ctx)["features"][: ctx.n_pr]
    p, r = knn_precision_recall(real, fake)
    return {"precision": p, "recall": r}


# distances ||theta - theta_G||^2 and mean_k ||theta - theta_N^k||^2 (plain squared L2 over G's parameters)
@metric("param_distance")
def param_distance_metric(gan: GAN, ctx: EvalContext) -> dict:
    theta = flatten_params(generator_params(gan)).detach().cpu()
    out = {"dist_to_original": float((theta - flatten_params(generator_params(ctx.original)).detach().cpu()).pow(2).sum())}
    if ctx.adapted:
        ds = [float((theta - flatten_params(generator_params(a)).detach().cpu()).pow(2).sum()) for a in ctx.adapted]
        out["dist_to_adapted"] = sum(ds) / len(ds)
    return out


def evaluate(gan: GAN, ctx: EvalContext, metrics=None) -> dict:
    """Run the named metrics (default: all that ``ctx`` allows) on ``gan``; returns one flat dict of
    floats. A metric named in ``metrics`` that ``ctx`` cannot give (e.g. FID without a classifier)
    raises ``ConfigError`` saying what it needs."""
    names = list(metrics) if metrics else list(METRICS)
    unknown = [m for m in names if m not in METRICS]
    if unknown:
        raise ConfigError(f"unknown metric(s) {unknown}; valid: {', '.join(METRICS)}")
    out: dict = {}
    try:
        with evaluating(gan):
            for name in names:
                values = METRICS[name](gan, ctx)
                if metrics and not values:
                    raise ConfigError(f"metric {name!r} cannot be computed here: it needs {METRIC_NEEDS[name] or 'more'}")
                out.update(values)
    finally:
        ctx._current = {}
    return out
