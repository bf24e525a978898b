"""Evaluation of a model larger than memory: every batch of inputs goes through one decoder layer
at a time (streaming.LayerSource), each layer read once per pass over all batches.

The batches are those the whole-model evaluation runs (perplexity windows, one padded batch per
multiple-choice item), so the scores are the same; their hidden states between layers are kept
up to a bound and spilled to a temporary folder beyond it. An adapter is put into each layer as it
is read (adapters.block_patcher): the LoRA delta folded into the layer's weights, recovery modules
hooked beside its linears.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path
from typing import Callable

SPILL_PREFIX = "calora-eval-spill-"


def _spill_folder() -> Path:
    """A spill folder named for this process; those of processes that died (kill -9) are removed."""
    root = Path(tempfile.gettempdir())
    for old in root.glob(f"{SPILL_PREFIX}*"):
        try:
            os.kill(int(old.name[len(SPILL_PREFIX):].split("-", 1)[0]), 0)
        except ProcessLookupError:
            shutil.rmtree(old, ignore_errors=True)
        except (ValueError, PermissionError):
            pass
    return Path(tempfile.mkdtemp(prefix=f"{SPILL_PREFIX}{os.getpid()}-", dir=root))


def logits_per_batch(source, batches: list[dict], patch=None, activation_bytes: int = 2 * 10**9,
                     on_layer: Callable | None = None):
    """Yield (batch index, logits) for every batch, after one streamed pass over the layers."""
    for k, _, logits in outputs_per_batch(source, batches, patch, activation_bytes, on_layer):
        yield k, logits


def outputs_per_batch(source, batches: list[dict], patch=None, activation_bytes: int = 2 * 10**9,
                      on_layer: Callable | None = None):
    """Yield (batch index, final hidden state after the final norm, logits) for every batch, after
    one streamed pass over the layers: what a model's output_hidden_states[-1] and logits are."""
    from calora_cli.arch import final_logits
    from calora_cli.compress.sequential import _release, block_outputs, capture_batches
    from calora_cli.streaming import Spill

    folder = _spill_folder()
    try:
        spill = Spill(activation_bytes, folder)
        source.embed()
        inputs = spill(capture_batches(source.model, batches))
        source.release_embedding()
        for i, block in enumerate(source.blocks()):
            handles = patch(i, block) if patch is not None else []
            previous, inputs = inputs, spill(block_outputs(block, inputs))
            _release(previous)
            for h in handles:
                h.remove()
            if on_layer is not None:
                on_layer(1)
        source.head()
        import torch

        with torch.no_grad():
            for k, (hs, _) in enumerate(inputs):
                yield k, source.model.model.norm(hs), final_logits(source.model, hs)
        _release(inputs)
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def perplexity(source, ids, seq_len: int, stride: int | None, batch_size: int, patch=None, activation_bytes: int = 2 * 10**9,
               on_layer=None):
    from calora_cli.evaluation.perplexity import result, score_windows, window_batches

    plan = window_batches(ids, seq_len, stride, batch_size)
    total, count = 0.0, 0
    for k, logits in logits_per_batch(source, [{"input_ids": x} for x, _ in plan], patch, activation_bytes, on_layer):
        nll, n = score_windows(logits, *plan[k])
        total += nll
        count += n
    return result(total, count)


def accuracy(source, tokenizer, items, max_len: int, patch=None, activation_bytes: int = 2 * 10**9, on_layer=None):
    from calora_cli.evaluation.multiple_choice import TaskResult, choice_batch, decide, score_choices

    plan = [choice_batch(tokenizer, item, max_len) for item in items]
    hits = hits_norm = 0
    batches = [{"input_ids": x, "attention_mask": mask} for x, mask, _ in plan]
    for k, logits in logits_per_batch(source, batches, patch, activation_bytes, on_layer):
        x, _, spans = plan[k]
        hit, hit_norm = decide(items[k], score_choices(logits, x, spans))
        hits += hit
        hits_norm += hit_norm
    n = len(items)
    return TaskResult(hits / n, hits_norm / n, n)
