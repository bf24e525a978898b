"""AWQ checkpoints in the GEMM layout (as GPTQModel and AutoAWQ write them): per linear, qweight
(in, out·bits/32) with AWQ's interleaved code order, qzeros (groups, out·bits/32), scales
(groups, out), and no g_idx (groups are contiguous). Unpacked with gptqmodel's own AWQ routine, the
one its CPU kernels use."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from calora_cli.errors import CaloraError
from calora_cli.formats import Layout

PARTS = ("qweight", "qzeros", "scales")


@dataclass
class AwqLayout(Layout):
    bits: int
    group_size: int
    zero_point: bool
    method: str = "awq"
    moves_scales: bool = True

    def parts(self, module, names):
        return [f"{module}.{p}" for p in PARTS] if f"{module}.qweight" in names else None

    def dequantize(self, module, tensors):
        from calora_cli.runtime import import_stack

        import_stack(gptq=True)  # gptqmodel's import, quietly
        from gptqmodel.quantization.awq.utils.packing_utils import dequantize_gemm

        qweight, qzeros, scales = (tensors[f"{module}.{p}"] for p in PARTS)
        return dequantize_gemm(qweight, qzeros, scales.float(), self.bits, self.group_size).T.contiguous()

    def dense_shape(self, module, header, read):
        return [header[f"{module}.scales"]["shape"][1], header[f"{module}.qweight"]["shape"][0]]

    def describe(self):
        return f"AWQ {self.bits}-bit (GEMM), group size {self.group_size}" + ("" if self.zero_point else ", symmetric")


def layout(q: dict, path: Path) -> AwqLayout:
    fmt = str(q.get("version") or q.get("format") or "gemm").lower()
    if fmt != "gemm":
        raise CaloraError(f"model {path} is AWQ in the {fmt!r} layout; calora reads AWQ's GEMM layout (GPTQModel's "
                          "and AutoAWQ's default): convert it to GEMM first")
    bits = q.get("bits", q.get("w_bit", 4))
    if bits != 4:
        raise CaloraError(f"model {path} is {bits}-bit AWQ; calora reads 4-bit AWQ (the GEMM layout's)")
    return AwqLayout(bits=bits, group_size=q.get("group_size", q.get("q_group_size", 128)),
                     zero_point=bool(q.get("zero_point", True)))
