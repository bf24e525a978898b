"""A model larger than the memory it may use: compress (Wanda, GPTQ) and evaluate (streamed, the
dense and the GPTQ model) a synthetic bf16 Llama of --size-gb under a hard cap on resident memory.

The checkpoint is written one 5 GB shard at a time (random bf16 weights, sharded as transformers
shards), so building it needs one shard of memory, not the model. Each calora command runs in a
child process watched every 50 ms: above --cap-gb of resident memory (VmRSS) it is killed, and the
run fails. Prints a table: seconds, seconds per GB, peak resident memory, and the result.

    .venv/bin/python benchmarks/scale.py --size-gb 8 --cap-gb 3
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from measure import print_table

REPO = Path(__file__).resolve().parents[1]
TEXT = REPO.parent / "shared" / "data" / "shakespeare" / "plays" / "histories--richard-ii.txt"


def build(root: Path, size_gb: float, hidden: int, inter: int, vocab: int = 32000) -> Path:
    """A Llama checkpoint of about size_gb in bf16, written one tensor at a time."""
    import torch
    from safetensors.torch import save_file

    sys.path.insert(0, str(REPO / "recipes"))
    from tiny_models import train_bpe_tokenizer

    per_layer = 4 * hidden * hidden + 3 * hidden * inter
    layers = max(1, round((size_gb * 1e9 / 2 - vocab * hidden) / per_layer))
    out = root / "model"
    out.mkdir()
    config = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": hidden,
              "intermediate_size": inter, "num_hidden_layers": layers, "num_attention_heads": hidden // 128,
              "num_key_value_heads": hidden // 128, "vocab_size": vocab, "max_position_embeddings": 4096,
              "rms_norm_eps": 1e-5, "tie_word_embeddings": True, "dtype": "bfloat16", "hidden_act": "silu",
              "bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 0}
    (out / "config.json").write_text(json.dumps(config, indent=2))
    g = torch.Generator().manual_seed(0)

    def tensor(*shape, std=0.02):
        return (torch.randn(*shape, generator=g) * std).to(torch.bfloat16)

    shapes = {"self_attn.q_proj": (hidden, hidden), "self_attn.k_proj": (hidden, hidden), "self_attn.v_proj": (hidden, hidden),
              "self_attn.o_proj": (hidden, hidden), "mlp.gate_proj": (inter, hidden), "mlp.up_proj": (inter, hidden),
              "mlp.down_proj": (hidden, inter)}
    names: list[list[str]] = [["model.embed_tokens.weight", "model.norm.weight"]]
    names += [[f"model.layers.{i}.{m}.weight" for m in shapes] + [f"model.layers.{i}.input_layernorm.weight",
              f"model.layers.{i}.post_attention_layernorm.weight"] for i in range(layers)]
    shard_of, shards, current, size = {}, [[]], 0, 0
    for group in names:  # shards of <= 5 GB, a layer never split
        group_bytes = sum(2 * (vocab * hidden if "embed" in n else hidden if "norm" in n else
                               shapes[n.split(".", 3)[3].rsplit(".", 1)[0]][0] * shapes[n.split(".", 3)[3].rsplit(".", 1)[0]][1])
                          for n in group)
        if size and size + group_bytes > 5e9:
            shards.append([])
            current, size = current + 1, 0
        shards[current] += group
        size += group_bytes
    total = 0
    for k, shard in enumerate(shards):
        file = f"model-{k + 1:05d}-of-{len(shards):05d}.safetensors"
        tensors = {}
        for n in shard:
            if "embed" in n:
                tensors[n] = tensor(vocab, hidden)
            elif "norm" in n:
                tensors[n] = torch.ones(hidden, dtype=torch.bfloat16)
            else:
                tensors[n] = tensor(*shapes[n.split(".", 3)[3].rsplit(".", 1)[0]])
            shard_of[n] = file
            total += tensors[n].numel() * 2
        save_file(tensors, out / file, metadata={"format": "pt"})
        del tensors
    index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(shard_of.items()))}
    (out / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
    tok = train_bpe_tokenizer([TEXT.read_text()], vocab)
    tok.save_pretrained(out)
    return out


def rss_gb(pid: int) -> float:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024 / 1e9
    except OSError:
        pass
    return 0.0


def capped(cmd: list[str], cap_gb: float) -> tuple[float, float, str]:
    """Run cmd, killing it if its resident memory passes cap_gb; (seconds, peak GB, stdout)."""
    t0, peak = time.time(), 0.0
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "HF_HUB_OFFLINE": "1", "GPTQMODEL_DISABLE_PACK_EXT": "1"})
    while proc.poll() is None:
        peak = max(peak, rss_gb(proc.pid))
        if peak > cap_gb:
            proc.send_signal(signal.SIGKILL)
            proc.wait()
            raise SystemExit(f"killed: {' '.join(cmd[2:5])} passed the {cap_gb} GB cap ({peak:.2f} GB)")
        time.sleep(0.05)
    out, err = proc.communicate()
    if proc.returncode:
        raise SystemExit(f"{' '.join(cmd[2:5])} failed: {err[-2000:]}")
    return time.time() - t0, peak, out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size-gb", type=float, default=8.0)
    ap.add_argument("--cap-gb", type=float, default=3.0)
    ap.add_argument("--hidden", type=int, default=3072)
    ap.add_argument("--intermediate", type=int, default=8192)
    ap.add_argument("--workdir", type=Path, default=None)
    ap.add_argument("--runs", default="", help="comma list of substrings of the runs to keep (default: all)")
    args = ap.parse_args()
    calora = [sys.executable, "-m", "calora_cli"]
    with tempfile.TemporaryDirectory(prefix="calora-bench-scale-", dir=args.workdir) as tmp:
        t0 = time.time()
        model = build(Path(tmp), args.size_gb, args.hidden, args.intermediate)
        gb = sum(f.stat().st_size for f in model.glob("*.safetensors")) / 1e9
        layers = json.loads((model / "config.json").read_text())["num_hidden_layers"]
        print(f"built {gb:.2f} GB bf16 ({layers} layers of hidden {args.hidden}) in {time.time() - t0:.0f} s", file=sys.stderr)
        short = Path(tmp) / "eval.txt"
        short.write_text(TEXT.read_text()[:6000])
        runs = {
            "compress wanda 50%": [*calora, "compress", str(model), "-o", str(Path(tmp) / "wanda"), "--method", "wanda",
                                   "--sparsity", "0.5", "--calib", str(TEXT), "--calib-samples", "8", "--seq-len", "128",
                                   "--activation-memory", "0.2", "--json", "-q"],
            "eval --stream": [*calora, "eval", str(model), "--ppl", str(short), "--seq-len", "256", "--stream",
                              "--activation-memory", "0.2", "--json", "-q"],
            "compress gptq 4-bit g128": [*calora, "compress", str(model), "-o", str(Path(tmp) / "gptq"), "--method", "gptq",
                                         "--bits", "4", "--group-size", "128", "--calib", str(TEXT), "--calib-samples", "8",
                                         "--seq-len", "128", "--activation-memory", "0.2", "--json", "-q"],
            "eval --stream (the GPTQ model)": [*calora, "eval", str(Path(tmp) / "gptq"), "--ppl", str(short), "--seq-len",
                                               "256", "--stream", "--activation-memory", "0.2", "--json", "-q"],
        }
        if args.runs:
            runs = {k: v for k, v in runs.items() if any(r in k for r in args.runs.split(","))}
        rows = []
        for name, cmd in runs.items():
            secs, peak, out = capped(cmd, args.cap_gb)
            summary = json.loads(out.strip().splitlines()[-1])
            what = (f"sparsity {summary['sparsity']:.3f}" if "sparsity" in summary
                    else f"perplexity {summary['perplexity']:.1f}" if "perplexity" in summary
                    else f"weights {summary['weights_bytes'] / 1e9:.2f} GB, mean block error {summary['mean_block_rel_error']:.2g}")
            rows.append((name, secs, peak, what))
            print(f"done: {name}", file=sys.stderr)
    print(f"\nsynthetic Llama, {gb:.2f} GB bf16 ({layers} layers, hidden {args.hidden}), cap {args.cap_gb} GB resident, "
          f"{os.cpu_count()} CPU cores\n")
    print_table(["run", "seconds", "seconds per GB", "peak resident GB", "result"],
                [[name, f"{secs:.0f}", f"{secs / gb:.1f}", f"{peak:.2f}", what] for name, secs, peak, what in rows])
    return 0


if __name__ == "__main__":
    sys.exit(main())
