"""bitsandbytes round-to-nearest (NF4, LLM.int8), one linear at a time, in transformers' format.

Round-to-nearest needs nothing but the weight, so each block linear is quantized where the
streaming engine holds it, with bitsandbytes' own functions (`quantize_4bit`,
`int8_vectorwise_quant`, called as its Params4bit/Int8Params do when transformers loads a model
with a BitsAndBytesConfig), and its state written under the names transformers' serialization
uses: the output is byte for byte what loading the model whole with that config and saving it
writes (tested on a float32 checkpoint). Other tensors keep the checkpoint's dtype.
"""

from __future__ import annotations

import json
from typing import TYPE_CHECKING

from calora_cli.compress.gptq import Quantized

if TYPE_CHECKING:
    import torch

NEEDS = None
BLOCKSIZE = 64  # transformers' default for bnb_4bit (Params4bit)


def quantize(method: str, weight: "torch.Tensor") -> Quantized:
    """One (out, in) weight as bitsandbytes stores it: `parts` by name suffix after the module
    ("weight", "weight.absmax", ..., or "weight", "SCB", "weight_format"), and the dequantized
    weight the next blocks are computed with."""
    import bitsandbytes.functional as F
    import torch

    if method == "nf4":
        packed, state = F.quantize_4bit(weight.contiguous(), blocksize=BLOCKSIZE, compress_statistics=False,
                                        quant_type="nf4", quant_storage=torch.uint8)
        parts = {"weight": packed, **{f"weight.{k}": v for k, v in state.as_dict(packed=True).items()}}
        return Quantized(F.dequantize_4bit(packed, state).float(), parts)
    codes, row_scales, _ = F.int8_vectorwise_quant(weight.contiguous().to(torch.float16))
    parts = {"weight": codes, "SCB": row_scales, "weight_format": torch.tensor(0, dtype=torch.uint8)}
    return Quantized(codes.float() * row_scales[:, None] / 127, parts)


def entries(method: str, name: str, shape: list[int], dtype: str) -> list[tuple[str, str, list[int]]]:
    """The tensors (name, safetensors dtype, shape) that replace one linear's weight, planned before
    any is computed; `dtype` is the torch dtype the weight is quantized in (float32, bfloat16)."""
    out, d_in = shape
    stem = name.removesuffix(".weight")
    if method == "nf4":
        state = json.dumps({"quant_type": "nf4", "blocksize": BLOCKSIZE, "dtype": dtype, "shape": [out, d_in]})
        blocks = -(-out * d_in // BLOCKSIZE)
        return [(f"{stem}.weight", "U8", [out * d_in // 2, 1]), (f"{stem}.weight.absmax", "F32", [blocks]),
                (f"{stem}.weight.quant_map", "F32", [16]),
                (f"{stem}.weight.quant_state.bitsandbytes__nf4", "U8", [len(state.encode())])]
    return [(f"{stem}.SCB", "F32", [out]), (f"{stem}.weight", "I8", [out, d_in]), (f"{stem}.weight_format", "U8", [])]


def quantization_config(method: str, compute_dtype: "torch.dtype") -> dict:
    """config.json's quantization_config, as transformers writes it for the same BitsAndBytesConfig."""
    from transformers import BitsAndBytesConfig

    if method == "nf4":
        cfg = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=compute_dtype)
    else:
        cfg = BitsAndBytesConfig(load_in_8bit=True)
    return cfg.to_dict()
