"""Load models, tokenizers and adapters from local directories; build tiny models for tests.

Everything loads from disk only: safetensors weights, no remote code, no hub.
"""

from __future__ import annotations

import contextlib
import io
import json
import math
import os
from pathlib import Path
from typing import TYPE_CHECKING, Iterator

from calora_cli.errors import CaloraError

if TYPE_CHECKING:
    import torch
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")

DTYPES = ("float32", "bfloat16", "float16")


def torch_dtype(name: str) -> "torch.dtype":
    import torch

    if name not in DTYPES:
        raise CaloraError(f"unknown --dtype {name!r} (choose from {', '.join(DTYPES)})")
    return getattr(torch, name)


def resolve_device(name: str) -> "torch.device":
    import torch

    if name == "cpu":
        return torch.device("cpu")
    if name.startswith("cuda"):
        if not torch.cuda.is_available():
            raise CaloraError(f"--device {name} was asked for, but no CUDA device is available")
        try:
            dev = torch.device(name)
        except RuntimeError:
            raise CaloraError(f"unknown --device {name!r} (use cpu or cuda[:N])") from None
        from calora_cli import distributed

        if dev.index is None and distributed.world_size() > 1:
            # under torchrun/accelerate a bare `cuda` means this process's own GPU, as the launchers intend
            local, count = int(os.environ.get("LOCAL_RANK", "0")), torch.cuda.device_count()
            if local >= count:
                raise CaloraError(f"this process (LOCAL_RANK {local}) has no GPU of its own: {count} visible")
            dev = torch.device("cuda", local)
        if dev.index is not None:
            torch.cuda.set_device(dev)  # nccl and FSDP work on the current device
        return dev
    raise CaloraError(f"unknown --device {name!r} (use cpu or cuda[:N])")


_STACK_READY = False


@contextlib.contextmanager
def library_chatter_hidden() -> Iterator[None]:
    """Swallow what libraries print to stdout/stderr (unless CALORA_DEBUG is set).

    gptqmodel prints a banner on import and logs kernel choices and its own progress bars when it
    loads or quantizes; torchao logs missing CUDA kernels. None of it concerns the user, calora
    reports progress itself, and it would clutter CI logs.
    """
    if os.environ.get("CALORA_DEBUG"):
        yield
        return
    sink = io.StringIO()
    with contextlib.redirect_stdout(sink), contextlib.redirect_stderr(sink):
        yield


def _quiet_transformers() -> None:
    """Import the ML stack once, quietly."""
    global _STACK_READY
    if _STACK_READY:
        return
    with library_chatter_hidden():
        import peft  # noqa: F401
        import transformers  # noqa: F401

        with contextlib.suppress(Exception):
            import gptqmodel  # noqa: F401
    from transformers.utils import logging

    logging.set_verbosity_error()
    logging.disable_progress_bar()
    _STACK_READY = True


def load_model(path: Path, device: str = "cpu", dtype: str = "float32", shardable: bool = False) -> "PreTrainedModel":
    """A causal LM from a local Hugging Face directory (dense, pruned, GPTQ or bitsandbytes).

    `shardable`: the caller shards the model with distributed.shard_model; under FSDP it then
    comes back as a skeleton whose weights are read slice by slice once sharded (`skeleton`)."""
    from transformers import AutoModelForCausalLM

    from calora_cli import distributed

    _quiet_transformers()
    dev = resolve_device(device)
    if shardable and distributed.sharded():
        return skeleton(path, dev, dtype)
    try:
        with library_chatter_hidden():
            model = AutoModelForCausalLM.from_pretrained(
                path,
                dtype=torch_dtype(dtype),
                use_safetensors=True,
                trust_remote_code=False,
                local_files_only=True,
                device_map={"": str(dev)},
                **gptq_kernel(path, dev, dtype),
            )
    except (OSError, ValueError, KeyError, RuntimeError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise CaloraError(f"cannot load model {path}: {first}") from e
    import torch

    for name, p in model.named_parameters():
        if p.is_floating_point() and not bool(torch.isfinite(p).all()):
            raise CaloraError(f"model {path} has NaN or Inf values in {name}")
    model.eval()
    return model


def quantize_on_load(src: Path, quantization_config, device: str, dtype: str) -> "PreTrainedModel":
    """`src` quantized as it loads (GPTQ, bitsandbytes), on `device`; the libraries' chatter hidden.

    The dtype is passed on explicitly: gptqmodel would pick bf16 on CPU, whose matmuls are ~10x
    slower on CPUs without AMX (float32, the default, is what calora's CPU runs use)."""
    from transformers import AutoModelForCausalLM

    with library_chatter_hidden():
        return AutoModelForCausalLM.from_pretrained(
            src, quantization_config=quantization_config, device_map=str(resolve_device(device)),
            dtype=torch_dtype(dtype), trust_remote_code=False, use_safetensors=True, local_files_only=True,
        )


def gptq_kernel(path: Path, dev: "torch.device", dtype: str) -> dict:
    """from_pretrained arguments that pick the GPTQ kernel on CUDA (none elsewhere, or for other models).

    gptqmodel's automatic choice on a GPU is Marlin, which takes float16 inputs only and cannot be
    trained through, so `recover`/`train` on a GPTQ base and float32 `eval` would fail. Every stage
    gets a kernel it can train through instead, the same one for evaluation so that evaluation
    measures what was trained: the dequantizing torch kernel in float32, Triton in float16/bfloat16.
    """
    if dev.type != "cuda":
        return {}
    from transformers import GPTQConfig

    try:
        q = json.loads((Path(path) / "config.json").read_text()).get("quantization_config") or {}
    except (OSError, ValueError):
        return {}  # from_pretrained reports the unreadable config
    if q.get("quant_method") != "gptq":
        return {}
    backend = "gptq_torch" if dtype == "float32" else "auto_trainable"
    return {"quantization_config": GPTQConfig(bits=q.get("bits", 4), backend=backend)}


# --- loading straight into shards (FSDP) ---------------------------------------------------------
#
# A model too large for one device cannot be loaded whole and then sharded. Instead every process
# builds the model's structure with empty placeholder weights (adapters and recovery modules attach
# to it as usual: they read only the layers' in/out features, the weight's device and dtype), and
# `materialize` shards it with FSDP while the base weights are on the meta device, then each
# process reads only its own rows of every tensor from the safetensors files. No process ever holds
# a whole model. FSDP2 is given meta tensors rather than the placeholders because it shards only
# full-shaped, contiguous parameters.


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


def load_tokenizer(path: Path) -> "PreTrainedTokenizerBase":
    from transformers import AutoTokenizer

    _quiet_transformers()
    try:
        tok = AutoTokenizer.from_pretrained(path, trust_remote_code=False, local_files_only=True)
    except (OSError, ValueError, KeyError) as e:
        raise CaloraError(f"cannot load a tokenizer from {path}: {str(e).splitlines()[0]}") from e
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return tok


def load_adapter(model: "PreTrainedModel", path: Path, trainable: bool = False):
    """Attach a peft adapter saved on disk (safetensors only) to `model`."""
    _quiet_transformers()
    from peft import PeftModel

    try:
        return PeftModel.from_pretrained(model, path, is_trainable=trainable, local_files_only=True)
    except (OSError, ValueError, KeyError, RuntimeError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise CaloraError(f"cannot load adapter {path} onto the model: {first}") from e


def linear_module_names(model: "PreTrainedModel") -> list[str]:
    """The short names (q_proj, up_proj, ...) of the linear layers inside the decoder blocks."""
    import torch

    names = set()
    for full, mod in model.named_modules():
        if ".layers." in full and isinstance(mod, torch.nn.Linear):
            names.add(full.rsplit(".", 1)[-1])
    if not names:  # quantized linears are not nn.Linear subclasses: fall back on the usual names
        names = {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}
    return sorted(names)


def build_tiny_llama(
    vocab_size: int,
    hidden: int = 64,
    layers: int = 2,
    heads: int = 4,
    kv_heads: int | None = None,
    intermediate: int = 128,
    max_positions: int = 512,
    seed: int = 0,
    pad_token_id: int | None = None,
    bos_token_id: int | None = None,
    eos_token_id: int | None = None,
) -> "PreTrainedModel":
    """A randomly initialised LlamaForCausalLM built from a config in code (no download)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=hidden,
        intermediate_size=intermediate,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads or heads,
        max_position_embeddings=max_positions,
        tie_word_embeddings=True,
        pad_token_id=pad_token_id,
        bos_token_id=bos_token_id,
        eos_token_id=eos_token_id,
    )
    torch.manual_seed(seed)
    return LlamaForCausalLM(cfg).eval()


def train_bpe_tokenizer(texts: list[str], vocab_size: int = 8192):
    """A byte-level BPE tokenizer trained locally (no download), as a transformers fast tokenizer.

    Special tokens: <s> (bos), </s> (eos), <pad>. Deterministic for equal texts and vocab size.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=["<pad>", "<s>", "</s>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>")
