"""Hugging Face tensor names and layouts <-> llama.cpp's, for every family calora supports.

The names come from gguf-py's own tensor map (the one llama.cpp's converter uses). Two families
store some tensors differently from Hugging Face, and the converter changes them on the way in:
- Llama and Mistral (llama.cpp arch `llama`): the rows of q_proj and k_proj (weight and bias) are
  permuted from Hugging Face's rotary layout (two halves per head) to llama.cpp's (interleaved
  pairs). A LoRA's lora_B of q/k takes the same row permutation.
- Gemma2: RMSNorm weights are stored plus one (Gemma multiplies by 1 + w).
Phi3's fused qkv_proj and gate_up_proj are stored fused as attn_qkv and ffn_up.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from calora_cli.errors import CaloraError

if TYPE_CHECKING:
    import torch

# calora family (config.json model_type) -> llama.cpp architecture
ARCH = {"llama": "llama", "mistral": "llama", "qwen2": "qwen2", "qwen3": "qwen3", "gemma2": "gemma2", "phi3": "phi3"}
PERMUTED = ("llama",)  # architectures whose q/k rows llama.cpp stores permuted
NORM_PLUS_ONE = ("gemma2",)


def arch_of(config: dict, where: object = "the model") -> str:
    family = config.get("model_type")
    if family not in ARCH:
        raise CaloraError(f"{where} is a {family or 'model without model_type'}: calora writes GGUF for "
                          f"{', '.join(sorted(ARCH))} models")
    return ARCH[family]


class NameMap:
    """Both ways between a model's Hugging Face tensor names and its GGUF names."""

    def __init__(self, config: dict):
        import gguf

        self.config, self.arch = config, arch_of(config)
        self.n_head = config["num_attention_heads"]
        self.n_kv = config.get("num_key_value_heads") or self.n_head
        by_name = {v: k for k, v in gguf.MODEL_ARCH_NAMES.items()}
        self._map = gguf.get_tensor_name_map(by_name[self.arch], config["num_hidden_layers"])

    def tied(self) -> bool:
        """llama.cpp reads the output projection from token_embd when the file has no output.weight:
        Gemma2 always (its converter drops lm_head), the others when config.json ties them."""
        return self.arch == "gemma2" or bool(self.config.get("tie_word_embeddings", False))

    def gguf_name(self, hf: str, strict: bool = True) -> str | None:
        """The GGUF name of a Hugging Face tensor; None for one llama.cpp does not store (and, not
        `strict`, for one this architecture has no name for)."""
        if hf == "lm_head.weight" and self.tied():
            return None
        if hf.endswith("rotary_emb.inv_freq"):
            return None
        name = self._map.get_name(hf, try_suffixes=(".weight", ".bias"))
        if name is None and strict:
            raise CaloraError(f"tensor {hf} has no GGUF name for llama.cpp's {self.arch} architecture")
        return name

    def _rows(self, hf: str) -> int | None:
        """Heads to permute over, for a q/k projection of a permuted architecture; else None."""
        if self.arch not in PERMUTED:
            return None
        stem = hf.rsplit(".", 1)[0]
        if stem.endswith("self_attn.q_proj"):
            return self.n_head
        if stem.endswith("self_attn.k_proj"):
            return self.n_kv
        return None

    def to_gguf(self, hf: str, t: "torch.Tensor") -> "torch.Tensor":
        """A Hugging Face tensor in llama.cpp's layout (same dtype)."""
        heads = self._rows(hf)
        if heads is not None:
            t = permute_rows(t, heads)
        if self.arch in NORM_PLUS_ONE and hf.endswith("norm.weight"):
            t = (t.float() + 1).to(t.dtype)
        return t

    def from_gguf(self, hf: str, t: "torch.Tensor") -> "torch.Tensor":
        """A tensor read from the GGUF back in Hugging Face's layout."""
        heads = self._rows(hf)
        if heads is not None:
            t = unpermute_rows(t, heads)
        if self.arch in NORM_PLUS_ONE and hf.endswith("norm.weight"):
            t = t - 1
        return t

    def lora_b_to_gguf(self, module: str, b: "torch.Tensor") -> "torch.Tensor":
        """A LoRA's B (out, r) for the module at `module` (its path), rows as the base's are stored."""
        heads = self._rows(module + ".weight")
        return permute_rows(b, heads) if heads is not None else b


def hf_names(config: dict) -> list[str]:
    """Every tensor name a checkpoint of this family can hold (biases and extra norms included;
    those a given model lacks are simply absent from its GGUF)."""
    from calora_cli.arch import FAMILIES

    block = ["input_layernorm.weight", "post_attention_layernorm.weight", "pre_feedforward_layernorm.weight",
             "post_feedforward_layernorm.weight", "self_attn.q_norm.weight", "self_attn.k_norm.weight"]
    for short in FAMILIES[config["model_type"]]:
        parent = "mlp" if short in ("gate_proj", "up_proj", "down_proj", "gate_up_proj") else "self_attn"
        block += [f"{parent}.{short}.weight", f"{parent}.{short}.bias"]
    names = ["model.embed_tokens.weight", "model.norm.weight", "lm_head.weight"]
    return names + [f"model.layers.{i}.{b}" for i in range(config["num_hidden_layers"]) for b in block]


def permute_rows(t: "torch.Tensor", heads: int) -> "torch.Tensor":
    """Hugging Face's rotary row order (per head: first half, second half) -> llama.cpp's
    (interleaved pairs): rows are (head, half, i) and become (head, i, half)."""
    rows = t.shape[0]
    return t.reshape(heads, 2, rows // heads // 2, *t.shape[1:]).transpose(1, 2).reshape(t.shape)


def unpermute_rows(t: "torch.Tensor", heads: int) -> "torch.Tensor":
    rows = t.shape[0]
    return t.reshape(heads, rows // heads // 2, 2, *t.shape[1:]).transpose(1, 2).reshape(t.shape)
