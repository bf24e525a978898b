"""Perplexity over a token stream in windows, streamed so memory holds one batch of logits."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable

if TYPE_CHECKING:
    import torch


@dataclass
class Window:
    start: int  # first token of the window
    end: int  # one past the last token
    score_from: int  # first position (absolute) whose prediction counts; >= start + 1


def windows(n_tokens: int, seq_len: int, stride: int | None = None) -> list[Window]:
    """Non-overlapping windows by default; with a stride < seq_len, overlapping windows whose
    later tokens get more context, each token still predicted exactly once."""
    if stride is None or stride >= seq_len:
        return [Window(s, min(s + seq_len, n_tokens), s + 1) for s in range(0, n_tokens, seq_len) if min(s + seq_len, n_tokens) - s > 1]
    out, scored = [], 1  # tokens [1, scored) have been predicted already
    start = 0
    while scored < n_tokens:
        end = min(start + seq_len, n_tokens)
        out.append(Window(start, end, max(scored, start + 1)))
        scored = end
        start += stride
        if end == n_tokens:
            break
    return out


@dataclass
class PerplexityResult:
    perplexity: float
    nll: float
    tokens: int


def perplexity(
    model: "torch.nn.Module",
    ids: "torch.Tensor",
    seq_len: int = 512,
    stride: int | None = None,
    batch_size: int = 4,
    on_batch: Callable[..., None] | None = None,
) -> PerplexityResult:
    """exp(total NLL / predicted tokens) over windows of `ids` (a 1-D LongTensor)."""
    import torch

    device = next(model.parameters()).device
    wins = windows(ids.numel(), seq_len, stride)
    total, count = 0.0, 0
    # windows of equal length batch together; only the last one can be shorter
    with torch.no_grad():
        for i in range(0, len(wins), batch_size):
            group = wins[i : i + batch_size]
            for same in _by_length(group):
                x = torch.stack([ids[w.start : w.end] for w in same]).to(device)
                logits = model(input_ids=x).logits.float()
                logp = torch.log_softmax(logits[:, :-1], dim=-1)
                tok_lp = logp.gather(-1, x[:, 1:, None]).squeeze(-1)
                for row, w in zip(tok_lp, same):
                    part = row[w.score_from - w.start - 1 :]
                    total -= part.double().sum().item()
                    count += part.numel()
            if on_batch is not None:
                on_batch(len(group))
    return PerplexityResult(math.exp(total / count) if count else float("nan"), total, count)


def _by_length(group: list[Window]) -> list[list[Window]]:
    buckets: dict[int, list[Window]] = {}
    for w in group:
        buckets.setdefault(w.end - w.start, []).append(w)
    return list(buckets.values())
