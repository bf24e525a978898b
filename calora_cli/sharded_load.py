"""Loading straight into shards (FSDP).

A model too large for one device cannot be loaded whole and then sharded. Instead every process
builds the model's structure with empty placeholder weights (adapters and recovery modules attach
to it as usual: they read only the layers' in/out features, the weight's device and dtype), and
`materialize` shards it with FSDP while the base weights are on the meta device, then each
process reads only its own rows of every tensor from the safetensors files. No process ever holds
a whole model. FSDP2 is given meta tensors rather than the placeholders because it shards only
full-shaped, contiguous parameters.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import TYPE_CHECKING

from calora_cli.errors import CaloraError
from calora_cli.runtime import library_chatter_hidden, torch_dtype

if TYPE_CHECKING:
    import torch
    from transformers import PreTrainedModel


def skeleton(path: Path, dev: "torch.device", dtype: str) -> "PreTrainedModel":
    """The model at `path` with empty placeholder weights, to be filled by materialize."""
    import torch
    from accelerate import init_empty_weights
    from transformers import AutoConfig, AutoModelForCausalLM

    try:
        config = AutoConfig.from_pretrained(path, trust_remote_code=False, local_files_only=True)
    except (OSError, ValueError, KeyError) as e:
        raise CaloraError(f"cannot load model {path}: {str(e).strip().splitlines()[0]}") from e
    if getattr(config, "quantization_config", None):
        raise CaloraError(f"{path} is quantized: FSDP shards unquantized (dense or pruned) models; "
                          "run quantized bases with CALORA_DISTRIBUTED=ddp")
    with library_chatter_hidden(), init_empty_weights():  # parameters on meta; buffers (rotary tables) real
        model = AutoModelForCausalLM.from_config(config, dtype=torch_dtype(dtype))
    out_emb = model.get_output_embeddings()
    if getattr(config, "tie_word_embeddings", False) and out_emb is not None:
        out_emb.weight = model.get_input_embeddings().weight  # from_pretrained ties these; from_config on meta does not
    placeholders: dict[int, torch.nn.Parameter] = {}
    slots: dict[int, tuple] = {}  # per base weight: every (module, name) holding it, its checkpoint keys, shape
    for mname, module in model.named_modules():
        for pname, p in list(module.named_parameters(recurse=False)):
            if id(p) not in placeholders:
                placeholders[id(p)] = torch.nn.Parameter(torch.empty(0, dtype=p.dtype, device=dev), requires_grad=p.requires_grad)
                slots[id(p)] = ([], [], tuple(p.shape))
            holders, keys, _ = slots[id(p)]
            holders.append((module, pname))
            keys.append(f"{mname}.{pname}" if mname else pname)  # tied weights: whichever name the file has
            module._parameters[pname] = placeholders[id(p)]
    model._calora_pending = (Path(path), list(slots.values()), dev)
    model.eval()
    return model


def _inner(model):
    return model.get_base_model() if hasattr(model, "get_base_model") else model  # a peft model wraps the HF one


def pending(model) -> bool:
    """Whether `model` (or the model a peft model wraps) is a skeleton not yet materialized."""
    return getattr(_inner(model), "_calora_pending", None) is not None


def materialize(model, shard) -> None:
    """Shard a skeleton with `shard(model)` (FSDP) and fill its base weights: each process reads
    only its rows of each tensor. Adapter weights and buffers keep their values."""
    import torch
    from torch.distributed.tensor import DTensor

    inner = _inner(model)
    path, slots, dev = inner._calora_pending
    for holders, _, shape in slots:
        module, pname = holders[0]
        meta = torch.nn.Parameter(torch.empty(shape, dtype=module._parameters[pname].dtype, device="meta"),
                                  requires_grad=module._parameters[pname].requires_grad)
        for module, pname in holders:
            module._parameters[pname] = meta
    shard(model)

    def local(t):
        return t.to_local() if isinstance(t, DTensor) else t

    # to_empty allocates every tensor afresh: keep what already has values (adapters, rotary tables)
    keep = {n: local(p).detach().clone() for n, p in model.named_parameters() if not local(p).is_meta}
    buffers = {n: b.detach().clone() for n, b in model.named_buffers()}
    model.to_empty(device=dev)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if n in keep:
                local(p).copy_(keep[n])
        for n, b in model.named_buffers():
            b.copy_(buffers[n])
    for holders, _, _ in slots:  # to_empty allocates per module: tie shared weights again
        first = holders[0][0]._parameters[holders[0][1]]
        for module, pname in holders[1:]:
            module._parameters[pname] = first
    inner._calora_read = _read_shards(path, slots)
    inner._calora_pending = None


def weights_read(model) -> float | None:
    """The share of a materialized model's weight bytes this process read (~1/N), else None."""
    read = getattr(_inner(model), "_calora_read", None)
    return read[0] / read[1] if read and read[1] else None


def _read_shards(path: Path, slots) -> tuple[int, int]:
    """Read each process's rows of each base weight; returns (bytes read, bytes of the whole weights)."""
    import torch
    from torch.distributed.tensor import DTensor

    from calora_cli.artifacts import safetensors_files
    from calora_cli.tensor_io import ShardReader

    readers = [ShardReader(f) for f in safetensors_files(path)]
    if not readers:
        raise CaloraError(f"cannot load model {path}: no safetensors weights in it")
    where = {k: r for r in readers for k in r.header if k != "__metadata__"}
    read = total = 0
    try:
        with torch.no_grad():
            for holders, keys, shape in slots:
                module, pname = holders[0]
                p = module._parameters[pname]
                key = next((k for k in keys if k in where), None)
                if key is None:
                    raise CaloraError(f"cannot load model {path}: its safetensors files have no tensor {keys[0]}")
                stored = tuple(where[key].header[key]["shape"])
                if stored != shape:
                    raise CaloraError(f"cannot load model {path}: {key} has shape {list(stored)}, its config needs {list(shape)}")
                lo, hi = 0, shape[0]
                if isinstance(p, DTensor):  # FSDP2 shards dim 0 in torch.chunk's pieces
                    per = -(-shape[0] // p.device_mesh.size())
                    lo = min(shape[0], p.device_mesh.get_local_rank() * per)
                    hi = min(shape[0], lo + per)
                target = p.to_local() if isinstance(p, DTensor) else p.data
                if target.shape[0] != hi - lo:
                    raise CaloraError(f"cannot load model {path}: {key} is sharded in a way calora does not read")
                rows = where[key].get_rows(key, lo, hi)
                if rows.is_floating_point() and not bool(torch.isfinite(rows).all()):
                    raise CaloraError(f"model {path} has NaN or Inf values in {key}")
                target.copy_(rows.to(target.dtype))
                read += rows.numel() * rows.element_size()
                total += math.prod(shape) * rows.element_size()
    finally:
        for r in readers:
            r.file.close()
    return read, total
