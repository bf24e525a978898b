"""The decoder-layer layout of each supported model family: where the layers are, which linears a
block holds, and their shapes from config.json alone (for quantized bases whose tensors are packed).

Every family calora supports is a Llama-style decoder: `model.model.layers[i]` blocks holding
attention and MLP linears. They differ in names (Phi3 fuses q/k/v into `qkv_proj` and gate/up into
`gate_up_proj`), biases (Qwen2's q/k/v), extra norms (Qwen3's q/k norms, Gemma2's four per block)
and head sizes (Gemma2 and Qwen3 set `head_dim` apart from hidden/heads).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from calora_cli.errors import CaloraError

if TYPE_CHECKING:
    import torch

PEFT_PREFIX = "base_model.model."  # what peft puts before a base module's path in its state dicts
LAYERS_PREFIX = "model.layers."  # the decoder layers' tensors in a checkpoint

_SEPARATE = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
_FUSED = ("qkv_proj", "o_proj", "gate_up_proj", "down_proj")
# model_type -> the linears of one block, by their short names
FAMILIES: dict[str, tuple[str, ...]] = {
    "llama": _SEPARATE,
    "mistral": _SEPARATE,
    "qwen2": _SEPARATE,
    "qwen3": _SEPARATE,
    "gemma2": _SEPARATE,
    "phi3": _FUSED,
}


def check_supported(config: dict, path: object = "the model") -> str:
    """The family of a config.json (its model_type); refuse, in one line, one calora does not know."""
    family = config.get("model_type")
    if family not in FAMILIES:
        raise CaloraError(f"{path} is a {family or 'model without model_type'}: calora supports "
                          f"{', '.join(sorted(FAMILIES))} decoders")
    return family


def decoder_layers(model) -> "torch.nn.ModuleList":
    inner = getattr(model, "model", model)
    layers = getattr(inner, "layers", None)
    if layers is None:
        raise CaloraError(f"{type(model).__name__} has no decoder layers at model.layers; "
                          f"calora supports {', '.join(sorted(FAMILIES))} decoders")
    return layers


def block_linears(block) -> dict[str, "torch.nn.Linear"]:
    """The nn.Linear layers of one (unquantized, unadapted) decoder block, by path inside it."""
    import torch

    return {name: m for name, m in block.named_modules() if isinstance(m, torch.nn.Linear)}


# linears that read the same input, in the order a block runs them: GPTQ solves one group after
# another, each from the inputs the already quantized groups produce (true sequential)
_STAGES = (("q_proj", "k_proj", "v_proj", "qkv_proj"), ("o_proj",), ("gate_proj", "up_proj", "gate_up_proj"),
           ("down_proj",))


def sequential_groups(names) -> list[list[str]]:
    """Block linear paths (self_attn.q_proj, ...) grouped by shared input, in execution order; a
    linear of an unknown name gets a group of its own at the end."""
    groups: list[list[str]] = [[] for _ in _STAGES]
    rest = []
    for name in names:
        short = name.rsplit(".", 1)[-1]
        stage = next((k for k, stems in enumerate(_STAGES) if short in stems), None)
        (rest.append([name]) if stage is None else groups[stage].append(name))
    return [g for g in groups if g] + rest


def adapted_linears(model) -> dict[str, "torch.nn.Module"]:
    """Every linear-like layer inside the decoder blocks, outermost wrapper only (peft LoRA layer,
    GPTQ/bnb quantized linear or nn.Linear), by its module path in the base model."""
    out: dict[str, "torch.nn.Module"] = {}
    for name, m in model.named_modules():
        if ".layers." not in name or not hasattr(m, "in_features") or not hasattr(m, "out_features"):
            continue
        clean = name.removeprefix(PEFT_PREFIX)
        parent = clean.rsplit(".", 1)[0]
        if any(parent == p or parent.startswith(p + ".") for p in out):
            continue  # inside an already-taken wrapper (peft's base_layer, lora_A, ...)
        if "lora_" in clean or clean.endswith("base_layer"):
            continue
        out[clean] = m
    return out


def linear_module_names(model) -> list[str]:
    """The short names (q_proj, up_proj, ...) of the linear layers inside the decoder blocks."""
    import torch

    names = {full.rsplit(".", 1)[-1] for full, mod in model.named_modules()
             if ".layers." in full and isinstance(mod, torch.nn.Linear)}
    if not names:  # quantized linears are not nn.Linear subclasses: the family's names
        names = set(FAMILIES.get(getattr(model.config, "model_type", "llama"), _SEPARATE))
    return sorted(names)


def linear_shapes(config: dict) -> dict[str, tuple[int, int]]:
    """(out, in) of each block linear by short name, from config.json alone."""
    hidden, inter = config.get("hidden_size"), config.get("intermediate_size")
    heads = config.get("num_attention_heads")
    if not (hidden and inter and heads):
        return {}
    hd = config.get("head_dim") or hidden // heads
    kv = config.get("num_key_value_heads") or heads
    shapes = {"o_proj": (hidden, heads * hd), "down_proj": (hidden, inter)}
    if FAMILIES.get(config.get("model_type")) is _FUSED:
        shapes.update(qkv_proj=((heads + 2 * kv) * hd, hidden), gate_up_proj=(2 * inter, hidden))
    else:
        shapes.update(q_proj=(heads * hd, hidden), k_proj=(kv * hd, hidden), v_proj=(kv * hd, hidden),
                      gate_proj=(inter, hidden), up_proj=(inter, hidden))
    return shapes


def expected_shape(config: dict, module: str) -> tuple[int, int] | None:
    """(out, in) of the block linear at a module path (model.layers.3.mlp.up_proj), from config.json."""
    return linear_shapes(config).get(module.rsplit(".", 1)[-1])


def final_logits(model, hidden: "torch.Tensor") -> "torch.Tensor":
    """What the model's head makes of the last block's output: final norm, output projection, and
    Gemma2's logit soft-capping (the part of each family's forward after its layers)."""
    import torch

    logits = model.lm_head(model.model.norm(hidden))
    cap = getattr(model.config, "final_logit_softcapping", None)
    if cap:
        logits = torch.tanh(logits / cap) * cap
    return logits
