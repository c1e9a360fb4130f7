"""Losses and penalties: the properties the method relies on."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from agu_lib.losses import (
    d_logistic_loss,
    ewc_penalty,
    fisher_diagonal,
    fisher_diagonal_loop,
    flatten_params,
    g_nonsaturating_loss,
    param_distance,
    per_tensor_weights,
    repulsion_el2,
    repulsion_il2,
    repulsion_nl2,
)
from agu_lib.models import generator_params


def test_gan_losses_match_bce():
    real, fake = torch.tensor([2.0, -1.0]), torch.tensor([0.5, -3.0])
    bce = torch.nn.functional.binary_cross_entropy_with_logits
    assert torch.allclose(d_logistic_loss(real, fake), bce(real, torch.ones(2)) + bce(fake, torch.zeros(2)))
    assert torch.allclose(g_nonsaturating_loss(fake), bce(fake, torch.ones(2)))


def test_fisher_vmap_matches_loop(tiny_gan):
    z = tiny_gan.sample_latents(6, seed=3)
    a = fisher_diagonal(tiny_gan.generator, tiny_gan.discriminator, z, chunk=4)
    b = fisher_diagonal_loop(tiny_gan.generator, tiny_gan.discriminator, z)
    assert a.shape == b.shape == (sum(p.numel() for p in generator_params(tiny_gan)),)
    assert not a.requires_grad and (a >= 0).all()
    assert torch.allclose(a, b, rtol=1e-4, atol=1e-10)


def test_ewc_zero_at_anchor_and_growing(tiny_gan):
    theta_g = flatten_params(generator_params(tiny_gan)).detach()
    fisher = torch.rand_like(theta_g) + 0.1
    direction = torch.randn_like(theta_g)
    values = [float(ewc_penalty(theta_g + t * direction, theta_g, fisher)) for t in (0.0, 0.1, 0.2, 0.4)]
    assert values[0] == 0.0
    assert values == sorted(values) and values[1] > 0
    assert values[2] == pytest.approx(4 * values[1], rel=1e-4)  # quadratic


def test_per_tensor_weights_give_mean_of_tensor_msd(tiny_gan):
    params = generator_params(tiny_gan)
    other = [p.detach() + torch.randn_like(p) for p in params]
    w = per_tensor_weights(params)
    d = param_distance(flatten_params(params).detach(), flatten_params(other).unsqueeze(0), w)
    expected = torch.stack([(p.detach() - o).pow(2).mean() for p, o in zip(params, other)]).mean()
    assert torch.allclose(d[0], expected, rtol=1e-5)


@pytest.mark.parametrize("repulsion", [repulsion_il2, repulsion_nl2, repulsion_el2])
def test_repulsion_maximal_at_anchor_and_decreasing(repulsion):
    anchor = torch.zeros(1, 5)
    direction = torch.randn(5)
    values = []
    for t in (1e-3, 0.5, 1.0, 2.0):
        d = param_distance(t * direction, anchor)
        values.append(float(repulsion(d)))
    assert values == sorted(values, reverse=True), values
    if repulsion is repulsion_el2:
        assert float(repulsion(param_distance(torch.zeros(5), anchor))) == 1.0  # max K=1 at theta_N
    if repulsion is repulsion_nl2:
        assert float(repulsion(param_distance(torch.zeros(5), anchor))) == 0.0


@pytest.mark.parametrize("repulsion", [repulsion_il2, repulsion_nl2, repulsion_el2])
def test_repulsion_gradient_points_away_from_anchor(repulsion):
    anchors = torch.stack([torch.zeros(4), torch.ones(4) * 0.1])  # K = 2
    theta = torch.tensor([0.5, -0.3, 0.2, 0.9], requires_grad=True)
    repulsion(param_distance(theta, anchors)).backward()
    step = -theta.grad  # gradient descent moves along -grad
    away = (theta.detach() - anchors).mean(0)
    assert float(step @ away) > 0


def test_the_fisher_of_a_weight_shared_by_two_layers_is_that_of_their_summed_gradient():
    torch.manual_seed(0)
    a, b = nn.Linear(8, 8), nn.Linear(8, 8)
    b.weight = a.weight  # tied: the layer-wise path would add the two layers' squared gradients
    g = nn.Sequential(a, nn.ReLU(), b, nn.Tanh())
    d = nn.Sequential(nn.Linear(8, 1))
    z = torch.randn(20, 8)
    reference = fisher_diagonal_loop(g, d, z)
    assert torch.allclose(fisher_diagonal(g, d, z), reference, rtol=1e-4, atol=1e-9)
