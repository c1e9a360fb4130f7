"""The CUDA path: the same loops on an NVIDIA GPU (skipped on a machine without one).

What only a GPU exercises: G's and D's convolutions in ``channels_last`` (so the flat parameter
vector is a copy, not a view), pinned asynchronous host-to-device copies, bf16 autocast
(``amp``), ``torch.compile`` on CUDA, DDP over NCCL, saving a GAN trained on the GPU and loading
it on the CPU. Each test compares with the CPU where the two must agree, or checks what a user
is told.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import bright, make_tiny_gan

from agu_lib import load_gan, save_gan
from agu_lib.adapt import AdaptConfig, adapt
from agu_lib.cli import main
from agu_lib.feedback import PredicateOracle, collect
from agu_lib.losses import fisher_diagonal, fisher_diagonal_loop
from agu_lib.models import generator_params
from agu_lib.training import FlatParams, TrainNets
from agu_lib.unlearn import UnlearnConfig, unlearn

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs an NVIDIA GPU (torch.cuda.is_available())")

ROOT = Path(__file__).resolve().parents[1]
SHORT = ["--iters", "150", "--adapt-iters", "150", "--n-samples", "2000", "--n-eval", "1000", "--quiet"]
CUDA = torch.device("cuda")


@pytest.fixture(autouse=True)
def _exact_fp32():
    """Plain fp32 matrix products (no TF32), so CPU and GPU can be compared tightly."""
    old = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = old


def max_rel_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.cpu() - b.cpu()).abs().max() / b.cpu().abs().max().clamp_min(1e-30))


def test_fisher_on_the_gpu_matches_the_cpu():
    gan = make_tiny_gan()
    z = gan.sample_latents(32, seed=0)
    cpu = fisher_diagonal(gan.generator, gan.discriminator, z)
    g = gan.clone().to(CUDA)
    gpu = fisher_diagonal(g.generator, g.discriminator, z.to(CUDA))
    loop = fisher_diagonal_loop(g.generator, g.discriminator, z.to(CUDA))
    assert gpu.device.type == "cuda" and gpu.shape == cpu.shape
    assert max_rel_diff(gpu, cpu) < 1e-4
    assert max_rel_diff(gpu, loop) < 1e-4


def test_conv_parameters_in_channels_last_train_as_on_the_cpu():
    """On CUDA a conv GAN's weights are channels_last, so the flat theta is a copy (not bound): stage 1's EWC and
    stage 2's repulsion read and step it correctly there. A few steps on GPU and CPU end at the same weights."""
    gan = make_tiny_gan()
    nets = TrainNets(gan.clone().to(CUDA), CUDA)
    conv_w = [p for p in nets.gan.generator.parameters() if p.dim() == 4]
    assert conv_w and all(p.is_contiguous(memory_format=torch.channels_last) for p in conv_w)
    assert not FlatParams(generator_params(nets.gan)).bound

    fb = collect(gan, PredicateOracle(bright), 256, seed=0, min_negatives=8)
    acfg = AdaptConfig(iters=5, n_models=2, batch_size=8, log_every=5)
    ucfg = UnlearnConfig(iters=5, batch_size=16, log_every=5, negative_pool=64)
    results = {}
    for dev in ("cpu", "cuda"):
        a = adapt(gan, fb.negatives, acfg, device=dev, progress=False)
        u = unlearn(gan, fb, a.models, ucfg, device=dev, progress=False)
        results[dev] = (a, u)
    (a_cpu, u_cpu), (a_gpu, u_gpu) = results["cpu"], results["cuda"]
    assert max_rel_diff(a_gpu.fisher, a_cpu.fisher) < 1e-4
    for name, p_cpu in u_cpu.gan.state_dict().items():
        p_gpu = u_gpu.gan.state_dict()[name]
        assert p_gpu.device.type == "cuda"
        assert torch.allclose(p_gpu.cpu(), p_cpu, rtol=1e-3, atol=1e-4), name
    theta_g = torch.cat([p.detach().reshape(-1) for p in generator_params(gan)])
    moved = torch.cat([p.detach().reshape(-1).cpu() for p in generator_params(u_gpu.gan)])
    assert not torch.equal(moved, theta_g)  # it trained
    assert u_gpu.log[-1]["d_loss"] == pytest.approx(u_cpu.log[-1]["d_loss"], rel=1e-3)


@pytest.mark.parametrize("arch,compile", [("dcgan", True), ("mlp", False)])
def test_bf16_autocast_and_compile_train_and_save(arch, compile, tmp_path):
    """amp (bf16 for the adversarial part), with torch.compile on CUDA for the conv GAN: finite losses, fp32 weights
    that moved, a GAN that saves and loads on the CPU with the same samples."""
    gan = make_tiny_gan(arch)
    fb = collect(gan, PredicateOracle(bright), 256, seed=0, min_negatives=8)
    a = adapt(gan, fb.negatives, AdaptConfig(iters=20, n_models=1, batch_size=8, log_every=10, amp=True, compile=compile),
              device=CUDA, progress=False)
    u = unlearn(gan, fb, a.models, UnlearnConfig(iters=20, batch_size=16, log_every=10, negative_pool=64, amp=True,
                                                 compile=compile), device=CUDA, progress=False)
    for row in a.logs[0] + u.log:
        assert all(torch.isfinite(torch.tensor(v)) for k, v in row.items() if k != "step")
    for p in generator_params(u.gan):
        assert p.dtype == torch.float32 and p.device.type == "cuda"
    assert not torch.equal(generator_params(u.gan)[0].detach().cpu(), generator_params(gan)[0].detach())
    save_gan(u.gan, tmp_path / "g")
    back = load_gan(tmp_path / "g", device="cpu")
    x_gpu, x_cpu = u.gan.sample(16, seed=3).cpu(), back.sample(16, seed=3)
    assert (x_gpu - x_cpu).abs().max() < 1e-4


def test_agu_run_on_cuda_lowers_the_class_and_its_gan_loads_on_the_cpu(tmp_path, capsys):
    """The README's main command, short, on the GPU: the same thresholds as the CPU test, a result that loads on the
    CPU with the same samples, and config.json that names the device."""
    out = tmp_path / "run"
    assert main(["run", "digits", "--classifier", "digits", "--forget", "1", "--out", str(out), "--device", "cuda",
                 *SHORT]) == 0
    m = json.loads((out / "metrics.json").read_text())
    u, o = m["unlearned"], m["original"]
    assert u["pul"] > 30.0 and u["retained_tv"] < 0.1  # CPU: measured 54 at these settings
    assert m["adapted"]["negative_share"] > 2 * o["negative_share"]
    assert json.loads((out / "config.json").read_text())["environment"]["device"] == "cuda"
    on_cpu, on_gpu = load_gan(out / "unlearned", device="cpu"), load_gan(out / "unlearned", device="cuda")
    assert all(p.is_contiguous() for p in on_cpu.generator.parameters())
    assert (on_gpu.sample(64, seed=5).cpu() - on_cpu.sample(64, seed=5)).abs().max() < 1e-4
    capsys.readouterr()
    assert main(["evaluate", str(out / "unlearned"), "--original", "digits", "--classifier", "digits", "--forget", "1",
                 "--n-eval", "1000", "--device", "cpu", "--metrics", "pul"]) == 0
    on_cpu_pul = json.loads(capsys.readouterr().out)["metrics"]["pul"]
    assert on_cpu_pul > 30.0  # the GPU-trained GAN, scored on the CPU (other latents than the run's)


def agu(*args: str, launcher: tuple[str, ...] = ("-m", "agu_lib.cli")) -> subprocess.CompletedProcess:
    """An agu command in a fresh process, as a user runs it (CUDA and cuBLAS start afresh)."""
    env = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    env.pop("CUBLAS_WORKSPACE_CONFIG", None)  # agu sets it itself
    r = subprocess.run([sys.executable, *launcher, *args], check=False, env=env, capture_output=True, text=True,
                       timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    return r


def test_same_seed_same_metrics_on_cuda(tmp_path):
    """Two runs of the same command on the GPU give the same metrics (what an instructor needs for a lab):
    agu makes CUDA deterministic (``training.deterministic_cuda``), and no operation it uses says it cannot be."""
    args = ["run", "digits", "--classifier", "digits", "--forget", "8", "--device", "cuda", "--iters", "60",
            "--adapt-iters", "60", "--k", "2", "--n-samples", "1000", "--n-eval", "500", "--quiet"]
    runs = []
    for k in range(2):
        r = agu(*args, "--out", str(tmp_path / f"r{k}"))
        assert "deterministic" not in r.stderr, r.stderr  # torch warns of an operation without a deterministic version
        m = json.loads((tmp_path / f"r{k}" / "metrics.json").read_text())
        m.pop("seconds")
        runs.append(m)
    assert runs[0] == runs[1]


def test_torchrun_one_process_on_nccl(tmp_path):
    """DDP over NCCL (one process): the run completes and rank 0 writes the result."""
    out = tmp_path / "ddp"
    agu("run", "digits", "--classifier", "digits", "--forget", "1", "--out", str(out), "--device", "cuda", "--iters", "40",
        "--adapt-iters", "40", "--k", "1", "--n-samples", "1000", "--n-eval", "500", "--quiet", "--threads", "1",
        launcher=("-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "1", "-m", "agu_lib.cli"))
    assert (out / "metrics.json").is_file() and (out / "unlearned" / "card.json").is_file()


@pytest.mark.parametrize("chapter", ["01", "02", "03", "04", "05", "06", "07"])
def test_every_chapter_runs_on_the_gpu(chapter, tmp_path, monkeypatch):
    """A student on a cloud GPU sets DEVICE = "cuda" (or AGU_DEVICE=cuda): the chapter runs there to the end
    in ci mode (its numbers are the GPU's, so they are not compared with the stored CPU outputs)."""
    pytest.importorskip("papermill")
    sys.path.insert(0, str(ROOT / "tools"))
    import refresh_notebooks

    (path,) = refresh_notebooks.notebook_paths([chapter])
    monkeypatch.setenv("AGU_DEVICE", "cuda")
    refresh_notebooks.execute(path, tmp_path / path.name, "ci")
    nb = json.loads((tmp_path / path.name).read_text())
    assert not [o for c in nb["cells"] for o in c.get("outputs", []) if o.get("output_type") == "error"]
