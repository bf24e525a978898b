"""Loading a model for FSDP: whole on every process then sharded, against straight into shards.

Builds an fp32 Llama of about --size GB (the memory benchmark's model) and, under torchrun with N
gloo processes on CPU, loads it both ways in fresh processes, side by side in one run:

- whole, then sharded: `load_model` on every process, then FSDP2 `fully_shard` (what calora did
  before; every process needs one whole model at load time);
- straight into shards: `load_model(shardable=True)` (a skeleton with empty weights, sharded on
  the meta device, each process reading only its rows of each tensor).

Prints each process's peak resident set above its imports, against the model's size.

    .venv/bin/python benchmarks/fsdp_load.py                 # 1 GB, 2 processes
    .venv/bin/python benchmarks/fsdp_load.py --size 2.2 --processes 2
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from measure import rss

WAYS = {"whole": "whole, then sharded", "shards": "straight into shards"}


def child(way: str, base: Path) -> None:
    import torch

    from calora_cli import distributed
    from calora_cli.models import load_model
    from calora_cli.runtime import import_stack

    distributed.setup(torch.device("cpu"))
    import_stack()  # the ML stack's imports (a third of a GB) belong to the baseline, not to loading
    import accelerate  # noqa: F401
    imports = rss("VmRSS")
    t0 = time.perf_counter()
    model = load_model(base, shardable=way == "shards")
    distributed.shard_model(model, torch.device("cpu"))
    local = sum(p.to_local().numel() * p.element_size() for p in model.parameters())
    print(json.dumps({"rank": distributed.rank(), "wall_s": time.perf_counter() - t0, "peak": rss("VmHWM") - imports,
                      "held": local}))


def run(way: str, base: Path, processes: int) -> list[dict]:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "CALORA_DISTRIBUTED": "fsdp", "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={processes}",
           __file__, "--child", way, str(base)]
    r = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=Path(__file__).parent)
    if r.returncode:
        sys.exit(f"{way} failed:\n{r.stderr[-2000:]}")
    return [json.loads(line) for line in r.stdout.splitlines() if line.startswith("{")]


def main() -> int:
    if len(sys.argv) > 1 and sys.argv[1] == "--child":
        child(sys.argv[2], Path(sys.argv[3]))
        return 0
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", type=float, default=1.0, help="model size in GB (fp32)")
    ap.add_argument("--processes", type=int, default=2)
    ap.add_argument("--workdir", type=Path, default=None)
    args = ap.parse_args()
    sys.path.insert(0, str(Path(__file__).parent))
    from memory import build

    with tempfile.TemporaryDirectory(prefix="calora-bench-fsdp-", dir=args.workdir) as tmp:
        base, _ = build(Path(tmp), args.size)
        model_gb = sum(f.stat().st_size for f in base.glob("*.safetensors")) / 1e9
        results = {way: run(way, base, args.processes) for way in WAYS}
    print(f"Loading a {model_gb:.2f} GB model for FSDP on {args.processes} CPU processes (gloo): peak RSS above "
          "imports per process, GB\n")
    print("| load | peak, worst process | x model size | weights held per process | wall s |")
    print("|---|---|---|---|---|")
    for way, rows in results.items():
        peak = max(r["peak"] for r in rows) / 1e9
        held = max(r["held"] for r in rows) / 1e9
        print(f"| {WAYS[way]} | {peak:.2f} | {peak / model_gb:.2f} | {held:.2f} | {max(r['wall_s'] for r in rows):.1f} |")
    whole, shards = (max(r["peak"] for r in results[w]) for w in WAYS)
    print(f"\nstraight into shards needs {whole / shards:.2f}x less peak memory per process")
    return 0


if __name__ == "__main__":
    sys.exit(main())
