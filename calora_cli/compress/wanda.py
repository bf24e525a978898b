"""Wanda (Sun et al. 2023): score |W_ij| * ||X_j||_2 over calibration tokens, pruned per output row."""

from __future__ import annotations

from calora_cli.compress.masks import nm_mask, row_mask

NEEDS = "norms"
COMPENSATES = False  # kept weights are left as they were


def scores(weight, sq_mean):
    """|W| times the root mean square of each input feature (the L2 norm up to a per-layer constant)."""
    return weight.abs() * sq_mean.sqrt()[None, :]


def prune(weight, stats, rate: float, nm: tuple[int, int] | None):
    s = scores(weight.float(), stats.sq_mean)
    mask = nm_mask(s, *nm) if nm else row_mask(s, rate)
    return weight * mask
