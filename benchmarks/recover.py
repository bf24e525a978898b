"""Throughput of `calora recover` against plain `calora train` on the same compressed model.

Both run in this process, one after the other, with the same data, batch, sequence length and
steps, so the ratio is measured side by side. Recovery adds a frozen teacher forward pass and a
recovery module beside every block linear; the ratio is what that costs.

    .venv/bin/python benchmarks/recover.py            # the quickstart model (make -C recipes tiny)
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SHK = REPO.parent / "shared" / "data" / "shakespeare"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", type=Path, default=Path.home() / ".cache/calora/models/tiny-shakespeare")
    ap.add_argument("--data", type=Path, default=SHK / "train-histories.txt")
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--seq-len", type=int, default=256)
    args = ap.parse_args()
    if not (args.model / "config.json").exists():
        sys.exit(f"no model at {args.model}: run `make -C recipes tiny` first, or pass --model")

    from calora_cli.run import RunOptions
    from calora_cli.stages.compress import CompressSpec, compress_model
    from calora_cli.stages.finetune import train_lora
    from calora_cli.methods.ca_lora.inherit import inherit
    from calora_cli.methods.ca_lora.recover import RecoverSpec, recover
    from calora_cli.train import TrainConfig

    opts = RunOptions(show_progress=False, force=True)
    cfg = TrainConfig(steps=args.steps, lr=1e-3, batch_size=args.batch_size, seq_len=args.seq_len)
    tokens = args.steps * args.batch_size * args.seq_len
    rows = []
    with tempfile.TemporaryDirectory(prefix="calora-bench-") as tmp:
        tmp = Path(tmp)
        lora = tmp / "lora"
        train_lora(args.model, args.data, lora, TrainConfig(steps=2, seq_len=args.seq_len), opts)
        small = compress_model(args.model, tmp / "wanda", CompressSpec("wanda", 0.5, calib=args.data, seq_len=args.seq_len), opts)
        inherit(lora, Path(small["output"]), tmp / "inherited", opts)
        runs = [
            ("train (new LoRA on the compressed model)", lambda out: train_lora(tmp / "wanda", args.data, out, cfg, opts)),
            ("recover, inheritance only (no teacher, no recovery)",
             lambda out: recover(tmp / "inherited", tmp / "wanda", args.model, lora, args.data, out, cfg,
                                 RecoverSpec(recovery_dim=0, distill_weight=0), opts)),
            ("recover (CA-LoRA: teacher + recovery modules)",
             lambda out: recover(tmp / "inherited", tmp / "wanda", args.model, lora, args.data, out, cfg, RecoverSpec(), opts)),
        ]
        for i, (name, fn) in enumerate(runs):
            t0 = time.time()
            fn(tmp / f"out{i}")
            rows.append((name, time.time() - t0))
    base = rows[0][1]
    print(f"\nmodel {args.model} · Wanda 50% · {args.steps} steps of {args.batch_size}x{args.seq_len} tokens · "
          f"{os.cpu_count()} CPU cores (seconds include loading the models)\n")
    print("| run | seconds | tokens/s | vs train |")
    print("|---|---|---|---|")
    for name, secs in rows:
        print(f"| {name} | {secs:.1f} | {tokens / secs:.0f} | {base / secs:.2f}x |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
