"""GPTQ's 4-bit grids, written as llama.cpp's legacy block types without re-rounding.

A GPTQ tensor of 4 bits, groups of 32 consecutive inputs and no act-order holds, per output row and
group, a float16 scale s, a zero point z and codes q in 0..15, standing for s·(q − z). llama.cpp's
Q4_0 block is 32 consecutive values of a row as d·(q − 8) with a float16 d; Q4_1's is d·q + m with
float16 d and m. So symmetric GPTQ (every z = 8) is Q4_0 exactly (d = s, the same codes), and
asymmetric GPTQ is Q4_1 with d = s and m = −s·z rounded to float16: GPTQ's error-compensated codes
reach llama.cpp unchanged. Block layout (ggml): d, [m,] then 16 bytes, byte j holding code j in its
low nibble and code j + 16 in its high nibble.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from calora_cli.errors import CaloraError

if TYPE_CHECKING:
    import torch

BLOCK = 32


def grid_type(parts: dict[str, "torch.Tensor"], bits: int, v1: bool, name: str) -> str:
    """Q4_0 or Q4_1 for a GPTQ tensor on one of their grids; refuse the others in one line."""
    import torch

    from calora_cli.compress.gptq_format import zero_points

    n_in = parts["g_idx"].numel()
    if bits != 4:
        raise CaloraError(f"{name} is {bits}-bit GPTQ; only 4-bit groups of 32 map onto llama.cpp's Q4_0/Q4_1 "
                          "without re-rounding: pass --requantize TYPE to quantize it again with llama.cpp")
    if n_in % BLOCK or not torch.equal(parts["g_idx"].long(), torch.arange(n_in) // BLOCK):
        raise CaloraError(f"{name}'s GPTQ groups are not 32 consecutive inputs (group size other than 32, or "
                          "act-order): pass --requantize TYPE to quantize it again with llama.cpp")
    zeros = zero_points(parts["qzeros"], bits, v1, parts["scales"].shape[1])
    return "Q4_0" if bool((zeros == 8).all()) else "Q4_1"


def blocks(parts: dict[str, "torch.Tensor"], bits: int, v1: bool, kind: str) -> "torch.Tensor":
    """The tensor's llama.cpp blocks, (out, in/32 · block bytes) uint8, rows in Hugging Face order."""
    import torch

    from calora_cli.compress.gptq_format import unpack, zero_points

    n_in = parts["g_idx"].numel()
    scales = parts["scales"].to(torch.float16)  # (groups, out)
    codes = unpack(parts["qweight"], bits, rows_packed=True)[:n_in].T.contiguous()  # (out, in)
    out, groups = codes.shape[0], n_in // BLOCK
    q = codes.reshape(out, groups, BLOCK).to(torch.uint8)
    packed = q[..., :16] | (q[..., 16:] << 4)  # (out, groups, 16)
    d = scales.T.contiguous().view(torch.uint8).reshape(out, groups, 2)
    fields = [d]
    if kind == "Q4_1":
        zeros = zero_points(parts["qzeros"], bits, v1, scales.shape[1]).float()
        m = (-scales.float() * zeros).to(torch.float16).T.contiguous().view(torch.uint8).reshape(out, groups, 2)
        fields.append(m)
    return torch.cat([*fields, packed], dim=2).reshape(out, -1).contiguous()


def gptq_tensors(readers, config: dict, lossless: bool) -> tuple[dict, str | None]:
    """A GPTQ checkpoint's tensors as writer.write_model takes them: each quantized linear as its
    Q4_0/Q4_1 blocks (`lossless`, refused unless every linear is on one of those grids) or
    dequantized to float32 (for llama.cpp's quantizer to quantize again); the rest as stored.
    Returns the tensors and, when lossless, the file's type (MOSTLY_Q4_0 or MOSTLY_Q4_1)."""
    from calora_cli.compress.gptq_format import PARTS, dequantize, is_v1

    q = config["quantization_config"]
    bits, v1 = q.get("bits", 4), is_v1(q)
    where = {n: r for r in readers for n in r.names()}
    out, kinds = {}, set()
    for name, reader in where.items():
        stem, _, leaf = name.rpartition(".")
        if leaf in PARTS:
            if leaf != "qweight":
                continue
            read = lambda stem=stem: {part: where[f"{stem}.{part}"].get_tensor(f"{stem}.{part}") for part in PARTS}  # noqa: E731
            parts = read()
            shape = [parts["scales"].shape[1], parts["g_idx"].numel()]
            if lossless:
                kind = grid_type(parts, bits, v1, stem)
                kinds.add(kind)
                out[f"{stem}.weight"] = (shape, lambda read=read, kind=kind: blocks(read(), bits, v1, kind), kind)
            else:
                out[f"{stem}.weight"] = (shape, lambda read=read: dequantize(read(), bits, v1))
            continue
        shape = list(reader.header[name]["shape"])
        if lossless and len(shape) == 2:  # the embedding (and an untied head) as llama.cpp's Q4_0 file has it
            out[name] = (shape, lambda r=reader, n=name: q8_0(r.get_tensor(n)), "Q8_0")
        else:
            out[name] = (shape, lambda r=reader, n=name: r.get_tensor(n))
    if lossless and len(kinds) > 1:
        raise CaloraError("the model mixes symmetric and asymmetric GPTQ layers; llama.cpp's file holds one legacy "
                          "type here: pass --requantize TYPE")
    return out, (f"MOSTLY_{kinds.pop()}" if lossless and kinds else None)


def q8_0(t: "torch.Tensor") -> "torch.Tensor":
    """gguf's own Q8_0 quantizer (a port of ggml's reference), rows of blocks as uint8."""
    import numpy as np
    import torch
    from gguf import GGMLQuantizationType
    from gguf.quants import quantize

    return torch.from_numpy(np.ascontiguousarray(quantize(t.float().numpy(), GGMLQuantizationType.Q8_0)))
