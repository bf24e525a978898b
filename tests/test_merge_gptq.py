"""Merging into GPTQ bases: the packed-format codec against gptqmodel's own dequantization, and
merges that reload in transformers and stay close to the unquantized merge."""

import json

import pytest
import torch
from helpers import one_line_error
from safetensors.torch import load_file

from calora_cli.compress.gptq_format import dequantize, pack, quantize_rtn, round_onto_grid, unpack
from calora_cli.run import RunOptions
from calora_cli.stages.compress import CompressSpec, compress_model

GPTQ = dict(group_size=32, calib_samples=8, seq_len=64)


@pytest.fixture(scope="module")
def gptq_base(trained_base, calib_text, tmp_path_factory):
    out = tmp_path_factory.mktemp("gptq") / "gptq4"
    compress_model(trained_base, out, CompressSpec("gptq", calib=calib_text, **GPTQ), RunOptions(show_progress=False))
    return out


def _ok(r):
    assert r.exit_code == 0, r.stderr
    return json.loads(r.stdout)


def _parts(path):
    sd = load_file(path / "model.safetensors")
    modules = sorted(k.removesuffix(".qweight") for k in sd if k.endswith(".qweight"))
    return {m: {p: sd[f"{m}.{p}"] for p in ("qweight", "qzeros", "scales", "g_idx")} for m in modules}


def _loaded_dequantized(path):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(path, device_map="cpu")
    return {n: m.dequantize_weight().T.float() for n, m in model.named_modules() if hasattr(m, "qweight")}


def test_codec_reads_what_gptqmodel_dequantizes(gptq_base):
    ref = _loaded_dequantized(gptq_base)
    bits = json.loads((gptq_base / "config.json").read_text())["quantization_config"]["bits"]
    ours = {m: dequantize(p, bits, v1=False) for m, p in _parts(gptq_base).items()}
    assert set(ours) == set(ref) and len(ours) == 14
    for m in ours:
        # gptqmodel multiplies in float16, calora in float32: equal to float16 rounding
        torch.testing.assert_close(ours[m], ref[m], rtol=1e-3, atol=1e-6)


@pytest.mark.parametrize("bits, sym, v1", [(4, True, False), (4, False, False), (4, False, True), (8, True, True), (2, False, True)])
def test_round_to_nearest_error_is_within_half_a_step_and_zeros_stay_zero(bits, sym, v1):
    g = torch.Generator().manual_seed(bits)
    W = torch.randn(48, 64, generator=g)
    W[W.abs() < 0.2] = 0  # pruned entries
    W[:, 40:48] = 0  # a whole group of zeros
    W[:8, :16] = W[:8, :16].abs()  # groups with no negative weight (zero point 0, which v1 cannot store)
    g_idx = torch.arange(64, dtype=torch.int32) // 16
    parts = quantize_rtn(W, g_idx, bits, sym, v1, torch.float16)
    assert parts["qweight"].shape == (64 * bits // 32, 48) and parts["qzeros"].shape == (4, 48 * bits // 32)
    back = dequantize(parts, bits, v1)
    step = parts["scales"].float()[g_idx.long()].T  # (out, in)
    # the symmetric grid has one code fewer above zero than below, so the top clips by up to a step
    bound = step if sym else step / 2
    assert ((back - W).abs() <= bound + 1e-5).all()
    assert (back[W == 0] == 0).all()
    # a weight already on its grid rounds onto it unchanged
    assert torch.equal(round_onto_grid(back, parts, bits, v1)["qweight"], parts["qweight"])


def test_pack_unpack_round_trip():
    codes = torch.randint(0, 16, (64, 24), generator=torch.Generator().manual_seed(0), dtype=torch.int32)
    assert torch.equal(unpack(pack(codes, 4, rows_packed=True), 4, rows_packed=True), codes)
    assert torch.equal(unpack(pack(codes, 4, rows_packed=False), 4, rows_packed=False), codes)


def _ppl(cli, model, text):
    return _ok(cli("eval", model, "--ppl", text, "--seq-len", "64", "--json"))["perplexity"]


def test_gptq_merge_reloads_and_stays_close_to_the_unquantized_merge(cli, gptq_base, trained_lora, small_text, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    dense = _ok(cli("merge", gptq_base, "--adapter", trained_lora, "-o", tmp_path / "dense", "--dense", "--json"))
    assert dense["merged_modules"] == 14
    assert "quantization_config" not in json.loads((tmp_path / "dense" / "config.json").read_text())
    # the dense merge is the quantized base with the adapter attached, folded: the dequantized
    # weights (checked against gptqmodel above) plus the delta of the LoRA peft loaded, and the same logits
    attached = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(gptq_base, device_map="cpu"), trained_lora)
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "dense")
    base_w = {m: dequantize(p, 4, v1=False) for m, p in _parts(gptq_base).items()}
    merged_sd = merged.state_dict()
    for name, m in attached.named_modules():
        if hasattr(m, "lora_A") and hasattr(m, "base_layer"):
            module = name.removeprefix("base_model.model.")
            delta = m.scaling["default"] * m.lora_B["default"].weight @ m.lora_A["default"].weight
            expected = base_w[module] + delta.detach()
            torch.testing.assert_close(merged_sd[f"{module}.weight"], expected, rtol=0, atol=1e-6)
    x = torch.randint(0, 500, (2, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        # gptqmodel's kernel runs on float16-rounded weights, hence the looser logit tolerance (the
        # trained fixture's logits span about +-15: 0.05 is a third of a percent of that)
        a, m = attached(x).logits, merged(x).logits
        torch.testing.assert_close(m, a, rtol=0, atol=5e-2)
        assert float((m - a).abs().mean()) < 5e-3

    ref = _ppl(cli, tmp_path / "dense", small_text)
    for grid in ("fresh", "keep"):
        s = _ok(cli("merge", gptq_base, "--adapter", trained_lora, "-o", tmp_path / grid, "--grid", grid, "--json"))
        assert s["merged_modules"] == 14 and 0 < s["delta_kept"] <= 1.5
        cfg = json.loads((tmp_path / grid / "config.json").read_text())["quantization_config"]
        assert cfg["bits"] == 4 and cfg["group_size"] == 32
        reloaded = _loaded_dequantized(tmp_path / grid)  # through transformers + gptqmodel
        assert len(reloaded) == 14
        # the stated bound (docs/merge.md): a 4-bit merge within 2% of the unquantized merge's perplexity
        assert abs(_ppl(cli, tmp_path / grid, small_text) / ref - 1) < 0.02, grid
    # the adapter really is in the re-quantized weights
    base_w, new_w = _loaded_dequantized(gptq_base), _loaded_dequantized(tmp_path / "fresh")
    assert all(not torch.equal(base_w[m], new_w[m]) for m in base_w)


def test_gptq_merge_on_a_pruned_base_keeps_every_zero(cli, trained_base, trained_lora, calib_text, tmp_path):
    base = tmp_path / "w24q"
    compress_model(trained_base, base, CompressSpec("wanda", 0.5, pattern="2:4", then="gptq", calib=calib_text, **GPTQ),
                   RunOptions(show_progress=False))
    s = _ok(cli("merge", base, "--adapter", trained_lora, "-o", tmp_path / "m", "--keep-sparsity", "--json"))
    assert s["zeros_filled"] == 0 and s["sparsity_after"] >= s["sparsity_before"] >= 0.5
    before, after = _loaded_dequantized(base), _loaded_dequantized(tmp_path / "m")
    for m in before:
        assert (after[m][before[m] == 0] == 0).all(), m
        assert not torch.equal(after[m], before[m]), m
    # without the mask the merge fills the pruned zeros and says so
    r = cli("merge", base, "--adapter", trained_lora, "-o", tmp_path / "naive", "--json")
    assert r.exit_code == 0 and "filled" in r.stderr and json.loads(r.stdout)["zeros_filled"] > 0


def test_merge_refuses_bitsandbytes_bases(cli, trained_base, trained_lora, tmp_path):
    _ok(cli("compress", trained_base, "-o", tmp_path / "nf4", "--method", "nf4", "--json"))
    line = one_line_error(cli("merge", tmp_path / "nf4", "--adapter", trained_lora, "-o", tmp_path / "out"))
    assert "merging into a bitsandbytes base is not supported" in line
    assert not (tmp_path / "out").exists()


def test_dense_merge_of_a_sharded_gptq_base_rewrites_the_index(cli, gptq_base, trained_lora, tmp_path):
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM

    sharded = tmp_path / "sharded"
    sharded.mkdir()
    for f in ("config.json", "tokenizer.json", "tokenizer_config.json"):
        (sharded / f).write_bytes((gptq_base / f).read_bytes())
    sd = load_file(gptq_base / "model.safetensors")
    shards = {"a.safetensors": {k: v for k, v in sd.items() if ".layers.1." not in k},
              "b.safetensors": {k: v for k, v in sd.items() if ".layers.1." in k}}
    for name, part in shards.items():
        save_file(part, sharded / name, metadata={"format": "pt"})
    index = {"metadata": {}, "weight_map": {k: name for name, part in shards.items() for k in part}}
    (sharded / "model.safetensors.index.json").write_text(json.dumps(index))

    _ok(cli("merge", sharded, "--adapter", trained_lora, "-o", tmp_path / "m", "--dense", "--allow-base-mismatch", "--json"))
    weight_map = json.loads((tmp_path / "m" / "model.safetensors.index.json").read_text())["weight_map"]
    assert weight_map["model.layers.1.self_attn.q_proj.weight"] == "b.safetensors"
    assert not any(k.endswith((".qweight", ".qzeros", ".scales", ".g_idx")) for k in weight_map)
    model, info = AutoModelForCausalLM.from_pretrained(tmp_path / "m", output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    assert model.model.layers[1].self_attn.q_proj.weight.dtype == torch.float32
