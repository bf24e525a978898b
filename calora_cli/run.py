"""What every stage does around its algorithm: shared options, seeding, checking its inputs."""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from pathlib import Path

from calora_cli.artifacts import Artifact, check_adapter_base, open_artifact
from calora_cli.errors import CaloraError

log = logging.getLogger(__name__)


@dataclass
class RunOptions:
    """Options every command shares (parsed by cli.py)."""

    device: str = "cpu"
    dtype: str = "float32"
    seed: int = 0
    force: bool = False
    show_progress: bool = True
    allow_base_mismatch: bool = False


def seed_everything(seed: int) -> None:
    import random

    import torch

    random.seed(seed)
    torch.manual_seed(seed)


def check_fits(adapter: Artifact, model: Artifact, opts: RunOptions) -> None:
    """Refuse an adapter made for a model `model` does not descend from (unless
    --allow-base-mismatch); warn when the adapter records no base to check against.

    A model without a calora manifest (a bare GGUF, a GPTQ/AWQ/bitsandbytes checkpoint made by
    another tool) has no lineage: the adapter's recorded base, where it is still on disk, must lie
    as close to the model's weights as a compression of it does (check_descends); where it is not,
    the model is assumed to be made from it, with a warning. Shapes are checked where it is loaded."""
    if model.manifest is None and adapter.base_fingerprint is not None and not opts.allow_base_mismatch:
        if adapter.base_fingerprint == model.fingerprint:  # made on this very model (inherit onto a downloaded base)
            return
        recorded = (adapter.manifest or {}).get("inputs", {}).get("base", {}).get("path")
        origin = None
        if recorded and Path(recorded).is_dir():
            try:
                origin = open_artifact(Path(recorded), expect="model", role="the adapter's base")
            except CaloraError:
                origin = None
        if origin is None or origin.fingerprint != adapter.base_fingerprint:
            log.warning(f"{model.source or model.path} records no lineage, and adapter {adapter.path}'s base is not "
                        "on disk to compare with: assuming the model was made from it")
            return
        distance = weight_distance(model, origin)
        if distance is None:
            log.warning(f"{model.source or model.path} records no lineage and is not read tensor by tensor here "
                        f"(bitsandbytes): assuming adapter {adapter.path} fits it")
            return
        if distance > CLOSE_ENOUGH:
            far = "do not match its tensors" if math.isinf(distance) else f"lie {distance:.2f} (relative) from its weights"
            raise CaloraError(f"adapter {adapter.path} was trained on another base ({origin.path}): "
                              f"{model.source or model.path} has no calora lineage, and its weights {far}, too far "
                              "for a compression of it; pass --allow-base-mismatch to use it anyway")
        return
    note = check_adapter_base(adapter, model, opts.allow_base_mismatch)
    if note:
        log.warning(note)


def open_model(path: Path, role: str = "model", hf_folder: Path | None = None) -> Artifact:
    """A model artifact, or a bare .gguf file seen as one (gguf/view.py: its config and tokenizer
    from `hf_folder`, the model it was made from, or from the file's own metadata), or an AutoGPTQ
    checkpoint seen as transformers' GPTQ layout (views.py)."""
    path = Path(path)
    if path.is_file() and path.suffix == ".gguf":
        from calora_cli.artifacts import check_gguf_header
        from calora_cli.gguf.view import view_of

        check_gguf_header(path)
        art = open_artifact(view_of(path, hf_folder), expect="model", role=role)
        art.source = path
        return art
    from calora_cli.views import gptq_view, needs_gptq_view

    if path.is_dir() and needs_gptq_view(path):
        art = open_artifact(gptq_view(path), expect="model", role=role)
        art.source = path
        return art
    return open_artifact(path, expect="model", role=role)


def open_model_and_adapter(model: Path, adapter: Path | None, opts: RunOptions) -> tuple[Artifact, Artifact | None]:
    """Check a model (and an adapter meant for it) before anything heavy is loaded."""
    model_art = open_model(model)
    adapter_art = None
    if adapter is not None:
        adapter_art = open_artifact(adapter, expect="adapter", role="adapter")
        check_fits(adapter_art, model_art, opts)
    return model_art, adapter_art


# a compression's weights stay this close to the original's (relative Frobenius error; measured 0.05-0.5
# from 8-bit to 2-bit quantization and 50% pruning); another model's are ~1.4 away
CLOSE_ENOUGH = 0.75


def check_descends(model: Artifact, origin: Artifact, what: str, opts: RunOptions) -> None:
    """Refuse a compressed `model` that was not made from `origin` (a teacher, a dense twin), unless
    --allow-base-mismatch. `what`: how it should have been made ("pruned from"). A model without a
    calora manifest (downloaded, or made by another tool) has no lineage to check: its first decoder
    layer's weights must then lie close to the origin's instead."""
    if origin.fingerprint in model.lineage or opts.allow_base_mismatch:
        return
    where = model.source or model.path
    if model.manifest is None:
        distance = weight_distance(model, origin)
        if distance is None:
            log.warning(f"{where} has no calora lineage, and its weights are not read tensor by tensor here "
                        f"(bitsandbytes): assuming it was {what} {origin.path}")
            return
        if distance <= CLOSE_ENOUGH:
            return
        if math.isinf(distance):
            raise CaloraError(f"{where} has no calora lineage, and its first layer's tensors do not match "
                              f"{origin.path}'s in names or shapes; pass --allow-base-mismatch to use it anyway")
        raise CaloraError(f"{where} has no calora lineage, and its weights lie {distance:.2f} (relative) from "
                          f"{origin.path}'s, too far for a compression of it; pass --allow-base-mismatch to use it anyway")
    raise CaloraError(f"{where} was not {what} {origin.path}; pass --allow-base-mismatch to use it anyway")


def weight_distance(model: Artifact, origin: Artifact) -> float | None:
    """Relative distance ||W - W_model|| / ||W|| over the first decoder layer's linear weights, the
    model's read as calora computes with them (dequantized GPTQ, AWQ, compressed-tensors or GGUF);
    None for a model whose tensors calora does not read one by one (a bitsandbytes checkpoint)."""
    import json

    import torch

    from calora_cli.formats import is_load_time
    from calora_cli.streaming import LayerSource
    from calora_cli.tensor_io import ShardReader

    if is_load_time(json.loads((model.path / "config.json").read_text())):
        return None
    source = LayerSource(model.path, model.weights, torch.float32, torch.device("cpu"))
    readers = [ShardReader(w) for w in origin.weights] if not origin.gguf else []
    try:
        num = den = 0.0
        for r in readers:
            for name in r.names():
                if not (name.startswith("model.layers.0.") and name.endswith(".weight")) or len(r.header[name]["shape"]) != 2:
                    continue
                theirs = source.dequantized(name)
                if theirs is None:
                    if name not in source.where:
                        return math.inf
                    theirs = source.read(name)
                w = r.get_tensor(name).float()
                if tuple(theirs.shape) != tuple(w.shape):
                    return math.inf
                num += float(((w - theirs.float()) ** 2).sum())
                den += float((w**2).sum())
        return math.sqrt(num / den) if den else math.inf
    finally:
        source.close()
        for r in readers:
            r.file.close()


def available_memory() -> int:
    """Bytes of memory this machine can still give (MemAvailable), or a large number if unknown."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 1 << 62


def resident_bytes(model: Artifact, dtype: str) -> int:
    """Bytes a model takes loaded whole in `dtype` (its floating tensors upcast or downcast),
    from its safetensors headers alone."""
    import math

    from calora_cli.artifacts import read_safetensors_header

    from calora_cli.runtime import torch_dtype

    width = torch_dtype(dtype).itemsize  # an unknown --dtype is refused here, in one line
    if model.gguf:  # dequantized into `dtype` as it is read
        from calora_cli.gguf.reader import open_gguf

        return sum(int(t.n_elements) for t in open_gguf(model.weights[0]).tensors) * width
    stored = {"F32": 4, "F16": 2, "BF16": 2, "F64": 8}
    total = 0
    for w in model.weights:
        for name, info in read_safetensors_header(w).items():
            if name == "__metadata__":
                continue
            n = math.prod(info["shape"])
            total += n * (width if info["dtype"] in stored else 1 if info["dtype"] in ("I8", "U8") else 4)
    return total


def check_training_memory(what: str, models: list[Artifact], dtype: str, batch_size: int, seq_len: int) -> None:
    """Refuse, in one line and before anything is loaded, a training run whose whole models
    (student and teacher are resident while training) will not fit the memory available.

    The estimate: each model's weights in the compute dtype (its share under FSDP), plus the
    activations kept for the backward pass (about 34 x batch x seq x hidden bytes per layer at 16
    bits, twice that at 32, as for transformer training in general) and the logits, log-softmax and
    their gradient (3 x batch x seq x vocab in float32). Optimizer state is the adapter's: small."""
    import json

    from calora_cli.ranks import sharded, world_size

    weights = sum(resident_bytes(m, dtype) for m in models) // (world_size() if sharded() else 1)
    config = json.loads((models[0].path / "config.json").read_text())
    hidden, layers = config.get("hidden_size", 0), config.get("num_hidden_layers", 0)
    per_token = 34 * hidden * layers * (2 if dtype == "float32" else 1) + 12 * config.get("vocab_size", 0)
    acts = batch_size * seq_len * per_token // max(1, world_size())
    need, free = int(1.1 * (weights + acts)), available_memory()
    if need > free:
        raise CaloraError(f"{what} needs about {need / 1e9:.1f} GB (models {weights / 1e9:.1f} GB, activations "
                          f"{acts / 1e9:.1f} GB), {free / 1e9:.1f} GB are free: lower --batch-size or --seq-len, use "
                          "--dtype bfloat16, or shard it over processes (CALORA_DISTRIBUTED=fsdp)")
