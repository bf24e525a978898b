"""GPTQ through transformers' GPTQConfig -> optimum -> gptqmodel (4/8-bit, grouped).

gptqmodel runs GPTQ block by block itself; calora only prepares calibration text, checks the
group size and keeps the calibration text out of config.json (gptqmodel stores it there).
"""

from __future__ import annotations

import json
from pathlib import Path

from calora_cli.compress.gptq_format import check_bits, pack, unpack, zero_points
from calora_cli.errors import CaloraError

BITS = (4, 8)


def in_features(config: dict) -> dict[str, int]:
    """Input width of each linear of a Llama-style block, from its config.json."""
    hidden = config["hidden_size"]
    heads = config["num_attention_heads"]
    head_dim = config.get("head_dim") or hidden // heads
    return {
        "q_proj/k_proj/v_proj/gate_proj/up_proj": hidden,
        "o_proj": heads * head_dim,
        "down_proj": config["intermediate_size"],
    }


def check_group_size(config: dict, group_size: int) -> None:
    if group_size == -1:
        return
    if group_size < 1:
        raise CaloraError(f"--group-size must be positive (or -1 for one group per row), got {group_size}")
    for names, width in in_features(config).items():
        if width % group_size:
            fits = [g for g in (32, 64, 128) if all(w % g == 0 for w in in_features(config).values())]
            hint = f"; {' or '.join(map(str, fits))} would fit every layer" if fits else ""
            raise CaloraError(
                f"--group-size {group_size} does not divide the {width} input features of {names}{hint}"
            )


def quantize(src: Path, bits: int, group_size: int, calib_texts: list[str], tokenizer, seed: int,
             device: str = "cpu", dtype: str = "float32"):
    """Load `src` quantized with GPTQ on `device`; returns the quantized model there."""
    import torch
    from transformers import GPTQConfig

    from calora_cli.models import quantize_on_load

    if bits not in BITS:
        raise CaloraError(f"--bits must be one of {', '.join(map(str, BITS))} for gptq, got {bits}")
    torch.manual_seed(seed)
    cfg = GPTQConfig(bits=bits, group_size=group_size, dataset=calib_texts, tokenizer=tokenizer, desc_act=False, sym=True)
    return quantize_on_load(src, cfg, device, dtype)


def strip_calibration(config_path: Path) -> None:
    """Drop the calibration text gptqmodel copies into config.json (the manifest records its fingerprint).

    transformers accepts only a dataset name or None there on reload, so the key is removed.
    """
    cfg = json.loads(config_path.read_text())
    q = cfg.get("quantization_config")
    if q and q.pop("dataset", None) is not None:
        config_path.write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")


def keep_zeros(module, keep) -> int:
    """Give every pruned weight of a GPTQ linear its group's zero code, which dequantizes to exactly 0.

    gptqmodel's GPTQ has no option to preserve a sparsity mask (llm-compressor's
    `preserve_sparsity_mask`): its error compensation writes non-zero values into pruned weights.
    `keep` is the (out, in) boolean mask of the pruned model. Returns how many codes changed.
    """
    import torch

    bits = module.bits
    check_bits(bits)
    codes = unpack(module.qweight, bits, rows_packed=True)[: module.in_features]
    # loaded modules hold v2 zero points whatever the checkpoint format
    zeros = zero_points(module.qzeros, bits, v1=False, out_features=module.out_features)
    zero_codes = zeros[module.g_idx.long()]  # (in, out)
    new = torch.where(keep.T, codes, zero_codes)
    changed = int((new != codes).sum())
    module.qweight.data.copy_(pack(new, bits, rows_packed=True))
    return changed
