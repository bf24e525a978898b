"""The keys llama.cpp reads from a model GGUF: hyper-parameters from config.json, the vocabulary
from the tokenizer's own files.

The hyper-parameters follow what llama.cpp's `convert_hf_to_gguf.py` writes for each family (the
tests compare a calora GGUF with that converter's, key by key).

The pre-tokenizer: llama.cpp's converter names a BPE tokenizer's pre-tokenizer by hashing its
output on a test string against a table of known models, and refuses any other. calora reads the
tokenizer's definition instead (tokenizer.json's pre_tokenizer) and maps the splits llama.cpp
implements: a byte-level BPE that splits with GPT-2's pattern is llama.cpp's `gpt-2`; digits split
one by one before that pattern is `smollm`; the Llama 3 and Qwen2 patterns are `llama-bpe` and
`qwen2`. Anything else is refused in one line, as llama.cpp would tokenize it differently.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING

from calora_cli.errors import CaloraError

if TYPE_CHECKING:
    import gguf

_LLAMA3 = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+"
           r"|\s+(?!\S)|\s+")
_QWEN2 = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+"
          r"|\s+(?!\S)|\s+")
SPLIT_PATTERNS = {_LLAMA3: "llama-bpe", _QWEN2: "qwen2"}


def add_hparams(w: "gguf.GGUFWriter", config: dict, arch: str, file_type: int) -> None:
    """What llama.cpp's converter writes for this family."""
    import gguf

    rope = config.get("rope_parameters") or config.get("rope_scaling") or {}
    rope_type = rope.get("rope_type") or rope.get("type")
    if rope_type not in (None, "default", "linear", "yarn") and not (arch == "phi3" and rope_type in ("su", "longrope")):
        raise CaloraError(f"RoPE scaling {rope_type!r} is not written to GGUF by calora yet; convert this model "
                          "with llama.cpp's convert_hf_to_gguf.py and pass the .gguf")
    theta = rope.get("rope_theta", config.get("rope_theta"))
    heads = config["num_attention_heads"]
    kv = config.get("num_key_value_heads") or heads
    w.add_context_length(config["max_position_embeddings"])
    w.add_embedding_length(config["hidden_size"])
    w.add_block_count(config["num_hidden_layers"])
    w.add_feed_forward_length(config["intermediate_size"])
    w.add_head_count(heads)
    w.add_head_count_kv(kv)
    w.add_layer_norm_rms_eps(config["rms_norm_eps"])
    w.add_file_type(file_type)
    if arch == "gemma2":
        w.add_key_length(config["head_dim"])
        w.add_value_length(config["head_dim"])
        w.add_attn_logit_softcapping(config["attn_logit_softcapping"])
        w.add_final_logit_softcapping(config["final_logit_softcapping"])
        w.add_sliding_window(config["sliding_window"])
        return
    if arch == "phi3":
        partial = rope.get("partial_rotary_factor", config.get("partial_rotary_factor", 1.0)) or 1.0
        w.add_rope_scaling_orig_ctx_len(rope.get("original_max_position_embeddings",
                                                 config.get("original_max_position_embeddings")))
        w.add_rope_dimension_count(int(partial * config["hidden_size"]) // heads)
        w.add_rope_freq_base(theta)
        w.add_sliding_window(config.get("sliding_window") or 0)
        if rope.get("long_factor"):
            raise CaloraError("Phi3 long-context RoPE factors are not written to GGUF by calora yet; convert this "
                              "model with llama.cpp's convert_hf_to_gguf.py and pass the .gguf")
        return
    if rope_type == "linear":
        w.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        w.add_rope_scaling_factor(rope["factor"])
    elif rope_type == "yarn":
        w.add_rope_scaling_type(gguf.RopeScalingType.YARN)
        w.add_rope_scaling_factor(rope["factor"])
        w.add_rope_scaling_orig_ctx_len(rope["original_max_position_embeddings"])
    if theta is not None:
        w.add_rope_freq_base(theta)
    head_dim = config.get("head_dim")
    if head_dim is None and arch == "llama":
        # transformers' Llama and Mistral configs fill head_dim in when config.json leaves it out,
        # and llama.cpp's converter writes what transformers reports
        head_dim = config["hidden_size"] // heads
    if head_dim is not None:
        w.add_key_length(head_dim)
        w.add_value_length(head_dim)
    if arch == "llama":
        w.add_vocab_size(config["vocab_size"])
        w.add_rope_dimension_count(config.get("head_dim") or config["hidden_size"] // heads)


def pre_tokenizer(tokenizer_json: dict, where: object = "the tokenizer") -> str:
    """llama.cpp's pre-tokenizer name for a byte-level BPE tokenizer, from its definition; refuse
    the ones llama.cpp would split differently."""
    model = (tokenizer_json.get("model") or {}).get("type")
    if model != "BPE":
        raise CaloraError(f"{where} is a {model or 'tokenizer without a model type'} tokenizer; calora maps "
                          "byte-level BPE tokenizers to GGUF (use llama.cpp's convert_hf_to_gguf.py for others)")
    norm = tokenizer_json.get("normalizer")
    if norm is not None and norm.get("type") != "NFC":
        raise CaloraError(f"{where} normalizes text ({norm.get('type')}), which llama.cpp's BPE tokenizer does not: "
                          "use llama.cpp's convert_hf_to_gguf.py")
    pre = tokenizer_json.get("pre_tokenizer") or {}
    steps = pre.get("pretokenizers", []) if pre.get("type") == "Sequence" else [pre]
    kinds = [s.get("type") for s in steps]
    unknown = f"{where} splits text as {kinds}, which no llama.cpp pre-tokenizer reproduces"
    if not steps or steps[-1].get("type") != "ByteLevel" or steps[-1].get("add_prefix_space"):
        raise CaloraError(f"{unknown} (calora maps byte-level BPE without a prefix space)")
    byte_level, before = steps[-1], steps[:-1]
    if byte_level.get("use_regex", True):
        if not before:
            return "gpt-2"
        if len(before) == 1 and before[0].get("type") == "Digits" and before[0].get("individual_digits"):
            return "smollm"
        raise CaloraError(unknown)
    if len(before) == 1 and before[0].get("type") == "Split":
        pattern = (before[0].get("pattern") or {}).get("Regex")
        if pattern in SPLIT_PATTERNS and before[0].get("behavior") == "Isolated":
            return SPLIT_PATTERNS[pattern]
    raise CaloraError(unknown)


def add_vocab(w: "gguf.GGUFWriter", tokenizer_dir: Path, vocab_size: int) -> list[str]:
    """Tokens, their types, merges and special ids, as llama.cpp's converter writes a BPE vocabulary.

    The tokens come from tokenizer.json itself (its model's vocabulary and its added tokens), not
    from the transformers class that loads it: some classes add tokens of their own on load
    (Qwen2Tokenizer adds <|endoftext|>), which the model's embedding has no row for."""
    import gguf

    path = Path(tokenizer_dir) / "tokenizer.json"
    if not path.is_file():
        raise CaloraError(f"{tokenizer_dir} has no tokenizer.json; calora writes GGUF vocabularies from a fast "
                          "(tokenizer.json) byte-level BPE tokenizer")
    spec = json.loads(path.read_text())
    pre = pre_tokenizer(spec, f"the tokenizer in {tokenizer_dir}")
    by_id = {i: t for t, i in spec["model"]["vocab"].items()}
    added = {a["id"]: a for a in spec.get("added_tokens", [])}
    by_id.update({i: a["content"] for i, a in added.items()})
    if max(by_id) >= vocab_size:
        raise CaloraError(f"the tokenizer in {tokenizer_dir} has ids up to {max(by_id)}, "
                          f"beyond the model's vocab_size {vocab_size}")
    tokens, types = [], []
    for i in range(vocab_size):
        token = by_id.get(i)
        if token is None:
            tokens.append(f"[PAD{i}]")
            types.append(gguf.TokenType.UNUSED)
        elif i in added:
            types.append(gguf.TokenType.CONTROL if added[i].get("special") else gguf.TokenType.USER_DEFINED)
            tokens.append(token)
        else:
            types.append(gguf.TokenType.NORMAL)
            tokens.append(token)
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre(pre)
    w.add_token_list(tokens)
    w.add_token_types(types)
    gguf.SpecialVocab(tokenizer_dir, load_merges=True, n_vocab=vocab_size).add_to_gguf(w, quiet=True)
    return tokens
