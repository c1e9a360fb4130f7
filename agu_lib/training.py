"""Pieces shared by the training loops (stage 1, stage 2, the baselines): D-input
augmentation, optimisers, batch sampling, the two halves of a GAN step (``d_step``,
``g_backward``), G's parameters as a flat vector (``FlatParams``), the wrapped modules a step
calls (``TrainNets``: DDP, torch.compile, channels_last) and the loss log. Nothing here syncs
with the host inside a step.

Random numbers are drawn on the CPU from the loop's seeded generator (the same on every device),
for the global batch; with several processes each keeps its rows (``distributed.shard_rows``)."""

from __future__ import annotations

import contextlib
import math
import os

import torch
from torch import nn

from .distributed import shard_rows, world_size, wrap_ddp
from .errors import ConfigError, TrainingError
from .losses import d_logistic_loss, d_negative_loss, g_nonsaturating_loss


def augment(x: torch.Tensor, shift: int, noise: float, gen: torch.Generator | None = None) -> torch.Tensor:
    """What D sees: a random translation by up to ``shift`` pixels (whole batch; differentiable,
    as in DiffAugment) plus Gaussian instance noise of std ``noise``. Applied to real and fake
    alike, it keeps D from memorising a few-shot real set."""
    if shift > 0:
        dx, dy = torch.randint(-shift, shift + 1, (2,), generator=gen).tolist()
        x = torch.roll(x, shifts=(dy, dx), dims=(2, 3))
    if noise > 0:  # drawn for the global batch; this process keeps its rows
        x = x + noise * to_device(shard_rows(torch.randn((len(x) * world_size(), *x.shape[1:]), generator=gen)), x.device)
    return x


def adam(params, lr: float, betas=(0.5, 0.99)) -> torch.optim.Adam:
    """Adam with the GAN-usual beta1 = 0.5; ``foreach`` kernels (one launch for all tensors)."""
    return torch.optim.Adam(params, lr=lr, betas=betas, foreach=True)


def sample_index(n: int, batch_size: int, gen: torch.Generator, device) -> torch.Tensor:
    """``batch_size`` indices in ``[0, n)`` drawn uniformly with replacement, for the global batch;
    with several processes, this process's shard of them, on ``device``."""
    return to_device(shard_rows(torch.randint(0, n, (batch_size,), generator=gen)), device)


def sample_batch(pool: torch.Tensor, batch_size: int, gen: torch.Generator) -> torch.Tensor:
    """``batch_size`` rows of ``pool`` drawn uniformly with replacement (pool stays on its device);
    with several processes, this process's shard of them."""
    return pool[sample_index(len(pool), batch_size, gen, pool.device)]


def sample_latent_batch(batch_size: int, latent_dim: int, gen: torch.Generator, device) -> torch.Tensor:
    """z ~ N(0, I) ``(batch_size, latent_dim)`` drawn on the CPU; this process's shard of them, on ``device``."""
    return to_device(shard_rows(torch.randn(batch_size, latent_dim, generator=gen)), device)


def mps_available() -> bool:
    """Whether this torch build and machine have Apple's MPS backend."""
    return getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available()


def as_device(device) -> torch.device:
    """``device`` (a name or ``torch.device``) as a ``torch.device`` this machine has (``ConfigError`` otherwise:
    torch's own error on a CPU-only build is an AssertionError that does not say what to do). ``"auto"`` is
    an NVIDIA GPU when there is one, else the CPU: Apple's MPS only when asked for by name (the project's
    tests never ran there, it rounds differently from the CPU, and these small GANs gain little from it)."""
    if isinstance(device, str) and device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(device)
    except (RuntimeError, TypeError):
        raise ConfigError(f"unknown device {device!r}; use 'cpu', 'cuda', 'cuda:0', 'mps' or 'auto'") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"device {str(device)!r} was asked for, but no CUDA GPU is available here (torch "
                          f"{torch.__version__}); use device='cpu'")
    if device.type == "mps" and not mps_available():
        raise ConfigError(f"device {str(device)!r} was asked for, but MPS is not available here; use device='cpu'")
    return device


def deterministic_cuda() -> None:
    """Same seed, same numbers on an NVIDIA GPU (process-wide; the CLI calls it for ``--device cuda``/``auto``
    on a machine with CUDA): cuDNN's deterministic convolution algorithms and no autotuning, cuBLAS with a fixed
    workspace (``CUBLAS_WORKSPACE_CONFIG``, read when cuBLAS starts: call this before the first GPU matrix
    product) and torch's deterministic implementations wherever it has them (a warning names an operation
    that has none). Without it two runs of the same command on a GPU end at different numbers."""
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    torch.backends.cudnn.deterministic = True
    torch.backends.cudnn.benchmark = False
    torch.use_deterministic_algorithms(True, warn_only=True)


def to_device(x: torch.Tensor, device) -> torch.Tensor:
    """Host -> device copy; on CUDA from pinned memory and asynchronous (a pageable copy would
    wait for the GPU to finish its queue: a host sync per step)."""
    device = torch.device(device)
    if device.type == "cuda" and x.device.type == "cpu":
        return x.pin_memory().to(device, non_blocking=True)
    return x.to(device)


def autocast(device: torch.device, enabled: bool):
    """bf16 autocast on CUDA when asked; a no-op context elsewhere (CPU runs in fp32)."""
    if enabled and device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


# ----------------------------------------------------------------------------------------
# A GAN step: what the stages share


class TrainNets:
    """The modules a training step calls: G and D, wrapped for speed or for several processes,
    while the GAN keeps its plain modules (its state dict, checkpoints and parameters are untouched).

    - ``channels_last`` memory format for conv models on CUDA (faster convolutions);
    - ``DistributedDataParallel`` when a process group is up (``distributed.init_from_env``);
    - ``torch.compile`` when asked (``compile=True``; the first steps compile).
    """

    def __init__(self, gan, device: torch.device, compile: bool = False):
        self.gan = gan
        if device.type == "cuda" and any(isinstance(m, nn.Conv2d) for m in gan.modules()):
            gan.to(memory_format=torch.channels_last)
        self.g = wrap_ddp(gan.generator, device)
        self.d = wrap_ddp(gan.discriminator, device)
        if compile:
            self.g, self.d = torch.compile(self.g), torch.compile(self.d)

    def generate(self, z: torch.Tensor) -> torch.Tensor:
        """Images ``(N, C, H, W)`` for latents ``(N, latent_dim)`` (as ``GAN.generate``)."""
        return self.g(z).reshape(-1, *self.gan.image_shape)

    def discriminate(self, x: torch.Tensor) -> torch.Tensor:
        """Raw logits ``(N,)`` (as ``GAN.discriminate``)."""
        return self.d(x).reshape(-1)

    @contextlib.contextmanager
    def d_frozen(self):
        """D's weights take no gradient inside (G's step: they would be thrown away); under DDP,
        no all-reduce is prepared for them either. The backward may run after the block."""
        params = [p for p in self.gan.discriminator.parameters() if p.requires_grad]
        sync = self.d.no_sync() if isinstance(self.d, nn.parallel.DistributedDataParallel) else contextlib.nullcontext()
        for p in params:
            p.requires_grad_(False)
        try:
            with sync:
                yield
        finally:
            for p in params:
                p.requires_grad_(True)


def d_step(nets: TrainNets, opt_d, real: torch.Tensor, z: torch.Tensor, aug, device, amp: bool,
           negatives: torch.Tensor | None = None, negative_weight: float = 0.0,
           zneg: torch.Tensor | None = None, zneg_weight: float = 0.0) -> torch.Tensor:
    """D's step, max_phi L_adv, on one batch: L_D = E_real[softplus(-D(x))] + E_z[softplus(D(G(z)))]
    (+ negative_weight * E_neg[softplus(D(x_neg))] when known ``negatives`` are given: samples D must
    call fake; + zneg_weight * E_{zneg}[softplus(D(G(zneg)))] when latents ``zneg`` are given: G's
    current images of those latents are fakes too). ``real`` and ``negatives`` are already augmented;
    ``aug`` augments the fakes. Returns L_D (detached, on the device)."""
    with autocast(device, amp):
        with torch.no_grad():  # G's output is a constant in D's step: no graph through G
            fake = nets.generate(z)
            fake_zneg = nets.generate(zneg) if zneg is not None and zneg_weight > 0 else None
        d_loss = d_logistic_loss(nets.discriminate(real), nets.discriminate(aug(fake)))
        if negatives is not None and negative_weight > 0:
            d_loss = d_loss + negative_weight * d_negative_loss(nets.discriminate(negatives))
        if fake_zneg is not None:
            d_loss = d_loss + zneg_weight * d_negative_loss(nets.discriminate(aug(fake_zneg)))
    opt_d.zero_grad(set_to_none=True)
    d_loss.backward()
    opt_d.step()
    return d_loss.detach()


def g_backward(nets: TrainNets, opt_g, z: torch.Tensor, aug, device, amp: bool, extra=None) -> torch.Tensor:
    """G's adversarial gradient: L_G = E_z[softplus(-D(G(z)))] backpropagated into G's (zeroed)
    gradients, D frozen. ``extra``: a function of the same batch of G's samples whose loss joins
    L_G's backward (one forward of G for both). The caller adds its penalty's gradient and calls
    ``opt_g.step()``. Returns L_G (detached)."""
    with nets.d_frozen(), autocast(device, amp):
        fake = nets.generate(z)
        g_adv = g_nonsaturating_loss(nets.discriminate(aug(fake)))
        total = g_adv if extra is None else g_adv + extra(fake)
    opt_g.zero_grad(set_to_none=True)
    total.float().backward()
    return g_adv.detach()


class FlatParams:
    """A list of parameters seen as one flat vector theta ``(P,)`` (the order of ``flatten_params``),
    with its buffers allocated once, so a penalty costs a few passes over P floats and no allocation.

    On contiguous float32 parameters (always on the CPU), the parameters' storage is moved into that one buffer (each parameter becomes a view of its
    slice: same Parameter objects, same values, the optimiser sees no difference), so theta is read
    without a copy and a step on theta is one vector operation. ``release()`` gives every parameter
    its own storage back (before saving: safetensors refuses tensors that share memory).

    - ``read()``: theta (the live buffer, not a copy: read-only for callers);
    - ``add_(v, alpha)``: theta += alpha * v, in place;
    - ``write_(v)``: theta = v, in place;
    - ``add_to_grad_(v, alpha)``: grad += alpha * v (after backward, before the optimiser step);
    - ``scratch``: two preallocated ``(P,)`` buffers for the penalties' intermediate vectors
      (``scratch_views``: their per-parameter views).
    """

    def __init__(self, params):
        self.params = [p for p in params if p.requires_grad]
        sizes = [p.numel() for p in self.params]
        like = self.params[0]
        # parameters in another memory format (channels_last on CUDA) keep their storage: theta is then a copy
        self.bound = all(p.dtype == torch.float32 and p.device == like.device and p.is_contiguous() for p in self.params)
        with torch.no_grad():
            self.theta = torch.cat([p.detach().reshape(-1).float() for p in self.params])
            if self.bound:
                for p, v in zip(self.params, self.theta.split(sizes)):
                    p.data = v.view_as(p)
        self.scratch = (torch.empty_like(self.theta), torch.empty_like(self.theta))
        self._sizes = sizes
        self.scratch_views = tuple(self._views(b) for b in self.scratch)  # their per-parameter views, made once

    def _views(self, v: torch.Tensor) -> list[torch.Tensor]:
        return [t.view(p.shape) for t, p in zip(v.split(self._sizes), self.params)]

    def read(self) -> torch.Tensor:
        if self.bound:
            return self.theta
        with torch.no_grad():
            return torch.cat([p.reshape(-1) for p in self.params], out=self.theta)

    def add_(self, v: torch.Tensor, alpha: float = 1.0) -> None:
        with torch.no_grad():
            if self.bound:
                self.theta.add_(v, alpha=alpha)
            else:
                torch._foreach_add_(self.params, self._views(v), alpha=alpha)

    def write_(self, v: torch.Tensor) -> None:
        """theta = v, in place (the parameters take the values of ``v``)."""
        with torch.no_grad():
            if self.bound:
                self.theta.copy_(v)
            else:
                torch._foreach_copy_(self.params, self._views(v))

    def _grads(self) -> list[torch.Tensor]:
        grads = [p.grad for p in self.params]
        if any(g is None for g in grads):  # a parameter the adversarial loss did not reach
            for p in self.params:
                if p.grad is None:
                    p.grad = torch.zeros_like(p)
            grads = [p.grad for p in self.params]
        return grads

    def add_to_grad_(self, v: torch.Tensor, alpha: float = 1.0, views: list[torch.Tensor] | None = None) -> None:
        """grad += alpha * v (``views``: ``v``'s per-parameter views when the caller has them, e.g. ``scratch_views``)."""
        torch._foreach_add_(self._grads(), views if views is not None else self._views(v), alpha=alpha)

    def release(self) -> None:
        """Every parameter gets its own storage again (values unchanged); theta is no longer live."""
        if self.bound:
            with torch.no_grad():
                for p in self.params:
                    p.data = p.data.clone()
            self.theta, self.bound = self.theta.clone(), False


class LossLog:
    """Keeps per-step losses on the device; turns them into floats only every ``every`` steps
    (one host sync per window), checking that they are finite. A row holds each loss's mean over
    the window, except the ``last`` ones: their value on the window's last step (a quantity the
    loop computes only on the steps it logs)."""

    def __init__(self, names: list[str], every: int, stage: str, last: tuple[str, ...] = ()):
        self.names, self.every, self.stage = names, max(1, every), stage
        self.last = [n in last for n in names]
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
        row = {"step": step + 1, **{n: float(v[-1] if last else v.mean()) for n, v, last in zip(self.names, vals.t(), self.last)}}
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


# torch's CPU generator keeps only the low 32 bits of a seed (manual_seed(2**32) draws what manual_seed(0)
# draws), and agu offsets seeds (seed + 101, + 7919, + 104729 + k, + 2**20 for the metric "floor"): from a seed
# below 2**31 every offset seed stays below 2**32, where torch tells seeds apart
MAX_SEED = 2**31 - 1


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


# b_t = min(g_ema, (1 + t) / (10 + t)) at step t (0-based): the average warms up, so that a short run's
# G is an average of its own steps and not still theta_G (b_0 = 0.1; g_ema 0.99 is reached at t = 890)
def ema_decay(g_ema: float, step: int) -> float:
    return min(g_ema, (1 + step) / (10 + step))


def check_ema(name: str, value, what: str) -> None:
    """A weight-average decay must be in [0, 1)."""
    if not (isinstance(value, (int, float)) and not isinstance(value, bool) and 0 <= value < 1):
        raise ConfigError(f"{name} must be in [0, 1), got {value!r}: {what} averages G's weights with this decay per step "
                          "(0.99: over about the last 100 steps; 0: no average, the last step's weights)")
