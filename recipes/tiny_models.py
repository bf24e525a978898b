"""Tiny models built from a config in code, and a tokenizer trained on local text: no download.

The tests, the quickstart's pretraining and the benchmarks build their models with these; calora
itself never builds a model, it loads the user's.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from transformers import PreTrainedModel


def build_tiny_llama(
    vocab_size: int,
    hidden: int = 64,
    layers: int = 2,
    heads: int = 4,
    kv_heads: int | None = None,
    intermediate: int = 128,
    max_positions: int = 512,
    seed: int = 0,
    pad_token_id: int | None = None,
    bos_token_id: int | None = None,
    eos_token_id: int | None = None,
) -> "PreTrainedModel":
    """A randomly initialised LlamaForCausalLM built from a config in code (no download)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=hidden,
        intermediate_size=intermediate,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads or heads,
        max_position_embeddings=max_positions,
        tie_word_embeddings=True,
        pad_token_id=pad_token_id,
        bos_token_id=bos_token_id,
        eos_token_id=eos_token_id,
    )
    torch.manual_seed(seed)
    return LlamaForCausalLM(cfg).eval()


# one tiny config per family calora supports: each differs from Llama where that family does
FAMILY_EXTRAS = {
    "llama": {},
    "mistral": {"sliding_window": None},
    "qwen2": {},  # q/k/v carry biases in Qwen2 itself
    "qwen3": {"head_dim": 32},  # q/k norms; head_dim set apart from hidden/heads (64/4 = 16)
    "gemma2": {"head_dim": 32, "query_pre_attn_scalar": 32, "sliding_window": 64},
    "phi3": {},  # fused qkv_proj and gate_up_proj
}


def build_tiny(family: str, vocab_size: int, hidden: int = 64, layers: int = 2, heads: int = 4, kv_heads: int = 2,
               intermediate: int = 128, seed: int = 0, pad_token_id: int | None = None, bos_token_id: int | None = None,
               eos_token_id: int | None = None) -> "PreTrainedModel":
    """A randomly initialised causal LM of one family (FAMILY_EXTRAS), built from a config in code."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    cfg = AutoConfig.for_model(
        family, vocab_size=vocab_size, hidden_size=hidden, intermediate_size=intermediate, num_hidden_layers=layers,
        num_attention_heads=heads, num_key_value_heads=kv_heads, max_position_embeddings=512,
        tie_word_embeddings=True, pad_token_id=pad_token_id, bos_token_id=bos_token_id, eos_token_id=eos_token_id,
        **FAMILY_EXTRAS[family],
    )
    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(cfg).eval()


def train_bpe_tokenizer(texts: list[str], vocab_size: int = 8192):
    """A byte-level BPE tokenizer trained locally (no download), as a transformers fast tokenizer.

    Special tokens: <s> (bos), </s> (eos), <pad>. Deterministic for equal texts and vocab size.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=["<pad>", "<s>", "</s>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>")
