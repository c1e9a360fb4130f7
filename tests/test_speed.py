"""The fast forms of the penalties equal their reference forms; the loop helpers and the
benchmark scripts work. (Timings themselves live in benchmarks/, not in the tests.)"""

from __future__ import annotations

import os
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from torch import nn

from agu_lib.losses import (
    REPULSIONS,
    anchor_distances,
    anchor_pull,
    ewc_penalty,
    ewc_penalty_half_grad,
    fisher_diagonal,
    fisher_diagonal_layers,
    fisher_diagonal_loop,
    fisher_diagonal_vmap,
    flatten_params,
    param_distance,
    per_tensor_weights,
    prepare_anchors,
    repulsion_slopes,
)
from agu_lib.models import GAN, build_gan, generator_params
from agu_lib.training import FlatParams, TrainNets
from agu_lib.unlearn import DATA_TERMS_OFF, Repulsion, UnlearnConfig, repulsion_step, unlearn

BENCH = Path(__file__).resolve().parent.parent / "benchmarks"


def _setup(tiny_gan, k=3, rel=0.05, seed=0):
    params = generator_params(tiny_gan)
    theta_g = flatten_params(params).detach()
    gen = torch.Generator().manual_seed(seed)
    anchors = theta_g + rel * torch.randn(k, theta_g.numel(), generator=gen)
    return params, theta_g, anchors


@pytest.mark.parametrize("kind", ["l2", "fisher", "per_tensor"])
def test_anchor_distances_equal_reference(tiny_gan, kind):
    params, theta_g, anchors = _setup(tiny_gan)
    w = {"l2": None, "fisher": torch.rand(theta_g.numel()) * 3, "per_tensor": per_tensor_weights(params)}[kind]
    prepared = prepare_anchors(anchors, theta_g, w)
    for theta in (theta_g, anchors[1], theta_g + 0.3 * (theta_g - anchors[0]), theta_g + 0.01 * torch.randn(theta_g.shape)):
        d_ref = param_distance(theta, anchors, w)
        d, wu = anchor_distances(theta, prepared)
        # absolute error ~ eps * (|u|^2 + |b|^2): relative to the starting distance d_k(theta_G)
        assert torch.allclose(d, d_ref, rtol=1e-5, atol=1e-5 * float(prepared.b_sq.max())), (d, d_ref)
        c = torch.rand(len(anchors))
        pull_ref = ((theta.unsqueeze(0) - anchors) * c.unsqueeze(1)).sum(0) * (w if w is not None else 1.0)
        assert torch.allclose(anchor_pull(wu.clone(), prepared, c), pull_ref, rtol=1e-4, atol=1e-6)


def test_anchor_distances_are_differentiable(tiny_gan):
    _, theta_g, anchors = _setup(tiny_gan)
    w = torch.rand(theta_g.numel())
    theta = (theta_g + 0.1).requires_grad_(True)
    REPULSIONS["el2"](anchor_distances(theta, prepare_anchors(anchors, theta_g, w))[0]).backward()
    g_fast = theta.grad.clone()
    theta.grad = None
    REPULSIONS["el2"](param_distance(theta, anchors, w)).backward()
    assert torch.allclose(g_fast, theta.grad, rtol=1e-4, atol=1e-7)


def test_repulsion_step_equals_reference(tiny_gan):
    """The decoupled step in matvec form = the (K, P)-difference form it replaced."""
    params, theta_g, anchors = _setup(tiny_gan)
    w = torch.rand(theta_g.numel())
    scale = 1.0 / param_distance(theta_g, anchors, w)
    with torch.no_grad():  # move theta off theta_G a little
        for p in params:
            p.add_(0.01)
    theta = flatten_params(params).detach().clone()
    # reference: theta + rate * sum_k c_k w (theta - theta_N,k), c_k = -dL/dd_k at d_k = s_k d_k(theta)
    diff = theta.unsqueeze(0) - anchors
    d = (diff.pow(2) * w).sum(1) * scale
    leaf = d.clone().requires_grad_(True)
    value_ref = REPULSIONS["el2"](leaf, alpha=0.7)
    (dl_dd,) = torch.autograd.grad(value_ref, leaf)
    expected = theta + 0.01 * (-dl_dd).unsqueeze(1).mul(diff).sum(0) * w

    rep = Repulsion(prepare_anchors(anchors, theta_g, w), scale, REPULSIONS["el2"], {"alpha": 0.7})
    value, dist = repulsion_step(FlatParams(params), rep, 0.01)
    assert torch.allclose(flatten_params(params).detach(), expected, rtol=1e-6, atol=1e-7)
    assert torch.allclose(value, value_ref.detach(), rtol=1e-5)
    assert torch.allclose(dist, d.mean(), rtol=1e-5)


@pytest.mark.parametrize("name", ["el2", "nl2", "il2"])
def test_repulsion_slopes(name):
    d = torch.tensor([0.5, 1.0, 2.0])
    value, c = repulsion_slopes(d, REPULSIONS[name], **({"alpha": 2.0} if name == "el2" else {}))
    expected = {"el2": 2.0 * torch.exp(-2.0 * d), "nl2": torch.ones(3), "il2": 1.0 / d**2}[name]
    assert torch.allclose(c, expected) and value.requires_grad is False


def test_ewc_penalty_half_grad_equals_autograd(tiny_gan):
    _, theta_g, anchors = _setup(tiny_gan, k=1)
    fisher = torch.rand(theta_g.numel())
    theta = anchors[0].clone().requires_grad_(True)
    ewc_penalty(theta, theta_g, fisher).backward()
    bufs = (torch.empty_like(theta_g), torch.empty_like(theta_g))
    value, half = ewc_penalty_half_grad(anchors[0], theta_g, fisher, *bufs)
    assert torch.allclose(value, ewc_penalty(anchors[0], theta_g, fisher), rtol=1e-5)
    assert torch.allclose(2 * half, theta.grad, rtol=1e-5, atol=1e-8)
    assert half.data_ptr() == bufs[1].data_ptr()  # written into the preallocated buffer
    none, half2 = ewc_penalty_half_grad(anchors[0], theta_g, fisher, *bufs, with_value=False)
    assert none is None and torch.equal(half2, half)  # without the value, the same vector


def test_loss_mode_gradient_equals_autograd(tiny_gan):
    """Repulsion mode "loss": the gradient added by hand = autograd of gamma * L_rep(s * d(theta))."""
    params, theta_g, anchors = _setup(tiny_gan)
    w = torch.rand(theta_g.numel())
    scale = 1.0 / param_distance(theta_g, anchors, w)
    gamma = 0.3
    with torch.no_grad():
        for p in params:
            p.add_(0.02)
    theta = flatten_params(params)
    (gamma * REPULSIONS["il2"](param_distance(theta, anchors, w) * scale)).backward()
    expected = flatten_params([p.grad for p in params]).clone()
    for p in params:
        p.grad = torch.zeros_like(p)
    flat = FlatParams(params)
    rep = Repulsion(prepare_anchors(anchors, theta_g, w), scale, REPULSIONS["il2"], {})
    _, _, c, wu = rep.evaluate(flat)
    flat.add_to_grad_(anchor_pull(wu, rep.anchors, 2 * rep.scale * c, out=wu), alpha=-gamma)
    assert torch.allclose(flatten_params([p.grad for p in params]), expected, rtol=1e-4, atol=1e-7)


def test_flat_params(tiny_gan):
    params = generator_params(tiny_gan)
    flat = FlatParams(params)
    theta = flatten_params(params).detach().clone()
    assert torch.equal(flat.read(), theta) and flat.read().data_ptr() == flat.theta.data_ptr()
    v = torch.randn_like(theta)
    flat.add_(v, alpha=0.5)
    assert torch.allclose(flatten_params(params).detach(), theta + 0.5 * v)
    for p in params:
        p.grad = None
    flat.add_to_grad_(v, alpha=2.0)  # missing grads start at zero
    assert torch.allclose(flatten_params([p.grad for p in params]), 2 * v)


@pytest.mark.parametrize("arch", ["dcgan", "mlp", "dcgan28"])
def test_fisher_fast_paths_equal_loop(arch):
    torch.manual_seed(0)
    gan = {"dcgan": lambda: build_gan("dcgan", 8, (1, 16, 16), channels=8),
           "mlp": lambda: build_gan("mlp", 8, (1, 8, 8), g_hidden=(16, 16), d_hidden=(16,)),
           "dcgan28": lambda: build_gan("dcgan", 8, (1, 28, 28), channels=8)}[arch]()
    z = gan.sample_latents(10, seed=1)
    ref = fisher_diagonal_loop(gan.generator, gan.discriminator, z)
    layers = fisher_diagonal_layers(gan.generator, gan.discriminator, z, chunk=4)
    vm = fisher_diagonal_vmap(gan.generator, gan.discriminator, z, chunk=4)
    for f in (layers, vm):
        assert f is not None and f.shape == ref.shape
        assert torch.allclose(f, ref, rtol=1e-4, atol=1e-6 * float(ref.abs().max()))


def test_fisher_falls_back_to_vmap_for_other_layers():
    """A generator with a parameterised layer that is not Linear/Conv2d takes the vmap path."""
    torch.manual_seed(0)
    g = nn.Sequential(nn.Linear(4, 16), nn.LayerNorm(16), nn.Linear(16, 16), nn.Tanh(), nn.Unflatten(1, (1, 4, 4)))
    d = nn.Sequential(nn.Flatten(), nn.Linear(16, 1))
    gan = GAN(g, d, 4, (1, 4, 4))
    z = gan.sample_latents(6, seed=0)
    assert fisher_diagonal_layers(g, d, z) is None
    assert torch.allclose(fisher_diagonal(g, d, z), fisher_diagonal_loop(g, d, z), rtol=1e-4, atol=1e-9)


def test_train_nets_compile_is_wired(tiny_gan, monkeypatch):
    calls = []
    monkeypatch.setattr(torch, "compile", lambda m, **kw: calls.append(m) or m)
    nets = TrainNets(tiny_gan, torch.device("cpu"), compile=True)
    assert calls == [tiny_gan.generator, tiny_gan.discriminator]
    z = tiny_gan.sample_latents(3)
    assert torch.equal(nets.generate(z), tiny_gan.generate(z))
    with nets.d_frozen():
        assert not any(p.requires_grad for p in tiny_gan.discriminator.parameters())
    assert all(p.requires_grad for p in tiny_gan.discriminator.parameters())


@pytest.mark.skipif(os.environ.get("AGU_TEST_COMPILE") != "1",
                    reason="torch.compile on the CPU builds C++ kernels: minutes on a small machine; set AGU_TEST_COMPILE=1")
def test_unlearn_with_compile_matches_eager(tiny_gan):
    cfg = {"method": "finetune", "iters": 3, "batch_size": 8, "log_every": 3, **DATA_TERMS_OFF}
    pos = tiny_gan.sample(32, seed=2)
    a = unlearn(tiny_gan, pos, [], UnlearnConfig(**cfg), progress=False).gan
    b = unlearn(tiny_gan, pos, [], UnlearnConfig(**cfg, compile=True), progress=False).gan
    assert torch.allclose(flatten_params(generator_params(a)), flatten_params(generator_params(b)), atol=1e-5)


def test_bench_gpu_exits_cleanly_without_cuda():
    if torch.cuda.is_available():
        pytest.skip("a CUDA GPU is present: bench_gpu would run for minutes")
    out = subprocess.run([sys.executable, str(BENCH / "bench_gpu.py"), "--batch", "256"], capture_output=True,
                         text=True, timeout=120, check=False)
    assert out.returncode == 0, out.stderr
    assert "no CUDA GPU" in out.stdout
    assert subprocess.run([sys.executable, str(BENCH / "bench_gpu.py"), "--help"], capture_output=True,
                          timeout=120, check=False).returncode == 0


def test_bench_variants_run_the_library_steps(tiny_gan):
    """Each benchmark variant runs (one iteration each) on a tiny GAN."""
    sys.path.insert(0, str(BENCH))
    try:
        from common import Variants
    finally:
        sys.path.remove(str(BENCH))
    v = Variants(tiny_gan, "cpu", batch1=4, batch2=8, fisher_samples=4)
    v.ucfg = replace(v.ucfg, negative_weight=1.0, negative_latent_weight=1.0, preserve_weight=1.0)
    for step in (v.plain(1), v.stage1(), v.plain(2), v.stage2(1), v.stage2(5), v.stage2(2, mode="loss"), v.ewc2(),
                 v.stage2(5, distance="fisher"), v.stage2_data_terms(2)):
        losses = step()  # (stage 1 as timed: EWC's value is not computed, None, as on the loop's unlogged steps)
        assert all(torch.isfinite(x).all() for x in losses[:2]) and all(x is None or torch.isfinite(x).all() for x in losses[2:])


def test_bench_load_gans_leaves_no_temporary_files(third_party_dir, tmp_path, monkeypatch):
    """The imported MNIST GAN is loaded into memory and its temporary folder removed: 91 runs of the
    benchmarks once left 91 folders (2.2 MB each) in /tmp."""
    sys.path.insert(0, str(BENCH))
    try:
        from common import load_gans
    finally:
        sys.path.remove(str(BENCH))
    monkeypatch.setattr("tempfile.tempdir", str(tmp_path))
    gans = load_gans("cpu", only="mnist_mlp")
    gan, _ = gans["mnist_mlp"]
    assert gan.sample(2, seed=0).shape == (2, 1, 28, 28)
    assert list(tmp_path.iterdir()) == []


def test_deterministic_cuda_sets_what_same_seed_same_numbers_needs(monkeypatch):
    """What the CLI turns on for --device cuda/auto on a GPU (tests/test_gpu.py checks the numbers there): cuDNN's
    deterministic algorithms without autotuning, a fixed cuBLAS workspace (unless the user chose one), torch's
    deterministic mode warning (not failing) on an operation that has no deterministic version."""
    from agu_lib.training import deterministic_cuda

    saved = (torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark, torch.are_deterministic_algorithms_enabled(),
             torch.is_deterministic_algorithms_warn_only_enabled())
    monkeypatch.delenv("CUBLAS_WORKSPACE_CONFIG", raising=False)
    try:
        torch.backends.cudnn.benchmark = True
        deterministic_cuda()
        assert os.environ["CUBLAS_WORKSPACE_CONFIG"] == ":4096:8"
        assert torch.backends.cudnn.deterministic and not torch.backends.cudnn.benchmark
        assert torch.are_deterministic_algorithms_enabled() and torch.is_deterministic_algorithms_warn_only_enabled()
        monkeypatch.setenv("CUBLAS_WORKSPACE_CONFIG", ":16:8")
        deterministic_cuda()
        assert os.environ["CUBLAS_WORKSPACE_CONFIG"] == ":16:8"  # the user's choice stays
    finally:
        torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = saved[:2]
        torch.use_deterministic_algorithms(saved[2], warn_only=saved[3])
