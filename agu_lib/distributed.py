"""Several processes (several GPUs, or CPU processes with gloo) through ``torchrun``.

Launch any ``agu`` command under torchrun; each process trains on its shard of every global
batch, DistributedDataParallel averages G's and D's gradients, and only rank 0 writes files:

    torchrun --standalone --nproc_per_node 4 -m agu_lib.cli run digits --classifier digits \\
        --forget 7 --out runs/forget7 --device cuda          # nccl, one GPU per process
    torchrun --standalone --nproc_per_node 2 -m agu_lib.cli run digits --classifier digits \\
        --forget 7 --out runs/forget7 --device cpu           # gloo, CPU processes

How a step is split (``adapt`` and ``unlearn`` are the same code with one process or many):

- The random numbers of a step (batch indices, latents, augmentation noise) are drawn for the
  **global** batch from the same seeded generator on every rank, and each rank keeps its rows
  (``shard_rows``). With equal shards, DDP's gradient average equals the single-process gradient
  of the global batch, so a run matches a one-process run up to float rounding (``batch_size``,
  the global batch, must be divisible by the number of processes).
- Fixed buffers (Fisher, adapted parameters) are computed on every rank and broadcast from rank 0.
- The penalties (EWC, repulsion) act on the parameters, which DDP keeps identical on every rank:
  they are computed by each rank on its replica, identically, with no communication.
- Files (checkpoints, run directories) are written by rank 0 only (``is_main_process``).
"""

from __future__ import annotations

import os

import torch
import torch.distributed as dist
from torch import nn

from .errors import ConfigError


def is_initialized() -> bool:
    """True when a process group is up (under torchrun, after ``init_from_env``)."""
    return dist.is_available() and dist.is_initialized()


def rank() -> int:
    return dist.get_rank() if is_initialized() else 0


def world_size() -> int:
    return dist.get_world_size() if is_initialized() else 1


def is_main_process() -> bool:
    """True on rank 0 (and in a plain single-process run): the process that writes files."""
    return rank() == 0


def init_from_env(device: str | torch.device | None = None) -> bool:
    """Start the process group when launched by torchrun (``WORLD_SIZE`` > 1 in the environment):
    nccl for CUDA, gloo otherwise; on CUDA each process uses GPU ``LOCAL_RANK``. Returns whether a
    group is up. A no-op in a plain run."""
    if is_initialized():
        return True
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return False
    use_cuda = torch.cuda.is_available() and (device is None or torch.device(device).type in ("cuda", "auto"))
    if use_cuda:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    dist.init_process_group(backend="nccl" if use_cuda else "gloo")
    return True


def shard_rows(x: torch.Tensor) -> torch.Tensor:
    """This rank's rows of a global batch ``x`` ``(B, ...)``: rows ``[r*B/W, (r+1)*B/W)``."""
    w = world_size()
    if w == 1:
        return x
    if len(x) % w:
        raise ConfigError(f"the batch size ({len(x)}) must be divisible by the number of processes ({w})")
    n = len(x) // w
    return x[rank() * n:(rank() + 1) * n]


def broadcast_(t: torch.Tensor) -> torch.Tensor:
    """Overwrite ``t`` in place with rank 0's copy (so fixed buffers are bitwise identical)."""
    if is_initialized():
        dist.broadcast(t, 0)
    return t


def wrap_ddp(module: nn.Module, device: torch.device) -> nn.Module:
    """``DistributedDataParallel(module)`` when a process group is up, else ``module`` itself.
    DDP broadcasts rank 0's weights at construction and averages gradients in backward."""
    if not is_initialized() or not any(p.requires_grad for p in module.parameters()):
        return module
    ids = [device.index if device.index is not None else torch.cuda.current_device()] if device.type == "cuda" else None
    return nn.parallel.DistributedDataParallel(module, device_ids=ids)


def barrier() -> None:
    if is_initialized():
        dist.barrier()
