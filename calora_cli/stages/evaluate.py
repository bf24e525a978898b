"""`calora eval`: perplexity on text and multiple-choice accuracy, with or without an adapter."""

from __future__ import annotations

import json
import math
from pathlib import Path

from calora_cli import adapters
from calora_cli.data import read_multiple_choice, read_text, tokenize_text
from calora_cli.errors import CaloraError
from calora_cli.models import load_model, load_tokenizer
from calora_cli.progress import progress
from calora_cli.run import RunOptions, available_memory, open_model, open_model_and_adapter, resident_bytes

ENGINES = ("torch", "llama.cpp")


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
    harness: list[str] | None = None,
    harness_include: Path | None = None,
    num_fewshot: int | None = None,
    stream: bool | None = None,
    activation_gb: float = 2.0,
    engine: str = "torch",
    more_adapters: list[Path] | None = None,
) -> dict:
    """Evaluate a model (with an adapter). `stream`: read the model one decoder layer at a time
    (evaluation/streamed.py) instead of loading it whole; None: stream when the whole model would
    take more than half the memory available. `engine` llama.cpp: a GGUF model scored by llama.cpp
    itself, with `adapter` and `more_adapters` applied at once."""
    from calora_cli.evaluation.multiple_choice import accuracy
    from calora_cli.evaluation.perplexity import perplexity

    task_files = task_files or []
    if ppl_file is None and not task_files and not harness:
        raise CaloraError("nothing to evaluate: give --ppl FILE.txt, --tasks FILE.jsonl and/or --harness TASKS")
    if num_fewshot is not None and num_fewshot < 0:
        raise CaloraError(f"--num-fewshot must be >= 0, got {num_fewshot}")
    if seq_len < 2:
        raise CaloraError(f"--seq-len must be at least 2, got {seq_len}")
    if stride is not None and not 1 <= stride <= seq_len:
        raise CaloraError(f"--stride must lie in [1, --seq-len], got {stride}")
    if engine not in ENGINES:
        raise CaloraError(f"--engine must be one of {', '.join(ENGINES)}, got {engine!r}")
    if more_adapters and engine != "llama.cpp":
        raise CaloraError("several --adapter at once run in llama.cpp (--engine llama.cpp); merge them for this engine "
                          "(calora merge BASE --adapter A --adapter B)")
    if engine == "llama.cpp":
        if harness:
            raise CaloraError("--harness runs on calora's own engine; leave out --engine llama.cpp")
        return _llamacpp(model_dir, [a for a in [adapter, *(more_adapters or [])] if a is not None], ppl_file,
                         task_files, seq_len, stride, limit, opts)
    model_art, adapter_art = open_model_and_adapter(model_dir, adapter, opts)
    text = read_text(ppl_file) if ppl_file is not None else None
    tasks = {Path(f).stem: read_multiple_choice(f)[:limit] for f in task_files}
    manager = None
    if harness:
        from calora_cli.evaluation import harness as bridge

        manager = bridge.check_tasks(harness, harness_include)  # before the model loads: bad names fail fast

    tokenizer = load_tokenizer(model_art.path)
    quantized = bool(json.loads((model_art.path / "config.json").read_text()).get("quantization_config"))
    if stream is None:
        stream = not quantized and resident_bytes(model_art, opts.dtype) > available_memory() // 2
    if stream:
        lm_eval_args = (harness, manager, num_fewshot, limit) if harness else None
        return _streamed(model_art, adapter_art, tokenizer, text, tasks, seq_len, stride, batch_size, activation_gb,
                         lm_eval_args, opts)
    model = load_model(model_art.path, opts.device, opts.dtype)
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
        result.update(_text_scores(ppl, tokenizer, text, ids, seq_len, stride))
    result["tasks"] = {}
    for name, items in tasks.items():
        with progress(name, len(items), opts.show_progress) as advance:
            r = accuracy(model, tokenizer, items, max_len=seq_len, on_item=advance)
        result["tasks"][name] = {"acc": r.acc, "acc_norm": r.acc_norm, "n": r.n}
    if harness:
        with progress("lm-eval", None, opts.show_progress):
            lm = bridge.resident_lm(model, tokenizer, batch_size, seq_len)
            result["harness"] = bridge.run(lm, harness, manager, num_fewshot, limit, opts.seed)
    return result


def _llamacpp(model_dir: Path, adapter_paths: list[Path], ppl_file, task_files, seq_len: int, stride, limit,
              opts: RunOptions) -> dict:
    """Scores from llama.cpp's forward pass and tokenizer (evaluation/llamacpp.py). An adapter is a
    llama.cpp LoRA .gguf file, or a peft adapter written as one (as `calora export` writes it) into
    a temporary folder first."""
    import tempfile

    from calora_cli.artifacts import open_artifact
    from calora_cli.evaluation import llamacpp
    from calora_cli.gguf.adapter import check_lora_file, exportable_factors, write_lora
    from calora_cli.gguf.llama import Engine, TokenizerView
    from calora_cli.run import check_fits

    model_art = open_model(model_dir)
    if not model_art.gguf:
        raise CaloraError(f"--engine llama.cpp runs a GGUF model; {model_art.path} is not one (make one with "
                          "calora compress --method gguf or calora export)")
    config = json.loads((model_art.path / "config.json").read_text())
    from calora_cli.gguf.reader import GGUFTensors

    GGUFTensors(model_art.weights[0], config).close()  # architecture, blocks and vocabulary against config.json
    text = read_text(ppl_file) if ppl_file is not None else None
    tasks = {Path(f).stem: read_multiple_choice(f)[:limit] for f in task_files or []}
    with tempfile.TemporaryDirectory(prefix="calora-lora-") as scratch:
        files = []
        for k, a in enumerate(adapter_paths):
            if Path(a).is_file():
                check_lora_file(Path(a), config)
                files.append(Path(a))
                continue
            art = open_artifact(a, expect="adapter", role="adapter")
            check_fits(art, model_art, opts)
            files.append(Path(scratch) / f"{k}.gguf")
            write_lora(files[-1], exportable_factors(art), config, art.path.name)
        engine = Engine(model_art.weights[0], files, n_ctx=seq_len)
        try:
            pad = load_tokenizer(model_art.path).pad_token_id
            tok = TokenizerView(engine, pad)
            out: dict = {"model": str(model_dir), "adapter": [str(a) for a in adapter_paths] or None, "engine": "llama.cpp"}
            if text is not None:
                ids = engine.tokenize(text)
                import torch

                with progress("perplexity (llama.cpp)", len(llamacpp.windows(len(ids), seq_len, stride)),
                              opts.show_progress) as advance:
                    ppl = llamacpp.perplexity(engine, ids, seq_len, stride, on_window=advance)
                out.update(_text_scores(ppl, tok, text, torch.tensor(ids), seq_len, stride))
            out["tasks"] = {}
            for name, items in tasks.items():
                with progress(f"{name} (llama.cpp)", len(items), opts.show_progress) as advance:
                    r = llamacpp.accuracy(engine, tok, items, seq_len, on_item=advance)
                out["tasks"][name] = {"acc": r.acc, "acc_norm": r.acc_norm, "n": r.n}
        finally:
            engine.close()
    return out


def _streamed(model_art, adapter_art, tokenizer, text, tasks, seq_len, stride, batch_size, activation_gb, lm_eval_args,
              opts) -> dict:
    """The same scores, each decoder layer read once per pass (a pass per text, per task, and per
    lm-eval task and request kind). `lm_eval_args`: (tasks, manager, num_fewshot, limit) or None."""
    from calora_cli.evaluation import streamed
    from calora_cli.runtime import resolve_device, torch_dtype
    from calora_cli.streaming import LayerSource

    patch = adapters.block_patcher(adapter_art) if adapter_art is not None else None
    bound = int(activation_gb * 1e9)
    result: dict = {"model": str(model_art.path), "adapter": str(adapter_art.path) if adapter_art else None, "streamed": True}
    source = LayerSource(model_art.path, model_art.weights, torch_dtype(opts.dtype), resolve_device(opts.device))
    try:
        n_layers = len(source.layers)
        if text is not None:
            ids = tokenize_text(tokenizer, text)
            with progress("perplexity (streamed)", n_layers, opts.show_progress) as advance:
                ppl = streamed.perplexity(source, ids, seq_len, stride, batch_size, patch, bound, on_layer=advance)
            result.update(_text_scores(ppl, tokenizer, text, ids, seq_len, stride))
        result["tasks"] = {}
        for name, items in tasks.items():
            with progress(f"{name} (streamed)", n_layers, opts.show_progress) as advance:
                r = streamed.accuracy(source, tokenizer, items, seq_len, patch, bound, on_layer=advance)
            result["tasks"][name] = {"acc": r.acc, "acc_norm": r.acc_norm, "n": r.n}
        if lm_eval_args is not None:
            from calora_cli.evaluation import harness as bridge

            names, manager, num_fewshot, limit = lm_eval_args
            with progress("lm-eval (streamed)", None, opts.show_progress):
                lm = bridge.streamed_lm(lambda batches: streamed.logits_per_batch(source, batches, patch, bound), tokenizer,
                                        batch_size, seq_len)
                result["harness"] = bridge.run(lm, names, manager, num_fewshot, limit, opts.seed)
    finally:
        source.close()
    return result


def _text_scores(ppl, tokenizer, text: str, ids, seq_len: int, stride: int | None) -> dict:
    """Token perplexity, and bits per byte and byte perplexity over the bytes the windows predict."""
    scored_bytes = predicted_bytes(tokenizer, text, ids, seq_len, stride)
    return {"perplexity": ppl.perplexity, "tokens": ppl.tokens, "bytes": scored_bytes,
            "bits_per_byte": ppl.nll / (scored_bytes * math.log(2)), "byte_perplexity": math.exp(ppl.nll / scored_bytes)}


def predicted_bytes(tokenizer, text: str, ids, seq_len: int, stride: int | None) -> int:
    """UTF-8 bytes of the tokens the perplexity windows predict: the whole text's, less those of the
    tokens no window predicts (the first of each window that has no context before it).

    Bits per byte and byte perplexity are then lm-eval's (NLL in bits, or nats, per byte of the
    predicted text), comparable across tokenizers."""
    from calora_cli.evaluation.perplexity import windows

    scored = set()
    for w in windows(ids.numel(), seq_len, stride):
        scored.update(range(w.score_from, w.end))
    unscored = [i for i in range(ids.numel()) if i not in scored]
    try:
        offsets = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)["offset_mapping"]
        lost = sum(len(text[offsets[i][0]:offsets[i][1]].encode("utf-8")) for i in unscored)
    except (NotImplementedError, KeyError, TypeError):  # a slow tokenizer has no offsets: decode those tokens
        lost = sum(len(tokenizer.decode([int(ids[i])]).encode("utf-8")) for i in unscored)
    return max(1, len(text.encode("utf-8")) - lost)
