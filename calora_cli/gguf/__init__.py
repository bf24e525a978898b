"""llama.cpp's GGUF format: one home for it.

- `names`: Hugging Face tensor names <-> GGUF names for each supported family, and the Llama-family
  q/k row permutation (rotary layout) both ways.
- `metadata`: the hyper-parameter and tokenizer keys llama.cpp reads, from config.json and the
  tokenizer's own definition.
- `writer`: a model's GGUF written one decoder layer at a time; `reader`: a GGUF's tensors read one at
  a time, dequantized and mapped back to Hugging Face names and layout.
- `adapter`: a peft LoRA as llama.cpp's LoRA GGUF.
- `llama`: the llama.cpp binding (llama-cpp-python): quantize, tokenize, per-token log-probabilities.

Nothing here imports torch, gguf or llama_cpp at module level.
"""

from __future__ import annotations

GGUF_FILE = "model.gguf"  # the one weights file of a calora GGUF model artifact

# --gguf-type -> llama.cpp's file type name (LLAMA_FTYPE_MOSTLY_*, ALL_F32)
TYPES: dict[str, str] = {
    "F32": "ALL_F32", "F16": "MOSTLY_F16", "BF16": "MOSTLY_BF16",
    "Q8_0": "MOSTLY_Q8_0", "Q6_K": "MOSTLY_Q6_K", "Q5_K_M": "MOSTLY_Q5_K_M", "Q5_K_S": "MOSTLY_Q5_K_S",
    "Q5_0": "MOSTLY_Q5_0", "Q5_1": "MOSTLY_Q5_1", "Q4_K_M": "MOSTLY_Q4_K_M", "Q4_K_S": "MOSTLY_Q4_K_S",
    "Q4_0": "MOSTLY_Q4_0", "Q4_1": "MOSTLY_Q4_1", "Q3_K_M": "MOSTLY_Q3_K_M", "Q3_K_L": "MOSTLY_Q3_K_L",
    "Q3_K_S": "MOSTLY_Q3_K_S", "Q2_K": "MOSTLY_Q2_K",
}
FLOAT_TYPES = ("F32", "F16", "BF16")  # written by calora itself; the rest by llama.cpp's quantizer


def is_gguf_file(path) -> bool:
    """A file that starts with GGUF's magic."""
    try:
        with open(path, "rb") as f:
            return f.read(4) == b"GGUF"
    except OSError:
        return False
