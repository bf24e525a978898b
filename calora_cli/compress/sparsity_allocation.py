"""Per-block sparsity rates: uniform, or LoSA's allocation from representation similarity.

LoSA (following ITPruner) measures how redundant each decoder block is by the linear CKA between
its input representation and every other block's; redundant blocks are pruned more. The rates lie
in target +- delta and average exactly to the target.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch


def uniform(target: float, n_blocks: int) -> list[float]:
    return [target] * n_blocks


def default_delta(target: float) -> float:
    """The reference code's band: 0.01 up to 50% sparsity, 0.02 up to 60%, 0.03 above."""
    return 0.01 if target <= 0.5 else 0.02 if target <= 0.6 else 0.03


def centre(k: "torch.Tensor") -> "torch.Tensor":
    n = k.shape[0]
    h = _eye(n, k) - 1.0 / n
    return h @ k @ h


def _eye(n: int, like: "torch.Tensor") -> "torch.Tensor":
    import torch

    return torch.eye(n, dtype=like.dtype, device=like.device)


def cka_matrix(grams: list["torch.Tensor"]) -> "torch.Tensor":
    """Linear CKA between every pair of blocks from their (uncentred) Gram matrices."""
    import torch

    c = [centre(k) for k in grams]
    norms = [torch.linalg.norm(x) for x in c]
    L = len(c)
    out = torch.ones(L, L, dtype=torch.float64)
    for i in range(L):
        for j in range(i + 1, L):
            v = (c[i] * c[j]).sum() / (norms[i] * norms[j])
            out[i, j] = out[j, i] = v
    return out


def importance(cka: "torch.Tensor", beta: float = 1.0) -> list[float]:
    """exp(-beta * normalised redundancy); redundancy = summed CKA with every other block."""
    L = cka.shape[0]
    red = [(cka[i].sum() - cka[i, i]).item() for i in range(L)]
    total = sum(red) or 1.0
    return [math.exp(-beta * r / total) for r in red]


def rmi(target: float, imp: list[float], delta: float) -> list[float]:
    """The optimum of min sum(rate_i * importance_i) s.t. mean(rate) = target, |rate_i - target| <= delta.

    The objective is linear over a symmetric box, so the optimum is a vertex: the least important
    half of the blocks get target + delta, the most important half target - delta, and the middle
    block (odd count) the target. Only the order of the importances matters.
    """
    L = len(imp)
    order = sorted(range(L), key=lambda i: (imp[i], i))
    rates = [target] * L
    for k in range(L // 2):
        rates[order[k]] = target + delta
        rates[order[L - 1 - k]] = target - delta
    return rates
