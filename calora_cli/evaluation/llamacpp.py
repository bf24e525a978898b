"""`eval --engine llama.cpp`: the same scores, from llama.cpp's own forward pass and tokenizer.

What a user's device computes: the GGUF base in llama.cpp, every adapter applied at once (a peft
adapter is written as a llama.cpp LoRA GGUF first, exactly as `calora export` writes it), text
tokenized by llama.cpp. Windows, scoring and the JSON fields are calora's own (perplexity.py,
multiple_choice.py): only the logits and the tokens come from llama.cpp. One sequence at a time.
"""

from __future__ import annotations

from typing import Callable

from calora_cli.evaluation.multiple_choice import TaskResult, score_choices, split_tokens, tally
from calora_cli.evaluation.perplexity import result, score_windows, windows


def perplexity(engine, ids: list[int], seq_len: int, stride: int | None, on_window: Callable | None = None):
    import torch

    x_all = torch.tensor(ids, dtype=torch.long)
    total, count = 0.0, 0
    for w in windows(len(ids), seq_len, stride):
        x = x_all[w.start:w.end]
        nll, n = score_windows(engine.logits(x.tolist())[None], x[None], [w])
        total += nll
        count += n
        if on_window is not None:
            on_window(1)
    return result(total, count)


def accuracy(engine, tokenizer, items, max_len: int, on_item: Callable | None = None) -> TaskResult:
    """Each choice scored as its own sequence (llama.cpp has no padding to batch them)."""
    import torch

    def logprobs(item) -> list[float]:
        lp = []
        for c in item.choices:
            ctx, cont = split_tokens(tokenizer, item.context, c)
            ids = (ctx + cont)[-max_len:]
            n_cont = min(len(cont), len(ids) - 1)
            lp += score_choices(engine.logits(ids)[None], torch.tensor([ids]), [(len(ids) - n_cont, len(ids))])
        return lp

    return tally(items, logprobs, on_item)
