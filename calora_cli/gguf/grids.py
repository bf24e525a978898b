"""The grid of a llama.cpp block: each value as scale · code + offset, and codes written back.

llama.cpp's quantizer chooses, per block, the scales (and mins) and then the codes by rounding each
value to its nearest grid point. `--solver gptq` keeps the scales and mins llama.cpp chose and lets
GPTQ choose the codes, column by column with error feedback. That needs the grid of every value and
a way to write new codes into the same bytes; gguf-py only dequantizes K-quant blocks as a whole,
so the block layouts are read here (ggml's `ggml-common.h`; checked against gguf-py's dequantizers
and round-tripped byte for byte in the tests).

Every type here is affine per group of 16 or 32 values of a row: x = scale · q + offset with integer
q in [QMIN, QMAX]. Arrays are numpy, (rows, blocks · block bytes) uint8 as gguf's reader hands them.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import numpy as np

# type -> (values per block, bytes per block, smallest code, largest code)
LAYOUT = {
    "Q4_0": (32, 18, 0, 15), "Q4_1": (32, 20, 0, 15), "Q5_0": (32, 22, 0, 31), "Q5_1": (32, 24, 0, 31),
    "Q8_0": (32, 34, -128, 127), "Q4_K": (256, 144, 0, 15), "Q5_K": (256, 176, 0, 31), "Q6_K": (256, 210, 0, 63),
}
SOLVABLE = tuple(LAYOUT)


def _f16(b: "np.ndarray") -> "np.ndarray":
    """(..., 2) uint8 -> (...) float32."""
    import numpy as np

    return np.ascontiguousarray(b).view(np.float16)[..., 0].astype(np.float32)


def _k_scales(s: "np.ndarray") -> tuple["np.ndarray", "np.ndarray"]:
    """Q4_K/Q5_K's 12 bytes of 6-bit scales and mins -> (blocks, 8) each (ggml's get_scale_min_k4)."""
    import numpy as np

    s = s.astype(np.uint8)
    sc = np.empty(s.shape[:-1] + (8,), np.uint8)
    mn = np.empty_like(sc)
    sc[..., :4] = s[..., 0:4] & 63
    mn[..., :4] = s[..., 4:8] & 63
    sc[..., 4:] = (s[..., 8:12] & 0xF) | ((s[..., 0:4] >> 6) << 4)
    mn[..., 4:] = (s[..., 8:12] >> 4) | ((s[..., 4:8] >> 6) << 4)
    return sc.astype(np.float32), mn.astype(np.float32)


def _nibbles(qs: "np.ndarray") -> "np.ndarray":
    """16 bytes -> 32 codes: byte j holds code j (low nibble) and code j + 16 (high)."""
    import numpy as np

    return np.concatenate([qs & 0xF, qs >> 4], axis=-1)


def _bits(qh: "np.ndarray") -> "np.ndarray":
    """4 bytes (little-endian uint32) -> 32 bits, bit j for code j."""
    import numpy as np

    return np.unpackbits(qh, axis=-1, bitorder="little")


def decode(kind: str, data: "np.ndarray") -> tuple["np.ndarray", "np.ndarray", "np.ndarray"]:
    """(scale, offset, codes), each (rows, values) (float32, float32, int16), for a tensor's blocks."""
    import numpy as np

    n, size, _, _ = LAYOUT[kind]
    rows = data.shape[0]
    b = data.reshape(rows, -1, size)
    nb = b.shape[1]

    def per_value(per_group, group):  # (rows, nb, groups) -> (rows, nb * n)
        return np.repeat(per_group, group, axis=-1).reshape(rows, nb * n)

    if kind in ("Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0"):
        d = _f16(b[..., 0:2])[..., None]
        if kind == "Q8_0":
            q = b[..., 2:].view(np.int8).astype(np.int16)
            m = np.zeros_like(d)
        else:
            at = 4 if kind in ("Q4_1", "Q5_1") else 2
            m = _f16(b[..., 2:4])[..., None] if at == 4 else None
            if kind in ("Q5_0", "Q5_1"):
                high = _bits(b[..., at : at + 4]).astype(np.int16) << 4
                at += 4
            else:
                high = 0
            q = _nibbles(b[..., at : at + 16]).astype(np.int16) | high
            if m is None:  # symmetric: d·(q − 8) or d·(q − 16)
                m = -d * (8 if kind == "Q4_0" else 16)
        return per_value(d, n), per_value(m, n), q.reshape(rows, -1)
    if kind in ("Q4_K", "Q5_K"):
        d, dmin = _f16(b[..., 0:2])[..., None], _f16(b[..., 2:4])[..., None]
        sc, mn = _k_scales(b[..., 4:16])
        if kind == "Q5_K":
            qh, qs = b[..., 16:48], b[..., 48:176]
        else:
            qh, qs = None, b[..., 16:144]
        # chunk c of 64 values: qs[32c + l] holds value 64c + l (low nibble) and 64c + 32 + l (high)
        chunks = qs.reshape(rows, nb, 4, 32)
        q = np.stack([chunks & 0xF, chunks >> 4], axis=3).astype(np.int16)  # (rows, nb, 4, 2, 32)
        if qh is not None:  # bit 2c (+1 for the high half) of qh[l]
            bit = (qh[..., None, None, :] >> (2 * np.arange(4)[:, None, None] + np.arange(2)[None, :, None])) & 1
            q |= bit.astype(np.int16) << 4
        return per_value(d * sc, 32), per_value(-dmin * mn, 32), q.reshape(rows, -1)
    # Q6_K: ql[128], qh[64], int8 scales[16], d; halves of 128 values, each four runs of 32
    ql, qh = b[..., 0:128].reshape(rows, nb, 2, 2, 32), b[..., 128:192].reshape(rows, nb, 2, 32)
    sc = b[..., 192:208].view(np.int8).astype(np.float32)
    d = _f16(b[..., 208:210])[..., None]
    low = np.stack([ql[:, :, :, 0] & 0xF, ql[:, :, :, 1] & 0xF, ql[:, :, :, 0] >> 4, ql[:, :, :, 1] >> 4], axis=3)
    high = np.stack([(qh >> s) & 3 for s in (0, 2, 4, 6)], axis=3)
    q = (low | (high << 4)).astype(np.int16)  # (rows, nb, half, run, 32)
    scale = d * sc  # (rows, nb, 16): scale k covers values 16k .. 16k + 15
    return per_value(scale, 16), per_value(-32 * scale, 16), q.reshape(rows, -1)


def encode(kind: str, data: "np.ndarray", codes: "np.ndarray") -> "np.ndarray":
    """`data`'s blocks with their codes replaced by `codes` (rows, values); scales and mins kept."""
    import numpy as np

    n, size, lo, hi = LAYOUT[kind]
    rows = data.shape[0]
    out = data.reshape(rows, -1, size).copy()
    nb = out.shape[1]
    q = np.clip(codes, lo, hi).astype(np.int16)
    if kind == "Q8_0":
        out[..., 2:] = q.reshape(rows, nb, 32).astype(np.int8).view(np.uint8)
        return out.reshape(rows, -1)
    q = q.astype(np.uint8)
    if kind in ("Q4_0", "Q4_1", "Q5_0", "Q5_1"):
        q = q.reshape(rows, nb, 32)
        at = 4 if kind in ("Q4_1", "Q5_1") else 2
        if kind in ("Q5_0", "Q5_1"):
            out[..., at : at + 4] = np.packbits((q >> 4) & 1, axis=-1, bitorder="little")
            at += 4
        out[..., at : at + 16] = (q[..., :16] & 0xF) | ((q[..., 16:] & 0xF) << 4)
        return out.reshape(rows, -1)
    if kind in ("Q4_K", "Q5_K"):
        q = q.reshape(rows, nb, 4, 2, 32)
        at = 16
        if kind == "Q5_K":
            shifts = (2 * np.arange(4)[:, None, None] + np.arange(2)[None, :, None]).astype(np.uint8)
            out[..., 16:48] = (((q >> 4) & 1) << shifts).sum(axis=(2, 3), dtype=np.uint8)
            at = 48
        out[..., at : at + 128] = ((q[:, :, :, 0] & 0xF) | ((q[:, :, :, 1] & 0xF) << 4)).reshape(rows, nb, 128)
        return out.reshape(rows, -1)
    q = q.reshape(rows, nb, 2, 4, 32)
    low, high = q & 0xF, q >> 4
    ql = np.stack([low[:, :, :, 0] | (low[:, :, :, 2] << 4), low[:, :, :, 1] | (low[:, :, :, 3] << 4)], axis=3)
    out[..., 0:128] = ql.reshape(rows, nb, 128)
    qh = high[:, :, :, 0] | (high[:, :, :, 1] << 2) | (high[:, :, :, 2] << 4) | (high[:, :, :, 3] << 6)
    out[..., 128:192] = qh.reshape(rows, nb, 64)
    return out.reshape(rows, -1)
