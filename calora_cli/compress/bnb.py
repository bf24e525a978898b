"""Round-to-nearest int8 and NF4 through bitsandbytes, saved in transformers' own format."""

from __future__ import annotations

from pathlib import Path

METHODS = ("rtn-int8", "nf4")


def quantize(src: Path, method: str):
    import torch
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    if method == "nf4":
        cfg = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.float32)
    else:
        cfg = BitsAndBytesConfig(load_in_8bit=True)
    return AutoModelForCausalLM.from_pretrained(
        src, quantization_config=cfg, device_map="cpu", dtype=torch.float32, trust_remote_code=False,
        use_safetensors=True, local_files_only=True,
    )
