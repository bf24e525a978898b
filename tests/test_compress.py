"""`calora compress`: exact sparsity patterns, methods against direct formulas, quantized reloads."""

import json

import pytest
import torch
from helpers import one_line_error
from safetensors.torch import load_file

from calora_cli.compress import sparsegpt, wanda
from calora_cli.compress import sparsity_allocation as allocation
from calora_cli.compress.masks import nm_mask, row_mask
from calora_cli.compress.sequential import InputStats

CAL = ["--calib-samples", "8", "--seq-len", "64"]


def _compress(cli, base, out, *args):
    r = cli("compress", base, "-o", out, *args, "--json")
    assert r.exit_code == 0, r.stderr
    return json.loads(r.stdout)


def _linears(path):
    sd = load_file(path / "model.safetensors")
    return {k: v for k, v in sd.items() if ".layers." in k and k.endswith("proj.weight")}


def _manifest(path):
    return json.loads((path / "calora.json").read_text())


def test_wanda_half_zeros_in_every_row(cli, tiny_base, calib_text, tmp_path):
    _compress(cli, tiny_base, tmp_path / "w", "--method", "wanda", "--sparsity", "0.5", "--calib", calib_text, *CAL)
    lin = _linears(tmp_path / "w")
    assert len(lin) == 14
    for name, w in lin.items():
        zeros_per_row = (w == 0).sum(dim=1)
        assert (zeros_per_row == w.shape[1] // 2).all(), name


def test_two_four_pattern_is_exact(cli, tiny_base, calib_text, tmp_path):
    for method in ("wanda", "sparsegpt", "magnitude"):
        out = tmp_path / method
        _compress(cli, tiny_base, out, "--method", method, "--pattern", "2:4", "--calib", calib_text, *CAL)
        for name, w in _linears(out).items():
            groups = (w != 0).reshape(w.shape[0], -1, 4).sum(-1)
            assert (groups == 2).all(), (method, name)
        assert _manifest(out)["metrics"]["sparsity"] == 0.5


def test_sparsegpt_beats_magnitude_on_block_error(cli, tiny_base, calib_text, tmp_path):
    sg = _compress(cli, tiny_base, tmp_path / "sg", "--method", "sparsegpt", "--sparsity", "0.5", "--calib", calib_text, *CAL)
    mag = _compress(cli, tiny_base, tmp_path / "mag", "--method", "magnitude", "--sparsity", "0.5", "--calib", calib_text, *CAL)
    assert sg["sparsity"] == mag["sparsity"] == 0.5
    assert sg["mean_block_rel_error"] < mag["mean_block_rel_error"]
    errs_sg = _manifest(tmp_path / "sg")["metrics"]["block_rel_error"]
    errs_mag = _manifest(tmp_path / "mag")["metrics"]["block_rel_error"]
    assert all(a < b for a, b in zip(errs_sg, errs_mag))


def test_wanda_scores_match_the_formula():
    torch.manual_seed(0)
    W = torch.randn(6, 8)
    X = torch.randn(3, 5, 8) * torch.arange(1, 9)  # features of very different scale
    stats = InputStats("norms")
    for x in X:
        stats.add(x)
    direct = W.abs() * torch.linalg.norm(X.reshape(-1, 8), dim=0)  # |W_ij| * ||X_j||_2
    got = wanda.scores(W, stats.sq_mean) * (15**0.5)  # the mean over 15 tokens is a constant factor
    assert torch.allclose(got, direct, rtol=1e-5)
    pruned = wanda.prune(W, stats, 0.5, None)
    keep = direct >= direct.sort(dim=1).values[:, 4:5]
    assert torch.equal(pruned != 0, keep)


def test_masks_exact_counts():
    s = torch.rand(16, 32)
    assert ((~row_mask(s, 0.25)).sum(1) == 8).all()
    m = nm_mask(s, 2, 8)
    assert (m.reshape(16, 4, 8).sum(-1) == 2).all()
    top = s.reshape(16, 4, 8).topk(2, dim=-1).indices
    assert m.reshape(16, 4, 8).gather(-1, top).all()


def test_sparsegpt_with_identity_hessian_is_magnitude_per_block():
    """With H = I, the OBS update changes nothing and the score is |w|: SparseGPT = magnitude."""
    torch.manual_seed(0)
    W = torch.randn(4, 16)

    class S:
        hessian = torch.eye(16)

    got = sparsegpt.prune(W, S, 0.5, None, damp=0.0)
    thresh = W.abs().flatten().sort().values[31]
    assert torch.equal(got, torch.where(W.abs() > thresh, W, torch.zeros_like(W)))


def test_rmi_allocation_on_a_four_block_model(cli, deep_base, calib_text, tmp_path):
    s = _compress(cli, deep_base, tmp_path / "r", "--method", "wanda", "--sparsity", "0.5", "--allocation", "rmi",
                  "--rmi-delta", "0.05", "--calib", calib_text, *CAL)
    rates = _manifest(tmp_path / "r")["metrics"]["layer_rates"]
    assert len(set(rates)) > 1 and sorted(rates) == pytest.approx([0.45, 0.45, 0.55, 0.55])
    assert abs(sum(rates) / len(rates) - 0.5) < 0.005
    assert abs(s["sparsity"] - 0.5) < 0.005


def test_rmi_prunes_redundant_blocks_more():
    torch.manual_seed(0)
    base = torch.randn(10, 50)
    # blocks 0-2 see nearly the same representation; block 3 a different one
    grams = [(base + 0.01 * torch.randn(10, 50)) for _ in range(3)] + [torch.randn(10, 50)]
    grams = [(x @ x.T).double() for x in grams]
    imp = allocation.importance(allocation.cka_matrix(grams))
    assert imp[3] == max(imp)
    rates = allocation.rmi(0.5, imp, 0.02)
    assert rates[3] == pytest.approx(0.48) and sum(rates) / 4 == pytest.approx(0.5)


def test_same_seed_same_bytes(cli, tiny_base, calib_text, tmp_path):
    for run in ("a", "b"):
        _compress(cli, tiny_base, tmp_path / run, "--method", "sparsegpt", "--sparsity", "0.6", "--calib", calib_text, *CAL, "--seed", "5")
    for name in ("model.safetensors", "config.json", "calora.json"):
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes(), name


def _ppl(path, text):
    from calora_cli.data import tokenize_text
    from calora_cli.evaluation.perplexity import perplexity
    from calora_cli.models import load_model, load_tokenizer

    model = load_model(path)
    return perplexity(model, tokenize_text(load_tokenizer(path), text), seq_len=64).perplexity


def _kl(reference, model_dir, text) -> float:
    """Mean per-token KL(reference || model) of next-token distributions on the text."""
    from calora_cli.data import tokenize_text
    from calora_cli.models import load_model, load_tokenizer

    ids = tokenize_text(load_tokenizer(reference), text)[: 64 * 40].view(40, 64)
    with torch.no_grad():
        p, q = (load_model(m)(input_ids=ids).logits.log_softmax(-1) for m in (reference, model_dir))
    return float((p.exp() * (p - q)).sum(-1).mean())


# Bounds measured on the trained fixture: perplexity GPTQ-4 g32 +0.1%, NF4 -0.04%; KL 1.1e-4 and
# 5.0e-4. A random-init model predicts nearly uniformly whatever is done to it; on this one a GPTQ
# model with every scale 15% off gives KL 1.8e-3, and the NF4 model saved after bitsandbytes had
# repacked it for its CPU kernel (the bug the next test pins) 1.6e-2: both bounds reject them.
@pytest.mark.parametrize("method, extra, bound, kl", [("gptq", ["--bits", "4", "--group-size", "32"], 0.01, 5e-4),
                                                      ("nf4", [], 0.01, 1.5e-3)])
def test_quantized_model_reloads_and_stays_close(cli, trained_base, calib_text, small_text, tmp_path, method, extra, bound, kl):
    from transformers import AutoModelForCausalLM

    out = tmp_path / method
    s = _compress(cli, trained_base, out, "--method", method, *extra, "--calib", calib_text, *CAL)
    model = AutoModelForCausalLM.from_pretrained(out, device_map="cpu")
    assert model(torch.randint(0, 500, (1, 8))).logits.isfinite().all()
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["quantization_config"]["quant_method"] in ("gptq", "bitsandbytes")
    assert "To be, or not" not in (out / "config.json").read_text()  # no calibration text copied in
    text = small_text.read_text()[:8000]
    before, after = _ppl(trained_base, text), _ppl(out, text)
    assert before < 150  # far from uniform (vocabulary 512): the fixture is trained
    assert abs(after / before - 1) < bound, (before, after)
    assert 0 < _kl(trained_base, out, text) < kl
    assert s["weights_bytes"] < (trained_base / "model.safetensors").stat().st_size
    assert 0 < s["mean_block_rel_error"] < 0.05


def test_nf4_output_does_not_depend_on_the_block_error_pass(cli, trained_base, calib_text, tmp_path):
    """With --calib, compress measures block errors by running the quantized model; bitsandbytes
    repacks 4-bit weights on a CPU forward, so the model must be saved before that pass."""
    _compress(cli, trained_base, tmp_path / "plain", "--method", "nf4")
    s = _compress(cli, trained_base, tmp_path / "calib", "--method", "nf4", "--calib", calib_text, *CAL)
    assert s["mean_block_rel_error"] > 0
    assert (tmp_path / "plain" / "model.safetensors").read_bytes() == (tmp_path / "calib" / "model.safetensors").read_bytes()


@pytest.mark.parametrize("method", ["nf4", "rtn-int8"])
def test_bitsandbytes_streamed_equals_transformers_loader(cli, trained_base, tmp_path, method):
    """Quantized one layer at a time, the output holds, tensor for tensor, what transformers writes
    after loading the whole model with the same BitsAndBytesConfig, and the same quantization_config."""
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    from calora_cli.tensor_io import load_tensors

    cfg = (BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.float32)
           if method == "nf4" else BitsAndBytesConfig(load_in_8bit=True))
    AutoModelForCausalLM.from_pretrained(trained_base, quantization_config=cfg, device_map="cpu",
                                         dtype=torch.float32).save_pretrained(tmp_path / "whole")
    _compress(cli, trained_base, tmp_path / "streamed", "--method", method)
    whole, streamed = (load_tensors(sorted((tmp_path / d).glob("*.safetensors")), lambda n: True)
                       for d in ("whole", "streamed"))
    assert set(whole) == set(streamed) and any(n.endswith(".SCB") or n.endswith(".absmax") for n in whole)
    for name, t in whole.items():
        assert t.dtype == streamed[name].dtype and torch.equal(t, streamed[name]), name
    q = [json.loads((tmp_path / d / "config.json").read_text())["quantization_config"] for d in ("whole", "streamed")]
    assert q[0] == q[1]


@pytest.mark.parametrize(
    "args, message",
    [
        (["--method", "wanda", "--sparsity", "1.5"], "--sparsity must lie in (0, 1)"),
        (["--method", "wanda", "--sparsity", "0"], "--sparsity must lie in (0, 1)"),
        (["--method", "magnitude", "--pattern", "4:4"], "N:M needs 0 < N < M"),
        (["--method", "magnitude", "--pattern", "2:three"], "--pattern must be"),
        (["--method", "gptq", "--group-size", "128"], "--group-size 128 does not divide the 64 input features"),
        # 16 compressed fine and then no CPU kernel could evaluate it (_weight_int4pack_mm takes 32-256)
        (["--method", "gptq", "--group-size", "16"], "--group-size 16 is not one the GPTQ kernels run"),
        (["--method", "wanda", "--sparsity", "0.5", "--then", "gptq", "--group-size", "48"], "--group-size 48 is not one"),
        (["--method", "gptq", "--bits", "5"], "--bits must be one of 2, 3, 4, 8 for gptq"),
        (["--method", "zip"], "unknown --method 'zip'"),
        (["--method", "gguf", "--gguf-type", "Q4_0", "--solver", "foo"], "--solver must be llama.cpp or gptq"),
        (["--method", "gguf", "--gguf-type", "F16", "--solver", "gptq"], "F16 has none"),
        (["--method", "gptq", "--solver", "gptq"], "--solver goes with --method gguf"),
        (["--method", "wanda", "--sparsity", "0.5"], "needs calibration text"),
        (["--method", "wanda", "--pattern", "2:4", "--allocation", "rmi"], "use one or the other"),
    ],
)
def test_bad_compress_options(cli, tiny_base, calib_text, tmp_path, args, message):
    extra = [] if "needs calibration" in message else ["--calib", calib_text]
    line = one_line_error(cli("compress", tiny_base, "-o", tmp_path / "out", *args, *extra))
    assert message in line
    assert list(tmp_path.iterdir()) == []


def test_empty_calibration_and_quantized_input(cli, tiny_base, calib_text, tmp_path):
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    assert "is empty" in one_line_error(cli("compress", tiny_base, "-o", tmp_path / "o", "--method", "wanda", "--sparsity", "0.5", "--calib", empty))
    _compress(cli, tiny_base, tmp_path / "q", "--method", "nf4")
    line = one_line_error(cli("compress", tmp_path / "q", "-o", tmp_path / "o", "--method", "magnitude", "--sparsity", "0.5"))
    assert "already quantized" in line
    assert not (tmp_path / "o").exists()


def _gptq_dense_weights(path):
    """Dequantized (out, in) weights of every GPTQ linear, reloaded from disk by transformers."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(path, device_map="cpu")
    out = {}
    for name, m in model.named_modules():
        if hasattr(m, "qweight"):
            out[name] = m.dequantize_weight().T.float()
    return out


def test_prune_then_gptq_keeps_the_zeros(cli, tiny_base, calib_text, tmp_path):
    """Joint prune + GPTQ: the output is exactly 2:4 sparse after dequantization. The first
    linears of block 0 see the same inputs as in a plain pruning run, so their masks are that run's."""
    _compress(cli, tiny_base, tmp_path / "pruned", "--method", "wanda", "--pattern", "2:4", "--calib", calib_text, *CAL)
    s = _compress(cli, tiny_base, tmp_path / "both", "--method", "wanda", "--pattern", "2:4", "--calib", calib_text,
                  *CAL, "--then", "gptq", "--group-size", "32")
    pruned = {k.removesuffix(".weight"): v for k, v in _linears(tmp_path / "pruned").items()}
    deq = _gptq_dense_weights(tmp_path / "both")
    assert set(deq) == set(pruned)
    for name, w in deq.items():
        assert ((w != 0).reshape(w.shape[0], -1, 4).sum(-1) <= 2).all(), name
    for proj in ("q_proj", "k_proj", "v_proj"):
        w = deq[f"model.layers.0.self_attn.{proj}"]
        assert (w[pruned[f"model.layers.0.self_attn.{proj}"] == 0] == 0).all(), proj
    m = _manifest(tmp_path / "both")
    assert m["params"]["then"] == "gptq" and m["metrics"]["sparsity"] >= 0.5
    assert 0 < s["mean_block_rel_error"] < 0.2


def test_gptq_is_deterministic(cli, tiny_base, calib_text, tmp_path):
    for run in ("a", "b"):
        _compress(cli, tiny_base, tmp_path / run, "--method", "gptq", "--group-size", "32", "--calib", calib_text, *CAL)
    for name in ("model.safetensors", "config.json", "calora.json"):
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes(), name


def test_each_block_is_pruned_on_the_pruned_model_s_activations(tiny_base, calib_text):
    """Block i+1's statistics come from the outputs of block i as pruned (its error included), as
    Wanda's and SparseGPT's references do; stepping the blocks by hand gives the same weights, and
    feeding the dense outputs forward would not."""
    from calora_cli.arch import block_linears, decoder_layers
    from calora_cli.compress.sequential import capture_inputs, collect_stats, prune_sequential, run_block
    from calora_cli.models import load_model, load_tokenizer
    from calora_cli.data import calibration_batch

    calib = calibration_batch(load_tokenizer(tiny_base), calib_text.read_text(), 4, 32, seed=0)
    engine = load_model(tiny_base)
    list(prune_sequential(engine, calib, [0.5, 0.5], wanda.prune, wanda.NEEDS, None))

    def prune_block(block, inputs):
        stats, _ = collect_stats(block, inputs, wanda.NEEDS)
        with torch.no_grad():
            for name, lin in block_linears(block).items():
                lin.weight.copy_(wanda.prune(lin.weight, stats[name], 0.5, None))

    by_hand, dense = load_model(tiny_base), load_model(tiny_base)
    x0 = capture_inputs(by_hand, calib)
    prune_block(decoder_layers(by_hand)[0], x0)
    prune_block(decoder_layers(by_hand)[1], run_block(decoder_layers(by_hand)[0], x0))  # pruned block 0's outputs
    prune_block(decoder_layers(dense)[1], run_block(decoder_layers(dense)[0], x0))  # dense block 0's outputs

    got, want, wrong = (block_linears(decoder_layers(m)[1]) for m in (engine, by_hand, dense))
    for name in want:
        assert torch.equal(got[name].weight, want[name].weight), name
    assert any(not torch.equal(want[n].weight != 0, wrong[n].weight != 0) for n in want)  # the test can tell
