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


def window_batches(ids: "torch.Tensor", seq_len: int, stride: int | None, batch_size: int) -> list[tuple]:
    """The model inputs perplexity runs: (input ids, the windows they hold), windows of equal
    length batched together (only the last one can be shorter), in order."""
    import torch

    wins = windows(ids.numel(), seq_len, stride)
    out = []
    for i in range(0, len(wins), batch_size):
        for same in _by_length(wins[i : i + batch_size]):
            out.append((torch.stack([ids[w.start : w.end] for w in same]), same))
    return out


def score_windows(logits: "torch.Tensor", x: "torch.Tensor", same: list[Window]) -> tuple[float, int]:
    """(NLL, predicted tokens) of one batch of windows from its logits."""
    import torch

    logp = torch.log_softmax(logits.float()[:, :-1], dim=-1)
    tok_lp = logp.gather(-1, x[:, 1:, None].to(logp.device)).squeeze(-1)
    total, count = 0.0, 0
    for row, w in zip(tok_lp, same):
        part = row[w.score_from - w.start - 1 :]
        total -= part.double().sum().item()
        count += part.numel()
    return total, count


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
    total, count = 0.0, 0
    with torch.no_grad():
        for x, same in window_batches(ids, seq_len, stride, batch_size):
            nll, n = score_windows(model(input_ids=x.to(device)).logits, x, same)
            total += nll
            count += n
            if on_batch is not None:
                on_batch(len(same))
    return result(total, count)


def result(total: float, count: int) -> PerplexityResult:
    return PerplexityResult(math.exp(total / count) if count else float("nan"), total, count)


def _by_length(group: list[Window]) -> list[list[Window]]:
    buckets: dict[int, list[Window]] = {}
    for w in group:
        buckets.setdefault(w.end - w.start, []).append(w)
    return list(buckets.values())
