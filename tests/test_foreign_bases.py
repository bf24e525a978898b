"""Compressed bases calora did not make: GPTQ checkpoints written by GPTQModel (through transformers'
GPTQConfig, as users make them) and in AutoGPTQ's older layout (quantize_config.json, the v1 zero
format), with act-order, asymmetric and 3-bit grids.

For each: calora's evaluation equals the model loaded by transformers; `inherit --compensate` takes
it without --allow-base-mismatch (it has no calora lineage: its weights are compared with the
teacher's) and brings the predictions closer to the teacher + LoRA's than the LoRA as is; `merge` re-quantizes into the same
scheme, act-order groups kept, and the merged model loads in transformers and computes the base
plus the adapter. A GPTQ of another model is refused in one line. (GPTQModel's 2-bit and 8-bit
checkpoints go the same way; test_gptq.py checks calora's 2/3-bit packing against GPTQModel's.)
"""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import pytest
import torch
from helpers import one_line_error, transformers_nll

BASES = {
    "act-order-asym": dict(bits=4, group_size=32, desc_act=True, sym=False),
    "3bit": dict(bits=3, group_size=64, desc_act=False, sym=True),
}
AUTOGPTQ = "autogptq-v1-3bit"  # the 3-bit checkpoint in AutoGPTQ's layout


def _gptqmodel(base: Path, out: Path, calib_text: Path, **config) -> Path:
    """`base` quantized by GPTQModel through transformers' GPTQConfig, saved by transformers (in a
    subprocess: quantized_fixtures.py says why)."""
    from quantized_fixtures import gptq

    return gptq(base, out, calib_text, **config)


def _autogptq_layout(src: Path, out: Path) -> Path:
    """`src` (GPTQModel's v2 checkpoint) as AutoGPTQ wrote checkpoints: zero points stored minus one
    (v1), settings in quantize_config.json and not in config.json, gptq_model-3bit-64g.safetensors."""
    from safetensors.torch import load_file, save_file

    from calora_cli.compress.gptq_format import pack, unpack

    config = json.loads((src / "config.json").read_text())
    q = config.pop("quantization_config")
    out.mkdir()
    for f in src.iterdir():
        if f.suffix != ".safetensors" and f.name != "config.json":
            shutil.copy2(f, out / f.name)
    (out / "config.json").write_text(json.dumps(config, indent=2))
    (out / "quantize_config.json").write_text(json.dumps({
        "bits": q["bits"], "group_size": q["group_size"], "desc_act": q["desc_act"], "sym": q["sym"],
        "damp_percent": 0.1, "static_groups": False, "true_sequential": True, "model_name_or_path": None,
        "model_file_base_name": "gptq_model-3bit-64g"}))
    state = load_file(next(src.glob("*.safetensors")))
    for name in [n for n in state if n.endswith(".qzeros")]:
        zeros = unpack(state[name], q["bits"], rows_packed=False)
        state[name] = pack(zeros - 1, q["bits"], rows_packed=False)
    save_file(state, out / "gptq_model-3bit-64g.safetensors", metadata={"format": "pt"})
    return out


@pytest.fixture(scope="module")
def foreign(tmp_path_factory, wide_base, calib_text) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("foreign")
    made = {name: _gptqmodel(wide_base, root / name, calib_text, **cfg) for name, cfg in BASES.items()}
    made[AUTOGPTQ] = _autogptq_layout(made["3bit"], root / AUTOGPTQ)
    return made


def _ids(model_dir: Path, text: Path) -> torch.Tensor:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    return tok(text.read_text(), add_special_tokens=False, return_tensors="pt").input_ids[0][:384].view(-1, 64)


def _log_probs(model_dir: Path, adapter: Path | None, ids: torch.Tensor) -> torch.Tensor:
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32, device_map="cpu")
    if adapter is not None:
        model = PeftModel.from_pretrained(model, adapter)
    model.eval()
    with torch.no_grad():
        return torch.log_softmax(model(input_ids=ids).logits.float(), -1)


def _kl(p: torch.Tensor, q: torch.Tensor) -> float:
    """Mean KL(p || q) per token, from log-probabilities."""
    return float((p.exp() * (p - q)).sum(-1).mean())


def _compensation_helps(cli, tmp_path: Path, base: Path, loadable: Path, teacher: Path, lora: Path, calib: Path,
                        ids: torch.Tensor, slack: float = 1.0) -> torch.Tensor:
    """`inherit --compensate 16` on `base` (no --allow-base-mismatch) brings the predictions closer to
    the teacher + LoRA's than the LoRA as is (this small model's perplexity hardly moves under
    quantization: its blocks carry little, 2 layers and 300 steps, so the compensation is judged by
    what it targets). `loadable`: `base` in a layout transformers reads; `slack` > 1 only asks that
    it does no harm beyond noise (a base whose rounding is at the noise level). Returns the as-is log-probs."""
    comp = tmp_path / "comp"
    r = cli("inherit", lora, "--base", base, "-o", comp, "--compensate", "16", "--teacher", teacher,
            "--calib", calib, "--calib-samples", "8", "--seq-len", "64", "--json", "--quiet")
    assert r.exit_code == 0, r.stderr[-1500:]
    target = _log_probs(teacher, lora, ids)
    as_is = _log_probs(loadable, lora, ids)
    assert _kl(target, _log_probs(loadable, comp, ids)) < slack * _kl(target, as_is)
    return as_is


def _logppl(cli, *args) -> float:
    r = cli("eval", *args, "--seq-len", "64", "--json", "--quiet")
    assert r.exit_code == 0, r.stderr[-1500:]
    return math.log(json.loads(r.stdout)["perplexity"])


@pytest.fixture(scope="module")
def held_out(tmp_path_factory, data_dir) -> Path:
    p = tmp_path_factory.mktemp("text") / "held-out.txt"
    p.write_text((data_dir / "shakespeare" / "plays" / "histories--richard-ii.txt").read_text()[:4000])
    return p


@pytest.mark.parametrize("name", ["act-order-asym", AUTOGPTQ])
def test_foreign_gptq_base_through_every_stage(cli, tmp_path, foreign, name, wide_base, wide_lora, calib_text, held_out):
    from safetensors.torch import load_file

    base = foreign[name]
    loadable = base if name != AUTOGPTQ else foreign["3bit"]  # the same codes, in the layout transformers reads
    # eval: calora's number is transformers' (the AutoGPTQ layout against the same codes in GPTQModel's)
    assert abs(_logppl(cli, base, "--ppl", held_out) - transformers_nll(loadable, held_out)) < 1e-4

    ids = _ids(wide_base, held_out)
    as_is = _compensation_helps(cli, tmp_path, base, loadable, wide_base, wide_lora, calib_text, ids)

    merged = tmp_path / "merged"
    r = cli("merge", base, "--adapter", wide_lora, "-o", merged, "--json", "--quiet")
    assert r.exit_code == 0, r.stderr[-1500:]
    q = json.loads((merged / "config.json").read_text()).get("quantization_config") or \
        json.loads((base / "quantize_config.json").read_text())
    for key, value in {"bits": 4 if name == "act-order-asym" else 3, "desc_act": name == "act-order-asym"}.items():
        assert q[key] == value, (key, q)
    ours, theirs = (load_file(next(p.glob("*.safetensors"))) for p in (merged, base))
    g_idx = [n for n in theirs if n.endswith(".g_idx")]
    assert g_idx and all(torch.equal(ours[n], theirs[n]) for n in g_idx)  # act-order groups kept
    if name == "act-order-asym":
        assert any(not torch.equal(theirs[n], torch.arange(len(theirs[n])) // 32) for n in g_idx)
    # the merged model loads where users load it, and computes about the base plus the adapter
    # (re-quantizing moves it off a little: measured KL 4e-4 at 4 bits, 1e-2 at 3, against 4e-2 for the base alone)
    assert _kl(as_is, _log_probs(merged, None, ids)) < 0.5 * _kl(as_is, _log_probs(loadable, None, ids))


@pytest.mark.parametrize("bits", [2, 8])
def test_gptqmodel_2_and_8_bit_bases(cli, tmp_path, bits, tiny_base, tiny_lora, calib_text, held_out):
    """GPTQModel's 2- and 8-bit checkpoints (of the smallest test model: GPTQModel's quantization is
    most of this test's time): calora's eval (with a LoRA) equals transformers', and merge
    re-quantizes into the same bits, loadable by transformers."""
    base = _gptqmodel(tiny_base, tmp_path / f"gptq{bits}", calib_text, bits=bits, group_size=32, desc_act=False, sym=True)
    assert abs(_logppl(cli, base, "--adapter", tiny_lora, "--ppl", held_out)
               - transformers_nll(base, held_out, tiny_lora)) < 1e-4
    merged = tmp_path / "merged"
    r = cli("merge", base, "--adapter", tiny_lora, "-o", merged, "--json", "--quiet")
    assert r.exit_code == 0, r.stderr[-1500:]
    assert json.loads((merged / "config.json").read_text())["quantization_config"]["bits"] == bits
    assert math.isfinite(transformers_nll(merged, held_out))


def test_gptq_of_another_model_is_refused(cli, tmp_path, foreign, trained_base, trained_lora, calib_text):
    """The wide model's GPTQ is no compression of the narrow teacher: refused in one line."""
    out = tmp_path / "out"
    line = one_line_error(cli("inherit", trained_lora, "--base", foreign["3bit"], "-o", out, "--compensate", "4",
                              "--teacher", trained_base, "--calib", calib_text, "--calib-samples", "2",
                              "--seq-len", "32"))
    assert "--allow-base-mismatch" in line and not out.exists()


@pytest.mark.parametrize("kind", ["nf4", "int8"])
def test_saved_bitsandbytes_checkpoint(cli, tmp_path, kind, wide_base, wide_lora, calib_text, held_out):
    """A bitsandbytes checkpoint saved by transformers: calora's eval equals transformers' loading of
    it; inherit --compensate takes it (its lineage cannot be checked tensor by tensor: a warning)
    and brings the predictions closer to the teacher + LoRA's; merge refuses in one line."""
    from transformers import AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig

    config = (BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.float32)
              if kind == "nf4" else BitsAndBytesConfig(load_in_8bit=True))
    base = tmp_path / kind
    AutoModelForCausalLM.from_pretrained(wide_base, quantization_config=config, device_map="cpu",
                                         dtype=torch.float32).save_pretrained(base)
    AutoTokenizer.from_pretrained(wide_base).save_pretrained(base)
    assert abs(_logppl(cli, base, "--adapter", wide_lora, "--ppl", held_out)
               - transformers_nll(base, held_out, wide_lora)) < 1e-4
    # int8 rounds so finely (KL to the teacher + LoRA 9e-6 nats) that a rank-16 fit to 8 windows of
    # 64 tokens is at the noise level there: measured 9.9e-6 against 8.7e-6 on one machine, below on another
    _compensation_helps(cli, tmp_path, base, base, wide_base, wide_lora, calib_text, _ids(wide_base, held_out),
                        slack=1.0 if kind == "nf4" else 1.5)
    out = tmp_path / "merged"
    assert "bitsandbytes" in one_line_error(cli("merge", base, "--adapter", wide_lora, "-o", out)) and not out.exists()


# --- AWQ (GPTQModel) and compressed-tensors (llm-compressor's format) ---------------------------------


@pytest.fixture(scope="module")
def awq_base(tmp_path_factory, wide_base, calib_text) -> Path:
    from quantized_fixtures import awq

    return awq(wide_base, tmp_path_factory.mktemp("awq") / "awq", calib_text)


def _merge_needs_dense(cli, tmp_path: Path, base: Path, lora: Path, as_is: torch.Tensor, ids: torch.Tensor,
                       loadable: Path) -> None:
    """merge refuses to write the base's own scheme (only GPTQ is re-quantized) in one line naming
    --dense; with --dense the merged model loads in transformers and computes the base plus the
    adapter (dequantized exactly: the same numbers as the LoRA on the quantized base, to kernel rounding)."""
    out = tmp_path / "merged"
    assert "--dense" in one_line_error(cli("merge", base, "--adapter", lora, "-o", out)) and not out.exists()
    r = cli("merge", base, "--adapter", lora, "-o", out, "--dense", "--json", "--quiet")
    assert r.exit_code == 0, r.stderr[-1500:]
    assert "quantization_config" not in json.loads((out / "config.json").read_text())
    merged = _log_probs(out, None, ids)
    assert _kl(as_is, merged) < 1e-3 * _kl(as_is, _log_probs(loadable, None, ids))


def _recovers(cli, tmp_path: Path, base: Path, teacher: Path, lora: Path, text: Path) -> None:
    """recover trains the LoRA through the base's own layers (peft on AWQ's kernel, or the
    dequantized linears) for a step, and the result evaluates on that base."""
    out = tmp_path / "recovered"
    r = cli("recover", lora, "--base", base, "--teacher", teacher, "--teacher-adapter", lora, "--data", text, "-o", out,
            "--steps", "1", "--batch-size", "2", "--seq-len", "32", "--json", "--quiet")
    assert r.exit_code == 0, r.stderr[-1500:]
    assert math.isfinite(_logppl(cli, base, "--adapter", out, "--ppl", text))


def test_awq_base_through_every_stage(cli, tmp_path, awq_base, wide_base, wide_lora, calib_text, held_out):
    """GPTQModel's AWQ (GEMM layout, asymmetric, group 64): calora's eval equals transformers'
    loading of it (gptqmodel's CPU kernel), with the adapter and streamed; inherit --compensate
    takes it without --allow-base-mismatch and helps; merge needs --dense; recover trains through it;
    info names the format."""
    q = json.loads((awq_base / "config.json").read_text())["quantization_config"]
    assert q["quant_method"] == "awq" and q["zero_point"]
    assert abs(_logppl(cli, awq_base, "--adapter", wide_lora, "--ppl", held_out)
               - transformers_nll(awq_base, held_out, wide_lora)) < 1e-4
    # streamed: dequantized by calora in float32, against the kernel's float16 arithmetic (measured 2e-5)
    assert abs(_logppl(cli, awq_base, "--ppl", held_out, "--stream") - transformers_nll(awq_base, held_out)) < 2e-4
    ids = _ids(wide_base, held_out)
    as_is = _compensation_helps(cli, tmp_path, awq_base, awq_base, wide_base, wide_lora, calib_text, ids)
    # AWQ computes in rescaled channels: inherit --teacher (no training, no calibration) carries the
    # LoRA into them (measured: KL to the teacher + LoRA 1.9e-4 against 1.2e-3 for the LoRA as is)
    carried = tmp_path / "carried"
    r = cli("inherit", wide_lora, "--base", awq_base, "-o", carried, "--teacher", wide_base, "--json", "--quiet")
    assert r.exit_code == 0, r.stderr[-1500:]
    target = _log_probs(wide_base, wide_lora, ids)
    assert _kl(target, _log_probs(awq_base, carried, ids)) < 0.5 * _kl(target, as_is)
    _merge_needs_dense(cli, tmp_path, awq_base, wide_lora, as_is, ids, awq_base)
    _recovers(cli, tmp_path, awq_base, wide_base, wide_lora, held_out)
    r = cli("info", awq_base, "--json")
    assert r.exit_code == 0 and json.loads(r.stdout)["quantization"]["format"].startswith("AWQ 4-bit (GEMM), group size 64")


@pytest.fixture(scope="module")
def ct_bases(tmp_path_factory, wide_base) -> dict[str, Path]:
    from quantized_fixtures import SCHEMES, compressed_tensors

    root = tmp_path_factory.mktemp("compressed-tensors")
    return {name: compressed_tensors(wide_base, root / name, name) for name in SCHEMES}


@pytest.mark.parametrize("scheme", ["w4a16-asym", "w8a16", "fp8", "w8a8"])
def test_compressed_tensors_base_through_every_stage(cli, tmp_path, ct_bases, scheme, wide_base, wide_lora, calib_text,
                                                      held_out):
    """compressed-tensors checkpoints (W4A16 pack-quantized with zero points, W8A16 int-quantized,
    FP8 float-quantized, W8A8 with dynamic int8 activations): calora's eval equals transformers'
    loading of the checkpoint; where transformers cannot load it (5.25 with compressed-tensors 0.20
    refuses packed zero points), it equals a plain model holding compressed-tensors' own
    fake-quantized weights. inherit --compensate helps, merge --dense computes the base + adapter and
    recover trains on it (W4A16 and FP8; the int8 schemes go through the same code)."""
    base = ct_bases[scheme]
    loadable = base.parent / f"{base.name}-reference" if scheme == "w4a16-asym" else base
    assert abs(_logppl(cli, base, "--adapter", wide_lora, "--ppl", held_out)
               - transformers_nll(loadable, held_out, wide_lora)) < 1e-4
    if scheme != "w8a8":  # streamed layers compute with the weights only: W8A8's activation rounding is not in them
        assert abs(_logppl(cli, base, "--ppl", held_out, "--stream") - transformers_nll(loadable, held_out)) < 1e-4
    if scheme in ("w8a16", "w8a8"):  # the 8-bit integer schemes share every path below with FP8 and W4A16
        out = tmp_path / "merged"
        assert "--dense" in one_line_error(cli("merge", base, "--adapter", wide_lora, "-o", out)) and not out.exists()
        return
    ids = _ids(wide_base, held_out)
    as_is = _compensation_helps(cli, tmp_path, base, loadable, wide_base, wide_lora, calib_text, ids)
    _merge_needs_dense(cli, tmp_path, base, wide_lora, as_is, ids, loadable)
    _recovers(cli, tmp_path, base, wide_base, wide_lora, held_out)


def test_compressed_tensors_act_order_groups_are_refused(cli, tmp_path, ct_bases, wide_lora, held_out):
    """weight_g_idx (act-order groups) went out of compressed-tensors in 0.20, which no longer
    reads it: such a checkpoint is refused in one line rather than read with its groups ignored."""
    from safetensors.torch import load_file, save_file

    base = tmp_path / "g-idx"
    shutil.copytree(ct_bases["w4a16-asym"], base)
    state = load_file(base / "model.safetensors")
    state["model.layers.0.mlp.up_proj.weight_g_idx"] = torch.arange(256, dtype=torch.int32) // 32
    save_file(state, base / "model.safetensors", metadata={"format": "pt"})
    assert "weight_g_idx" in one_line_error(cli("eval", base, "--ppl", held_out, "--stream"))
