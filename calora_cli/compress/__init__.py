"""Base-model compression methods, one module each, chosen through one registry."""

from __future__ import annotations

import importlib

PRUNERS = ("magnitude", "wanda", "sparsegpt")
QUANTIZERS = ("gptq", "rtn-int8", "nf4")
FORMATS = ("gguf",)  # another runtime's own format and quantizer (compress/gguf.py)
METHODS = PRUNERS + QUANTIZERS + FORMATS


def pruner(name: str):
    """The module implementing a pruning method: NEEDS (input statistics) and prune()."""
    return importlib.import_module(f"calora_cli.compress.{name}")
