"""GPTQ checkpoints (GPTQModel, AutoGPTQ through views.py, calora's own): qweight, qzeros, scales,
g_idx per linear; the packing lives in compress/gptq_format.py, which calora also writes."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from calora_cli.compress.gptq_format import PARTS, check_bits, dequantize, is_v1
from calora_cli.formats import Layout


@dataclass
class GptqLayout(Layout):
    bits: int
    v1: bool
    group_size: int
    method: str = "gptq"

    def parts(self, module, names):
        return [f"{module}.{p}" for p in PARTS] if f"{module}.qweight" in names else None

    def dequantize(self, module, tensors):
        return dequantize({p: tensors[f"{module}.{p}"] for p in PARTS}, self.bits, self.v1)

    def dense_shape(self, module, header, read):
        return [header[f"{module}.scales"]["shape"][1], header[f"{module}.g_idx"]["shape"][0]]

    def describe(self):
        return f"GPTQ {self.bits}-bit, group size {self.group_size}"


def layout(q: dict, path: Path) -> GptqLayout:
    bits = q.get("bits", 4)
    check_bits(bits)
    return GptqLayout(bits=bits, v1=is_v1(q), group_size=q.get("group_size", 128))
