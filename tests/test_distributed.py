"""Stage 1 and stage 2 with 2 processes (DDP over gloo, CPU) match one process on the same global batch.

Each process draws the random numbers of the global batch from the same seeded generator and
keeps its rows; DDP averages the gradients of the two half-batches, which equals the gradient of
the whole batch up to float rounding. Tolerance: 1e-5 absolute on every generator parameter after
a few Adam steps (Adam divides by sqrt(v), so rounding differences of ~1e-7 in the gradients can
move a weight by a few lr * 1e-3; observed differences are ~1e-7).
"""

from __future__ import annotations

import os
import socket

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from agu_lib.adapt import AdaptConfig, adapt
from agu_lib.distributed import is_main_process, rank, shard_rows, world_size
from agu_lib.errors import ConfigError
from agu_lib.losses import flatten_params
from agu_lib.models import build_gan, generator_params
from agu_lib.unlearn import UnlearnConfig, unlearn

ADAPT = AdaptConfig(iters=4, batch_size=4, n_negatives=8, fisher_samples=4, log_every=2, n_models=2)
UNLEARN = UnlearnConfig(iters=5, batch_size=8, fisher_samples=4, log_every=5, method="el2", instance_noise=0.1,
                        augment_shift=1, negative_weight=1.0, negative_pool=64, negative_latent_weight=1.0,
                        preserve_weight=10.0)  # the data terms' rows are sharded too
TOL = 1e-5


def _job():
    """Stage 1 then stage 2 on a tiny GAN; returns the flat generator parameters of both results."""
    torch.set_num_threads(1)
    torch.manual_seed(0)
    gan = build_gan("dcgan", 8, (1, 16, 16), channels=8)
    images, z = gan.sample(48, seed=3), gan.sample_latents(48, seed=3)
    res = adapt(gan, images[:16], ADAPT, progress=False)
    out = unlearn(gan, images[16:], res.models, UNLEARN, progress=False, positive_latents=z[16:], negative_latents=z[:16])
    theta = lambda g: flatten_params(generator_params(g)).detach()
    return {"adapted": torch.stack([theta(m) for m in res.models]), "unlearned": theta(out.gan),
            "log": torch.tensor([[r[k] for k in ("d_loss", "g_adv", "reg")] for r in out.log])}


def _worker(r: int, world: int, port: int, path: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=r, world_size=world)
    try:
        assert rank() == r and world_size() == world and is_main_process() == (r == 0)
        result = _job()
        result["shard"] = shard_rows(torch.arange(8))
        try:
            shard_rows(torch.arange(7))
            result["shard_error"] = "no error"
        except ConfigError as e:
            result["shard_error"] = str(e)
        torch.save(result, f"{path}.{r}")
    finally:
        dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_processes_match_one(tmp_path):
    single = _job()
    mp.spawn(_worker, args=(2, _free_port(), str(tmp_path / "r")), nprocs=2, join=True)
    ranks = [torch.load(tmp_path / f"r.{r}") for r in range(2)]
    # the replicas stay identical (same averaged gradients, same penalties on the same parameters)
    for key in ("adapted", "unlearned"):
        assert torch.equal(ranks[0][key], ranks[1][key]), key
    # and match the single-process run of the same global batch
    for key in ("adapted", "unlearned"):
        diff = (ranks[0][key] - single[key]).abs().max().item()
        print(f"{key}: max |2 processes - 1 process| = {diff:.2e}")
        assert diff < TOL, f"{key}: max |2 processes - 1 process| = {diff:.2e} >= {TOL}"
    assert not torch.equal(single["unlearned"], single["adapted"][0])
    # each rank kept its rows of the global batch; an indivisible batch is refused
    assert torch.equal(ranks[0]["shard"], torch.arange(4)) and torch.equal(ranks[1]["shard"], torch.arange(4, 8))
    assert "divisible by the number of processes" in ranks[0]["shard_error"]


def test_shard_rows_single_process_is_identity():
    x = torch.arange(6)
    assert shard_rows(x) is x and world_size() == 1 and is_main_process()
