"""Pruning masks from scores. True = keep. Exact counts, ties broken by position (stable sort)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from calora_cli.errors import CaloraError

if TYPE_CHECKING:
    import torch


def parse_pattern(pattern: str) -> tuple[int, int] | None:
    """'unstructured' -> None; 'N:M' -> (N kept, M group) with 0 < N < M."""
    if pattern == "unstructured":
        return None
    try:
        n, m = (int(x) for x in pattern.split(":"))
    except ValueError:
        raise CaloraError(f"--pattern must be 'unstructured' or N:M like 2:4, got {pattern!r}") from None
    if not 0 < n < m:
        raise CaloraError(f"--pattern {pattern}: N:M needs 0 < N < M (N weights kept in every M)")
    return n, m


def lowest(scores: "torch.Tensor", k: int, dim: int = -1) -> "torch.Tensor":
    """Boolean mask of the k lowest scores along `dim` (stable: earlier positions go first)."""
    import torch

    mask = torch.zeros_like(scores, dtype=torch.bool)
    if k > 0:
        idx = torch.sort(scores, dim=dim, stable=True).indices.narrow(dim, 0, k)
        mask.scatter_(dim, idx, True)
    return mask


def row_mask(scores: "torch.Tensor", rate: float) -> "torch.Tensor":
    """Prune floor(cols * rate) lowest scores in every output row."""
    return ~lowest(scores, round(scores.shape[1] * rate), dim=1)


def matrix_mask(scores: "torch.Tensor", rate: float) -> "torch.Tensor":
    """Prune floor(numel * rate) lowest scores of the whole matrix."""
    return ~lowest(scores.reshape(1, -1), round(scores.numel() * rate), dim=1).view_as(scores)


def nm_mask(scores: "torch.Tensor", n: int, m: int) -> "torch.Tensor":
    """Keep the n highest scores of every m consecutive inputs in each row."""
    rows, cols = scores.shape
    if cols % m:
        raise CaloraError(f"N:M pattern with M={m} needs input features divisible by {m}, got {cols}")
    groups = scores.reshape(rows, cols // m, m)
    return ~lowest(groups, m - n, dim=2).view(rows, cols)


def zeros(tensors) -> tuple[int, int]:
    """(exact zeros, elements) over some tensors: what a sparsity is measured from."""
    z = n = 0
    for t in tensors:
        z += int((t == 0).sum())
        n += t.numel()
    return z, n
