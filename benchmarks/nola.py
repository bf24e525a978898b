"""Time and memory to regenerate a NOLA adapter's bases and expand it, for a LLaMA-7B shape.

32 layers x (q_proj, v_proj), 4096 x 4096, rank 8, k = l = 1024 bases: the adapter calora would
expand for `merge`, `eval` after merging, or `compress --method expand`. Two ways to key the bases:
shared (one set per module type, calora's default: each set is generated once and combined for
all 32 layers in one pass) and per module (a set per layer). Each runs in a fresh process; the
expansion itself is what is timed (no model is needed: coefficients are drawn at random).

    .venv/bin/python benchmarks/nola.py
    .venv/bin/python benchmarks/nola.py --layers 4      # a quick run
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

from measure import rss, run_child

RANK, WIDTH, BASES = 8, 4096, 1024


def child(mode: str, layers: int) -> None:
    import torch

    from calora_cli.methods.nola import layer as nola

    torch.set_num_threads(os.cpu_count() or 1)
    g = torch.Generator().manual_seed(0)
    modules = {}
    for i in range(layers):
        for t in ("q_proj", "v_proj"):
            path = f"model.layers.{i}.self_attn.{t}"
            seeds = nola.seeds_for(0, path, RANK, WIDTH, WIDTH, BASES, BASES, shared=(mode == "shared"))
            modules[path] = (torch.randn(BASES, generator=g), torch.randn(BASES, generator=g), seeds, RANK, WIDTH, WIDTH)
    before = rss("VmRSS")
    t0 = time.perf_counter()
    out = nola.expand_all(modules)
    wall = time.perf_counter() - t0
    assert len(out) == 2 * layers
    print(json.dumps({"wall_s": wall, "peak_rss": rss("VmHWM"), "before_rss": before, "modules": len(out)}))


def main() -> int:
    if len(sys.argv) > 1 and sys.argv[1] == "--child":
        child(sys.argv[2], int(sys.argv[3]))
        return 0
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--layers", type=int, default=32)
    args = ap.parse_args()
    results = {mode: run_child(__file__, mode, str(args.layers)) for mode in ("shared", "per-module")}
    coefficients = 2 * args.layers * 2 * BASES
    print(f"LLaMA-7B shape: {args.layers} layers x q,v ({WIDTH}x{WIDTH}), rank {RANK}, k = l = {BASES}: "
          f"{coefficients} coefficients ({coefficients * 4 / 1e6:.2f} MB in float32); {os.cpu_count()} CPUs\n")
    print("| bases | wall s | peak RSS GB | RSS added by the expansion GB |")
    print("|---|---|---|---|")
    for mode, r in results.items():
        print(f"| {mode} | {r['wall_s']:.1f} | {r['peak_rss'] / 1e9:.2f} | {(r['peak_rss'] - r['before_rss']) / 1e9:.2f} |")
    print(f"\nper-module / shared: {results['per-module']['wall_s'] / results['shared']['wall_s']:.1f}x the time")
    return 0


if __name__ == "__main__":
    sys.exit(main())
