"""Compression benchmark: method x (time, peak RSS, size, perplexity before/after), one run.

Each method runs as its own `calora compress` process, so its peak RSS is its own (os.wait4).
With --llmcompressor-python, llm-compressor's Wanda and SparseGPT run on the same model and the
same calibration windows, in that interpreter (it pins an older transformers, so it lives in a
separate venv):

    python3 -m venv /tmp/llmc && /tmp/llmc/bin/pip install torch==2.13.0 llmcompressor==0.14.0.1
    .venv/bin/python benchmarks/compress.py --llmcompressor-python /tmp/llmc/bin/python

With --gptqmodel, GPTQModel (7.6, through transformers' GPTQConfig and optimum: the route calora
took before its own solver) quantizes the same model on the same calibration windows for each GPTQ
row, in a child process of this interpreter, for perplexity and speed side by side:

    .venv/bin/python benchmarks/compress.py --model ~/.cache/calora/models/smollm2-135m \
        --methods "gptq 4-bit g64" --gptqmodel

Defaults use the quickstart's pretrained model (make -C recipes tiny) and the shipped text.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SHK = REPO.parent / "shared" / "data" / "shakespeare"
CALORA = [sys.executable, "-m", "calora_cli"]

METHODS = {
    "magnitude 50%": ["--method", "magnitude", "--sparsity", "0.5"],
    "wanda 50%": ["--method", "wanda", "--sparsity", "0.5"],
    "wanda 50% rmi": ["--method", "wanda", "--sparsity", "0.5", "--allocation", "rmi"],
    "sparsegpt 50%": ["--method", "sparsegpt", "--sparsity", "0.5"],
    "wanda 2:4": ["--method", "wanda", "--pattern", "2:4"],
    "sparsegpt 2:4": ["--method", "sparsegpt", "--pattern", "2:4"],
    "gptq 4-bit g64": ["--method", "gptq", "--bits", "4", "--group-size", "64"],
    "gptq 4-bit g128": ["--method", "gptq", "--bits", "4", "--group-size", "128"],
    "gptq 8-bit g128": ["--method", "gptq", "--bits", "8", "--group-size", "128"],
    "nf4": ["--method", "nf4"],
    "rtn-int8": ["--method", "rtn-int8"],
    "sparsegpt 2:4 + gptq 4-bit": ["--method", "sparsegpt", "--pattern", "2:4", "--then", "gptq", "--group-size", "128"],
}


def run_measured(cmd: list[str]) -> tuple[float, float, str]:
    """Run cmd in a child and return (seconds, its own peak RSS in MiB, stdout)."""
    t0 = time.time()
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # child: stdout to the pipe, stderr to /dev/null, then exec
        os.close(r)
        os.dup2(w, 1)
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, 2)
        os.execvp(cmd[0], cmd)
    os.close(w)
    chunks = []
    with os.fdopen(r) as f:
        chunks.append(f.read())
    _, status, usage = os.wait4(pid, 0)
    if os.waitstatus_to_exitcode(status) != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed with exit code {os.waitstatus_to_exitcode(status)}")
    return time.time() - t0, usage.ru_maxrss / 1024, "".join(chunks)


def perplexity(model: Path, text: Path, seq_len: int) -> float:
    """Streamed (each layer read once, GPTQ dequantized exactly) where calora can read the checkpoint
    layer by layer: the same numbers as a whole-model evaluation, minutes faster than the CPU GPTQ kernel."""
    q = json.loads((model / "config.json").read_text()).get("quantization_config") or {}
    stream = ["--stream"] if q.get("quant_method") in (None, "gptq") else []
    _, _, out = run_measured([*CALORA, "eval", str(model), "--ppl", str(text), "--seq-len", str(seq_len), *stream,
                              "--json", "-q"])
    return json.loads(out)["perplexity"]


def sparsity_by_group(path: Path) -> str:
    """Share of exact zeros per tensor group (embedding, attention, MLP, other), to show what a tool pruned."""
    from safetensors import safe_open

    zeros: dict[str, list[int]] = {}
    for f in sorted(path.rglob("*.safetensors")):
        with safe_open(f, framework="pt") as sf:
            for name in sf.keys():
                t = sf.get_tensor(name)
                group = ("embedding" if "embed" in name or "lm_head" in name else "attention" if "self_attn" in name
                         else "mlp" if ".mlp." in name else "other")
                z = zeros.setdefault(group, [0, 0])
                z[0] += int((t == 0).sum())
                z[1] += t.numel()
    return ", ".join(f"{g} {z / n:.0%}" for g, (z, n) in sorted(zeros.items()))


def size_mb(path: Path) -> float:
    return sum(p.stat().st_size for p in path.rglob("*.safetensors")) / 2**20


LLMC = r'''
import json, sys, torch
from transformers import AutoModelForCausalLM, AutoTokenizer
from llmcompressor import oneshot
from llmcompressor.modifiers.pruning import WandaPruningModifier
from llmcompressor.modifiers.obcq import SparseGPTModifier
from datasets import Dataset
src, out, method, windows = sys.argv[1], sys.argv[2], sys.argv[3], json.load(open(sys.argv[4]))
model = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32)
tok = AutoTokenizer.from_pretrained(src)
ds = Dataset.from_dict({"input_ids": windows, "attention_mask": [[1] * len(w) for w in windows]})
mod = {"wanda": WandaPruningModifier, "sparsegpt": SparseGPTModifier}[method]
# the decoder blocks' linears only, by module path: with targets=["Linear"] and ignore=["lm_head"],
# the tied embedding's name (model.embed_tokens, shared with lm_head) is not what the ignore matches
recipe = mod(sparsity=0.5, mask_structure="0:0", targets=[r"re:.*layers\.\d+\..*_proj$"], ignore=["lm_head"])
oneshot(model=model, dataset=ds, recipe=recipe, num_calibration_samples=len(windows), max_seq_length=len(windows[0]))
model.save_pretrained(out); tok.save_pretrained(out)
'''


# GPTQModel's GPTQ as transformers calls it; the windows go in tokenized, so both tools see the same tokens
GPTQMODEL = r'''
import json, os, sys, torch
os.environ.setdefault("GPTQMODEL_DISABLE_PACK_EXT", "1")
from transformers import AutoModelForCausalLM, AutoTokenizer, GPTQConfig
src, out, bits, group, windows = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), json.load(open(sys.argv[5]))
data = [{"input_ids": torch.tensor([w]), "attention_mask": torch.ones(1, len(w), dtype=torch.long)} for w in windows]
cfg = GPTQConfig(bits=bits, group_size=group, dataset=data, desc_act=False, sym=True)
model = AutoModelForCausalLM.from_pretrained(src, quantization_config=cfg, device_map="cpu", dtype=torch.float32)
model.config.quantization_config.dataset = None
model.save_pretrained(out); AutoTokenizer.from_pretrained(src).save_pretrained(out)
'''


def _windows(args, tmp: str) -> Path:
    from calora_cli.data import calibration_batch, read_text
    from calora_cli.models import load_tokenizer

    wfile = Path(tmp) / "windows.json"
    if not wfile.exists():
        windows = calibration_batch(load_tokenizer(args.model), read_text(args.calib), args.calib_samples, args.seq_len, 0)
        wfile.write_text(json.dumps(windows.tolist()))
    return wfile


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", type=Path, default=Path.home() / ".cache/calora/models/tiny-shakespeare")
    ap.add_argument("--calib", type=Path, default=SHK / "train.txt")
    ap.add_argument("--eval", type=Path, default=SHK / "valid.txt")
    ap.add_argument("--calib-samples", type=int, default=32)
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--methods", default=",".join(METHODS), help="comma list of the rows to run")
    ap.add_argument("--llmcompressor-python", type=Path, help="python of a venv with llmcompressor installed")
    ap.add_argument("--gptqmodel", action="store_true", help="GPTQModel beside each GPTQ row (same windows)")
    args = ap.parse_args()
    if not (args.model / "config.json").exists():
        sys.exit(f"no model at {args.model}: run `make -C recipes tiny` first, or pass --model")

    base_ppl = perplexity(args.model, args.eval, args.seq_len)
    rows = [("uncompressed", "-", None, size_mb(args.model), base_ppl, sparsity_by_group(args.model))]
    common = ["--calib", str(args.calib), "--calib-samples", str(args.calib_samples), "--seq-len", str(args.seq_len)]
    with tempfile.TemporaryDirectory(prefix="calora-bench-") as tmp:
        for name in args.methods.split(","):
            out = Path(tmp) / name.replace(" ", "_").replace("%", "").replace(":", "of").replace("+", "then")
            secs, rss, _ = run_measured([*CALORA, "compress", str(args.model), "-o", str(out), *METHODS[name], *common, "--json", "-q"])
            rows.append((f"calora {name}", f"{secs:.1f}", rss, size_mb(out), perplexity(out, args.eval, args.seq_len),
                         sparsity_by_group(out) if "gptq" not in name and name not in ("nf4", "rtn-int8") else "-"))
            print(f"done: {name}", file=sys.stderr)
            argv = METHODS[name]
            if args.gptqmodel and argv[:2] == ["--method", "gptq"]:
                bits, group = argv[argv.index("--bits") + 1], argv[argv.index("--group-size") + 1]
                ref = Path(tmp) / f"gptqmodel-{bits}-{group}"
                secs, rss, _ = run_measured([sys.executable, "-c", GPTQMODEL, str(args.model), str(ref), bits, group,
                                             str(_windows(args, tmp))])
                rows.append((f"GPTQModel {name}", f"{secs:.1f}", rss, size_mb(ref), perplexity(ref, args.eval, args.seq_len), "-"))
                print(f"done: GPTQModel {name}", file=sys.stderr)
        if args.llmcompressor_python:
            wfile = _windows(args, tmp)
            for method in ("wanda", "sparsegpt"):
                out = Path(tmp) / f"llmc-{method}"
                secs, rss, _ = run_measured([str(args.llmcompressor_python), "-c", LLMC, str(args.model), str(out), method, str(wfile)])
                rows.append((f"llm-compressor {method} 50%", f"{secs:.1f}", rss, size_mb(out),
                             perplexity(out, args.eval, args.seq_len), sparsity_by_group(out)))

    print(f"\nmodel {args.model} · calibration {args.calib.name} ({args.calib_samples}x{args.seq_len} tokens) · "
          f"perplexity on {args.eval.name} (windows of {args.seq_len}) · {os.cpu_count()} CPU cores\n")
    print("| method | seconds | peak RSS (MiB) | weights (MiB) | perplexity | vs uncompressed | zeros per tensor group |")
    print("|---|---|---|---|---|---|---|")
    for name, secs, rss, mb, ppl, groups in rows:
        rel = f"{ppl / base_ppl:.3f}x" if name != "uncompressed" else "1x"
        print(f"| {name} | {secs} | {'-' if rss is None else f'{rss:.0f}'} | {mb:.1f} | {ppl:.2f} | {rel} | {groups} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
