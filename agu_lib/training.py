"""Pieces shared by the training loops (stage 1, stage 2, the baselines): D-input
augmentation, optimisers, batch sampling and the loss log. Nothing here syncs with the host
inside a step."""

from __future__ import annotations

import contextlib
import math

import torch

from .errors import ConfigError, TrainingError


def augment(x: torch.Tensor, shift: int, noise: float, gen: torch.Generator | None = None) -> torch.Tensor:
    """What D sees: a random translation by up to ``shift`` pixels (whole batch; differentiable,
    as in DiffAugment) plus Gaussian instance noise of std ``noise``. Applied to real and fake
    alike, it keeps D from memorising a few-shot real set."""
    if shift > 0:
        dx, dy = torch.randint(-shift, shift + 1, (2,), generator=gen).tolist()
        x = torch.roll(x, shifts=(dy, dx), dims=(2, 3))
    if noise > 0:
        x = x + noise * torch.randn(x.shape, generator=gen).to(x.device)
    return x


def adam(params, lr: float, betas=(0.5, 0.99)) -> torch.optim.Adam:
    """Adam with the GAN-usual beta1 = 0.5; ``foreach`` kernels (one launch for all tensors)."""
    return torch.optim.Adam(params, lr=lr, betas=betas, foreach=True)


def sample_batch(pool: torch.Tensor, batch_size: int, gen: torch.Generator) -> torch.Tensor:
    """``batch_size`` rows of ``pool`` drawn uniformly with replacement (pool stays on its device)."""
    idx = torch.randint(0, len(pool), (batch_size,), generator=gen)
    return pool[idx.to(pool.device)]


def autocast(device: torch.device, enabled: bool):
    """bf16 autocast on CUDA when asked; a no-op context elsewhere (CPU runs in fp32)."""
    if enabled and device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


class LossLog:
    """Keeps per-step losses on the device; turns them into floats only every ``every`` steps
    (one host sync per window), checking that they are finite."""

    def __init__(self, names: list[str], every: int, stage: str):
        self.names, self.every, self.stage = names, max(1, every), stage
        self.window: list[torch.Tensor] = []
        self.rows: list[dict] = []

    def add(self, step: int, *values: torch.Tensor) -> dict | None:
        self.window.append(torch.stack([v.detach().float() for v in values]))
        if (step + 1) % self.every and step >= 0:
            return None
        return self.flush(step)

    def flush(self, step: int) -> dict | None:
        if not self.window:
            return None
        w = torch.stack(self.window)  # (steps, n_values), one sync below
        self.window = []
        vals = w.cpu()
        if not torch.isfinite(vals).all():
            bad = (~torch.isfinite(vals)).any(1).nonzero()[0].item()
            first = step + 1 - len(vals) + bad
            names = [n for n, ok in zip(self.names, torch.isfinite(vals[bad])) if not ok]
            raise TrainingError(
                f"{self.stage}: loss {'/'.join(names)} became NaN or Inf at step {first}. Likely cause: a "
                "learning rate or penalty weight (lambda, gamma) too large for this model, or (il2) the "
                "parameters reached the adapted ones. Lower them and run again; checkpoints saved so far are intact"
            )
        row = {"step": step + 1, **{n: float(v) for n, v in zip(self.names, vals.mean(0))}}
        self.rows.append(row)
        return row


def check_positive(name: str, value: float, allow_zero: bool = False) -> None:
    ok = value >= 0 if allow_zero else value > 0
    if not ok or not math.isfinite(value):
        raise ConfigError(f"{name} must be {'>= 0' if allow_zero else '> 0'} (and finite), got {value}")
