"""GPTQ's packed on-disk format, read and written tensor by tensor.

`calora merge` streams a model file by file without building its modules; gptqmodel's dequantize
and pack routines work only on loaded quantized modules, so the format is handled here.

One linear (in -> out) is four tensors:
  qweight (in*bits/32, out) int32: codes packed along rows, low bits first (3-bit codes straddle words)
  qzeros  (groups, out*bits/32) int32: zero points packed along columns
  scales  (groups, out) float16
  g_idx   (in,) int32: the group of each input row
and W^T[i, o] = scales[g, o] * (code[i, o] - zero[g, o]) with g = g_idx[i].
Checkpoint format "gptq" (v1) stores zero - 1; "gptq_v2" stores the zero itself.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from calora_cli.errors import CaloraError

if TYPE_CHECKING:
    import torch

PARTS = ("qweight", "qzeros", "scales", "g_idx")
PACKABLE_BITS = (2, 3, 4, 8)


def is_v1(quantization_config: dict) -> bool:
    fmt = quantization_config.get("checkpoint_format") or quantization_config.get("format") or "gptq"
    if fmt not in ("gptq", "gptq_v2"):
        raise CaloraError(f"GPTQ checkpoint format {fmt!r} is not supported (gptq or gptq_v2)")
    return fmt == "gptq"


def _chunk(bits: int) -> tuple[int, int]:
    """The fewest codes that fill whole words, and those words: 32/bits codes in one word for 2, 4
    and 8 bits, 32 codes in three words for 3."""
    import math

    g = math.gcd(bits, 32)
    return 32 // g, bits // g


def unpack(packed: "torch.Tensor", bits: int, rows_packed: bool) -> "torch.Tensor":
    """int32 words -> codes, along rows (qweight) or columns (qzeros). Codes form one little-endian
    bit stream (code k at bit k·bits): for 2, 4 and 8 bits, 32/bits whole codes per word; 3-bit
    codes straddle word boundaries, 32 of them in 3 words, as GPTQ packs them."""
    import torch

    if not rows_packed:
        return unpack(packed.T, bits, rows_packed=True).T
    n, w = _chunk(bits)
    words = packed.to(torch.int64) & 0xFFFFFFFF  # (in · bits/32, out), unsigned
    chunks = words.reshape(-1, w, words.shape[1])
    codes = torch.empty(chunks.shape[0], n, words.shape[1], dtype=torch.int64)
    for k in range(n):
        word, shift = divmod(k * bits, 32)
        v = chunks[:, word] >> shift
        if shift + bits > 32:  # the rest of the code opens the next word
            v = v | (chunks[:, word + 1] << (32 - shift))
        codes[:, k] = v & (2**bits - 1)
    return codes.reshape(-1, words.shape[1]).to(torch.int32)


def pack(codes: "torch.Tensor", bits: int, rows_packed: bool) -> "torch.Tensor":
    import torch

    if not rows_packed:
        return pack(codes.T, bits, rows_packed=True).T.contiguous()
    n, w = _chunk(bits)
    grouped = codes.reshape(-1, n, codes.shape[1]).to(torch.int64)
    words = torch.zeros(grouped.shape[0], w, grouped.shape[2], dtype=torch.int64)
    for k in range(n):
        word, shift = divmod(k * bits, 32)
        words[:, word] |= (grouped[:, k] << shift) & 0xFFFFFFFF
        if shift + bits > 32:
            words[:, word + 1] |= grouped[:, k] >> (32 - shift)
    words = words.reshape(-1, grouped.shape[2])
    # reinterpret the low 32 bits as a signed int32, as the packed format stores them
    return torch.where(words >= 2**31, words - 2**32, words).to(torch.int32)


def check_bits(bits: int) -> None:
    if bits not in PACKABLE_BITS:
        raise CaloraError(f"GPTQ packing supports {'/'.join(map(str, PACKABLE_BITS))}-bit codes, got {bits}")


def zero_points(qzeros: "torch.Tensor", bits: int, v1: bool, out_features: int) -> "torch.Tensor":
    zeros = unpack(qzeros, bits, rows_packed=False)[:, :out_features]
    return zeros + 1 if v1 else zeros


def dequantize(parts: dict[str, "torch.Tensor"], bits: int, v1: bool) -> "torch.Tensor":
    """The (out, in) float32 weight the four packed tensors stand for."""
    check_bits(bits)
    g_idx = parts["g_idx"].long()
    scales = parts["scales"].float()
    codes = unpack(parts["qweight"], bits, rows_packed=True)[: g_idx.numel()]
    zeros = zero_points(parts["qzeros"], bits, v1, scales.shape[1])
    return (scales[g_idx] * (codes - zeros[g_idx]).float()).T.contiguous()


def quantize_rtn(weight: "torch.Tensor", g_idx: "torch.Tensor", bits: int, sym: bool, v1: bool,
                 scale_dtype: "torch.dtype") -> dict[str, "torch.Tensor"]:
    """Round-to-nearest onto a fresh per-group grid, with GPTQ's quantizer rules (min-max range,
    symmetric zero at the middle code), keeping the groups of `g_idx`. Exact zeros stay exact:
    0 maps to the zero point, which dequantizes to 0."""
    import torch

    check_bits(bits)
    maxq = 2**bits - 1
    wt = weight.T.float()  # (in, out)
    idx = g_idx.long()
    groups = int(idx.max()) + 1
    spread = idx[:, None].expand_as(wt)
    lo = torch.zeros(groups, wt.shape[1]).scatter_reduce(0, spread, wt, "amin")
    hi = torch.zeros(groups, wt.shape[1]).scatter_reduce(0, spread, wt, "amax")
    if sym:
        hi = torch.maximum(hi, -lo)
        lo = -hi
    empty = (lo == 0) & (hi == 0)
    lo, hi = torch.where(empty, -1.0, lo), torch.where(empty, 1.0, hi)
    # codes are computed against the stored (rounded) scales, so dequantization is what was meant
    scales = (hi - lo) / maxq
    if v1 and not sym:
        # v1 stores zero - 1 and cannot hold a zero point of 0: stretch those groups' grids so that
        # code 1 is 0.0 (all their weights are >= 0 there)
        low = torch.round(-lo / scales) < 1
        scales = torch.where(low, hi / (maxq - 1), scales)
    scales = scales.to(scale_dtype)
    s = scales.float()
    zeros = torch.full_like(s, (maxq + 1) // 2) if sym else torch.round(-lo / s).clamp(1 if v1 else 0, maxq)
    codes = torch.clamp(torch.round(wt / s[idx]) + zeros[idx], 0, maxq).to(torch.int32)
    stored = zeros - 1 if v1 else zeros
    return {
        "qweight": pack(codes, bits, rows_packed=True),
        "qzeros": pack(stored.to(torch.int32), bits, rows_packed=False),
        "scales": scales,
        "g_idx": g_idx,
    }


def round_onto_grid(weight: "torch.Tensor", parts: dict[str, "torch.Tensor"], bits: int, v1: bool) -> dict[str, "torch.Tensor"]:
    """Round `weight` to the nearest codes of the layer's existing grid (its scales and zero points).

    For a weight already on the grid plus a small change, only the codes the change moves by half a
    step or more change: nothing else of the original quantization is disturbed."""
    import torch

    check_bits(bits)
    maxq = 2**bits - 1
    idx = parts["g_idx"].long()
    s = parts["scales"].float()
    zeros = zero_points(parts["qzeros"], bits, v1, s.shape[1])
    codes = torch.clamp(torch.round(weight.T.float() / s[idx]) + zeros[idx], 0, maxq).to(torch.int32)
    return {**parts, "qweight": pack(codes, bits, rows_packed=True)}
