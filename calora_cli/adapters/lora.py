"""LoRA factors as peft stores them, and the weight deltas they stand for."""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import TYPE_CHECKING

from calora_cli.errors import CaloraError

if TYPE_CHECKING:
    import torch

PREFIX = "base_model.model."


@dataclass
class LoraFactors:
    """One adapted module: delta W = scale * B @ A."""

    module: str  # e.g. model.layers.0.self_attn.q_proj
    A: "torch.Tensor"  # (r, in)
    B: "torch.Tensor"  # (out, r)
    scale: float

    def delta(self) -> "torch.Tensor":
        return (self.B.float() @ self.A.float()).mul_(self.scale)


def _pattern_value(patterns: dict, module: str, default):
    """peft's rank_pattern / alpha_pattern: keys match the end of a module name (or as a regex)."""
    for key, value in (patterns or {}).items():
        if module == key or module.endswith("." + key) or re.fullmatch(rf"(.*\.)?{key}", module):
            return value
    return default


def factors_from_state(state: dict[str, "torch.Tensor"], config: dict) -> dict[str, LoraFactors]:
    """Group a peft LoRA state dict into per-module factors with their scales.

    Refuses what a plain delta merge cannot represent (DoRA, trained biases, modules_to_save).
    """
    if config.get("peft_type", "LORA") != "LORA":
        raise CaloraError(f"adapter type {config.get('peft_type')} is not a LoRA")
    if config.get("use_dora"):
        raise CaloraError("DoRA adapters are not supported (their magnitude vector is not a low-rank delta)")
    if config.get("fan_in_fan_out"):
        raise CaloraError("fan_in_fan_out adapters (GPT-2 Conv1D layers) are not supported")
    extra = sorted(k for k in state if "lora_A" not in k and "lora_B" not in k)
    if extra:
        raise CaloraError(f"adapter holds weights other than LoRA factors (e.g. {extra[0]}); only plain LoRA merges as a delta")
    out: dict[str, LoraFactors] = {}
    for key, A in state.items():
        if ".lora_A." not in key:
            continue
        module = key.split(".lora_A.")[0].removeprefix(PREFIX)
        bkey = key.replace(".lora_A.", ".lora_B.")
        if bkey not in state:
            raise CaloraError(f"adapter has {key} without its lora_B")
        B = state[bkey]
        r = A.shape[0]
        if B.shape[1] != r:
            raise CaloraError(f"adapter rank mismatch in {module}: A has rank {r}, B has {B.shape[1]}")
        for name, t in ((key, A), (bkey, B)):
            if not t.is_floating_point():
                raise CaloraError(f"adapter tensor {name} has dtype {str(t.dtype).removeprefix('torch.')}; LoRA factors are floating point")
            if not t.isfinite().all():
                raise CaloraError(f"adapter tensor {name} holds NaN or Inf values")
        alpha = _pattern_value(config.get("alpha_pattern"), module, config.get("lora_alpha", r))
        scale = alpha / math.sqrt(r) if config.get("use_rslora") else alpha / r
        out[module] = LoraFactors(module, A, B, scale)
    if not out:
        raise CaloraError("adapter holds no LoRA factors")
    return out
