"""Multiple-choice accuracy by log-likelihood, scored like lm-evaluation-harness.

Each choice is scored as the continuation of the context: the sum of its tokens' log-probs.
`acc` takes the highest sum; `acc_norm` divides each sum by the choice's length in characters.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable

from calora_cli.data import MCItem

if TYPE_CHECKING:
    import torch


def split_tokens(tokenizer, context: str, choice: str) -> tuple[list[int], list[int]]:
    """Tokens of context and continuation, as lm-eval does: encode the whole string, then cut at
    the context's own token count, after moving trailing spaces of the context to the choice."""
    stripped = context.rstrip(" ")
    choice = context[len(stripped) :] + choice
    ctx = tokenizer(stripped, add_special_tokens=False)["input_ids"]
    whole = tokenizer(stripped + choice, add_special_tokens=False)["input_ids"]
    return whole[: len(ctx)], whole[len(ctx) :]


def choice_batch(tokenizer, item: MCItem, max_len: int) -> tuple["torch.Tensor", "torch.Tensor", list]:
    """One padded batch per item: (input ids, attention mask, each choice's scored span)."""
    import torch

    seqs, spans = [], []
    for c in item.choices:
        ctx, cont = split_tokens(tokenizer, item.context, c)
        ids = (ctx + cont)[-max_len:]
        n_cont = min(len(cont), len(ids) - 1)
        seqs.append(ids)
        spans.append((len(ids) - n_cont, len(ids)))
    width = max(len(s) for s in seqs)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    x = torch.full((len(seqs), width), pad, dtype=torch.long)
    mask = torch.zeros_like(x)
    for i, s in enumerate(seqs):
        x[i, : len(s)] = torch.tensor(s)
        mask[i, : len(s)] = 1
    return x, mask, spans


def score_choices(logits: "torch.Tensor", x: "torch.Tensor", spans: list) -> list[float]:
    """Summed log-prob of each choice's continuation, from the batch's logits."""
    import torch

    logp = torch.log_softmax(logits.float(), dim=-1)
    scores = []
    for i, (lo, hi) in enumerate(spans):
        targets = x[i, lo:hi].to(logp.device)
        scores.append(logp[i, lo - 1 : hi - 1].gather(-1, targets[:, None]).double().sum().item())
    return scores


def choice_logprobs(model: "torch.nn.Module", tokenizer, item: MCItem, max_len: int) -> list[float]:
    """Summed log-prob of each choice given the context, one padded batch per item."""
    import torch

    device = next(model.parameters()).device
    x, mask, spans = choice_batch(tokenizer, item, max_len)
    with torch.no_grad():
        logits = model(input_ids=x.to(device), attention_mask=mask.to(device)).logits
    return score_choices(logits, x, spans)


def decide(item: MCItem, lp: list[float]) -> tuple[int, int]:
    """(hit, hit by acc_norm) of one item from its choices' log-probs."""
    norm = [s / max(1, len(c)) for s, c in zip(lp, item.choices)]
    return int(max(range(len(lp)), key=lp.__getitem__) == item.label), int(max(range(len(norm)), key=norm.__getitem__) == item.label)


@dataclass
class TaskResult:
    acc: float
    acc_norm: float
    n: int


def accuracy(
    model: "torch.nn.Module",
    tokenizer,
    items: list[MCItem],
    max_len: int = 512,
    on_item: Callable[..., None] | None = None,
) -> TaskResult:
    return tally(items, lambda item: choice_logprobs(model, tokenizer, item, max_len), on_item)


def tally(items: list[MCItem], logprobs: Callable[[MCItem], list[float]],
          on_item: Callable[..., None] | None = None) -> TaskResult:
    """acc and acc_norm over the items, from each item's choice log-probs (`logprobs`)."""
    hits = hits_norm = 0
    for item in items:
        hit, hit_norm = decide(item, logprobs(item))
        hits += hit
        hits_norm += hit_norm
        if on_item is not None:
            on_item(1)
    n = len(items)
    return TaskResult(hits / n, hits_norm / n, n)
