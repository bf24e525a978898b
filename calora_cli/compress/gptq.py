"""GPTQ (Frantar et al. 2023) on the streaming engine's Hessians, written in GPTQModel's packed format.

calora runs GPTQ itself rather than through gptqmodel: gptqmodel's quantizer lives inside its own
model loop, which loads the whole model (through transformers' GPTQConfig it also quantizes on the
first visible GPU), and its error compensation cannot keep a pruning mask. Here each linear is
solved from the Hessian of its inputs that the block engine collects, one decoder layer at a time,
and, given a keep-mask, pruned weights stay exactly zero while their error is compensated on the kept
weights of later columns (joint prune + quantize, as SparseGPT's paper does it).

The choices follow GPTQModel's defaults as transformers/optimum call it, and on SmolLM2 the output
is GPTQModel's, every tensor bit for bit (benchmarks/compress.py, tests/test_gptq.py): symmetric min-max groups, 1e-1 dampening, columns in blocks of 128,
group parameters from the block-start weights, group-aware reordering (columns sorted by Hessian
diagonal within each group, groups by their largest one: the solve order changes, the stored
layout does not), and linears solved in execution order inside a block (true sequential).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from calora_cli.compress.gptq_format import check_bits, pack
from calora_cli.errors import CaloraError

if TYPE_CHECKING:
    import torch

NEEDS = "hessian"
BITS = (2, 3, 4, 8)
DAMP = 0.1
BLOCK = 128

# group sizes the int4 CPU kernel (torch's _weight_int4pack_mm) and gptqmodel's CUDA kernels run; a
# model quantized with another one compresses fine and then cannot be evaluated, so it is refused
GROUP_SIZES = (32, 64, 128, 256)


def in_features(config: dict) -> dict[str, int]:
    """Input width of each linear of a block, linears of equal width named together."""
    from calora_cli.arch import linear_shapes

    by_width: dict[int, list[str]] = {}
    for name, (_, d_in) in linear_shapes(config).items():
        by_width.setdefault(d_in, []).append(name)
    return {"/".join(names): width for width, names in by_width.items()}


def check_group_size(config: dict, group_size: int) -> None:
    widths = in_features(config)
    fits = [g for g in GROUP_SIZES if all(w % g == 0 for w in widths.values())]
    hint = f"; {' or '.join(map(str, fits))} would fit every layer" if fits else ""
    if group_size not in GROUP_SIZES:
        raise CaloraError(f"--group-size {group_size} is not one the GPTQ kernels run "
                          f"({', '.join(map(str, GROUP_SIZES))}){hint}")
    for names, width in widths.items():
        if width % group_size:
            raise CaloraError(f"--group-size {group_size} does not divide the {width} input features of {names}{hint}")


def check_bits_for_gptq(bits: int) -> None:
    if bits not in BITS:
        raise CaloraError(f"--bits must be one of {', '.join(map(str, BITS))} for gptq, got {bits}")


@dataclass
class Quantized:
    weight: "torch.Tensor"  # (out, in) float32: exactly what the packed codes dequantize to
    parts: dict  # qweight, qzeros, scales, g_idx (gptq_v2: zero points stored as they are)


def group_aware_order(diag: "torch.Tensor", group_size: int) -> "torch.Tensor":
    """Solve order: within each group, columns by descending Hessian diagonal; groups by their
    largest diagonal entry, descending (stable). Groups stay contiguous, so the stored g_idx is the
    plain i // group_size."""
    import torch

    groups = diag.numel() // group_size
    values, local = torch.sort(diag.view(groups, group_size), dim=1, descending=True, stable=True)
    order = torch.argsort(values[:, 0], descending=True, stable=True)
    base = torch.arange(groups, device=diag.device)[:, None] * group_size
    return (local + base)[order].reshape(-1)


def _in_solve_order(weight: "torch.Tensor", held: list, perm: "torch.Tensor", dead: "torch.Tensor",
                   damp: float) -> tuple["torch.Tensor", "torch.Tensor"]:
    """The weight's columns in solve order `perm` (inputs never seen, `dead`, zeroed) and the upper
    Cholesky factor of the damped inverse Hessian in that order: row i holds column i's update
    direction. The Hessian comes in `held`, a one-element list emptied here: it is the layer's
    largest tensor (in^2: 268 MB for an input of 8192), so it is permuted into one new tensor and
    factored with each intermediate freed at once, no other reference keeping the original alive."""
    import torch

    H = held.pop().detach().float()
    W = weight.detach().float()[:, perm]
    H = H.index_select(0, perm).index_select(1, perm)
    dead = dead[perm]
    H[dead, dead] = 1
    W[:, dead] = 0
    H.diagonal().add_(damp * torch.mean(torch.diag(H)))
    L = torch.linalg.cholesky(H)
    del H
    Hinv = torch.cholesky_inverse(L)
    del L
    return W, torch.linalg.cholesky(Hinv, upper=True)


def _solve_columns(W: "torch.Tensor", Hinv: "torch.Tensor", blocksize: int, round_column) -> "torch.Tensor":
    """GPTQ's column loop (lazy batches of `blocksize` columns): each column rounded by
    `round_column(c, running column) -> its value`, the rounding error spread over the columns not
    yet solved through the inverse Hessian's factor. W (in solve order) is updated in place, a
    block at a time, as the reference does; returns the rounded weight."""
    import torch

    cols = W.shape[1]
    Q = torch.empty_like(W)
    for i1 in range(0, cols, blocksize):
        i2 = min(i1 + blocksize, cols)
        W1 = W[:, i1:i2].clone()
        Err = torch.empty_like(W1)
        Hinv1 = Hinv[i1:i2, i1:i2]
        for i in range(i2 - i1):
            w = W1[:, i]
            q = round_column(i1 + i, w)
            Q[:, i1 + i] = q
            err = (w - q) / Hinv1[i, i]
            W1[:, i:] -= err[:, None] * Hinv1[i, i:][None, :]
            Err[:, i] = err
        W[:, i2:] -= Err @ Hinv[i1:i2, i2:]
    return Q


def quantize(weight: "torch.Tensor", hessian: "torch.Tensor", bits: int, group_size: int,
             keep: "torch.Tensor | None" = None, damp: float = DAMP, blocksize: int = BLOCK,
             reorder: bool = True, round_scales: bool = False) -> Quantized:
    """GPTQ one (out, in) weight against the Hessian 2 X^T X / n of its inputs.

    `keep` (out, in) bool: weights outside it get the zero code, which dequantizes to exactly 0, and
    their removal (from whatever value `weight` holds there: the dense one, or 0 from a pruner
    that compensated it itself) is compensated like a rounding error. The solve uses float32
    scales and they are stored as float16, as gptqmodel does (so the output is gptqmodel's,
    tensor for tensor);
    `round_scales` rounds them first instead, so that the stored codes dequantize exactly to
    `weight` (measured on SmolLM2 GPTQ-4 g64: not better, perplexity 62.3 vs 59.75)."""
    import torch

    check_bits(bits)
    maxq = 2**bits - 1
    mid = (maxq + 1) // 2
    rows, cols = weight.shape
    if cols % group_size:
        raise CaloraError(f"group size {group_size} does not divide the {cols} input features")
    # the weight is copied once, by the permutation (_in_solve_order)
    dev = weight.device
    diag = torch.diag(hessian).float()
    dead = diag == 0
    perm = group_aware_order(torch.where(dead, 1.0, diag), group_size) if reorder else torch.arange(cols, device=dev)
    held = [hessian]
    del hessian  # the caller hands its reference over (InputStats.take_hessian): the permuted copy replaces it
    W, Hinv = _in_solve_order(weight, held, perm, dead, damp)
    if keep is not None:
        keep = keep[:, perm]

    groups = cols // group_size
    scales = torch.empty(rows, groups, device=dev)  # by solve-order group
    codes = torch.empty(rows, cols, dtype=torch.uint8, device=dev)  # 2-8 bit codes
    scale = None

    def round_column(c: int, w: "torch.Tensor") -> "torch.Tensor":
        nonlocal scale
        if c % group_size == 0:
            # from W (updated once per block), as the reference does; pruned weights do not
            # widen the range, they will be 0 whatever their running value
            g = W[:, c : c + group_size]
            if keep is not None:
                g = g * keep[:, c : c + group_size]
            top = g.abs().amax(dim=1)
            top = torch.where(top == 0, 1.0, top)
            scale = 2 * top / maxq
            if round_scales:
                scale = scale.half().float()
            scales[:, c // group_size] = scale
        code = torch.clamp(torch.round(w / scale) + mid, 0, maxq)
        if keep is not None:
            code = torch.where(keep[:, c], code, float(mid))
        codes[:, c] = code.to(torch.uint8)
        return scale * (code - mid)

    Q = _solve_columns(W, Hinv, blocksize, round_column)
    del W, Hinv  # before packing, the other peak

    inverse = torch.argsort(perm)
    group_of = perm.view(groups, group_size)[:, 0] // group_size  # solve-order group -> stored group
    stored = torch.empty_like(scales)
    stored[:, group_of] = scales
    codes, stored = codes[:, inverse].cpu(), stored.cpu()  # packing runs on the CPU, where it is written
    g_idx = (torch.arange(cols) // group_size).to(torch.int32)
    # packed 1024 input rows at a time: pack() works in int64, 8x the codes' size for the whole matrix
    qweight = torch.cat([pack(codes[:, r : r + 1024].T.to(torch.int32), bits, rows_packed=True)
                         for r in range(0, cols, 1024)])
    del codes
    parts = {
        "qweight": qweight,
        "qzeros": pack(torch.full((groups, rows), mid, dtype=torch.int32), bits, rows_packed=False),
        "scales": stored.T.contiguous().half(),
        "g_idx": g_idx,
    }
    return Quantized(Q[:, inverse].contiguous(), parts)


def quantize_on_grid(weight: "torch.Tensor", hessian: "torch.Tensor", scale: "torch.Tensor",
                     offset: "torch.Tensor", qmin: int, qmax: int, damp: float = DAMP,
                     blocksize: int = BLOCK) -> tuple["torch.Tensor", "torch.Tensor"]:
    """GPTQ's codes on a grid fixed in advance: value (r, c) may only be scale·q + offset with integer
    q in [qmin, qmax] (scale and offset (out, in), e.g. the scales and mins llama.cpp chose for
    its blocks). The grid does not move during the solve, so columns go in act-order (descending
    Hessian diagonal), which a stored layout with groups would not allow. Returns the dequantized
    weight and the codes (int16), both (out, in) in the original column order."""
    import torch

    rows, cols = weight.shape
    diag = torch.diag(hessian).float()
    dead = diag == 0
    perm = torch.argsort(torch.where(dead, -1.0, diag), descending=True, stable=True)
    held = [hessian]
    del hessian
    W, Hinv = _in_solve_order(weight, held, perm, dead, damp)
    S, Z = scale.float()[:, perm], offset.float()[:, perm]
    safe = torch.where(S == 0, 1.0, S)  # a zero scale leaves one grid point: the offset
    codes = torch.empty(rows, cols, dtype=torch.int16)

    def round_column(c: int, w: "torch.Tensor") -> "torch.Tensor":
        code = torch.clamp(torch.round((w - Z[:, c]) / safe[:, c]), qmin, qmax)
        codes[:, c] = code.to(torch.int16)
        return S[:, c] * code + Z[:, c]

    Q = _solve_columns(W, Hinv, blocksize, round_column)
    inverse = torch.argsort(perm)
    return Q[:, inverse].contiguous(), codes[:, inverse].contiguous()


def packed_entries(name: str, shape: list[int], bits: int, group_size: int) -> list[tuple[str, str, list[int]]]:
    """The packed tensors (name, safetensors dtype, shape) that replace one (out, in) linear weight."""
    out, d_in = shape
    stem = name.removesuffix(".weight")
    groups = d_in // group_size
    return [(f"{stem}.g_idx", "I32", [d_in]), (f"{stem}.qweight", "I32", [d_in * bits // 32, out]),
            (f"{stem}.qzeros", "I32", [groups, out * bits // 32]), (f"{stem}.scales", "F16", [groups, out])]


def quantization_config(bits: int, group_size: int) -> dict:
    """config.json's quantization_config for what `quantize` writes; transformers (through optimum
    and gptqmodel) loads it and peft attaches LoRA to its linears."""
    from calora_cli import __version__

    return {
        "quant_method": "gptq", "bits": bits, "group_size": group_size, "sym": True, "desc_act": False,
        "act_group_aware": True, "true_sequential": True, "damp_percent": DAMP,
        "checkpoint_format": "gptq_v2", "format": "gptq_v2", "backend": "auto",
        "meta": {"quantizer": [f"calora:{__version__}"]},
    }
