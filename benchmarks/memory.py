"""Peak memory against model size: compress (each pruning family, GPTQ, joint prune + GPTQ), eval
(whole, streamed, streamed on the GPTQ output, lm-eval on the streamed model), the teacher pass,
merge and info --verify.

Builds Llama models of about --sizes GB (random weights, sharded, --dtype float32 or bfloat16), a
rank-16 LoRA for each, and runs every stage in a fresh process, reading its peak resident set
(VmHWM) and its resident set after imports. The slope of (peak - imports) against model size says
how memory grows: ~1 for stages that hold the model once (eval), ~0 for streaming ones (pruning
one decoder layer at a time, merge, verify), 2-3 for a bf16 model upcast whole.

    .venv/bin/python benchmarks/memory.py                      # 0.5, 1, 2 and 4 GB, fp32
    .venv/bin/python benchmarks/memory.py --dtype bfloat16
    .venv/bin/python benchmarks/memory.py --sizes 0.1,0.2,0.4  # quick
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

from measure import rss, run_child

REPO = Path(__file__).resolve().parents[1]
TEXT = REPO.parent / "shared" / "data" / "shakespeare" / "plays" / "histories--richard-ii.txt"
STAGES = ("magnitude", "wanda", "sparsegpt", "gptq", "wanda-gptq", "eval", "eval-stream", "eval-gptq", "harness-stream",
          "teacher", "merge", "verify")


def build(root: Path, size_gb: float, dtype: str = "float32") -> tuple[Path, Path]:
    sys.path.insert(0, str(Path(__file__).parent))
    from merge import build as build_model  # same model and LoRA as the merge benchmark

    # a narrower model than the merge benchmark's, so every size is several layers deep and the
    # embedding (fixed) is a small part: the sizes differ by depth alone
    base, lora = build_model(root, size_gb, hidden=1024, dtype=dtype)
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "recipes"))
    from tiny_models import train_bpe_tokenizer

    # a tokenizer so eval can run (the vocabulary is the model's 32000 ids, trained on the text)
    tok = train_bpe_tokenizer([TEXT.read_text()], 32000)
    tok.save_pretrained(base)
    return base, lora


def child(stage: str, base: Path, lora: Path, out: Path) -> None:
    import torch  # noqa: F401  (counted in the imports baseline for every stage)

    from calora_cli.artifacts import open_artifact, verify
    from calora_cli.run import RunOptions
    from calora_cli.stages.compress import CompressSpec, compress_model
    from calora_cli.stages.evaluate import evaluate
    from calora_cli.merge import merge

    opts = RunOptions(show_progress=False, allow_base_mismatch=True)
    imports = rss("VmRSS")
    t0 = time.perf_counter()
    calib = {"calib": TEXT, "calib_samples": 8, "seq_len": 128}
    short = out.with_suffix(".txt")
    short.write_text(TEXT.read_text()[:20000])  # a few thousand tokens: memory, not throughput, is measured
    if stage in ("magnitude", "wanda", "sparsegpt"):
        compress_model(base, out, CompressSpec(stage, 0.5, **({} if stage == "magnitude" else calib)), opts)
    elif stage == "gptq":
        compress_model(base, out, CompressSpec("gptq", bits=4, group_size=128, **calib), opts)
    elif stage == "wanda-gptq":
        compress_model(base, out, CompressSpec("wanda", 0.5, then="gptq", bits=4, group_size=128, **calib), opts)
    elif stage in ("eval", "eval-stream"):
        evaluate(base, opts, ppl_file=short, seq_len=256, stream=stage == "eval-stream")
    elif stage == "harness-stream":  # lm-eval's multiple choice (the shipped SocialIQa items) on the streamed model
        evaluate(base, opts, harness=["socialiqa_local"], harness_include=REPO / "recipes" / "tasks", limit=24,
                 seq_len=256, stream=True)
    elif stage == "eval-gptq":  # the "gptq" stage's output, read layer by layer
        evaluate(out.with_name("out-gptq"), opts, ppl_file=short, seq_len=256, stream=True)
    elif stage == "teacher":  # recover/sparsify-adapter --cache-teacher: the teacher + LoRA in one streamed pass
        from calora_cli.data import load_examples
        from calora_cli.distill import DistillSpec, cache_teacher
        from calora_cli.models import load_tokenizer

        examples = load_examples(short, load_tokenizer(base), 128)
        cache_teacher(open_artifact(base), open_artifact(lora), examples, DistillSpec(), 8, opts)
    elif stage == "merge":
        merge(base, [lora], out, opts)
    else:
        assert verify(open_artifact(base))["ok"]
    print(json.dumps({"wall_s": time.perf_counter() - t0, "peak_rss": rss("VmHWM"), "imports_rss": imports}))


def slope(xs: list[float], ys: list[float]) -> float:
    mx, my = sum(xs) / len(xs), sum(ys) / len(ys)
    return sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / sum((x - mx) ** 2 for x in xs)


def main() -> int:
    if len(sys.argv) > 1 and sys.argv[1] == "--child":
        child(sys.argv[2], *map(Path, sys.argv[3:6]))
        return 0
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", default="0.5,1.0,2.0,4.0", help="model sizes in GB (on disk)")
    ap.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
    ap.add_argument("--stages", default=",".join(STAGES))
    ap.add_argument("--workdir", type=Path, default=None)
    args = ap.parse_args()
    sizes, rows = [float(s) for s in args.sizes.split(",")], []
    stages = args.stages.split(",")
    for size in sizes:
        with tempfile.TemporaryDirectory(prefix="calora-bench-mem-", dir=args.workdir) as tmp:
            base, lora = build(Path(tmp), size, args.dtype)
            model_bytes = sum(f.stat().st_size for f in base.glob("*.safetensors"))
            row = {"model_gb": model_bytes / 1e9}
            for stage in stages:
                r = run_child(__file__, stage, str(base), str(lora), str(Path(tmp) / f"out-{stage}"))
                row[stage] = (r["peak_rss"] - r["imports_rss"]) / 1e9
                row[f"{stage}_wall"] = r["wall_s"]
                print(f"{row['model_gb']:.2f} GB {stage}: {row[stage]:.2f} GB above imports, {r['wall_s']:.0f} s",
                      file=sys.stderr, flush=True)  # a row at a time: a long run cut short still tells
            rows.append(row)
    print(f"Peak RSS above the imports, GB (wall s), each stage in a fresh process; {args.dtype} models\n")
    print("| model GB | " + " | ".join(stages) + " |")
    print("|---|" + "---|" * len(stages))
    for row in rows:
        print(f"| {row['model_gb']:.2f} | " + " | ".join(f"{row[s]:.2f} ({row[s + '_wall']:.0f} s)" for s in stages) + " |")
    xs = [r["model_gb"] for r in rows]
    if len(set(xs)) < 2:  # one size (a single point added to an earlier table): no slope to fit
        return 0
    print("\nslope of peak memory against model size: " + ", ".join(f"{s} {slope(xs, [r[s] for r in rows]):.2f}" for s in stages))
    return 0


if __name__ == "__main__":
    sys.exit(main())
