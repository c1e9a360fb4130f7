"""GANs: one small abstraction (``GAN``) over any generator/discriminator pair, and the two
built-in architectures (a DCGAN-style conv GAN and an MLP GAN).

Conventions used everywhere in agu_lib:
- latents are ``z ~ N(0, I)`` of shape ``(N, latent_dim)`` (a GAN trained on U(-1, 1) latents states
  ``latent_prior="uniform"`` and its ``generator`` maps z there);
- ``gan.generate(z)`` returns images ``(N, C, H, W)`` in ``[-1, 1]``;
- ``gan.discriminate(x)`` returns raw logits ``(N,)`` (no sigmoid).
"""

from __future__ import annotations

import contextlib
import copy
import itertools
import math
import numbers
import warnings
from collections.abc import Callable, Iterator

import torch
from torch import nn

from .errors import ConfigError, error_line

# ----------------------------------------------------------------------------------------
# Built-in architectures


class MLPGenerator(nn.Module):
    """z (N, latent_dim) -> Linear/ReLU stack -> Linear -> tanh -> (N, C, H, W).

    The layer layout is that of the common MNIST MLP GANs (e.g. csinva's), so foreign
    weights map onto ``layers.<i>.weight`` one to one.
    """

    def __init__(self, latent_dim: int, hidden: list[int], image_shape: tuple[int, int, int]):
        super().__init__()
        self.image_shape = tuple(image_shape)
        dims = [latent_dim, *hidden]
        layers: list[nn.Module] = []
        for a, b in itertools.pairwise(dims):
            layers += [nn.Linear(a, b), nn.ReLU()]
        layers += [nn.Linear(dims[-1], math.prod(self.image_shape)), nn.Tanh()]
        self.layers = nn.Sequential(*layers)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.layers(z).view(-1, *self.image_shape)  # (N, C, H, W)


class MLPDiscriminator(nn.Module):
    """x (N, C, H, W) -> flatten -> Linear/LeakyReLU(0.2) stack -> Linear -> logit (N,)."""

    def __init__(self, image_shape: tuple[int, int, int], hidden: list[int]):
        super().__init__()
        dims = [math.prod(image_shape), *hidden]
        layers: list[nn.Module] = []
        for a, b in itertools.pairwise(dims):
            layers += [nn.Linear(a, b), nn.LeakyReLU(0.2)]
        layers += [nn.Linear(dims[-1], 1)]
        self.layers = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers(x.flatten(1)).squeeze(1)  # (N,)


def _upsampling_plan(size: int) -> tuple[int, int]:
    """Start size s0 and number of x2 upsamplings so that s0 * 2**n == size, s0 in 3..7."""
    n = 0
    while size % 2 == 0 and size // 2 >= 4:
        size //= 2
        n += 1
    if not 3 <= size <= 7:
        raise ConfigError(
            f"dcgan cannot make images of this size (start size {size} after halving); "
            "use a size of the form s*2**n with s in 3..7, e.g. 16, 28 or 32"
        )
    return size, n


class DCGANGenerator(nn.Module):
    """z -> Linear -> (c0, s0, s0) -> [Upsample x2, Conv3x3, LeakyReLU] * n -> Conv3x3 -> tanh.

    For 16x16 images with ``channels=64``: (64, 4, 4) -> (32, 8, 8) -> (16, 16, 16) -> (C, 16, 16).
    No batch norm: every layer is per-sample, so per-sample gradients (the Fisher) and
    train/eval modes behave the same.
    """

    def __init__(self, latent_dim: int, image_shape: tuple[int, int, int], channels: int = 64):
        super().__init__()
        c, h, w = image_shape
        if h != w:
            raise ConfigError(f"dcgan needs square images, got {h}x{w}")
        self.s0, n_up = _upsampling_plan(h)
        self.c0 = channels
        self.fc = nn.Linear(latent_dim, channels * self.s0 * self.s0)
        blocks: list[nn.Module] = []
        ch = channels
        for _ in range(n_up):
            blocks += [
                nn.Upsample(scale_factor=2, mode="nearest"),
                nn.Conv2d(ch, ch // 2, 3, padding=1),
                nn.LeakyReLU(0.2),
            ]
            ch //= 2
        blocks += [nn.Conv2d(ch, c, 3, padding=1), nn.Tanh()]
        self.blocks = nn.Sequential(*blocks)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        x = nn.functional.leaky_relu(self.fc(z), 0.2)
        x = x.view(-1, self.c0, self.s0, self.s0)  # (N, c0, s0, s0)
        return self.blocks(x)  # (N, C, H, W)


class DCGANDiscriminator(nn.Module):
    """x (N, C, H, W) -> [Conv4x4 stride 2, LeakyReLU] * n -> Linear -> logit (N,).

    For 16x16 with ``channels=64``: (C,16,16) -> (16,8,8) -> (32,4,4) -> 512 -> 1.
    """

    def __init__(self, image_shape: tuple[int, int, int], channels: int = 64):
        super().__init__()
        c, h, _ = image_shape
        s0, n_down = _upsampling_plan(h)
        ch_out = channels // 2 ** max(n_down - 1, 0)
        layers: list[nn.Module] = []
        ch_in = c
        for _ in range(n_down):
            layers += [nn.Conv2d(ch_in, ch_out, 4, stride=2, padding=1), nn.LeakyReLU(0.2)]
            ch_in, ch_out = ch_out, ch_out * 2
        self.convs = nn.Sequential(*layers)
        self.fc = nn.Linear(ch_in * s0 * s0, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.convs(x).flatten(1)).squeeze(1)  # (N,)


def build_mlp(latent_dim: int, image_shape, g_hidden=(256, 256), d_hidden=(256, 256)):
    """MLP GAN; layer widths default to those of csinva's MNIST MLP GAN."""
    image_shape = tuple(image_shape)
    return (
        MLPGenerator(latent_dim, list(g_hidden), image_shape),
        MLPDiscriminator(image_shape, list(d_hidden)),
    )


def build_dcgan(latent_dim: int, image_shape, channels: int = 64, d_channels: int | None = None):
    """DCGAN-style conv GAN; ``channels`` is G's widest layer, ``d_channels`` D's (default same)."""
    image_shape = tuple(image_shape)
    return (
        DCGANGenerator(latent_dim, image_shape, channels),
        DCGANDiscriminator(image_shape, d_channels or channels),
    )


#: architecture name -> builder(latent_dim, image_shape, **kwargs) -> (generator, discriminator)
ARCHITECTURES: dict[str, Callable[..., tuple[nn.Module, nn.Module]]] = {
    "dcgan": build_dcgan,
    "mlp": build_mlp,
}
BUILT_IN = dict(ARCHITECTURES)  # agu's own: register_architecture does not replace them


def register_architecture(name: str, builder: Callable[..., tuple[nn.Module, nn.Module]]) -> None:
    """Make a user architecture known by name, so GANs built from it can be saved and loaded.

    ``builder(latent_dim, image_shape, **arch_kwargs)`` must return ``(generator, discriminator)``.
    Registering a name again replaces its builder, but not agu's own (``dcgan``, ``mlp``: the shipped
    GANs and imported checkpoints are built with them).
    """
    if not isinstance(name, str) or not name:
        raise ConfigError(f"an architecture's name must be a non-empty string, got {name!r}")
    if not callable(builder):
        raise ConfigError(f"the builder of architecture {name!r} must be callable, builder(latent_dim, image_shape, "
                          f"**arch_kwargs) -> (generator, discriminator); got a {type(builder).__name__}")
    if name in BUILT_IN and builder is not BUILT_IN[name]:
        raise ConfigError(f"{name!r} is one of agu's own architectures ({', '.join(BUILT_IN)}): the shipped GANs are built "
                          "with it; register yours under another name")
    ARCHITECTURES[name] = builder


#: what ``import_architectures`` imported in this process, in order (worker processes replay it)
IMPORTED: list[str] = []


def import_architectures(specs) -> None:
    """Import the Python files (``path/to/my_gan.py``) or modules (``my_package.gans``) that register
    user architectures (``agu --import``). A file is imported as a module named after its stem, so
    that GANs of its classes can be sent to worker processes, which import the same files first; its
    folder goes first on ``sys.path`` (as ``python my_gan.py`` would put it) and stays there, so the file
    can import its sibling modules, then or later (worker processes start with the parent's ``sys.path``)."""
    import importlib
    import importlib.util
    import sys
    from pathlib import Path

    for spec in specs:
        if spec in IMPORTED:
            continue
        path = Path(spec)
        try:
            if spec.endswith(".py") or path.is_file():
                if not path.is_file():
                    raise FileNotFoundError(f"no such file: {path}")
                name = path.stem
                folder = str(path.resolve().parent)
                if folder not in sys.path:
                    sys.path.insert(0, folder)
                module_spec = importlib.util.spec_from_file_location(name, path.resolve())
                module = importlib.util.module_from_spec(module_spec)
                sys.modules[name] = module
                module_spec.loader.exec_module(module)
            else:
                importlib.import_module(spec)
        except Exception as e:  # noqa: BLE001 (any error of the user's code: one line saying which file)
            if spec.endswith(".py") or path.is_file():
                sys.modules.pop(path.stem, None)
            raise ConfigError(f"--import {spec}: it could not be imported ({type(e).__name__}: {e}); give a Python file "
                              "or an importable module that calls agu_lib.register_architecture") from None
        IMPORTED.append(spec)


# ----------------------------------------------------------------------------------------
# Train and eval modes (they matter only for user modules with batch norm or dropout: the
# built-in architectures have neither), and the check of a user's modules before training

NORM_LAYERS = (nn.modules.batchnorm._NormBase,)  # batch and instance norm: the layers with running statistics


@contextlib.contextmanager
def evaluating(module: nn.Module) -> Iterator[nn.Module]:
    """``module`` in eval mode inside the block (batch norm uses its running statistics, so a
    sample does not depend on the rest of its batch and no statistic changes); every submodule's
    own mode is restored afterwards."""
    modes = [(m, m.training) for m in module.modules()]
    module.eval()
    try:
        yield module
    finally:
        for m, mode in modes:
            m.training = mode


def finetuning_mode(gan: GAN) -> GAN:
    """The mode stages 1 and 2 train a pre-trained GAN in: everything in train mode except the
    generator's normalisation layers, which keep the pre-trained running statistics (their scale
    and shift still train). So G maps each latent on its own, as when sampling: the preserved
    positives start exactly at their targets and per-sample gradients (the Fisher) are defined.
    D trains as it was pre-trained (batch statistics if it has batch norm)."""
    gan.train()
    for m in gan.generator.modules():
        if isinstance(m, NORM_LAYERS):
            m.eval()
    return gan


def _final_sigmoid(module: nn.Module) -> str | None:
    """Where ``module`` ends in an ``nn.Sigmoid``, its name in ``module`` (``""`` for the module itself,
    ``"main.12"`` for pytorch/examples' DCGAN discriminator), else None. "Ends in": the last leaf module
    registered is a sigmoid that is the last step of an ``nn.Sequential`` (or the module itself), the
    pattern of every common discriminator that returns probabilities."""
    if isinstance(module, nn.Sigmoid):
        return ""
    leaves = [(name, m) for name, m in module.named_modules() if not any(True for _ in m.children())]
    if not leaves or not isinstance(leaves[-1][1], nn.Sigmoid):
        return None
    name = leaves[-1][0]
    parent = module.get_submodule(name.rpartition(".")[0]) if "." in name else module
    last_step = isinstance(parent, nn.Sequential) and parent[-1] is leaves[-1][1]
    return name if last_step else None


def _drop_advice(name: str) -> str:
    """The line that drops the sigmoid at ``name`` (see ``_final_sigmoid``) from a discriminator ``d``
    (``del`` keeps the class of a Sequential subclass, where slicing may not)."""
    if name == "":
        return "give D's logits (the input of that sigmoid) instead"
    parent, _, _ = name.rpartition(".")
    path = "".join(f"[{p}]" if p.isdigit() else f".{p}" for p in parent.split(".")) if parent else ""
    return f"del d{path}[-1]"


def _positive_int(x) -> bool:
    """Whether ``x`` is an integer >= 1 (Python's or numpy's; not a bool)."""
    return isinstance(x, numbers.Integral) and not isinstance(x, bool) and x >= 1


#: the latent priors a GAN may state: agu draws z ~ N(0, I) and maps it to the prior inside ``gan.generator``
LATENT_PRIORS = ("normal", "uniform")


def _check_conventions(latent_dim, latent_shape, output_range, latent_prior="normal"):
    """``latent_dim`` as an int, ``latent_shape`` as a tuple (or None when it is ``(latent_dim,)``),
    ``output_range`` as two floats and ``latent_prior`` one of ``LATENT_PRIORS``, or a ConfigError that says
    what to pass."""
    if not _positive_int(latent_dim):
        hint = (f"; a generator that takes latents of shape {tuple(latent_dim)} needs latent_dim={math.prod(latent_dim)}, "
                f"latent_shape={tuple(latent_dim)}" if isinstance(latent_dim, (tuple, list, torch.Size)) and latent_dim
                and all(_positive_int(s) for s in latent_dim) else "")
        raise ConfigError(f"latent_dim must be a positive integer (the size of z), got {latent_dim!r}{hint}")
    latent_dim = int(latent_dim)
    if latent_shape is not None:
        shape = tuple(latent_shape) if isinstance(latent_shape, (tuple, list, torch.Size)) else None
        if shape and all(_positive_int(s) for s in shape):
            shape = tuple(int(s) for s in shape)
        if not shape or not all(_positive_int(s) for s in shape) or math.prod(shape) != latent_dim:
            raise ConfigError(f"latent_shape must be a tuple of positive integers with latent_dim ({latent_dim}) elements "
                              f"in all, e.g. ({latent_dim}, 1, 1); got {latent_shape!r}")
        latent_shape = None if shape == (latent_dim,) else shape
    try:
        low, high = (float(v) for v in output_range)
    except (TypeError, ValueError):
        raise ConfigError(f"output_range must be (low, high), e.g. (0, 1), got {output_range!r}") from None
    if not (math.isfinite(low) and math.isfinite(high) and low < high):
        raise ConfigError(f"output_range must be two finite numbers, low < high, e.g. (0, 1); got {output_range!r}")
    if latent_prior not in LATENT_PRIORS:
        raise ConfigError(f"latent_prior must be one of {', '.join(LATENT_PRIORS)} (the distribution of z the generator "
                          f"was trained on: 'uniform' is U(-1, 1) per coordinate), got {latent_prior!r}; for another "
                          "prior wrap the generator in a module that maps z ~ N(0, I) to it")
    return latent_dim, latent_shape, (low, high), latent_prior


class Rescale(nn.Module):
    """x -> scale * x + shift, no weights: maps images between a GAN's own output range and agu's [-1, 1]."""

    def __init__(self, scale: float, shift: float):
        super().__init__()
        self.scale, self.shift = scale, shift

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.scale + self.shift

    def extra_repr(self) -> str:
        return f"scale={self.scale:g}, shift={self.shift:g}"


class NormalToUniform(nn.Module):
    """z -> erf(z / sqrt(2)), no weights: maps each coordinate of z ~ N(0, 1) to exactly U(-1, 1)
    (2 Phi(z) - 1, Phi the normal CDF), for a generator trained on uniform latents."""

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return torch.erf(z * 0.7071067811865476)


def _adapted_generator(generator: nn.Module, latent_shape, output_range, latent_prior="normal") -> nn.Module:
    """``generator`` as agu calls it: z ``(N, latent_dim)`` from N(0, I) in, images in [-1, 1] out (itself
    when it is so).

        z_own = erf(z / sqrt(2))   (latent_prior "uniform": U(-1, 1))
        x_agu = 2 (x - low) / (high - low) - 1
    """
    steps = [NormalToUniform()] if latent_prior == "uniform" else []
    if latent_shape is not None:
        steps.append(nn.Unflatten(1, latent_shape))
    steps.append(generator)
    low, high = output_range
    if (low, high) != (-1.0, 1.0):
        steps.append(Rescale(2.0 / (high - low), -2.0 * low / (high - low) - 1.0))
    return nn.Sequential(*steps) if len(steps) > 1 else generator


def _adapted_discriminator(discriminator: nn.Module, output_range) -> nn.Module:
    """``discriminator`` as agu calls it: images in [-1, 1] in (itself when it was trained on them).

        x = low + (x_agu + 1) (high - low) / 2
    """
    low, high = output_range
    if (low, high) == (-1.0, 1.0):
        return discriminator
    return nn.Sequential(Rescale((high - low) / 2.0, low + (high - low) / 2.0), discriminator)


def _latent_advice(gan: GAN, z: torch.Tensor) -> str:
    """What to do when the generator fails on ``z`` ``(N, latent_dim)``: a convolutional generator that
    takes ``(N, latent_dim, 1, 1)`` (as pytorch/examples' DCGAN) needs ``latent_shape``."""
    n, d = z.shape
    try:
        gan.given_generator(z.reshape(n, d, 1, 1))
    except Exception:  # noqa: BLE001 (the user's module: whatever it raises)
        if gan.latent_shape is not None:
            return f"check latent_shape {gan.latent_shape}: the generator fails on latents of that shape too"
        return "give the GAN its generator's latent size"
    instead = f" instead of {gan.latent_shape}" if gan.latent_shape is not None else ""
    return (f"this generator takes latents of shape (N, {d}, 1, 1), as pytorch/examples' DCGAN does: say so with "
            f"latent_shape=({d}, 1, 1){instead} (agu_lib.GAN(...), or agu import-gan --latent-shape {d},1,1)")


def _legacy_norms(gan: GAN) -> list[str]:
    """Modules normalised by the old hook-based ``torch.nn.utils.spectral_norm`` / ``weight_norm``, whose
    weight is recomputed into a plain attribute at every forward (it cannot be copied after a backward)."""
    from torch.nn.utils.spectral_norm import SpectralNorm
    from torch.nn.utils.weight_norm import WeightNorm

    return [f"{part}.{name}".rstrip(".") for part, module in (("generator", gan.generator), ("discriminator", gan.discriminator))
            for name, m in module.named_modules()
            if any(isinstance(h, (SpectralNorm, WeightNorm)) for h in m._forward_pre_hooks.values())]


def _legacy_norm_error(legacy: list[str]) -> ConfigError:
    return ConfigError(
        f"{', '.join(legacy[:3])} {'use' if len(legacy) > 1 else 'uses'} the old torch.nn.utils.spectral_norm / weight_norm hooks, which agu cannot copy "
        "once they ran a backward: convert each such layer m with torch.nn.utils.remove_spectral_norm(m) (or "
        "remove_weight_norm) and then torch.nn.utils.parametrizations.spectral_norm(m) (or weight_norm): same "
        "weights, parametrised")


def check_gan(gan: GAN) -> None:
    """One small batch through G and D before a stage trains them (``ConfigError`` when it does not fit):
    float32 weights, no hook-based spectral/weight norm, G gives ``image_shape`` images per latent
    (channels first) inside its ``output_range``, D one logit per image. Warns when G's samples look
    like [0, 1] images given as [-1, 1] ones, and when D looks like it returns probabilities: every
    output on G's samples, on noise and on blank images lies in [0, 1] (agu's losses need raw logits)."""
    n, shape = 16, gan.image_shape
    odd = sorted({str(t.dtype).replace("torch.", "") for t in gan.parameters() if t.dtype != torch.float32})
    if odd:
        raise ConfigError(f"agu trains and samples in float32, but this GAN has {', '.join(odd)} weights: convert them "
                          "with gan.float() (or generator.float() and discriminator.float() before building the GAN)")
    legacy = _legacy_norms(gan)
    if legacy:
        raise _legacy_norm_error(legacy)
    with torch.no_grad(), evaluating(gan):
        device = gan.device
        z = gan.sample_latents(n, seed=0, device=device)
        try:
            x = gan.generator(z)
        except Exception as e:  # noqa: BLE001 (the user's module: whatever it raises, one line)
            raise ConfigError(f"the generator fails on latents of shape ({n}, {gan.latent_dim}) (latent_dim {gan.latent_dim}): "
                              f"{error_line(e)}; {_latent_advice(gan, z)}") from None
        if x.numel() != n * math.prod(shape):
            raise ConfigError(f"the generator returns {tuple(x.shape)} for {n} latents, not {n} images of shape {shape} "
                              "(image_shape): give the GAN the image shape its generator makes")
        if x.ndim == 4 and tuple(x.shape[1:]) != shape:
            raise ConfigError(f"the generator returns images of shape {tuple(x.shape[1:])}, not image_shape {shape}: agu "
                              "needs channels first, (N, C, H, W); if it makes (N, H, W, C), end it in a permute(0, 3, 1, 2)")
        x = x.reshape(n, *shape)
        _check_range(gan, x)
        noise = torch.rand((n, *shape), generator=torch.Generator().manual_seed(0)).to(device) * 2 - 1
        blank = torch.stack([torch.full(shape, v) for v in (-1.0, 1.0)]).to(device)
        outs = []
        for batch in (x, noise, blank):
            try:
                out = gan.discriminator(batch)
            except Exception as e:  # noqa: BLE001 (the user's module: whatever it raises, one line)
                raise ConfigError(f"the discriminator fails on images of shape {tuple(batch.shape)}: "
                                  f"{error_line(e)}") from None
            if out.numel() != len(batch):
                raise ConfigError(f"the discriminator returns {tuple(out.shape)} for {len(batch)} images; it must return one "
                                  "raw logit per image, (N,) or (N, 1)")
            outs.append(out.reshape(-1).float())
        out = torch.cat(outs)
        in_unit = lambda t: bool(((t >= 0) & (t <= 1)).all())
        # A sigmoid keeps D's outputs in [0, 1] whatever the input; a D that returns logits (an untrained one
        # may happen to give small positive ones) leaves [0, 1] on images scaled far beyond [-1, 1].
        probabilities = (in_unit(out) and float(out.std()) > 0
                         and in_unit(gan.discriminator(torch.cat([noise, blank]) * 100).reshape(-1).float()))
    if probabilities:
        warnings.warn(
            "the discriminator's outputs all lie in [0, 1] (on the generator's samples, on noise, on blank images and on "
            "images scaled 100x): does it end in a sigmoid? agu's losses need raw logits; remove the final sigmoid (the "
            "weights stay the same), or the GAN will barely learn", stacklevel=1)


RANGE_SLACK = 1e-3  # G's images may pass its output range by this share of the range (rounding), not more


def check_output_range(gan: GAN, x: torch.Tensor) -> None:
    """A ConfigError when some of G's images ``x`` (agu's [-1, 1] scale) leave its output range.
    ``check_gan`` looks at 16 samples; feedback and evaluation call this on every image they draw."""
    lo, hi = float(x.min()), float(x.max())
    if not (lo < -1 - 2 * RANGE_SLACK or hi > 1 + 2 * RANGE_SLACK):  # (NaN images: a training error, raised elsewhere)
        return
    outside = int(((x < -1 - 2 * RANGE_SLACK) | (x > 1 + 2 * RANGE_SLACK)).flatten(1).any(1).sum())
    low, high = gan.output_range
    to_own = lambda v: low + (v + 1) * (high - low) / 2
    raise ConfigError(
        f"the generator's images reach [{to_own(lo):.4g}, {to_own(hi):.4g}] ({outside} of {len(x)} samples leave it), "
        f"outside its output range "
        f"[{low:g}, {high:g}]: agu's classifiers, metrics and losses need images inside it. End the generator in a tanh "
        f"(a sigmoid for [0, 1]) or a clamp, nn.Hardtanh({low:g}, {high:g}); or give the GAN its real output range "
        "(output_range=(low, high); agu import-gan --output-range low,high)")


def _check_range(gan: GAN, x: torch.Tensor) -> None:
    """G's images ``x`` (agu's [-1, 1] scale) must lie in the GAN's output range. All of them >= 0 is the
    mark of a [0, 1] generator: refused when the range was not stated (the scores would be wrong), a
    warning when (-1, 1) was stated."""
    check_output_range(gan, x)
    low, high = gan.output_range
    lo, hi = float(x.min()), float(x.max())
    if (low, high) == (-1.0, 1.0) and lo >= 0:
        text = (f"the generator's images all lie in [{lo:.3g}, {hi:.3g}] on a [-1, 1] scale: if it makes images in [0, 1] "
                "(a final sigmoid), say so with output_range=(0, 1) (agu_lib.GAN(...), or agu import-gan --output-range "
                "0,1), or the classifiers and metrics score them wrongly")
        if not gan.range_stated:
            raise ConfigError(text + "; if they really are [-1, 1] images, state output_range=(-1, 1)")
        warnings.warn(text, stacklevel=1)


# ----------------------------------------------------------------------------------------
# The abstraction


class GAN(nn.Module):
    """A generator/discriminator pair with what the rest of agu_lib needs to know about it.

    Arguments:
        generator: ``nn.Module``, z ``(N, latent_dim)`` -> images ``(N, C, H, W)`` or ``(N, C*H*W)``.
        discriminator: ``nn.Module``, images ``(N, C, H, W)`` -> logits ``(N,)`` or ``(N, 1)``.
            It must return raw logits: one that ends in ``nn.Sigmoid`` (an ``nn.Sequential``) is
            refused; drop the sigmoid, the weights stay the same.
        latent_dim: size of z.
        image_shape: ``(C, H, W)``.
        arch, arch_kwargs: the registered architecture that rebuilds these modules (needed to
            save the GAN); ``None`` for an ad-hoc pair that is only used in memory.
        provenance: free-form dict saved in the card (where the weights came from).
        latent_shape: the shape of one latent as the generator takes it, when not ``(latent_dim,)``:
            ``(100, 1, 1)`` for pytorch/examples' DCGAN. agu still draws z ``(N, latent_dim)``.
        output_range: ``(low, high)`` of the generator's images, e.g. ``(0, 1)`` for a generator that
            ends in a sigmoid (its discriminator was trained on that range too); default ``(-1, 1)``.
        latent_prior: the distribution of z the generator was trained on: ``"normal"`` (N(0, I), the
            default) or ``"uniform"`` (U(-1, 1) per coordinate).

    agu draws every latent as z ~ N(0, I), ``(N, latent_dim)`` (``sample_latents``; the stages'
    batches, ``training.sample_latent_batch``). For ``latent_prior="uniform"`` ``gan.generator`` first
    maps z to erf(z / sqrt(2)), exactly U(-1, 1), so sampling, both stages and every metric feed the
    generator the prior it was trained on. A subclass that overrides ``sample_latents`` is refused (the
    stages would not use it): wrap the generator in a module that maps N(0, I) to its prior instead.

    With ``latent_shape``, ``output_range`` or a uniform prior, ``gan.generator`` and ``gan.discriminator``
    wrap the modules given: ``nn.Sequential(<to the prior>, nn.Unflatten(...), generator, <to [-1, 1]>)`` and
    ``nn.Sequential(<back to [low, high]>, discriminator)``; the wrappers hold no weights. Load
    pre-trained weights into your modules before building the GAN.
    """

    def __init__(
        self,
        generator: nn.Module,
        discriminator: nn.Module,
        latent_dim: int,
        image_shape,
        arch: str | None = None,
        arch_kwargs: dict | None = None,
        provenance: dict | None = None,
        latent_shape=None,
        output_range=None,
        latent_prior: str = "normal",
    ):
        super().__init__()
        if type(self).sample_latents is not GAN.sample_latents:
            raise ConfigError(
                f"{type(self).__name__} overrides sample_latents, but agu draws the stages' latents as z ~ N(0, I) "
                "itself, so the override would be used in some places and not others: state the prior instead "
                "(latent_prior='uniform' for U(-1, 1)), or wrap the generator in a module that maps z ~ N(0, I) to "
                "the latents it was trained on")
        own = [m for m in ("sample", "generate", "discriminate") if getattr(type(self), m) is not getattr(GAN, m)]
        if own:
            raise ConfigError(
                f"{type(self).__name__} overrides {', '.join(own)}, but agu's stages call gan.generator and "
                "gan.discriminator directly, so the override would be used in some places and not others: put what "
                "it does into the generator or discriminator module instead")
        if len(tuple(image_shape)) != 3:
            raise ConfigError(f"image_shape must be (C, H, W), got {tuple(image_shape)}")
        stated = output_range is not None
        latent_dim, latent_shape, output_range, latent_prior = _check_conventions(
            latent_dim, latent_shape, output_range if stated else (-1.0, 1.0), latent_prior)
        sigmoid = _final_sigmoid(discriminator)
        if sigmoid is not None:
            raise ConfigError(
                f"the discriminator ends in nn.Sigmoid ({sigmoid}), but agu needs raw logits (its losses apply the "
                "sigmoid themselves; with probabilities the GAN barely learns). Drop that layer, e.g. "
                f"{_drop_advice(sigmoid)}: the weights stay the same")
        self.latent_dim = latent_dim
        self.latent_shape = latent_shape  # what the generator takes per sample, when not (latent_dim,)
        self.output_range = output_range  # the range the generator makes; agu sees [-1, 1]
        self.range_stated = stated  # False: (-1, 1) by default, so a [0, 1]-looking generator is refused
        self.latent_prior = latent_prior  # what the generator was trained on; agu draws N(0, I) and maps it
        self.generator = _adapted_generator(generator, latent_shape, output_range, latent_prior)
        self.discriminator = _adapted_discriminator(discriminator, output_range)
        self._given = (generator, discriminator)  # a tuple: the same modules, not registered twice (copies keep them paired)
        self.image_shape = tuple(int(s) for s in image_shape)
        self.arch = arch
        self.arch_kwargs = dict(arch_kwargs or {})
        self.provenance = dict(provenance or {})

    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device

    @property
    def given_generator(self) -> nn.Module:
        """The generator module as it was given (``generator`` without the wrapper of ``latent_shape`` and
        ``output_range``): its state dict has the keys of the pre-trained checkpoint."""
        return self._given[0]

    @property
    def given_discriminator(self) -> nn.Module:
        """The discriminator module as it was given (``discriminator`` without the ``output_range`` wrapper)."""
        return self._given[1]

    def sample_latents(self, n: int, seed: int | None = 0, device=None) -> torch.Tensor:
        """``n`` latents ``(n, latent_dim)`` from N(0, I); drawn on the CPU with ``seed`` so the
        same seed gives the same latents on every device."""
        gen = torch.Generator().manual_seed(int(seed)) if seed is not None else None
        z = torch.randn(n, self.latent_dim, generator=gen)
        return z.to(device if device is not None else self.device)

    def generate(self, z: torch.Tensor) -> torch.Tensor:
        """Images ``(N, C, H, W)`` in [-1, 1] for latents ``z`` ``(N, latent_dim)`` drawn from N(0, I)
        (``sample_latents``). With ``latent_prior="uniform"`` they are mapped to U(-1, 1) first: to feed the
        generator latents of its own prior as they are, call ``gan.given_generator`` (and rescale its
        images from ``output_range`` yourself)."""
        if z.ndim != 2 or z.shape[1] != self.latent_dim:
            raise ConfigError(f"latents must have shape (N, {self.latent_dim}) for this GAN, got {tuple(z.shape)}: "
                              "draw them with gan.sample_latents(n, seed)")
        return self.generator(z).reshape(-1, *self.image_shape)

    def discriminate(self, x: torch.Tensor) -> torch.Tensor:
        """Raw logits ``(N,)`` for images ``x`` ``(N, C, H, W)``."""
        return self.discriminator(x).reshape(-1)

    @torch.no_grad()
    def sample(self, n: int, seed: int | None = 0, batch_size: int = 1024) -> torch.Tensor:
        """``n`` images ``(n, C, H, W)`` on the GAN's device, generated in batches without grad, in
        eval mode (the same image for a latent whatever the batch)."""
        z = self.sample_latents(n, seed)
        with evaluating(self):
            try:
                return torch.cat([self.generate(zb) for zb in z.split(batch_size)])
            except Exception:  # (re-raised below when check_gan finds nothing)
                check_gan(self)  # a GAN that does not fit agu's conventions: what to do, instead of torch's message
                raise

    def clone(self) -> GAN:
        """An independent deep copy (same device)."""
        try:
            return copy.deepcopy(self)
        except RuntimeError:  # torch's deepcopy error for a hook-normalised layer after a backward says nothing of the fix
            legacy = _legacy_norms(self)
            if legacy:
                raise _legacy_norm_error(legacy) from None
            raise


def build_gan(arch: str, latent_dim: int, image_shape, provenance: dict | None = None, *, latent_shape=None,
              output_range=None, latent_prior: str = "normal", **arch_kwargs) -> GAN:
    """A freshly initialised GAN of a registered architecture (``dcgan``, ``mlp``, ...); ``latent_shape``,
    ``output_range`` and ``latent_prior`` as in ``GAN``."""
    if arch not in ARCHITECTURES:
        raise ConfigError(f"unknown architecture {arch!r}; valid: {', '.join(sorted(ARCHITECTURES))}")
    try:
        built = ARCHITECTURES[arch](latent_dim=latent_dim, image_shape=tuple(image_shape), **arch_kwargs)
    except TypeError as e:
        raise ConfigError(f"bad arguments for architecture {arch!r}: {e}") from None
    if output_range is None and arch in BUILT_IN:
        output_range = (-1.0, 1.0)  # agu's own end in tanh (an untrained one may still make only bright images)
    if not (isinstance(built, (tuple, list)) and len(built) == 2 and all(isinstance(m, nn.Module) for m in built)):
        raise ConfigError(f"the builder of architecture {arch!r} must return (generator, discriminator), two nn.Modules; "
                          f"it returned a {type(built).__name__}")
    g, d = built
    return GAN(g, d, latent_dim, image_shape, arch=arch, arch_kwargs=arch_kwargs, provenance=provenance,
               latent_shape=latent_shape, output_range=output_range, latent_prior=latent_prior)


def generator_params(gan: GAN) -> list[torch.Tensor]:
    """The generator's trainable parameters, in a fixed order (that of ``named_parameters``)."""
    return [p for p in gan.generator.parameters() if p.requires_grad]
