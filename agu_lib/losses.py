"""Losses and penalties: small pure functions, tensors in, scalar (or per-anchor vector) out.
The training loops apply the weights (lambda, gamma). The formula stands above each.

Generator parameters are handled as one **flat vector** ``theta`` (``flatten_params``): the EWC
anchor, the Fisher, the adapted models and the distance weights are flat buffers computed once,
so each penalty is a handful of fused vector operations, whatever the number of tensors.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call, grad, vmap

# ----------------------------------------------------------------------------------------
# The GAN game (D outputs raw logits)


# L_D = E_real[softplus(-D(x))] + E_fake[softplus(D(G(z)))]      (logistic, = BCE with logits)
def d_logistic_loss(real_logits: torch.Tensor, fake_logits: torch.Tensor) -> torch.Tensor:
    return F.softplus(-real_logits).mean() + F.softplus(fake_logits).mean()


# L_neg = E_neg[softplus(D(x))]: known negatives are fakes for D (negative data augmentation)
def d_negative_loss(negative_logits: torch.Tensor) -> torch.Tensor:
    return F.softplus(negative_logits).mean()


# L_keep = mean over the batch and pixels of (G(z_pos) - x_pos)^2, x_pos = G_original(z_pos)
def preserve_loss(generated: torch.Tensor, original: torch.Tensor) -> torch.Tensor:
    return (generated - original).pow(2).mean()


# L_det = E_z[softplus(h(G(z)))]: G's samples away from what the detector h calls negative
def detector_loss(detector_logits: torch.Tensor) -> torch.Tensor:
    return F.softplus(detector_logits).mean()


# L_G = E_z[softplus(-D(G(z)))]                                   (non-saturating)
def g_nonsaturating_loss(fake_logits: torch.Tensor) -> torch.Tensor:
    return F.softplus(-fake_logits).mean()


# R1 = E_real[ ||grad_x D(x)||^2 ]                                 (Mescheder et al. 2018)
def d_r1_penalty(real_logits: torch.Tensor, real_images: torch.Tensor) -> torch.Tensor:
    (g,) = torch.autograd.grad(real_logits.sum(), real_images, create_graph=True)
    return g.pow(2).flatten(1).sum(1).mean()


# ----------------------------------------------------------------------------------------
# Flat parameter vectors


def flatten_params(params) -> torch.Tensor:
    """theta = concat_t vec(p_t): one vector ``(P,)`` that keeps the autograd graph."""
    return torch.cat([p.reshape(-1) for p in params])


def per_tensor_weights(params) -> torch.Tensor:
    """w_i = 1 / (T * n_t(i)): every tensor t counts equally whatever its size (T tensors).

    With these weights, sum_i w_i (theta_i - a_i)^2 = mean_t mean((p_t - a_t)^2), the distance
    of the paper's public code.
    """
    params = list(params)
    return torch.cat([torch.full((p.numel(),), 1.0 / (len(params) * p.numel()), device=p.device) for p in params])


# ----------------------------------------------------------------------------------------
# Stage 1: EWC


def fisher_diagonal(generator: nn.Module, discriminator: nn.Module, z: torch.Tensor, chunk: int = 64) -> torch.Tensor:
    """F_i = E_z[(d D(G(z)) / d theta_i)^2]: diagonal Fisher of G at its current parameters,
    from per-sample gradients of D's raw logit (Li et al. 2020, as in the paper's code).

    ``chunk`` samples at a time, so memory stays bounded. A generator made of ``nn.Linear`` and
    ``nn.Conv2d`` layers takes the layer-wise path (``fisher_diagonal_layers``: sums of squared
    per-sample gradients from one batched backward); any other takes ``fisher_diagonal_vmap``.
    Returns a detached flat vector ``(P,)`` in the order of ``generator.named_parameters()``
    (trainable ones).

    Arguments:
        z: latents ``(n, latent_dim)``.
    """
    fisher = fisher_diagonal_layers(generator, discriminator, z, chunk)
    return fisher if fisher is not None else fisher_diagonal_vmap(generator, discriminator, z, chunk)


def fisher_diagonal_layers(generator: nn.Module, discriminator: nn.Module, z: torch.Tensor, chunk: int = 64):
    """``fisher_diagonal`` for a generator whose trainable parameters all sit in ``nn.Linear`` and
    ``nn.Conv2d`` layers (each called once per forward, on per-sample inputs). A layer's
    per-sample weight gradient is an outer product of its output gradient delta_n and its input
    a_n, so no per-sample gradient needs to exist:

        Linear:  sum_n (delta_n a_n^T)^2 = (delta^2)^T (a^2)          one matmul per layer
        Conv2d:  sum_n (delta_n U_n^T)^2,  U_n = unfold(a_n)           one batched matmul per layer
        bias:    sum_n delta_n^2  (Conv2d: delta_n summed over positions first)

    delta comes from one backward of sum_n D(G(z_n)) over the chunk (samples are independent).
    Returns None when the generator has other parameterised layers, reuses a layer or shares a weight.
    """
    params = [p for p in generator.parameters() if p.requires_grad]
    layers: dict[nn.Module, None] = {}
    for m in generator.modules():
        if any(p.requires_grad for p in m.parameters(recurse=False)):
            layers[m] = None
    owners = [id(p) for m in layers for p in m.parameters(recurse=False) if p.requires_grad]
    if len(owners) != len(set(owners)):
        return None  # a weight shared by two layers: its gradient is their sum, not two separate ones
    for m in layers:
        if isinstance(m, nn.Conv2d):
            if m.groups != 1 or m.padding_mode != "zeros" or isinstance(m.padding, str):
                return None
        elif not isinstance(m, nn.Linear):
            return None
        own = {id(p) for p in m.parameters(recurse=False) if p.requires_grad}
        if not own <= {id(m.weight), id(m.bias) if m.bias is not None else None}:
            return None  # the forward uses a weight computed from other parameters (old spectral_norm hooks)
    totals = {p: torch.zeros_like(p) for p in params}
    for zc in z.split(chunk):
        seen: list[tuple[nn.Module, torch.Tensor, torch.Tensor]] = []  # (layer, input, output)
        hooks = [m.register_forward_hook(lambda m, inp, out, seen=seen: seen.append((m, inp[0].detach(), out))) for m in layers]
        try:
            with torch.enable_grad():
                logits = discriminator(generator(zc))
                if len(seen) != len(layers) or any(a.dim() != (2 if isinstance(m, nn.Linear) else 4) for m, a, _ in seen):
                    return None  # a layer reused, skipped, or fed more than one vector per sample
                deltas = torch.autograd.grad(logits.sum(), [out for _, _, out in seen])
        finally:
            for h in hooks:
                h.remove()
        with torch.no_grad():
            for (m, a, _), d in zip(seen, deltas):
                if isinstance(m, nn.Linear):
                    w_sq = d.pow(2).t() @ a.pow(2)  # (out, in)
                    b_sq = d.pow(2).sum(0)
                else:
                    w_sq = _conv_weight_grad_sq_sum(m, a, d)
                    b_sq = d.sum((2, 3)).pow(2).sum(0)
                if m.weight.requires_grad:
                    totals[m.weight] += w_sq.view_as(m.weight)
                if m.bias is not None and m.bias.requires_grad:
                    totals[m.bias] += b_sq
    return torch.cat([totals[p].reshape(-1) for p in params]) / len(z)


def _conv_weight_grad_sq_sum(conv: nn.Conv2d, a: torch.Tensor, delta: torch.Tensor) -> torch.Tensor:
    """sum_n g_n^2 for a Conv2d's weight, g_n the per-sample weight gradient; one kernel offset
    (i, j) at a time: g_n[:, :, i, j] = delta_n (Cout, L) @ shifted a_n (L, Cin)  (no im2col buffer)."""
    (kh, kw), (sh, sw), (dh, dw), (ph, pw) = conv.kernel_size, conv.stride, conv.dilation, conv.padding
    ho, wo = delta.shape[2:]
    a = nn.functional.pad(a, (pw, pw, ph, ph))
    dl = delta.flatten(2)  # (c, Cout, L)
    out = torch.empty(conv.weight.shape, dtype=delta.dtype, device=delta.device)
    for i in range(kh):
        for j in range(kw):
            patch = a[:, :, i * dh: i * dh + sh * (ho - 1) + 1: sh, j * dw: j * dw + sw * (wo - 1) + 1: sw]  # (c, Cin, ho, wo)
            g = torch.bmm(dl, patch.flatten(2).transpose(1, 2))  # (c, Cout, Cin)
            out[:, :, i, j] = g.pow_(2).sum(0)
    return out


def fisher_diagonal_vmap(generator: nn.Module, discriminator: nn.Module, z: torch.Tensor, chunk: int = 64) -> torch.Tensor:
    """``fisher_diagonal`` for any generator: per-sample gradients with ``torch.func.vmap(grad(...))``
    over ``chunk`` samples at a time (peak memory ~ chunk x P floats)."""
    names = [n for n, p in generator.named_parameters() if p.requires_grad]
    params = {n: p.detach() for n, p in generator.named_parameters() if p.requires_grad}
    buffers = {n: b.detach() for n, b in generator.named_buffers()}

    def logit(p, z1):
        x = functional_call(generator, (p, buffers), (z1.unsqueeze(0),))
        return discriminator(x).reshape(())

    per_sample = vmap(grad(logit), in_dims=(None, 0))
    total = torch.zeros(sum(params[n].numel() for n in names), device=z.device)
    parts = dict(zip(names, total.split([params[n].numel() for n in names])))  # views of total, one per tensor
    with torch.no_grad():  # the outer graph (through D's parameters) is not needed: F is a constant
        for zc in z.split(chunk):
            g = per_sample(params, zc)  # {name: (c, *shape)}; peak memory ~ chunk x P floats
            for n in names:  # sum over the chunk of the squares, straight into total (no (c, P) concatenation)
                parts[n] += g[n].reshape(len(zc), -1).pow_(2).sum(0)
            del g
    return total / len(z)


def fisher_diagonal_loop(generator: nn.Module, discriminator: nn.Module, z: torch.Tensor) -> torch.Tensor:
    """Reference implementation of ``fisher_diagonal``: one backward pass per sample (slow)."""
    params = [p for p in generator.parameters() if p.requires_grad]
    total = torch.zeros(sum(p.numel() for p in params), device=z.device)
    for z1 in z:
        out = discriminator(generator(z1.unsqueeze(0))).reshape(())
        gs = torch.autograd.grad(out, params)
        total += flatten_params(gs).detach().pow(2)
    return total / len(z)


# EWC(theta) = sum_i F_i (theta_i - theta_G,i)^2
def ewc_penalty(theta: torch.Tensor, anchor: torch.Tensor, fisher: torch.Tensor) -> torch.Tensor:
    return (fisher * (theta - anchor).pow(2)).sum()


# EWC(theta) = sum_i F_i (theta_i - theta_G,i)^2 and its gradient dEWC/dtheta = 2 F (theta - theta_G),
# by hand: the loops add the gradient to G's, so no autograd graph runs through the (P,) vector.
# Returned is half the gradient, F (theta - theta_G): the loops fold the 2 into the scale of their
# add into G's gradients (three passes over P floats; EWC's value, a dot product, a fourth on request).
def ewc_penalty_half_grad(theta, anchor, fisher, out_diff=None, out_grad=None,
                          with_value: bool = True) -> tuple[torch.Tensor | None, torch.Tensor]:
    """``(EWC(theta) or None, dEWC/dtheta / 2)``: a scalar (None unless ``with_value``) and a
    ``(P,)`` vector written into ``out_grad`` when given (``out_diff`` is scratch); no allocation
    with the outs."""
    diff = torch.sub(theta, anchor, out=out_diff)  # theta - theta_G
    half = torch.mul(diff, fisher, out=out_grad)  # F (theta - theta_G)
    return (torch.dot(half, diff) if with_value else None), half


# ----------------------------------------------------------------------------------------
# Stage 2: repulsion from the adapted parameters theta_N^k (k = 1..K)


# d_k(theta) = sum_i w_i (theta_i - theta_N,k,i)^2        -> (K,)   (anchors: (K, P))
def param_distance(theta: torch.Tensor, anchors: torch.Tensor, weights: torch.Tensor | None = None) -> torch.Tensor:
    sq = (theta.unsqueeze(0) - anchors).pow(2)
    return (sq * weights if weights is not None else sq).sum(1)


# The same distances in matvec form, for the loops. With a fixed centre c (theta_G), u = theta - c and
# b_k = theta_N,k - c:
#     d_k(theta) = sum_i w_i (u_i - b_k,i)^2 = |u|_w^2 - 2 (w*b_k).u + |b_k|_w^2
# (w*b_k) and |b_k|_w^2 are computed once (``prepare_anchors``): a step reads the (K, P) anchors in one
# matrix-vector product instead of materialising K differences. Centring on theta_G keeps u and b_k
# small: the expansion's rounding error is ~eps (|u|_w^2 + |b_k|_w^2), i.e. ~eps relative to the
# starting distance d_k(theta_G) = |b_k|_w^2 while theta stays within a few of those of theta_G.


@dataclass
class AnchorSet:
    """The K adapted parameter vectors theta_N,k prepared for ``anchor_distances``/``anchor_pull``."""

    center: torch.Tensor  # (P,) c = theta_G
    wb: torch.Tensor  # (K, P) w * b_k, b_k = theta_N,k - c
    b_sq: torch.Tensor  # (K,) |b_k|_w^2 = sum_i w_i b_k,i^2 = d_k(c)
    weights: torch.Tensor | None  # (P,) w; None = plain L2 (w = 1)


def prepare_anchors(anchors: torch.Tensor, center: torch.Tensor, weights: torch.Tensor | None = None) -> AnchorSet:
    """Arguments: anchors ``(K, P)``, center ``(P,)`` (theta_G), weights ``(P,)`` or None."""
    b = anchors - center  # (K, P)
    wb = b * weights if weights is not None else b
    return AnchorSet(center.detach().clone(), wb.detach().contiguous(), (wb * b).sum(1).detach(), weights)


# d_k(theta) = |u|_w^2 - 2 (w*b_k).u + |b_k|_w^2,  u = theta - c                  -> (K,), and w*u (P,)
def anchor_distances(theta: torch.Tensor, anchors: AnchorSet, out_u=None, out_wu=None) -> tuple[torch.Tensor, torch.Tensor]:
    """Distances ``(K,)`` equal to ``param_distance(theta, theta_N, w)`` (within float rounding), and
    ``w*u`` ``(P,)`` for ``anchor_pull``. Differentiable in ``theta`` when no outs are given."""
    u = torch.sub(theta, anchors.center, out=out_u)
    wu = torch.mul(u, anchors.weights, out=out_wu) if anchors.weights is not None else u
    return torch.dot(wu, u) - 2 * torch.mv(anchors.wb, u) + anchors.b_sq, wu


# v = sum_k c_k w*(theta - theta_N,k) = (sum_k c_k) w*u - sum_k c_k (w*b_k)          -> (P,)
def anchor_pull(wu: torch.Tensor, anchors: AnchorSet, c: torch.Tensor, out=None) -> torch.Tensor:
    """``sum_k c_k w (theta - theta_N,k)`` ``(P,)`` from ``w*u`` of ``anchor_distances``: one
    transposed matvec over the anchors. ``out`` may be ``wu`` itself."""
    out = torch.mul(wu, c.sum(), out=out)
    return out.addmv_(anchors.wb.t(), c, alpha=-1)


# c_k = -dL_rep/dd_k   (EL2: alpha exp(-alpha d_k); NL2: 1; IL2: 1/d_k^2): in closed form for the
# three repulsions below (a step then costs a few (K,) operations), by autograd on the (K,) vector for any other
def repulsion_slopes(d: torch.Tensor, repulsion, **kwargs) -> tuple[torch.Tensor, torch.Tensor]:
    """``(L_rep(d), -dL_rep/dd)`` for distances ``d`` ``(K,)``: a scalar and ``(K,)``, detached."""
    d = d.detach()
    if repulsion is repulsion_el2:
        e = torch.exp(-kwargs.get("alpha", 1.0) * d)
        return e.sum(), kwargs.get("alpha", 1.0) * e
    if repulsion is repulsion_nl2:
        return -d.sum(), torch.ones_like(d)
    if repulsion is repulsion_il2:
        inv = 1.0 / d
        return inv.sum(), inv * inv
    with torch.enable_grad():
        leaf = d.requires_grad_(True)
        value = repulsion(leaf, **kwargs)
        (slope,) = torch.autograd.grad(value, leaf)
    return value.detach(), -slope


# IL2: L = sum_k 1 / d_k            (maximal, +inf, at theta_N; needs d_k > 0)
def repulsion_il2(d: torch.Tensor) -> torch.Tensor:
    return (1.0 / d).sum()


# NL2: L = -sum_k d_k               (maximal, 0, at theta_N; unbounded below)
def repulsion_nl2(d: torch.Tensor) -> torch.Tensor:
    return -d.sum()


# EL2: L = sum_k exp(-alpha d_k)    (maximal, K, at theta_N; bounded in (0, K])
def repulsion_el2(d: torch.Tensor, alpha: float = 1.0) -> torch.Tensor:
    return torch.exp(-alpha * d).sum()


REPULSIONS = {"il2": repulsion_il2, "nl2": repulsion_nl2, "el2": repulsion_el2}
