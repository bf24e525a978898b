"""Streamed pruning against the in-memory path it replaced: seconds, side by side, same outputs.

The in-memory path is the one calora took before the streaming engine: load the whole model
(float32), run the same block engine on its layers in place, save it. The streamed path is
`calora compress` as it is now (one decoder layer read, compressed, written and freed at a time).
Each run is a fresh process; the table reports wall seconds (imports excluded), the ratio, and
whether the two outputs hold the same tensors bit for bit.

    .venv/bin/python benchmarks/stream_speed.py --model ~/.cache/calora/models/smollm2-135m
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

from measure import print_table, run_child

REPO = Path(__file__).resolve().parents[1]
SHK = REPO.parent / "shared" / "data" / "shakespeare"
METHODS = ("wanda", "sparsegpt")


def child(mode: str, method: str, model: Path, out: Path, calib: Path, samples: int, seq_len: int) -> None:
    from calora_cli.run import RunOptions
    from calora_cli.stages.compress import CompressSpec, compress_model

    opts = RunOptions(show_progress=False)
    spec = CompressSpec(method, 0.5, calib=calib, calib_samples=samples, seq_len=seq_len)
    t0 = time.perf_counter()
    if mode == "stream":
        compress_model(model, out, spec, opts)
    else:
        from calora_cli.compress import pruner
        from calora_cli.compress.sequential import prune_sequential
        from calora_cli.data import calibration_batch, read_text
        from calora_cli.models import load_model, load_tokenizer

        tok = load_tokenizer(model)
        calib_ids = calibration_batch(tok, read_text(calib), samples, seq_len, opts.seed)
        m = load_model(model)
        impl = pruner(method)
        list(prune_sequential(m, calib_ids, [0.5] * m.config.num_hidden_layers, impl.prune, impl.NEEDS, None))
        m.save_pretrained(out)
    print(json.dumps({"wall_s": time.perf_counter() - t0, "peak_rss": 0, "imports_rss": 0}))


def same_tensors(a: Path, b: Path) -> bool:
    from calora_cli.tensor_io import load_tensors

    ta = load_tensors(sorted(a.glob("*.safetensors")), lambda n: True)
    tb = load_tensors(sorted(b.glob("*.safetensors")), lambda n: True)
    tb.setdefault("lm_head.weight", tb.get("model.embed_tokens.weight"))  # save_pretrained may drop a tied head
    return all(name in tb and ta[name].float().equal(tb[name].float()) for name in ta)


def main() -> int:
    if len(sys.argv) > 1 and sys.argv[1] == "--child":
        mode, method, model, out, calib, samples, seq_len = sys.argv[2:9]
        child(mode, method, Path(model), Path(out), Path(calib), int(samples), int(seq_len))
        return 0
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", type=Path, default=Path.home() / ".cache/calora/models/smollm2-135m")
    ap.add_argument("--calib", type=Path, default=SHK / "train.txt")
    ap.add_argument("--calib-samples", type=int, default=32)
    ap.add_argument("--seq-len", type=int, default=256)
    args = ap.parse_args()
    rows = []
    with tempfile.TemporaryDirectory(prefix="calora-bench-speed-") as tmp:
        for method in METHODS:
            secs = {}
            for mode in ("memory", "stream"):
                out = Path(tmp) / f"{method}-{mode}"
                r = run_child(__file__, mode, method, str(args.model), str(out), str(args.calib),
                              str(args.calib_samples), str(args.seq_len))
                secs[mode] = r["wall_s"]
                print(f"{method} {mode}: {secs[mode]:.1f} s", file=sys.stderr, flush=True)
            rows.append((method, secs["memory"], secs["stream"], same_tensors(Path(tmp) / f"{method}-stream",
                                                                             Path(tmp) / f"{method}-memory")))
    print(f"\nmodel {args.model.name} · calibration {args.calib_samples}x{args.seq_len} tokens · 50% unstructured\n")
    print_table(["method", "in memory (s)", "streamed (s)", "streamed / in memory", "same tensors"],
                [[m, f"{mem:.1f}", f"{st:.1f}", f"{st / mem:.2f}x", "yes" if same else "NO"] for m, mem, st, same in rows])
    return 0


if __name__ == "__main__":
    sys.exit(main())
