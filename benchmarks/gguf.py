"""`compress --method gguf` against model size, and against llama.cpp's own converter + quantizer.

Synthetic bf16 Llamas of --sizes GB (widths that K-quants take: hidden 1024, MLP 2816), each
converted to Q4_K_M two ways, each in a fresh process watched every 50 ms for its resident memory:
- calora: `calora compress MODEL --method gguf --gguf-type Q4_K_M` (the float GGUF written one
  tensor at a time, then llama.cpp's quantizer);
- llama.cpp: its `convert_hf_to_gguf.py --outtype bf16` (extracted by `make setup`; run through
  tests/llamacpp_convert.py, which answers its pre-tokenizer lookup), then `llama_model_quantize`.
Prints seconds and peak resident memory per run, and the slope of peak memory against model size.

    .venv/bin/python benchmarks/gguf.py --sizes 0.5,1,2,4
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

from measure import print_table
from scale import build, rss_gb

REPO = Path(__file__).resolve().parents[1]
CONVERTER = REPO / ".venv" / "llama.cpp"


def watched(cmd: list[str]) -> tuple[float, float]:
    """Run cmd; (seconds, peak resident GB of it and its children)."""
    t0, peak = time.time(), 0.0
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "HF_HUB_OFFLINE": "1"})
    while proc.poll() is None:
        peak = max(peak, rss_gb(proc.pid))
        time.sleep(0.05)
    out, err = proc.communicate()
    if proc.returncode:
        raise SystemExit(f"{' '.join(cmd[:4])} failed: {err[-2000:]}")
    return time.time() - t0, peak


def slope(xs: list[float], ys: list[float]) -> float:
    mx, my = sum(xs) / len(xs), sum(ys) / len(ys)
    return sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / sum((x - mx) ** 2 for x in xs)


QUANTIZE = "import sys; from calora_cli.gguf.llama import quantize; from pathlib import Path; " \
           "quantize(Path(sys.argv[1]), Path(sys.argv[2]), sys.argv[3])"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", default="0.5,1,2,4", help="model sizes in GB (bf16)")
    ap.add_argument("--type", default="Q4_K_M")
    ap.add_argument("--workdir", type=Path, default=None)
    args = ap.parse_args()
    py = sys.executable
    rows, points = [], {"calora": [], "llama.cpp": []}
    for size in [float(s) for s in args.sizes.split(",")]:
        with tempfile.TemporaryDirectory(prefix="calora-bench-gguf-", dir=args.workdir) as tmp:
            model = build(Path(tmp), size, 1024, 2816)
            gb = sum(f.stat().st_size for f in model.glob("*.safetensors")) / 1e9
            ours = Path(tmp) / "ours"
            s1, p1 = watched([py, "-m", "calora_cli", "compress", str(model), "-o", str(ours), "--method", "gguf",
                              "--gguf-type", args.type, "--json", "-q"])
            ref = Path(tmp) / "ref.gguf"
            s2, p2 = watched([py, str(REPO / "tests" / "llamacpp_convert.py"), str(CONVERTER), str(model),
                              "--outtype", "bf16", "--outfile", str(ref)])
            s3, p3 = watched([py, "-c", QUANTIZE, str(ref), str(Path(tmp) / "ref-q.gguf"), args.type])
            ours_bytes = (ours / "model.gguf").stat().st_size
            ref_bytes = (Path(tmp) / "ref-q.gguf").stat().st_size
            types = json.loads((ours / "calora.json").read_text())["metrics"]["tensor_types"]
            rows.append([f"{gb:.2f}", f"{s1:.1f}", f"{p1:.2f}", f"{s2:.1f} + {s3:.1f} = {s2 + s3:.1f}",
                         f"{max(p2, p3):.2f}", f"{(s2 + s3) / s1:.2f}x", str(ours_bytes == ref_bytes), str(types)])
            points["calora"].append((gb, p1))
            points["llama.cpp"].append((gb, max(p2, p3)))
            print(f"done: {' | '.join(rows[-1])}", file=sys.stderr, flush=True)  # a cut-off run keeps its rows
    print(f"\nbf16 synthetic Llama (hidden 1024, MLP 2816) -> {args.type}; peak resident memory of each process, GB\n")
    print_table(["model GB", "calora s", "calora peak GB", "llama.cpp convert + quantize s", "llama.cpp peak GB",
                 "llama.cpp / calora time", "same file size", "calora's tensor types"], rows)
    if len(rows) > 1:
        print("\nslope of peak memory against model size (GB per GB): "
              + ", ".join(f"{k} {slope([x for x, _ in v], [y for _, y in v]):.3f}" for k, v in points.items()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
