"""Every supported family through every stage, as a new user would run them.

Tiny random models (configs built in code, recipes/tiny_models.py) of Llama, Mistral, Qwen2 (q/k/v
biases), Qwen3 (q/k norms, head_dim apart), Gemma2 (four norms a block, soft-capping) and Phi3
(fused qkv_proj and gate_up_proj), saved in several shards as real checkpoints are: compress
(Wanda, SparseGPT 2:4, GPTQ, Wanda 2:4 then GPTQ, NF4), train, inherit (plain and compensated),
recover, sparsify-adapter, merge (dense, sparse, GPTQ; sharded like the base), eval and info. Each
step checks what the step promises, not only its exit code.
"""

from __future__ import annotations

import json
import math

import pytest
import torch
from helpers import DATA, SHK, one_line_error
from calora_cli.compress.gptq_format import dequantize, is_v1
from safetensors.torch import load_file

FAMILIES = ("llama", "mistral", "qwen2", "qwen3", "gemma2", "phi3")
TEXT = SHK / "plays" / "histories--richard-ii.txt"
CALIB = ["--calib", TEXT, "--calib-samples", "4", "--seq-len", "32"]
TRAIN = ["--data", TEXT, "--steps", "2", "--batch-size", "2", "--seq-len", "32"]


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory):
    from tiny_models import train_bpe_tokenizer

    out = tmp_path_factory.mktemp("tok")
    train_bpe_tokenizer([(SHK / "plays" / "tragedies--hamlet.txt").read_text()], 512).save_pretrained(out)
    return out


def _base(family, tokenizer_dir, out, **shape):
    from tiny_models import build_tiny
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    model = build_tiny(family, len(tok), pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id,
                       eos_token_id=tok.eos_token_id, **shape)
    model.save_pretrained(out, max_shard_size="100KB")  # a few shards: the streamed reader and merge's shard workers
    tok.save_pretrained(out)
    return out


def _run(cli, *args) -> dict:
    r = cli(*args, "--json", "--quiet")
    assert r.exit_code == 0, (args[:2], r.stderr[-2000:])
    return json.loads(r.stdout)


def _logits(model_dir, adapter=None, ids=None):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    if adapter is not None:
        model = PeftModel.from_pretrained(model, adapter).eval()
    with torch.no_grad():
        return model(input_ids=ids).logits


def _all(model_dir) -> dict[str, torch.Tensor]:
    state = {}
    for f in sorted(model_dir.glob("*.safetensors")):
        state.update(load_file(f))
    return state


def _block_weights(model_dir) -> dict[str, torch.Tensor]:
    return {k: v for k, v in _all(model_dir).items() if ".layers." in k and k.endswith("proj.weight")}


@pytest.mark.slow
@pytest.mark.parametrize("family", FAMILIES)
def test_family_through_every_stage(cli, tokenizer_dir, tmp_path, family):
    base = _base(family, tokenizer_dir, tmp_path / "base")
    short = tmp_path / "short.txt"
    short.write_text(TEXT.read_text()[:2000])
    ids = torch.randint(3, 500, (2, 24), generator=torch.Generator().manual_seed(0))

    # compress: the pruned models hold exactly the zeros they promise
    wanda = tmp_path / "wanda"
    s = _run(cli, "compress", base, "-o", wanda, "--method", "wanda", "--sparsity", "0.5", *CALIB)
    weights = _block_weights(wanda)
    assert weights and abs(s["sparsity"] - 0.5) < 1e-3
    for name, w in weights.items():
        assert abs(float((w == 0).float().mean()) - 0.5) < 0.02, name
    nm = tmp_path / "sparsegpt24"
    _run(cli, "compress", base, "-o", nm, "--method", "sparsegpt", "--pattern", "2:4", *CALIB)
    for name, w in _block_weights(nm).items():
        assert bool(((w.reshape(w.shape[0], -1, 4) != 0).sum(-1) <= 2).all()), name
    gptq = tmp_path / "gptq"
    s = _run(cli, "compress", base, "-o", gptq, "--method", "gptq", "--group-size", "32", *CALIB)
    assert json.loads((gptq / "config.json").read_text())["quantization_config"]["bits"] == 4
    assert 0 < s["mean_block_rel_error"] < 0.2
    joint = tmp_path / "w24-gptq"
    _run(cli, "compress", base, "-o", joint, "--method", "wanda", "--pattern", "2:4", "--then", "gptq",
         "--group-size", "32", *CALIB)
    packed, v1 = _all(joint), is_v1(json.loads((joint / "config.json").read_text())["quantization_config"])
    prefixes = [k.removesuffix(".qweight") for k in packed if k.endswith(".qweight")]
    assert prefixes
    for p in prefixes:
        w = dequantize({part: packed[f"{p}.{part}"] for part in ("qweight", "qzeros", "scales", "g_idx")}, 4, v1)
        assert bool(((w != 0).reshape(w.shape[0], -1, 4).sum(-1) <= 2).all()), p
    nf4 = tmp_path / "nf4"
    _run(cli, "compress", base, "-o", nf4, "--method", "nf4")

    # train a LoRA; merge it into the dense base: the merged model computes what base + adapter does
    lora = tmp_path / "lora"
    _run(cli, "train", base, "-o", lora, *TRAIN, "--rank", "4", "--lr", "1e-2")
    merged = tmp_path / "merged"
    _run(cli, "merge", base, "--adapter", lora, "-o", merged)
    assert (merged / "model.safetensors.index.json").exists()
    torch.testing.assert_close(_logits(merged, ids=ids), _logits(base, lora, ids), rtol=1e-4, atol=1e-4)

    # CA-LoRA: inherit onto GPTQ, recover on the pruned base; both evaluate to finite perplexities
    inherited = tmp_path / "inherited"
    s = _run(cli, "inherit", lora, "--base", gptq, "-o", inherited)
    assert s["skipped"] == 0 and s["carried"] > 0
    recovered = tmp_path / "recovered"
    _run(cli, "recover", lora, "--base", wanda, "--teacher", base, "--teacher-adapter", lora, "-o", recovered, *TRAIN)
    compensated = tmp_path / "compensated"
    s = _run(cli, "inherit", lora, "--base", joint, "-o", compensated, "--compensate", "2", "--teacher", base, *CALIB)
    assert 0 < s["mean_compensation_removed"] <= 1
    for model, adapter in ((gptq, inherited), (wanda, recovered), (nf4, lora), (joint, compensated)):
        e = _run(cli, "eval", model, "--adapter", adapter, "--ppl", short, "--seq-len", "32")
        assert math.isfinite(e["perplexity"])
    # streamed eval makes one pass over the layers per text and per task: the second pass must find
    # what the first left (Gemma2's embedding scale is a buffer, not in the checkpoint)
    two = ["--adapter", recovered, "--ppl", short, "--tasks", DATA / "tasks" / "socialiqa.jsonl", "--limit", "6",
           "--seq-len", "32"]
    whole, streamed = _run(cli, "eval", wanda, *two, "--no-stream"), _run(cli, "eval", wanda, *two, "--stream")
    assert streamed["perplexity"] == pytest.approx(whole["perplexity"], rel=1e-5)
    assert streamed["tasks"] == whole["tasks"]

    # LoSA: a masked adapter merges into the sparse base without filling a zero
    masked = tmp_path / "masked"
    _run(cli, "sparsify-adapter", lora, "--base", wanda, "-o", masked, *TRAIN)
    sparse_merged = tmp_path / "sparse-merged"
    s = _run(cli, "merge", wanda, "--adapter", masked, "-o", sparse_merged)
    before, after = _block_weights(wanda), _block_weights(sparse_merged)
    for name in before:
        assert torch.equal(before[name] == 0, after[name] == 0), name

    # merge into GPTQ: dequantize, fold, re-quantize; the output loads and runs
    # (Qwen2's q/k/v biases are stored beside the packed weights: they pass through unchanged)
    gptq_merged, gptq_dense = tmp_path / "gptq-merged", tmp_path / "gptq-dense"
    _run(cli, "merge", gptq, "--adapter", inherited, "-o", gptq_merged)
    _run(cli, "merge", gptq, "--adapter", inherited, "-o", gptq_dense, "--dense")
    biases = {k: v for k, v in _all(gptq).items() if k.endswith(".bias")}
    assert (family == "qwen2") == bool(biases)
    for out in (gptq_merged, gptq_dense):
        merged_tensors = _all(out)
        assert all(torch.equal(merged_tensors[k], v) for k, v in biases.items())
        e = _run(cli, "eval", out, "--ppl", short, "--seq-len", "32")
        assert math.isfinite(e["perplexity"])

    for artifact in (wanda, gptq, recovered, masked):
        info = _run(cli, "info", artifact)
        assert info["kind"] in ("model", "adapter")


@pytest.mark.slow
@pytest.mark.parametrize("family", FAMILIES)
def test_family_on_awq_and_compressed_tensors_bases(cli, tokenizer_dir, tmp_path, family):
    """The bases users download, on every family: compressed-tensors W4A16 (asymmetric, packed zero
    points) and GPTQModel's AWQ. calora's eval with a LoRA equals transformers + peft on the same
    base (for W4A16, which transformers 5.25 cannot load, on a plain model holding
    compressed-tensors' fake-quantized weights); inherit --compensate and merge --dense run and
    evaluate. AWQ needs output widths that are multiples of 64 (GPTQModel's clipping search): a
    wider model than the one above. GPTQModel 7.6 does not AWQ-quantize Phi3 (no scaling plan for
    its fused qkv_proj / gate_up_proj), so Phi3 has the compressed-tensors base only."""
    from helpers import transformers_nll
    from quantized_fixtures import awq, compressed_tensors

    base = _base(family, tokenizer_dir, tmp_path / "base", hidden=128, intermediate=256)
    short = tmp_path / "short.txt"
    short.write_text(TEXT.read_text()[:2000])
    lora = tmp_path / "lora"
    _run(cli, "train", base, "-o", lora, *TRAIN, "--rank", "4", "--lr", "1e-2")
    ct = compressed_tensors(base, tmp_path / "w4a16", "w4a16-asym")
    bases = {"w4a16": (ct, tmp_path / "w4a16-reference")}
    if family != "phi3":
        made = awq(base, tmp_path / "awq", TEXT, group_size=32)
        bases["awq"] = (made, made)
    for name, (quantized, loadable) in bases.items():
        e = _run(cli, "eval", quantized, "--adapter", lora, "--ppl", short, "--seq-len", "32")
        assert abs(math.log(e["perplexity"]) - transformers_nll(loadable, short, lora, window=32)) < 1e-4, name
        comp = tmp_path / f"{name}-comp"
        s = _run(cli, "inherit", lora, "--base", quantized, "-o", comp, "--compensate", "2", "--teacher", base, *CALIB)
        assert 0 < s["mean_compensation_removed"] <= 1 and s["skipped"] == 0, name
        dense = tmp_path / f"{name}-dense"
        _run(cli, "merge", quantized, "--adapter", comp, "-o", dense, "--dense")
        for model, adapter in ((quantized, comp), (dense, None)):
            e = _run(cli, "eval", model, *(["--adapter", adapter] if adapter else []), "--ppl", short, "--seq-len", "32")
            assert math.isfinite(e["perplexity"]), name
        assert _run(cli, "info", quantized)["quantization"]["format"].startswith(("compressed-tensors", "AWQ"))


def test_an_unsupported_family_is_refused_in_one_line(cli, tiny_base, tmp_path):
    import shutil

    other = tmp_path / "gpt2ish"
    shutil.copytree(tiny_base, other)
    cfg = json.loads((other / "config.json").read_text())
    cfg["model_type"] = "gpt_neox"
    (other / "config.json").write_text(json.dumps(cfg))
    line = one_line_error(cli("compress", other, "-o", tmp_path / "out", "--method", "magnitude", "--sparsity", "0.5"))
    assert "gpt_neox" in line and "supports" in line
    assert not (tmp_path / "out").exists()
