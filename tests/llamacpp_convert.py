"""Run llama.cpp's own convert_hf_to_gguf.py (extracted by `make setup` into .venv/llama.cpp/), with
one lookup answered: the converter names a BPE tokenizer's pre-tokenizer from a table of hashes of
known models, and the tests' locally trained tokenizer is in no table. It uses GPT-2's split, which
llama.cpp calls "gpt-2", the name calora's writer derives from the tokenizer's definition.

    python llamacpp_convert.py CONVERTER_DIR MODEL_DIR --outtype f32 --outfile OUT.gguf
"""

import runpy
import sys

converter = sys.argv[1]
sys.path.insert(0, converter)
import conversion.base as base  # noqa: E402  (the converter's own package, from its directory)

base.TextModel.get_vocab_base_pre = lambda self, tokenizer: "gpt-2"
sys.argv = [f"{converter}/convert_hf_to_gguf.py", *sys.argv[2:]]
runpy.run_path(sys.argv[0], run_name="__main__")
