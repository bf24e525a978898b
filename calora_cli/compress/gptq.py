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


# group sizes the int4 CPU kernel (torch's _weight_int4pack_mm) and gptqmodel's CUDA kernels run; a
# model quantized with another one compresses fine and then cannot be evaluated, so it is refused
GROUP_SIZES = (32, 64, 128, 256)


def in_features(config: dict) -> dict[str, int]:
    """Input width of each linear of a block, linears of equal width named together."""
    from calora_cli.arch import linear_shapes

    by_width: dict[int, list[str]] = {}
    for name, (_, d_in) in linear_shapes(config).items():
        by_width.setdefault(d_in, []).append(name)
    return {"/".join(names): width for width, names in by_width.items()}


def check_group_size(config: dict, group_size: int) -> None:
    widths = in_features(config)
    fits = [g for g in GROUP_SIZES if all(w % g == 0 for w in widths.values())]
    hint = f"; {' or '.join(map(str, fits))} would fit every layer" if fits else ""
    if group_size not in GROUP_SIZES:
        raise CaloraError(f"--group-size {group_size} is not one the GPTQ kernels run "
                          f"({', '.join(map(str, GROUP_SIZES))}){hint}")
    for names, width in widths.items():
        if width % group_size:
            raise CaloraError(f"--group-size {group_size} does not divide the {width} input features of {names}{hint}")


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
