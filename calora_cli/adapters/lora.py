"""The plain LoRA kind: factors as peft stores them, the deltas they stand for, its files."""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import TYPE_CHECKING

from calora_cli.arch import PEFT_PREFIX
from calora_cli.errors import CaloraError

if TYPE_CHECKING:
    import torch


@dataclass
class LoraFactors:
    """One adapted module: delta W = scale * B @ A."""

    module: str  # e.g. model.layers.0.self_attn.q_proj
    A: "torch.Tensor"  # (r, in)
    B: "torch.Tensor"  # (out, r)
    scale: float

    def delta(self) -> "torch.Tensor":
        return (self.B.float() @ self.A.float()).mul_(self.scale)

    @property
    def shape(self) -> tuple[int, int]:
        """The delta's (out, in)."""
        return (self.B.shape[0], self.A.shape[1])

    def add_to(self, W: "torch.Tensor", weight: float = 1.0) -> "torch.Tensor":
        """W += weight * delta, in place (W float32, of `shape`): the product accumulates straight
        into W, with the scalars folded into the small B, so no delta-sized temporary is made or scaled."""
        return W.addmm_(self.B.float() * (self.scale * weight), self.A.float())


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
        module = key.split(".lora_A.")[0].removeprefix(PEFT_PREFIX)
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


# --- the kind (adapters registry) ----------------------------------------------------------------


def detect(artifact) -> bool:
    return True  # every adapter that no other kind claims is a peft LoRA


def files(artifact) -> tuple[dict, dict]:
    import json

    from safetensors.torch import load_file

    weights = artifact.path / "adapter_model.safetensors"
    if not weights.exists():
        raise CaloraError(f"adapter {artifact.path} has no adapter_model.safetensors")
    return json.loads((artifact.path / "adapter_config.json").read_text()), load_file(weights)


def factors(artifact) -> dict[str, LoraFactors]:
    config, state = files(artifact)
    return factors_from_state(state, config)


def attach(model, artifact, trainable: bool = False):
    from calora_cli.models import load_adapter

    return load_adapter(model, artifact.path, trainable=trainable)


def write(directory, config: dict, state: dict) -> None:
    """A peft LoRA directory: adapter_model.safetensors and adapter_config.json (sorted keys)."""
    import json

    from safetensors.torch import save_file

    directory.mkdir(parents=True, exist_ok=True)
    save_file(state, directory / "adapter_model.safetensors", metadata={"format": "pt"})
    (directory / "adapter_config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")


def save_trained(peft_model, directory, state_dict=None) -> None:
    """A trained peft model's adapter, as peft writes it, with two changes: no model card (peft's
    template names no base calora can vouch for), and target_modules sorted. peft keeps them in a
    set and writes it in hash order, which changes with PYTHONHASHSEED: the same run in two
    processes would write different bytes."""
    import json

    peft_model.save_pretrained(directory, state_dict=state_dict)
    (directory / "README.md").unlink(missing_ok=True)
    path = directory / "adapter_config.json"
    config = json.loads(path.read_text())
    if isinstance(config.get("target_modules"), list):
        config["target_modules"] = sorted(config["target_modules"])
    path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
