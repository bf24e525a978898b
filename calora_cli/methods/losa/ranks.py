"""LoSA's layer-wise ranks: blocks that lost more to sparsification get a larger LoRA rank.

r_i = clip(round(e_i / sum(e) * r_mean * L), 1, r_max), then moved one at a time until the ranks
sum to exactly r_mean * L (the reference code fixes up in one pass and can miss its budget).
One rank per decoder block, shared by the block's adapted modules, as in the reference.

An existing LoRA is resized to those ranks: down by truncating its delta's SVD (the best rank-k
approximation, computed on the r x r core, never on the full out x in product), up by adding
components with B = 0 (the function is unchanged until training moves them). alpha_pattern keeps
each module's scale alpha/r as it was, as LoSA keeps its fixed scale.
"""

from __future__ import annotations

import math
import re
from typing import TYPE_CHECKING

from calora_cli.errors import CaloraError

if TYPE_CHECKING:
    import torch

MODES = ("uniform", "error")


def allocate(errors: list[float], mean_rank: int, max_rank: int, min_rank: int = 1) -> list[int]:
    n = len(errors)
    if not min_rank <= mean_rank <= max_rank:
        raise CaloraError(f"rank budget {mean_rank} per layer must lie in [{min_rank}, {max_rank}]")
    if any(not math.isfinite(e) or e < 0 for e in errors):
        raise CaloraError(f"layer errors must be finite and >= 0, got {errors}")
    budget, total = mean_rank * n, sum(errors)
    if total == 0:
        return [mean_rank] * n
    ranks = [min(max(round(e / total * budget), min_rank), max_rank) for e in errors]
    by_error = sorted(range(n), key=lambda i: errors[i])
    while sum(ranks) > budget:  # take from the blocks that lost least
        i = next(i for i in by_error if ranks[i] > min_rank)
        ranks[i] -= 1
    while sum(ranks) < budget:  # give to the blocks that lost most
        i = next(i for i in reversed(by_error) if ranks[i] < max_rank)
        ranks[i] += 1
    return ranks


def block_of(module: str) -> int:
    m = re.search(r"\.layers\.(\d+)\.", module)
    if not m:
        raise CaloraError(f"cannot tell which decoder block {module} belongs to")
    return int(m.group(1))


def _truncate(A: "torch.Tensor", B: "torch.Tensor", k: int):
    """Best rank-k factors of B @ A: QR both factors, SVD the r x r core."""
    import torch

    Qb, Rb = torch.linalg.qr(B.double())
    Qa, Ra = torch.linalg.qr(A.double().T)
    U, S, Vh = torch.linalg.svd(Rb @ Ra.T)
    root = S[:k].sqrt()
    return ((root[:, None] * Vh[:k]) @ Qa.T).to(A.dtype), ((Qb @ U[:, :k]) * root).to(B.dtype)


def _grow(A: "torch.Tensor", B: "torch.Tensor", k: int, generator: "torch.Generator"):
    import torch

    extra = k - A.shape[0]
    bound = 1 / math.sqrt(A.shape[1])  # peft's default init of lora_A (Kaiming-uniform, a = sqrt(5))
    new_A = (torch.rand(extra, A.shape[1], generator=generator, dtype=torch.float64) * 2 - 1) * bound
    return torch.cat([A, new_A.to(A.dtype)]), torch.cat([B, torch.zeros(B.shape[0], extra, dtype=B.dtype)], dim=1)


def resize(state: dict, config: dict, ranks: dict[str, int], seed: int) -> tuple[dict, dict]:
    """A peft LoRA (state dict, config) with module m at rank ranks[m] and its scale unchanged."""
    import torch

    from calora_cli.adapters.lora import factors_from_state
    from calora_cli.arch import PEFT_PREFIX

    factors = factors_from_state(state, config)
    generator = torch.Generator().manual_seed(seed)
    new_state = dict(state)
    rank_pattern, alpha_pattern = dict(config.get("rank_pattern") or {}), dict(config.get("alpha_pattern") or {})
    for module in sorted(factors):
        f, k = factors[module], ranks[module]
        r = f.A.shape[0]
        A, B = (f.A, f.B) if k == r else _truncate(f.A, f.B, k) if k < r else _grow(f.A, f.B, k, generator)
        key = next(n for n in state if n.startswith(PEFT_PREFIX + module + ".lora_A."))
        new_state[key], new_state[key.replace(".lora_A.", ".lora_B.")] = A.contiguous(), B.contiguous()
        rank_pattern[module] = k
        alpha_pattern[module] = f.scale * (math.sqrt(k) if config.get("use_rslora") else k)
    return new_state, {**config, "rank_pattern": rank_pattern, "alpha_pattern": alpha_pattern}
