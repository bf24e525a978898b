"""`calora eval`: perplexity on text and multiple-choice accuracy, with or without an adapter."""

from __future__ import annotations

from pathlib import Path

from calora_cli import adapters
from calora_cli.data import read_multiple_choice, read_text, tokenize_text
from calora_cli.errors import CaloraError
from calora_cli.models import load_model, load_tokenizer
from calora_cli.progress import progress
from calora_cli.run import RunOptions, open_model_and_adapter


def evaluate(
    model_dir: Path,
    opts: RunOptions,
    adapter: Path | None = None,
    ppl_file: Path | None = None,
    task_files: list[Path] | None = None,
    seq_len: int = 512,
    stride: int | None = None,
    batch_size: int = 4,
    limit: int | None = None,
) -> dict:
    from calora_cli.evaluation.multiple_choice import accuracy
    from calora_cli.evaluation.perplexity import perplexity

    task_files = task_files or []
    if ppl_file is None and not task_files:
        raise CaloraError("nothing to evaluate: give --ppl FILE.txt and/or --tasks FILE.jsonl")
    if seq_len < 2:
        raise CaloraError(f"--seq-len must be at least 2, got {seq_len}")
    if stride is not None and not 1 <= stride <= seq_len:
        raise CaloraError(f"--stride must lie in [1, --seq-len], got {stride}")
    model_art, adapter_art = open_model_and_adapter(model_dir, adapter, opts)
    text = read_text(ppl_file) if ppl_file is not None else None
    tasks = {Path(f).stem: read_multiple_choice(f)[:limit] for f in task_files}

    tokenizer = load_tokenizer(model_dir)
    model = load_model(model_dir, opts.device, opts.dtype)
    if adapter_art is not None:
        model = adapters.attach(model, adapter_art)
    model.eval()

    result: dict = {"model": str(model_dir), "adapter": str(adapter) if adapter else None}
    if text is not None:
        ids = tokenize_text(tokenizer, text)
        from calora_cli.evaluation.perplexity import windows

        n_windows = len(windows(ids.numel(), seq_len, stride))
        with progress("perplexity", n_windows, opts.show_progress) as advance:
            ppl = perplexity(model, ids, seq_len, stride, batch_size, on_batch=advance)
        result.update(perplexity=ppl.perplexity, tokens=ppl.tokens)
    result["tasks"] = {}
    for name, items in tasks.items():
        with progress(name, len(items), opts.show_progress) as advance:
            r = accuracy(model, tokenizer, items, max_len=seq_len, on_item=advance)
        result["tasks"][name] = {"acc": r.acc, "acc_norm": r.acc_norm, "n": r.n}
    return result
