"""Directions in parameter space: theta_G - theta_N points away from the feature.

The extrapolation baseline moves along it: theta(gamma) = theta_N + gamma (theta_G - theta_N);
gamma = 0 is the adapted GAN, gamma = 1 the original, gamma > 1 suppresses the feature (and,
the paper observes, quality with it).
"""

from __future__ import annotations

import math

import torch

from .errors import ConfigError
from .models import GAN


# theta(gamma) = theta_N + gamma * (theta_G - theta_N), for G and D alike (every parameter)
@torch.no_grad()
def extrapolate(original: GAN, adapted: GAN | list[GAN], gamma: float) -> GAN:
    """A new GAN at ``theta_N + gamma (theta_G - theta_N)``; with several adapted GANs (a list, as
    ``adapt(...).models``) theta_N is their mean (``mean_gan``). ``gamma = 1`` returns the original's
    parameters exactly. Buffers (batch norm's running statistics) are the original's: extrapolated,
    a variance could turn negative."""
    if not isinstance(gamma, (int, float)) or not math.isfinite(gamma):
        raise ConfigError(f"gamma must be a number, got {gamma!r}")
    if isinstance(adapted, (list, tuple)):
        adapted = mean_gan(list(adapted))
    if not isinstance(adapted, GAN):
        raise ConfigError(f"adapted must be an agu GAN or a list of them (adapt(...).models), got {type(adapted).__name__}")
    out = original.clone()
    sd_g, sd_n = original.state_dict(), adapted.state_dict()
    if sd_g.keys() != sd_n.keys():
        raise ConfigError("the adapted GAN does not have the original's architecture")
    params = {k for k, _ in original.named_parameters()}
    new = {}
    for k, tg in sd_g.items():
        tn = sd_n[k].to(tg.device)
        new[k] = tg.clone() if (gamma == 1 or k not in params or not tg.is_floating_point()) else tn + gamma * (tg - tn)
    out.load_state_dict(new)
    out.provenance = {**original.provenance, "stage": "extrapolated", "gamma": float(gamma)}
    return out


@torch.no_grad()
def mean_gan(gans: list[GAN]) -> GAN:
    """The GAN whose parameters are the mean of ``gans``' (same architecture)."""
    if not gans or not all(isinstance(g, GAN) for g in gans):
        raise ConfigError("mean_gan needs a non-empty list of agu GANs (e.g. adapt(...).models)")
    out = gans[0].clone()
    sds = [g.state_dict() for g in gans]
    if any(sd.keys() != sds[0].keys() or any(sd[k].shape != v.shape for k, v in sds[0].items()) for sd in sds[1:]):
        raise ConfigError("mean_gan: the GANs do not share one architecture")
    out.load_state_dict({k: (torch.stack([sd[k] for sd in sds]).mean(0) if v.is_floating_point() else v) for k, v in sds[0].items()})
    return out
