"""The penalties' gradients that the training steps add by hand (fp32, no autograd graph through theta)
equal autograd of the objective the docstrings write, on one real step of ``adapt_step`` / ``unlearn_step``.

Each test runs the same step twice from the same state, once with the penalty and once without it, and
records G's gradient where the step hands it to the optimiser: the difference is what the step added.
(A mutation run showed that a sign flip or a lost factor 2 there went unnoticed by the rest of the suite.)
"""

from __future__ import annotations

import pytest
import torch

from agu_lib.adapt import AdaptConfig, adapt_step
from agu_lib.losses import REPULSIONS, ewc_penalty, flatten_params, param_distance, prepare_anchors
from agu_lib.models import generator_params
from agu_lib.training import FlatParams, TrainNets, adam
from agu_lib.unlearn import EWC, Repulsion, UnlearnConfig, unlearn_step

CPU = torch.device("cpu")


class RecordingOptimizer:
    """opt_g's stand-in: zero_grad as Adam's, and step() records G's gradient instead of stepping."""

    def __init__(self, params):
        self.params, self.grad = list(params), None

    def zero_grad(self, set_to_none=True):
        for p in self.params:
            p.grad = None

    def step(self):
        self.grad = flatten_params([p.grad for p in self.params]).clone()


def g_gradient(gan, step) -> torch.Tensor:
    """G's gradient at the optimiser step of ``step(nets, opt_g, opt_d, real, z, flat, gen)``, from a fresh copy."""
    model = gan.clone()
    rec = RecordingOptimizer(generator_params(model))
    gen = torch.Generator().manual_seed(0)
    real = torch.rand(8, *gan.image_shape, generator=gen) * 2 - 1
    z = torch.randn(8, gan.latent_dim, generator=gen)
    step(TrainNets(model, CPU), rec, adam(model.discriminator.parameters(), 1e-3), real, z,
         FlatParams(generator_params(model)), gen)
    return rec.grad


@pytest.fixture
def moved(tiny_gan):
    """(theta_G, a copy of the GAN whose G moved off theta_G): penalties have a gradient there."""
    theta_g = flatten_params(generator_params(tiny_gan)).detach().clone()
    gan = tiny_gan.clone()
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in generator_params(gan):
            p.add_(0.02 * torch.randn(p.shape, generator=gen))
    return theta_g, gan


def autograd_of(gan, objective) -> torch.Tensor:
    theta = flatten_params(generator_params(gan)).detach().clone().requires_grad_(True)
    (grad,) = torch.autograd.grad(objective(theta), theta)
    return grad


def fisher_like(n: int) -> torch.Tensor:
    return torch.rand(n, generator=torch.Generator().manual_seed(2)) + 0.1


def test_stage1_adds_the_gradient_of_lambda_ewc(moved):
    """adapt_step: G's gradient = adversarial + d/dtheta [lambda * sum_i F_i (theta_i - theta_G,i)^2]."""
    theta_g, gan = moved
    fisher, lam = fisher_like(theta_g.numel()), 0.7

    def step(cfg):
        return lambda nets, opt_g, opt_d, real, z, flat, gen: adapt_step(
            nets, opt_g, opt_d, real, z, flat, theta_g, fisher, cfg, gen, CPU)

    added = g_gradient(gan, step(AdaptConfig(ewc_lambda=lam))) - g_gradient(gan, step(AdaptConfig(ewc_lambda=0.0)))
    expected = autograd_of(gan, lambda t: lam * ewc_penalty(t, theta_g, fisher))
    assert added.abs().max() > 1e-4  # (the penalty matters at this point)
    assert torch.allclose(added, expected, rtol=1e-4, atol=1e-6)


def test_the_ewc_baseline_adds_the_gradient_of_lambda_ewc(moved):
    """unlearn_step, method ewc: G's gradient = adversarial + d/dtheta [lambda * EWC(theta)]."""
    theta_g, gan = moved
    fisher, lam = fisher_like(theta_g.numel()), 3.0

    def step(cfg, reg):
        return lambda nets, opt_g, opt_d, real, z, flat, gen: unlearn_step(
            nets, opt_g, opt_d, real, z, flat, reg, cfg, gen, CPU)

    with_it = g_gradient(gan, step(UnlearnConfig(method="ewc", ewc_lambda=lam), EWC(theta_g, fisher)))
    without = g_gradient(gan, step(UnlearnConfig(method="finetune"), None))
    expected = autograd_of(gan, lambda t: lam * ewc_penalty(t, theta_g, fisher))
    assert torch.allclose(with_it - without, expected, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("method", ["el2", "il2", "nl2"])
def test_the_repulsion_in_the_loss_adds_the_gradient_of_gamma_l_rep(moved, method):
    """unlearn_step, repulsion_mode "loss": G's gradient = adversarial + d/dtheta [gamma * L_rep(s * d(theta))],
    d_k = sum_i w_i (theta_i - theta_N,k,i)^2 and s_k = 1 / d_k(theta_G): minimising it moves away from theta_N."""
    theta_g, gan = moved
    gen = torch.Generator().manual_seed(3)
    anchors = theta_g + 0.05 * torch.randn(2, theta_g.numel(), generator=gen)  # (K = 2, P) "adapted" parameters
    w = fisher_like(theta_g.numel())
    scale = 1.0 / param_distance(theta_g, anchors, w)
    gamma, kwargs = 0.4, ({"alpha": 2.0} if method == "el2" else {})
    cfg = UnlearnConfig(method=method, gamma=gamma, repulsion_mode="loss", **kwargs)
    reg = Repulsion(prepare_anchors(anchors, theta_g, w), scale, REPULSIONS[method], kwargs)

    def step(reg_):
        return lambda nets, opt_g, opt_d, real, z, flat, gen_: unlearn_step(
            nets, opt_g, opt_d, real, z, flat, reg_, cfg, gen_, CPU)

    added = g_gradient(gan, step(reg)) - g_gradient(gan, step(None))
    expected = autograd_of(gan, lambda t: gamma * REPULSIONS[method](param_distance(t, anchors, w) * scale, **kwargs))
    assert added.abs().max() > 1e-5
    assert torch.allclose(added, expected, rtol=1e-4, atol=1e-6)
