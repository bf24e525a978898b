"""Quantized checkpoint formats read tensor by tensor: GPTQ, AWQ and compressed-tensors.

Each format (one module here) knows which stored tensors make up a quantized linear and how they
dequantize into the (out, in) float32 weight the checkpoint stands for. The streaming weight source
(streaming.LayerSource), the lineage check and `merge --dense` read every quantized base through
this registry, so a format is added in one place. bitsandbytes checkpoints are not here: they
quantize when the model loads, and their stored tensors are read only through transformers.
"""

from __future__ import annotations

import importlib
from pathlib import Path
from typing import TYPE_CHECKING, Container

from calora_cli.errors import CaloraError

if TYPE_CHECKING:
    import torch

# quant_method in config.json's quantization_config -> the module that reads it
READERS = {"gptq": "gptq", "awq": "awq", "compressed-tensors": "compressed_tensors"}


class Layout:
    """One quantized checkpoint's format and settings (from its quantization_config)."""

    method: str = ""
    # the quantizer moved per-channel scales between layers (AWQ folds its activation scales into the
    # op before each linear): the model computes in rescaled coordinates (methods/ca_lora/compensation.py)
    moves_scales: bool = False

    def parts(self, module: str, names: Container[str]) -> list[str] | None:
        """The stored tensors (full names) of `module`'s quantized weight; None where the module's
        weight is stored plain (an unquantized head, a skipped layer)."""
        raise NotImplementedError

    def dequantize(self, module: str, tensors: dict[str, "torch.Tensor"]) -> "torch.Tensor":
        """The (out, in) float32 weight, from `parts`' tensors (by full name)."""
        raise NotImplementedError

    def dense_shape(self, module: str, header: dict, read) -> list[int]:
        """(out, in) of the dequantized weight, from the safetensors header (and, where the format
        stores the shape as a tensor, `read(name)`)."""
        raise NotImplementedError

    def describe(self) -> str:
        raise NotImplementedError

    @property
    def weight_only(self) -> bool:
        """Whether the weights alone say what the model computes (no activation quantization)."""
        return True


def layout_of(config: dict, path: Path | str) -> Layout | None:
    """The layout of a checkpoint from its config.json; None for a dense one. A quantization calora
    does not read tensor by tensor is refused in one line (bitsandbytes: see is_load_time)."""
    q = config.get("quantization_config")
    if not q:
        return None
    method = q.get("quant_method", "unknown method")
    if method not in READERS:
        raise CaloraError(f"model {path} is quantized ({method}); calora reads dense, pruned, GPTQ, AWQ and "
                          "compressed-tensors checkpoints tensor by tensor")
    return importlib.import_module(f"calora_cli.formats.{READERS[method]}").layout(q, path)


def is_load_time(config: dict) -> bool:
    """A bitsandbytes checkpoint: quantized when transformers loads it, not read tensor by tensor."""
    return (config.get("quantization_config") or {}).get("quant_method") == "bitsandbytes"


def read_layout(config: dict, path: Path | str) -> Layout | None:
    """layout_of for what is read tensor by tensor: None for a dense and a bitsandbytes checkpoint."""
    return None if is_load_time(config) else layout_of(config, path)
