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
        self._check_finite(vals, step)
        row = {"step": step + 1, **{n: float(v) for n, v in zip(self.names, vals.mean(0))}}
        self.rows.append(row)
        return row

    def _check_finite(self, vals: torch.Tensor, step: int) -> None:
        """Raise ``TrainingError`` naming the first step (counted from 1, as in the rows) whose
        losses in ``vals`` ``(steps, n_values)``, the window ending at ``step``, are not finite."""
        if not torch.isfinite(vals).all():
            bad = (~torch.isfinite(vals)).any(1).nonzero()[0].item()
            first = step + 2 - len(vals) + bad
            names = [n for n, ok in zip(self.names, torch.isfinite(vals[bad])) if not ok]
            raise TrainingError(
                f"{self.stage}: loss {'/'.join(names)} became NaN or Inf at step {first}. Likely cause: a "
                "learning rate or penalty weight (lambda, gamma) too large for this model, or (il2) the "
                "parameters reached the adapted ones. Lower them and run again; checkpoints saved so far are intact"
            )

    def pending(self, step: int) -> torch.Tensor:
        """The losses not yet flushed, ``(steps, n_values)`` on the CPU, checked finite (for a checkpoint)."""
        if not self.window:
            return torch.zeros(0, len(self.names))
        vals = torch.stack(self.window).cpu()
        self._check_finite(vals, step)
        return vals

    def restore(self, rows: list[dict], pending: torch.Tensor, device) -> None:
        """Continue from a checkpoint: the rows so far and the ``pending`` window."""
        self.rows = [dict(r) for r in rows]
        self.window = list(pending.to(device).unbind(0))


MAX_SEED = 2**62  # seeds are offset (seed + 7919, ...) and must stay within torch's 64-bit seed range


def check_positive(name: str, value: float, allow_zero: bool = False) -> None:
    """A finite real number > 0 (``>= 0`` with ``allow_zero``), else ``ConfigError``."""
    is_number = isinstance(value, (int, float)) and not isinstance(value, bool)
    if not is_number or not math.isfinite(value) or not (value >= 0 if allow_zero else value > 0):
        raise ConfigError(f"{name} must be a number {'>= 0' if allow_zero else '> 0'} (and finite), got {value!r}")


def check_int(name: str, value, minimum: int = 1, maximum: int | None = None) -> None:
    """An integer in ``[minimum, maximum]``, else ``ConfigError`` (floats, NaN, strings and bools are refused)."""
    if not isinstance(value, int) or isinstance(value, bool) or value < minimum or (maximum is not None and value > maximum):
        bound = f"at least {minimum}" + (f" and at most {maximum}" if maximum is not None else "")
        raise ConfigError(f"{name} must be an integer {bound}, got {value!r}")
