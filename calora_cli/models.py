"""Load models, tokenizers and adapters from local directories.

Everything loads from disk only: safetensors weights, no remote code, no hub.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING

from calora_cli.errors import CaloraError
from calora_cli.ranks import sharded
from calora_cli.runtime import (
    import_stack,
    library_chatter_hidden,
    resolve_device,
    torch_dtype,
)

if TYPE_CHECKING:
    import torch
    from transformers import PreTrainedModel, PreTrainedTokenizerBase


def load_model(path: Path, device: str = "cpu", dtype: str = "float32", shardable: bool = False) -> "PreTrainedModel":
    """A causal LM from a local Hugging Face directory (dense, pruned, GPTQ or bitsandbytes).

    `shardable`: the caller shards the model with distributed.shard_model; under FSDP it then
    comes back as a skeleton whose weights are read slice by slice once sharded (`skeleton`)."""
    from transformers import AutoModelForCausalLM

    from calora_cli.arch import check_supported

    try:
        config = json.loads((Path(path) / "config.json").read_text())
    except (OSError, ValueError):
        config = None  # from_pretrained reports the missing or unreadable config
    if config is not None:
        check_supported(config, path)
    quantization = (config or {}).get("quantization_config") or {}
    import_stack(gptq=quantization.get("quant_method") == "gptq")
    dev = resolve_device(device)
    if shardable and sharded():
        from calora_cli.sharded_load import skeleton

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
                **gptq_kernel(quantization, dev, dtype),
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


def gptq_kernel(q: dict, dev: "torch.device", dtype: str) -> dict:
    """from_pretrained arguments that pick the GPTQ kernel on CUDA (none elsewhere, or for other
    models), from the model's quantization_config `q`.

    gptqmodel's automatic choice on a GPU is Marlin, which takes float16 inputs only and cannot be
    trained through, so `recover`/`train` on a GPTQ base and float32 `eval` would fail. Every stage
    gets a kernel it can train through instead, the same one for evaluation so that evaluation
    measures what was trained: the dequantizing torch kernel in float32, Triton in float16/bfloat16.
    """
    if dev.type != "cuda":
        return {}
    from transformers import GPTQConfig

    if q.get("quant_method") != "gptq":
        return {}
    backend = "gptq_torch" if dtype == "float32" else "auto_trainable"
    return {"quantization_config": GPTQConfig(bits=q.get("bits", 4), backend=backend)}


def load_tokenizer(path: Path) -> "PreTrainedTokenizerBase":
    from transformers import AutoTokenizer

    import_stack()
    try:
        tok = AutoTokenizer.from_pretrained(path, trust_remote_code=False, local_files_only=True)
    except (OSError, ValueError, KeyError) as e:
        raise CaloraError(f"cannot load a tokenizer from {path}: {str(e).splitlines()[0]}") from e
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return tok


def load_adapter(model: "PreTrainedModel", path: Path, trainable: bool = False):
    """Attach a peft adapter saved on disk (safetensors only) to `model`."""
    import_stack(gptq=True)  # peft's LoRA dispatch imports gptqmodel whatever the base: quietly, here
    from peft import PeftModel

    try:
        return PeftModel.from_pretrained(model, path, is_trainable=trainable, local_files_only=True)
    except (OSError, ValueError, KeyError, RuntimeError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise CaloraError(f"cannot load adapter {path} onto the model: {first}") from e
