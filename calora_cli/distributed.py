"""Multi-process training through torch.distributed (DDP), launched by torchrun or accelerate.

A stage runs unchanged under `torchrun --nproc-per-node N -m calora_cli ...`: every process loads
the same model and data and draws the same global batches; each takes its 1/N slice of every batch,
DDP averages the gradients, and only rank 0 writes artifacts and prints. With equal tokens per
row (packed text), the average of the slices' mean losses is the global batch's mean loss, so N
processes train the same adapter as one (tested with 2 gloo processes on CPU).
"""

from __future__ import annotations

import os

from calora_cli.errors import CaloraError


def world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def rank() -> int:
    return int(os.environ.get("RANK", "0"))


def is_writer() -> bool:
    """Whether this process writes outputs and prints results (rank 0, or a single process)."""
    return rank() == 0


def setup(device) -> None:
    """Join the process group the launcher describes (gloo on CPU, nccl on CUDA); idempotent."""
    import torch.distributed as dist

    if world_size() == 1 or dist.is_initialized():
        return
    backend = "nccl" if str(device).startswith("cuda") else "gloo"
    dist.init_process_group(backend=backend)


def wrap(model, device):
    """The model as DDP sees it when running distributed, else itself."""
    if world_size() == 1:
        return model
    from torch.nn.parallel import DistributedDataParallel

    setup(device)
    return DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)


def shard(batch: dict, batch_size: int) -> dict:
    """This rank's rows of a global batch."""
    n = world_size()
    if n == 1:
        return batch
    if batch_size % n:
        raise CaloraError(f"--batch-size {batch_size} must be divisible by the {n} processes")
    per = batch_size // n
    lo = rank() * per
    return {k: v[lo : lo + per] for k, v in batch.items()}


def mean(value: float, device) -> float:
    """The mean of a number over all processes (the logged loss)."""
    if world_size() == 1:
        return value
    import torch
    import torch.distributed as dist

    t = torch.tensor([value], dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return float(t) / world_size()
