"""llama.cpp end to end: calora's GGUF files checked in llama.cpp itself (llama-cpp-python).

- every family: compress --method gguf -> export (the base, a LoRA) -> llama.cpp's per-token
  log-probabilities equal calora's own evaluation of the same base + adapter;
- the writer against llama.cpp's own convert_hf_to_gguf.py: the same keys and the same tensors,
  before and after llama.cpp's quantizer;
- llama.cpp tokenizes text exactly as the model's tokenizer for every pre-tokenizer calora maps;
- K-quants on a pretrained model: the tolerance between llama.cpp and calora's float computation
  over the same dequantized weights, the importance matrix, and a compensated adapter that lowers
  llama.cpp's perplexity against the adapter as is;
- several adapters applied at once by llama.cpp equal the merged model in calora.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from helpers import REPO, SHK, one_line_error

FAMILIES = ("llama", "mistral", "qwen2", "qwen3", "gemma2", "phi3")
HELD_OUT = SHK / "plays" / "histories--richard-ii.txt"
CONVERTER = REPO / ".venv" / "llama.cpp"
# measured (tests below, and docs/gguf.md): F32 and F16 agree to ~1e-6 in mean log-probability; the
# K-quants to ~5e-5, llama.cpp rounding activations to 8 bits inside its quantized dot products
FLOAT_TOL, QUANT_TOL = 1e-3, 2e-3


@pytest.fixture(scope="module")
def text(tmp_path_factory) -> Path:
    p = tmp_path_factory.mktemp("text") / "held-out.txt"
    p.write_text(HELD_OUT.read_text()[:6000])
    return p


@pytest.fixture(scope="module")
def text_long(tmp_path_factory) -> Path:
    """A third of the held-out play: enough tokens for small perplexity differences to be real."""
    p = tmp_path_factory.mktemp("text") / "held-out-long.txt"
    p.write_text(HELD_OUT.read_text()[:40000])
    return p


def _run(cli, *args) -> dict:
    r = cli(*args, "--json", "--quiet")
    assert r.exit_code == 0, (args[:2], r.stderr[-2000:])
    return json.loads(r.stdout)


def _tokenizer(out: Path, pre=None, vocab: int = 512):
    """The tests' byte-level BPE (GPT-2's split) or one with another pre-tokenizer, trained locally."""
    from tiny_models import train_bpe_tokenizer

    tok = train_bpe_tokenizer([(SHK / "plays" / "tragedies--hamlet.txt").read_text()], vocab)
    if pre is not None:
        from tokenizers import Tokenizer, decoders, models, trainers
        from transformers import PreTrainedTokenizerFast

        t = Tokenizer(models.BPE())
        t.pre_tokenizer, t.decoder = pre, decoders.ByteLevel()
        from tokenizers import pre_tokenizers

        t.train_from_iterator([(SHK / "plays" / "tragedies--hamlet.txt").read_text()], trainers.BpeTrainer(
            vocab_size=vocab, special_tokens=["<pad>", "<s>", "</s>"], show_progress=False,
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
        tok = PreTrainedTokenizerFast(tokenizer_object=t, bos_token="<s>", eos_token="</s>", pad_token="<pad>")
    tok.save_pretrained(out)
    return tok


def _model(family: str, out: Path, tokenizer_dir: Path, **shape) -> Path:
    from tiny_models import build_tiny
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    model = build_tiny(family, len(tok), pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id,
                       eos_token_id=tok.eos_token_id, **shape)
    model.save_pretrained(out, max_shard_size="200KB")
    tok.save_pretrained(out)
    return out


def _random_lora(base: Path, out: Path, seed: int, **config) -> Path:
    """A peft LoRA on every linear with both factors random (a trained-looking delta), in a variant."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    torch.manual_seed(seed)
    peft = get_peft_model(model, LoraConfig(target_modules="all-linear", init_lora_weights=False, **config))
    with torch.no_grad():
        for name, p in peft.named_parameters():
            if "lora_B" in name:
                p.mul_(0.2)
    peft.save_pretrained(out)
    return out


# the peft variants llama.cpp's own converter gets wrong (it reads lora_alpha alone): each family one
VARIANTS = {
    "llama": {"r": 4, "lora_alpha": 8, "use_rslora": True},
    "mistral": {"r": 4, "lora_alpha": 16, "rank_pattern": {"q_proj": 2}, "alpha_pattern": {"down_proj": 3}},
    "qwen2": {"r": 8, "lora_alpha": 8, "rank_pattern": {"v_proj": 2}},
    "qwen3": {"r": 4, "lora_alpha": 4},
    "gemma2": {"r": 4, "lora_alpha": 32},
    "phi3": {"r": 2, "lora_alpha": 4, "alpha_pattern": {"qkv_proj": 1}},
}


def _logppl(result: dict) -> float:
    return math.log(result["perplexity"])  # = -(mean log-probability of the predicted tokens)


@pytest.mark.parametrize("family", FAMILIES)
def test_family_round_trip_in_llama_cpp(cli, tmp_path, text, family):
    """compress --method gguf -> export -> llama.cpp: its mean log-probability on held-out text equals
    calora's evaluation of the same base + LoRA (F32 against the source model itself; F16 against
    calora's evaluation of the F16 GGUF read back)."""
    tok_dir = tmp_path / "tok"
    _tokenizer(tok_dir)
    base = _model(family, tmp_path / "base", tok_dir)
    lora = _random_lora(base, tmp_path / "lora", seed=1, **VARIANTS[family])
    ppl = ["--ppl", text, "--seq-len", "64"]

    ppl += ["--tasks", SHK.parent / "tasks" / "socialiqa.jsonl", "--limit", "8"]
    reference = _run(cli, "eval", base, "--adapter", lora, *ppl)
    gguf32 = tmp_path / "f32"
    _run(cli, "compress", base, "-o", gguf32, "--method", "gguf", "--gguf-type", "F32")
    exported = _run(cli, "export", gguf32, "--adapter", lora, "-o", tmp_path / "export")
    served = _run(cli, "eval", tmp_path / "export", "--engine", "llama.cpp", "--adapter",
                  exported["adapters"]["lora"], *ppl)
    assert served["tokens"] == reference["tokens"]  # llama.cpp tokenized the text as the model's tokenizer
    assert abs(_logppl(served) - _logppl(reference)) < FLOAT_TOL
    assert served["tasks"] == reference["tasks"]  # the same choices win, scored in llama.cpp
    # the GGUF read back by calora (names and q/k permutation undone) is the model itself
    read_back = _run(cli, "eval", gguf32, "--adapter", lora, *ppl)
    assert read_back["perplexity"] == pytest.approx(reference["perplexity"], rel=1e-6)

    gguf16 = tmp_path / "f16"
    _run(cli, "compress", base, "-o", gguf16, "--method", "gguf", "--gguf-type", "F16")
    ours = _run(cli, "eval", gguf16, "--adapter", lora, *ppl)
    theirs = _run(cli, "eval", gguf16, "--engine", "llama.cpp", "--adapter", lora, *ppl)
    assert abs(_logppl(ours) - _logppl(theirs)) < FLOAT_TOL
    assert abs(_logppl(ours) - _logppl(reference)) > 0  # F16 rounded something: the check above is not vacuous


def _gguf_fields(path: Path) -> tuple[dict, dict]:
    import numpy as np
    from gguf import GGUFReader

    r = GGUFReader(path)
    kv = {k: f.contents() for k, f in r.fields.items() if not k.startswith("GGUF.")}
    tensors = {t.name: (t.tensor_type.name, [int(d) for d in t.shape], np.asarray(t.data).tobytes()) for t in r.tensors}
    return kv, tensors


@pytest.mark.parametrize("family", ("llama", "mistral", "qwen3"))
def test_writer_matches_llama_cpp_converter(cli, tmp_path, family):
    """The same model through calora and through llama.cpp's convert_hf_to_gguf.py: every key and
    tensor equal, the F32 files and both quantized by llama.cpp to Q4_0 and Q4_K_M. The one
    difference is general.name (the converter title-cases the folder name). Qwen2 is left out: its
    transformers tokenizer class adds <|endoftext|> beyond the model's vocabulary and the converter
    stops on it (calora reads tokenizer.json itself); Gemma2's and Phi3's converters read only
    SentencePiece tokenizer.model files, which the tests' byte-level BPE is not."""
    from calora_cli.gguf.llama import quantize

    assert (CONVERTER / "convert_hf_to_gguf.py").is_file(), "make setup extracts llama.cpp's converter"
    tok_dir = tmp_path / "tok"
    _tokenizer(tok_dir)
    base = _model(family, tmp_path / "base", tok_dir)
    ours = tmp_path / "ours"
    _run(cli, "compress", base, "-o", ours, "--method", "gguf", "--gguf-type", "F32")
    ref = tmp_path / "ref.gguf"
    r = subprocess.run([sys.executable, str(REPO / "tests" / "llamacpp_convert.py"), str(CONVERTER), str(base),
                        "--outtype", "f32", "--outfile", str(ref)], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-2000:]
    pairs = [(ours / "model.gguf", ref)]
    for t in ("Q4_0", "Q4_K_M"):
        quantize(ours / "model.gguf", tmp_path / f"ours-{t}.gguf", t)
        quantize(ref, tmp_path / f"ref-{t}.gguf", t)
        pairs.append((tmp_path / f"ours-{t}.gguf", tmp_path / f"ref-{t}.gguf"))
    for a, b in pairs:
        (kv_a, t_a), (kv_b, t_b) = _gguf_fields(a), _gguf_fields(b)
        assert kv_a.pop("general.name") != kv_b.pop("general.name")
        assert kv_a == kv_b
        assert t_a.keys() == t_b.keys()
        for name in t_a:
            assert t_a[name] == t_b[name], name


def _pre_tokenizers():
    from tokenizers import Regex, pre_tokenizers

    from calora_cli.gguf.metadata import SPLIT_PATTERNS

    by_name = {v: k for k, v in SPLIT_PATTERNS.items()}
    split = lambda name: pre_tokenizers.Sequence([  # noqa: E731
        pre_tokenizers.Split(Regex(by_name[name]), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    return {
        "gpt-2": None,  # the tests' own tokenizer
        "smollm": pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True),
                                           pre_tokenizers.ByteLevel(add_prefix_space=False)]),
        "llama-bpe": split("llama-bpe"),
        "qwen2": split("qwen2"),
    }


@pytest.mark.parametrize("pre", ("gpt-2", "smollm", "llama-bpe", "qwen2"))
def test_llama_cpp_tokenizes_as_the_model_tokenizer(cli, tmp_path, pre):
    from calora_cli.gguf.llama import Engine
    from calora_cli.gguf.reader import field, open_gguf

    tok = _tokenizer(tmp_path / "tok", _pre_tokenizers()[pre])
    base = _model("llama", tmp_path / "base", tmp_path / "tok")
    _run(cli, "compress", base, "-o", tmp_path / "g", "--method", "gguf", "--gguf-type", "F16")
    assert field(open_gguf(tmp_path / "g" / "model.gguf"), "tokenizer.ggml.pre") == pre
    # held-out verse, digits, runs of spaces and newlines, apostrophes, non-Latin text
    sample = HELD_OUT.read_text()[:20000] + "\n\n  1234 56789 3.14   tabs\tand 'll 're 'VE\n Ünïcödé 日本語 😶‍🌫️ —\n"
    engine = Engine(tmp_path / "g" / "model.gguf", n_ctx=64)
    try:
        assert engine.tokenize(sample) == tok(sample, add_special_tokens=False)["input_ids"]
    finally:
        engine.close()


def test_unmapped_pre_tokenizer_is_refused(cli, tmp_path):
    from tokenizers import pre_tokenizers

    _tokenizer(tmp_path / "tok", pre_tokenizers.Sequence([pre_tokenizers.Whitespace(), pre_tokenizers.ByteLevel()]))
    base = _model("llama", tmp_path / "base", tmp_path / "tok")
    line = one_line_error(cli("compress", base, "-o", tmp_path / "g", "--method", "gguf", "--gguf-type", "F16"))
    assert "pre-tokenizer" in line and "Whitespace" in line
    assert not (tmp_path / "g").exists()


def test_k_quants_compensation_and_importance_matrix(cli, tmp_path, wide_base, wide_lora, calib_text, text_long):
    """On a pretrained model whose widths K-quants take (256): Q4_K_M holds Q4_K tensors; llama.cpp
    agrees with calora's float evaluation of the same dequantized weights within QUANT_TOL; the
    compensated adapter (inherit --compensate on the GGUF base) lowers llama.cpp's perplexity
    against the LoRA as is; an importance matrix from --calib changes what llama.cpp's quantizer
    picks, and lowers the imatrix-weighted rounding error it aims at."""
    from calora_cli.compress.gguf import importance_matrix
    from calora_cli.gguf.reader import GGUFTensors
    from calora_cli.models import load_tokenizer
    from calora_cli.streaming import LayerSource
    from calora_cli.tensor_io import ShardReader

    ppl = ["--ppl", text_long, "--seq-len", "128"]
    calib = ["--calib", calib_text, "--calib-samples", "8", "--seq-len", "64"]
    q = tmp_path / "q4km"
    _run(cli, "compress", wide_base, "-o", q, "--method", "gguf", "--gguf-type", "Q4_K_M")
    types = json.loads((q / "calora.json").read_text())["metrics"]["tensor_types"]
    assert types.get("Q4_K", 0) >= 8, types  # the block linears really are K-quants
    comp = tmp_path / "comp"
    _run(cli, "inherit", wide_lora, "--base", q, "-o", comp, "--compensate", "16", "--teacher", wide_base, *calib)
    as_is = _run(cli, "eval", q, "--engine", "llama.cpp", "--adapter", wide_lora, *ppl)
    compensated = _run(cli, "eval", q, "--engine", "llama.cpp", "--adapter", comp, *ppl)
    assert compensated["perplexity"] < as_is["perplexity"]
    for adapter, theirs in ((wide_lora, as_is), (comp, compensated)):
        ours = _run(cli, "eval", q, "--adapter", adapter, *ppl)
        assert abs(_logppl(ours) - _logppl(theirs)) < QUANT_TOL

    qi = tmp_path / "q4km-imatrix"
    made_i = _run(cli, "compress", wide_base, "-o", qi, "--method", "gguf", "--gguf-type", "Q4_K_M", *calib)
    assert made_i["imatrix_tensors"] == 14  # 7 linears x 2 blocks
    config = json.loads((wide_base / "config.json").read_text())
    from calora_cli.data import calibration_batch, read_text

    batch = calibration_batch(load_tokenizer(wide_base), read_text(calib_text), 8, 64, 0)
    source = LayerSource(wide_base, sorted(wide_base.glob("*.safetensors")), torch.float32, torch.device("cpu"))
    imatrix = importance_matrix(source, batch, config)
    source.close()
    plain, weighted = GGUFTensors(q / "model.gguf", config), GGUFTensors(qi / "model.gguf", config)
    dense = {n: r for r in map(ShardReader, sorted(wide_base.glob("*.safetensors"))) for n in r.names()}
    better = 0
    for hf, target in plain.where.items():
        if target not in imatrix:
            continue
        w = dense[hf].get_tensor(hf).float()
        err = lambda src: float((((src.get_tensor(hf) - w) ** 2) * imatrix[target]).sum())  # noqa: E731
        better += err(weighted) < err(plain)
    assert better >= 12, better  # of 14


def test_several_adapters_at_once(cli, tmp_path, text):
    """llama.cpp applying two LoRAs at once (as llama-server --lora A --lora B) equals calora's
    evaluation of the base with both merged; export writes both and the switched-server command."""
    tok_dir = tmp_path / "tok"
    _tokenizer(tok_dir)
    base = _model("llama", tmp_path / "base", tok_dir)
    a = _random_lora(base, tmp_path / "a", seed=1, r=4, lora_alpha=8)
    b = _random_lora(base, tmp_path / "b", seed=2, r=2, lora_alpha=16)
    ppl = ["--ppl", text, "--seq-len", "64"]
    out = _run(cli, "export", base, "--adapter", a, "--adapter", b, "-o", tmp_path / "export")
    switched = out["llama_cpp"]["server_switched"]
    assert "--lora-init-without-apply" in switched and all(p in switched for p in out["adapters"].values())
    both = _run(cli, "eval", tmp_path / "export", "--engine", "llama.cpp", "--adapter", out["adapters"]["a"],
                "--adapter", out["adapters"]["b"], *ppl)
    _run(cli, "merge", base, "--adapter", a, "--adapter", b, "-o", tmp_path / "merged")
    merged = _run(cli, "eval", tmp_path / "merged", *ppl)
    assert abs(_logppl(both) - _logppl(merged)) < FLOAT_TOL
    alone = _run(cli, "eval", tmp_path / "export", "--engine", "llama.cpp", "--adapter", out["adapters"]["a"], *ppl)
    assert abs(_logppl(alone) - _logppl(both)) > 10 * FLOAT_TOL  # the second adapter was really applied


def test_export_refuses_what_llama_cpp_cannot_run(cli, tmp_path, tiny_base, tiny_lora):
    """A DoRA adapter and one with recovery modules: one line naming the way out, nothing written."""
    import shutil

    dora = tmp_path / "dora"
    shutil.copytree(tiny_lora, dora)
    cfg = json.loads((dora / "adapter_config.json").read_text())
    cfg["use_dora"] = True
    (dora / "adapter_config.json").write_text(json.dumps(cfg))
    line = one_line_error(cli("export", tiny_base, "--adapter", dora, "-o", tmp_path / "out"))
    assert "DoRA" in line and "merge" in line
    assert not (tmp_path / "out").exists()
    from calora_cli.artifacts import write_manifest
    from calora_cli.methods.ca_lora.format import RECOVERY_FILE
    from safetensors.torch import save_file

    recovered = tmp_path / "recovered"
    shutil.copytree(tiny_lora, recovered)
    (recovered / "calora.json").unlink(missing_ok=True)
    save_file({"d": torch.zeros(1)}, recovered / RECOVERY_FILE)
    write_manifest(recovered, kind="adapter", stage="recover", params={}, inputs={}, metrics={},
                   extra_files={RECOVERY_FILE: "recovery modules"})
    line = one_line_error(cli("export", tiny_base, "--adapter", recovered, "-o", tmp_path / "out",
                              "--allow-base-mismatch"))
    assert "recovery modules" in line and not (tmp_path / "out").exists()
    line = one_line_error(cli("export", tiny_base, "-o", tmp_path / "out", "--gguf-type", "Q9_X"))
    assert "--gguf-type" in line and not (tmp_path / "out").exists()


def test_gptq_grid_written_as_q4_0_unchanged(cli, tmp_path, trained_base, calib_text):
    """A 4-bit, group-32 GPTQ model exported without re-rounding: every linear read back from the GGUF
    (gguf's own Q4_0 dequantizer) equals the GPTQ tensor bit for bit, and llama.cpp serves it; a
    group-64 model is refused naming --requantize, which then quantizes it with llama.cpp."""
    from calora_cli.compress.gptq_format import PARTS, dequantize, is_v1
    from calora_cli.gguf.reader import GGUFTensors
    from calora_cli.tensor_io import ShardReader

    calib = ["--calib", calib_text, "--calib-samples", "4", "--seq-len", "64"]
    g32 = tmp_path / "g32"
    _run(cli, "compress", trained_base, "-o", g32, "--method", "gptq", "--bits", "4", "--group-size", "32", *calib)
    out = _run(cli, "export", g32, "-o", tmp_path / "q40")
    config = json.loads(((tmp_path / "q40") / "config.json").read_text())
    read = GGUFTensors(tmp_path / "q40" / "model.gguf", config)
    where = {n: r for r in map(ShardReader, sorted(g32.glob("*.safetensors"))) for n in r.names()}
    linears = [n.removesuffix(".qweight") for n in where if n.endswith(".qweight")]
    assert len(linears) == 14
    for stem in linears:
        parts = {p: where[f"{stem}.{p}"].get_tensor(f"{stem}.{p}") for p in PARTS}
        assert read.tensor_type(f"{stem}.weight") == "Q4_0"
        v1 = is_v1(json.loads((g32 / "config.json").read_text())["quantization_config"])
        assert torch.equal(read.get_tensor(f"{stem}.weight"), dequantize(parts, 4, v1)), stem
    served = _run(cli, "eval", tmp_path / "q40", "--engine", "llama.cpp", "--ppl", HELD_OUT, "--seq-len", "64")
    ours = _run(cli, "eval", g32, "--ppl", HELD_OUT, "--seq-len", "64")
    assert abs(_logppl(served) - _logppl(ours)) < QUANT_TOL  # the embedding is Q8_0 there, as in llama.cpp's Q4_0
    assert out["gguf_bytes"] < sum(p.stat().st_size for p in g32.glob("*.safetensors"))

    g64 = tmp_path / "g64"
    _run(cli, "compress", trained_base, "-o", g64, "--method", "gptq", "--bits", "4", "--group-size", "64", *calib)
    line = one_line_error(cli("export", g64, "-o", tmp_path / "no"))
    assert "--requantize" in line and not (tmp_path / "no").exists()
    redone = _run(cli, "export", g64, "-o", tmp_path / "re", "--requantize", "Q4_0")
    assert redone["gguf_bytes"] > 0


def test_asymmetric_gptq_grid_is_q4_1():
    """Asymmetric GPTQ groups of 32 as Q4_1 blocks: gguf's dequantizer gives the GPTQ values up to
    the float16 rounding of m = -scale * zero."""
    import numpy as np
    from gguf import GGMLQuantizationType
    from gguf.quants import dequantize as gguf_dequantize

    from calora_cli.compress.gptq_format import dequantize, quantize_rtn
    from calora_cli.gguf.legacy import blocks, grid_type

    torch.manual_seed(0)
    w = torch.randn(48, 128) + 0.3
    parts = quantize_rtn(w, torch.arange(128, dtype=torch.int32) // 32, 4, sym=False, v1=False,
                         scale_dtype=torch.float16)
    assert grid_type(parts, 4, False, "w") == "Q4_1"
    raw = blocks(parts, 4, False, "Q4_1").numpy()
    back = torch.from_numpy(gguf_dequantize(np.ascontiguousarray(raw), GGMLQuantizationType.Q4_1).reshape(48, 128))
    ref = dequantize(parts, 4, False)
    step = parts["scales"].float().max().item()
    assert (back - ref).abs().max() < 1e-3 * step * 16  # m's float16 rounding, a small fraction of a step
    assert not torch.equal(back, w)
    sym = quantize_rtn(w, torch.arange(128, dtype=torch.int32) // 32, 4, sym=True, v1=True, scale_dtype=torch.float16)
    assert grid_type(sym, 4, True, "w") == "Q4_0"
    raw = blocks(sym, 4, True, "Q4_0").numpy()
    back = torch.from_numpy(gguf_dequantize(np.ascontiguousarray(raw), GGMLQuantizationType.Q4_0).reshape(48, 128))
    assert torch.equal(back, dequantize(sym, 4, True))


def test_bare_gguf_file_and_merge(cli, tmp_path, wide_base, wide_lora, calib_text, text):
    """A .gguf file with nothing beside it (as downloaded): eval reads its config and tokenizer from
    the file's own metadata and scores as the artifact does; inherit --compensate takes it with the
    model it came from as --teacher (lineage replaced by how close its weights lie to the teacher's,
    and another model refused); merge --dense folds an adapter into it as calora's eval applies it."""
    import shutil

    ppl = ["--ppl", text, "--seq-len", "64"]
    q = tmp_path / "q"
    _run(cli, "compress", wide_base, "-o", q, "--method", "gguf", "--gguf-type", "Q4_0")
    bare = tmp_path / "downloads" / "wide-Q4_0.gguf"
    bare.parent.mkdir()
    shutil.copy2(q / "model.gguf", bare)
    assert _run(cli, "eval", bare, *ppl)["perplexity"] == pytest.approx(_run(cli, "eval", q, *ppl)["perplexity"], rel=1e-6)
    calib = ["--calib", calib_text, "--calib-samples", "4", "--seq-len", "64"]
    comp = _run(cli, "inherit", wide_lora, "--base", bare, "-o", tmp_path / "comp", "--compensate", "8",
                "--teacher", wide_base, *calib)
    assert comp["carried"] == 14
    record = json.loads((tmp_path / "comp" / "calora.json").read_text())["inputs"]["base"]["path"]
    assert record == str(bare)  # the file the user named, not the temporary view of it
    other = tmp_path / "other"
    _model("llama", other, wide_base, hidden=256, intermediate=512, heads=4, layers=2)
    line = one_line_error(cli("inherit", wide_lora, "--base", bare, "-o", tmp_path / "no", "--compensate", "8",
                              "--teacher", other, *calib))
    assert "no calora lineage" in line and "--allow-base-mismatch" in line

    merged = _run(cli, "merge", q, "--adapter", wide_lora, "--dense", "-o", tmp_path / "merged")
    assert merged["merged_modules"] == 14
    with_adapter = _run(cli, "eval", q, "--adapter", wide_lora, *ppl)
    assert _run(cli, "eval", tmp_path / "merged", *ppl)["perplexity"] == pytest.approx(with_adapter["perplexity"], rel=1e-5)
    line = one_line_error(cli("merge", q, "--adapter", wide_lora, "-o", tmp_path / "no"))
    assert "--dense" in line and "export" in line


def test_nola_adapter_expanded_for_llama_cpp(cli, tmp_path, text, tiny_base):
    """A NOLA adapter (seed + coefficients) is exported as the LoRA its bases expand to: llama.cpp
    applies it as calora's evaluation of the NOLA adapter does."""
    nola = tmp_path / "nola"
    _run(cli, "train", tiny_base, "--data", text, "-o", nola, "--kind", "nola", "--bases", "16", "--steps", "3",
         "--seq-len", "32", "--batch-size", "2", "--lr", "5e-2")
    out = _run(cli, "export", tiny_base, "--adapter", nola, "-o", tmp_path / "export")
    ppl = ["--ppl", text, "--seq-len", "64"]
    served = _run(cli, "eval", tmp_path / "export", "--engine", "llama.cpp", "--adapter", out["adapters"]["nola"], *ppl)
    ours = _run(cli, "eval", tiny_base, "--adapter", nola, *ppl)
    assert abs(_logppl(served) - _logppl(ours)) < FLOAT_TOL
    plain = _run(cli, "eval", tiny_base, *ppl)
    assert abs(_logppl(plain) - _logppl(ours)) > 10 * FLOAT_TOL  # the NOLA delta is not nothing


def test_sparsify_against_a_float_gguf_of_a_pruned_base(cli, tmp_path, tiny_base, tiny_lora):
    """A pruned model's F16 GGUF keeps its zeros exactly: sparsify-adapter against it gives the adapter
    it gives against the pruned safetensors model; a quantized GGUF's zeros are refused as masks."""
    from safetensors.torch import load_file

    pruned = tmp_path / "pruned"
    _run(cli, "compress", tiny_base, "-o", pruned, "--method", "magnitude", "--sparsity", "0.5")
    _run(cli, "compress", pruned, "-o", tmp_path / "f16", "--method", "gguf", "--gguf-type", "F16")
    _run(cli, "compress", pruned, "-o", tmp_path / "q8", "--method", "gguf", "--gguf-type", "Q8_0")
    a = _run(cli, "sparsify-adapter", tiny_lora, "--base", pruned, "-o", tmp_path / "a")
    b = _run(cli, "sparsify-adapter", tiny_lora, "--base", tmp_path / "f16", "-o", tmp_path / "b")
    assert a["base_sparsity"] == b["base_sparsity"] == pytest.approx(0.5, abs=0.01)
    ta, tb = (load_file(next(p.glob("masks*.safetensors"))) for p in (tmp_path / "a", tmp_path / "b"))
    assert ta.keys() == tb.keys() and all(torch.equal(ta[k], tb[k]) for k in ta)
    line = one_line_error(cli("sparsify-adapter", tiny_lora, "--base", tmp_path / "q8", "-o", tmp_path / "c"))
    assert "quantized GGUF" in line
