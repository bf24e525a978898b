"""Pruning streams the model one decoder layer at a time (streaming.py) and gives, bit for bit, the
tensors of the same algorithm run on the whole model in memory; activations spill to disk beyond
a bound without changing a bit; a bf16 checkpoint stays bf16; the output is a sharded checkpoint
that transformers loads."""

from __future__ import annotations

import json

import pytest
import torch
from helpers import SHK
from safetensors.torch import load_file

TEXT = SHK / "plays" / "histories--richard-ii.txt"
CAL = ["--calib", TEXT, "--calib-samples", "4", "--seq-len", "32"]


def _tensors(d) -> dict[str, torch.Tensor]:
    out = {}
    for f in sorted(d.glob("*.safetensors")):
        out.update(load_file(f))
    return out


def _in_memory(base, method: str, sparsity: float, nm=None, rmi: bool = False) -> dict[str, torch.Tensor]:
    """The reference: the whole model loaded, every block pruned in place (the path before streaming)."""
    from calora_cli.compress import pruner
    from calora_cli.compress import sparsity_allocation as allocation
    from calora_cli.compress.sequential import input_grams, prune_sequential
    from calora_cli.models import load_model, load_tokenizer
    from calora_cli.data import calibration_batch

    model = load_model(base)
    calib = None if method == "magnitude" else calibration_batch(load_tokenizer(base), TEXT.read_text(), 4, 32, seed=0)
    n = len(model.model.layers)
    if rmi:
        grams = input_grams(model, calib)
        rates = allocation.rmi(sparsity, allocation.importance(allocation.cka_matrix(grams)), allocation.default_delta(sparsity))
    else:
        rates = allocation.uniform(sparsity, n)
    m = pruner(method)
    list(prune_sequential(model, calib, rates, m.prune, m.NEEDS, nm))
    return {k: v.detach() for k, v in model.state_dict().items() if k != "lm_head.weight"}


CASES = {
    "magnitude": (["--method", "magnitude", "--sparsity", "0.5"], ("magnitude", 0.5, None, False)),
    "wanda": (["--method", "wanda", "--sparsity", "0.5", *CAL], ("wanda", 0.5, None, False)),
    "sparsegpt": (["--method", "sparsegpt", "--sparsity", "0.6", *CAL], ("sparsegpt", 0.6, None, False)),
    "sparsegpt-2:4": (["--method", "sparsegpt", "--pattern", "2:4", *CAL], ("sparsegpt", 0.5, (2, 4), False)),
    "wanda-rmi": (["--method", "wanda", "--sparsity", "0.5", "--allocation", "rmi", *CAL], ("wanda", 0.5, None, True)),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_streamed_pruning_equals_the_in_memory_path_bitwise(cli, tiny_base, tmp_path, case):
    args, ref_args = CASES[case]
    r = cli("compress", tiny_base, "-o", tmp_path / "s", *args, "--json")
    assert r.exit_code == 0, r.stderr
    got, want = _tensors(tmp_path / "s"), _in_memory(tiny_base, *ref_args)
    assert got.keys() == want.keys()
    for k in want:
        assert torch.equal(got[k], want[k]), k


def test_spilled_activations_change_nothing_and_leave_nothing(cli, tiny_base, tmp_path):
    args = ["--method", "sparsegpt", "--sparsity", "0.5", *CAL, "--json"]
    assert cli("compress", tiny_base, "-o", tmp_path / "mem", *args).exit_code == 0
    # a bound below one micro-batch: every activation goes through the spill folder
    r = cli("compress", tiny_base, "-o", tmp_path / "disk", *args, "--activation-memory", "1e-9")
    assert r.exit_code == 0, r.stderr
    a, b = _tensors(tmp_path / "mem"), _tensors(tmp_path / "disk")
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not any(p.name.startswith(".") for p in (tmp_path / "disk").rglob("*")), "spill folder left behind"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["disk", "mem"]


def test_the_engine_spills_beyond_its_bound(tiny_base, tmp_path):
    """The spill path is taken (not only allowed): count the entries written to the folder."""
    from calora_cli.streaming import Spill

    spill = Spill(bound=100, folder=tmp_path / "spill")
    store = spill((torch.full((2, 8, 4), float(i)), {"i": i}) for i in range(3))  # 256 bytes each
    assert spill.spilled == 3 and len(list((tmp_path / "spill").iterdir())) == 3
    assert [float(hs[0, 0, 0]) for hs, _ in store] == [0.0, 1.0, 2.0] and store[2][1] == {"i": 2}
    store.drop()
    assert list((tmp_path / "spill").iterdir()) == []


def test_a_bf16_sharded_checkpoint_stays_bf16_and_reloads(cli, tiny_base, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    src = tmp_path / "bf16"
    model = AutoModelForCausalLM.from_pretrained(tiny_base, dtype=torch.bfloat16)
    model.save_pretrained(src, max_shard_size="100KB")
    AutoTokenizer.from_pretrained(tiny_base).save_pretrained(src)
    assert len(list(src.glob("*.safetensors"))) > 1
    r = cli("compress", src, "-o", tmp_path / "out", "--method", "wanda", "--sparsity", "0.5", *CAL, "--json")
    assert r.exit_code == 0, r.stderr
    before, after = _tensors(src), _tensors(tmp_path / "out")
    assert after.keys() == before.keys()
    assert all(t.dtype == torch.bfloat16 for t in after.values())
    index = json.loads((tmp_path / "out" / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"]) == set(after)
    for k, w in after.items():
        if ".layers." in k and w.ndim == 2:
            kept = w != 0
            assert abs(float(kept.float().mean()) - 0.5) < 0.01, k
            assert torch.equal(w[kept], before[k][kept]), k  # Wanda only removes: kept weights are the stored ones
        else:
            assert torch.equal(w, before[k]), k  # embeddings and norms copied byte for byte
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "out")
    assert reloaded.dtype == torch.bfloat16
    with torch.no_grad():
        assert reloaded(torch.arange(5)[None]).logits.isfinite().all()


PPL = ["--ppl", TEXT, "--seq-len", "64", "--tasks", SHK.parent / "tasks" / "quartz.jsonl", "--limit", "20", "--json"]


def _eval(cli, *args) -> dict:
    r = cli("eval", *args, *PPL)
    assert r.exit_code == 0, r.stderr
    return json.loads(r.stdout)


def test_streamed_eval_scores_what_the_whole_model_scores(cli, tiny_base, tiny_lora, tmp_path):
    import tempfile
    from pathlib import Path

    whole, streamed = _eval(cli, tiny_base, "--no-stream"), _eval(cli, tiny_base, "--stream", "--activation-memory", "1e-9")
    assert streamed["streamed"] and streamed["perplexity"] == whole["perplexity"]  # same windows, same ops: bitwise
    assert streamed["tasks"] == whole["tasks"]
    import os

    # spilled, and cleaned up (this process's folder: other calora runs on the machine have their own)
    assert not list(Path(tempfile.gettempdir()).glob(f"calora-eval-spill-{os.getpid()}-*"))
    # an adapter is folded into each layer as it is read: equal up to float rounding
    a, b = _eval(cli, tiny_base, "--adapter", tiny_lora, "--no-stream"), _eval(cli, tiny_base, "--adapter", tiny_lora, "--stream")
    assert b["perplexity"] == pytest.approx(a["perplexity"], rel=1e-6) and a["perplexity"] != whole["perplexity"]
    assert b["tasks"] == a["tasks"]


def test_streamed_eval_takes_every_adapter_kind(cli, tiny_base, tiny_lora, tmp_path):
    def ok(*args):
        r = cli(*args, "--json", "-q")
        assert r.exit_code == 0, r.stderr

    train = ["--data", TEXT, "--steps", "3", "--seq-len", "32", "--batch-size", "2"]
    ok("train", tiny_base, "-o", tmp_path / "nola", "--kind", "nola", "--bases", "16", "--lr", "5e-2", *train)
    ok("compress", tiny_base, "-o", tmp_path / "pruned", "--method", "magnitude", "--sparsity", "0.5")
    ok("sparsify-adapter", tiny_lora, "--base", tmp_path / "pruned", "-o", tmp_path / "masked", *train, "--lr", "1e-2")
    ok("recover", tiny_lora, "--base", tmp_path / "pruned", "--teacher", tiny_base, "--teacher-adapter", tiny_lora,
       "-o", tmp_path / "rec", *train, "--lr", "1e-2")
    for model, adapter in ((tiny_base, "nola"), (tmp_path / "pruned", "masked"), (tmp_path / "pruned", "rec")):
        a = _eval(cli, model, "--adapter", tmp_path / adapter, "--no-stream")
        b = _eval(cli, model, "--adapter", tmp_path / adapter, "--stream")
        assert b["perplexity"] == pytest.approx(a["perplexity"], rel=1e-5), adapter
        assert b["tasks"] == a["tasks"], adapter


def test_streamed_eval_refuses_a_bitsandbytes_base(cli, tiny_base, tmp_path):
    from helpers import one_line_error

    r = cli("compress", tiny_base, "-o", tmp_path / "nf4", "--method", "nf4", "-q")
    assert r.exit_code == 0, r.stderr
    line = one_line_error(cli("eval", tmp_path / "nf4", "--ppl", TEXT, "--stream"))
    assert "is quantized (bitsandbytes)" in line and "GPTQ, AWQ and compressed-tensors checkpoints tensor by tensor" in line


def test_gptq_of_a_bf16_sharded_checkpoint(cli, tiny_base, tmp_path):
    """GPTQ streamed over a sharded bf16 checkpoint: the output is sharded like it, its index names
    every tensor written (packed names included), non-quantized tensors stay bf16 and byte-equal,
    and transformers reloads it."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    src = tmp_path / "bf16"
    AutoModelForCausalLM.from_pretrained(tiny_base, dtype=torch.bfloat16).save_pretrained(src, max_shard_size="100KB")
    AutoTokenizer.from_pretrained(tiny_base).save_pretrained(src)
    r = cli("compress", src, "-o", tmp_path / "out", "--method", "gptq", "--group-size", "32", *CAL, "--json")
    assert r.exit_code == 0, r.stderr
    before, after = _tensors(src), _tensors(tmp_path / "out")
    assert sorted(p.name for p in (tmp_path / "out").glob("*.safetensors")) == sorted(p.name for p in src.glob("*.safetensors"))
    index = json.loads((tmp_path / "out" / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"]) == set(after)
    for f in (tmp_path / "out").glob("*.safetensors"):
        assert {n for n, where in index["weight_map"].items() if where == f.name} == set(load_file(f))
    packed = {k for k in after if k.endswith(".qweight")}
    assert len(packed) == 7 * 2 and not any(k.endswith("_proj.weight") for k in after)
    for k, t in after.items():
        if not k.rsplit(".", 1)[1] in ("qweight", "qzeros", "scales", "g_idx"):
            assert t.dtype == torch.bfloat16 and torch.equal(t, before[k]), k
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "out", device_map="cpu")
    with torch.no_grad():
        assert reloaded(torch.arange(5)[None]).logits.isfinite().all()
