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
    """A causal LM from a local Hugging Face directory (dense, pruned, GPTQ, AWQ, compressed-tensors
    or bitsandbytes), or a GGUF model artifact (config.json beside model.gguf).

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
    import_stack(gptq=quantization.get("quant_method") in ("gptq", "awq"))
    dev = resolve_device(device)
    if shardable and sharded():
        from calora_cli.sharded_load import skeleton

        return skeleton(path, dev, dtype)
    gguf_file = Path(path) / "model.gguf"
    if gguf_file.is_file() and not any(Path(path).glob("*.safetensors")):
        model = _from_gguf(Path(path), gguf_file, config, dev, torch_dtype(dtype))
    elif _dequantized_on_load(config or {}, path):
        model = _from_weight_source(Path(path), dev, torch_dtype(dtype))
    else:
        model = _from_safetensors(path, dev, dtype, quantization)
    import torch

    for name, p in model.named_parameters():
        if p.is_floating_point() and not bool(torch.isfinite(p).all()):
            raise CaloraError(f"model {path} has NaN or Inf values in {name}")
    model.eval()
    return model


def _from_safetensors(path: Path, dev, dtype: str, quantization: dict) -> "PreTrainedModel":
    from transformers import AutoModelForCausalLM

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
    return model


def _dequantized_on_load(config: dict, path: Path) -> bool:
    """A compressed-tensors checkpoint quantizing weights only: transformers would decompress it into
    plain linears on the CPU anyway, and its loader fails on some of them (transformers 5.25 with
    compressed-tensors 0.20 refuses asymmetric pack-quantized zero points), so calora dequantizes
    it itself, with compressed-tensors' own decompressors (formats/). Activation-quantized schemes
    (W8A8) still load through transformers, which applies the activation rounding."""
    if (config.get("quantization_config") or {}).get("quant_method") != "compressed-tensors":
        return False
    from calora_cli.formats import layout_of

    return layout_of(config, path).weight_only


def _from_weight_source(path: Path, dev, dtype) -> "PreTrainedModel":
    """A dense model holding a quantized checkpoint's weights dequantized tensor by tensor
    (streaming.LayerSource, the reader every streamed stage uses): plain nn.Linear layers."""
    from calora_cli.arch import LAYERS_PREFIX
    from calora_cli.streaming import LayerSource

    source = LayerSource(path, sorted(path.glob("*.safetensors")), dtype, dev)
    try:
        source.embed()
        for i, block in enumerate(source.layers):
            source.load(block, f"{LAYERS_PREFIX}{i}.")
        source.head()
    finally:
        source.close()
    model = source.model
    model.tie_weights()  # a tied head shares the embedding just read
    del model.config.quantization_config  # what it holds now is dense: peft and transformers must not see a quantizer
    return model


def _from_gguf(path: Path, gguf_file: Path, config: dict, dev, dtype) -> "PreTrainedModel":
    """A Hugging Face model (its config.json) holding a GGUF's weights, dequantized tensor by tensor
    (gguf/reader.py): plain nn.Linear layers computing with exactly the weights llama.cpp holds."""
    from accelerate import init_empty_weights
    from accelerate.utils import set_module_tensor_to_device
    from transformers import AutoConfig, AutoModelForCausalLM

    from calora_cli.gguf.reader import GGUFTensors

    source = GGUFTensors(gguf_file, config)
    try:
        cfg = AutoConfig.from_pretrained(path, trust_remote_code=False, local_files_only=True)
        with library_chatter_hidden(), init_empty_weights():
            model = AutoModelForCausalLM.from_config(cfg, dtype=dtype)
        for name, p in list(model.named_parameters()):
            read = name if name in source.where else "model.embed_tokens.weight" if name == "lm_head.weight" else None
            if read is None:
                raise CaloraError(f"cannot load model {path}: {gguf_file.name} has no tensor for {name}")
            t = source.get_tensor(read)
            if tuple(t.shape) != tuple(p.shape):
                raise CaloraError(f"cannot load model {path}: {name} has shape {list(t.shape)} in {gguf_file.name}, "
                                  f"its config needs {list(p.shape)}")
            set_module_tensor_to_device(model, name, dev, value=t, dtype=dtype)
        model.tie_weights()  # a tied head shares the embedding just read
        for module in model.modules():  # buffers (rotary tables) were made on the CPU
            for key, b in module._buffers.items():
                if b is not None:
                    module._buffers[key] = b.to(dev)
    finally:
        source.close()
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
