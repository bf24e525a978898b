"""Round-to-nearest int8 and NF4 through bitsandbytes, saved in transformers' own format."""

from __future__ import annotations

from pathlib import Path

METHODS = ("rtn-int8", "nf4")


def quantize(src: Path, method: str, device: str = "cpu", dtype: str = "float32"):
    """Load `src` quantized by bitsandbytes on `device` (the weights are quantized as they load)."""
    from transformers import BitsAndBytesConfig

    from calora_cli.models import quantize_on_load
    from calora_cli.runtime import torch_dtype

    if method == "nf4":
        cfg = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch_dtype(dtype))
    else:
        cfg = BitsAndBytesConfig(load_in_8bit=True)
    return quantize_on_load(src, cfg, device, dtype)
