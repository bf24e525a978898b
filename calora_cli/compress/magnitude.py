"""Magnitude pruning: score |W|, one threshold per matrix (no calibration data needed)."""

from __future__ import annotations

from calora_cli.compress.masks import matrix_mask, nm_mask

NEEDS = None  # no input statistics
COMPENSATES = False  # kept weights are left as they were


def prune(weight, stats, rate: float, nm: tuple[int, int] | None):
    scores = weight.abs()
    mask = nm_mask(scores, *nm) if nm else matrix_mask(scores, rate)
    return weight * mask
