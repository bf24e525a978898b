"""Pretrain a small Llama on the shipped Shakespeare text and save it in the Hugging Face layout.

Not a calora command: users bring their own models. The recipes use this one as a fast stand-in
for a real LLM. Defaults (4 layers, hidden 256, intermediate 768 so GPTQ group size 128 divides
every linear, 8k BPE) take about 10 minutes on 2 CPU cores.

    python recipes/pretrain.py --data ../shared/data/shakespeare/train.txt --out models/tiny-shakespeare
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", type=Path, required=True, help="training text")
    ap.add_argument("--valid", type=Path, help="held-out text to report perplexity on")
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--vocab", type=int, default=8192)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--intermediate", type=int, default=768)
    ap.add_argument("--heads", type=int, default=4)
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--steps", type=int, default=450)
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)

    import torch

    from calora_cli.artifacts import atomic_output
    from calora_cli.data import batches, pack, tokenize_text, Examples
    from tiny_models import build_tiny_llama, train_bpe_tokenizer
    from calora_cli.train import TrainConfig, train_loop

    t0 = time.time()
    text = args.data.read_text()
    tok = train_bpe_tokenizer([text], args.vocab)
    blocks = pack(tokenize_text(tok, text), args.seq_len)
    print(f"tokenizer: {len(tok)} tokens; data: {blocks.numel():,} tokens in {len(blocks)} blocks ({time.time() - t0:.1f}s)")

    model = build_tiny_llama(
        len(tok), hidden=args.hidden, layers=args.layers, heads=args.heads, intermediate=args.intermediate,
        max_positions=2048, seed=args.seed, pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
    )
    n_params = sum(p.numel() for p in model.parameters())
    print(f"model: {n_params / 1e6:.2f}M parameters")
    cfg = TrainConfig(steps=args.steps, lr=args.lr, batch_size=args.batch_size, seq_len=args.seq_len, seed=args.seed,
                      warmup=min(50, args.steps // 10), weight_decay=0.1)
    torch.manual_seed(args.seed)
    t1 = time.time()
    every = max(1, args.steps // 10)
    state = {"step": 0}

    def report(n: int = 1, loss: float = 0.0) -> None:
        state["step"] += n
        if state["step"] % every == 0 or state["step"] == args.steps:
            print(f"step {state['step']}/{args.steps} loss {loss:.3f} ({time.time() - t1:.0f}s)", flush=True)

    metrics = train_loop(model, model.parameters(), batches(Examples(blocks, torch.ones_like(blocks), blocks), args.batch_size, args.seed), cfg, on_step=report)

    result = {"params": n_params, "steps": args.steps, "final_loss": metrics["final_loss"], "seconds": round(time.time() - t1)}
    if args.valid:
        from calora_cli.evaluation.perplexity import perplexity

        ids = tokenize_text(tok, args.valid.read_text())
        result["valid_perplexity"] = perplexity(model, ids, seq_len=args.seq_len).perplexity
        # a unigram model's perplexity on the same tokens, for scale
        counts = torch.bincount(blocks.flatten(), minlength=len(tok)).double() + 1
        p = counts / counts.sum()
        result["unigram_perplexity"] = math.exp(-p.log()[ids].mean().item())
    with atomic_output(args.out, force=True) as tmp:
        model.save_pretrained(tmp)
        tok.save_pretrained(tmp)
        (tmp / "pretrain.json").write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
