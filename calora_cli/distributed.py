"""Multi-process training through torch.distributed (DDP), launched by torchrun or accelerate.

A stage runs unchanged under `torchrun --nproc-per-node N -m calora_cli ...`: every process loads
the same model and data and draws the same global batches; each takes its 1/N slice of every batch,
DDP averages the gradients, and only rank 0 writes artifacts and prints. With equal tokens per
row (packed text), the average of the slices' mean losses is the global batch's mean loss, so N
processes train the same adapter as one (tested with 2 gloo processes on CPU).

With CALORA_DISTRIBUTED=fsdp (or accelerate's FSDP launch, ACCELERATE_USE_FSDP=true) the model
is sharded instead of replicated (torch FSDP2, `fully_shard` per decoder layer and at the root), for
models whose full copy does not fit one device: each process holds 1/N of the weights, gathered one
layer at a time for the forward and backward. Such models are never loaded whole: each process
builds a skeleton, shards it and reads only its own rows of each tensor (sharded_load). Saved
tensors are gathered whole first (`full`).
"""

from __future__ import annotations

from calora_cli.errors import CaloraError
from calora_cli.ranks import is_writer, rank, sharded, strategy, world_size  # noqa: F401 (distributed.* for callers)


def setup(device) -> None:
    """Join the process group the launcher describes (gloo on CPU, nccl on CUDA); idempotent."""
    import torch.distributed as dist

    if world_size() == 1 or dist.is_initialized():
        return
    backend = "nccl" if str(device).startswith("cuda") else "gloo"
    dist.init_process_group(backend=backend)


def wrap(model, device):
    """The model as DDP sees it when running distributed, else itself (sharded in place under FSDP)."""
    if world_size() == 1:
        return model
    setup(device)
    if sharded():
        return shard_model(model, device)
    from torch.nn.parallel import DistributedDataParallel

    return DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)


def shard_model(model, device):
    """Shard `model` over the processes in place (FSDP2): one group per decoder layer, the rest at
    the root, so at most one layer's full weights are gathered at a time. A no-op unless sharded()."""
    if not sharded():
        return model
    from calora_cli.sharded_load import materialize, pending

    setup(device)
    if pending(model):  # a skeleton (load_model(shardable=True)): sharded first, then each process reads its slices
        materialize(model, _fully_shard)
    else:
        _fully_shard(model)
    return model


def _fully_shard(model) -> None:
    from torch.distributed.fsdp import fully_shard

    from calora_cli.arch import decoder_layers

    inner = model.get_base_model() if hasattr(model, "get_base_model") else model  # a peft model wraps the HF one
    for layer in decoder_layers(inner):
        fully_shard(layer)
    fully_shard(model)


def full(tensor):
    """A parameter's whole value: gathered from every process when FSDP shards it (every process
    must call this, in the same order), else the tensor itself."""
    from torch.distributed.tensor import DTensor

    return tensor.full_tensor() if isinstance(tensor, DTensor) else tensor


def place_like(value, param):
    """`value` (a whole tensor, the same on every process) as `param` holds it: this process's
    shard under FSDP, else `value` unchanged."""
    from torch.distributed.tensor import DTensor, distribute_tensor

    if isinstance(param, DTensor) and not isinstance(value, DTensor) and value.shape == param.shape:
        return distribute_tensor(value.to(param.dtype), param.device_mesh, param.placements)
    return value


def adapter_state(model) -> dict | None:
    """The trainable (adapter) tensors of a peft model, whole, for save_pretrained(state_dict=...)
    under FSDP; None otherwise (peft then reads them itself)."""
    if not sharded():
        return None
    names = {n for n, p in model.named_parameters() if p.requires_grad}
    return {k: full(v).detach().contiguous() for k, v in model.state_dict().items() if k in names}


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
