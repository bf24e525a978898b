"""NOLA: basis generation pinned, layer math, the train/compress/expand stages and their artifacts."""

import pytest
import torch

from calora_cli.methods.nola import layer as nola


def test_bases_are_pinned():
    """Reference values: an adapter made today must expand identically on another machine and a
    later torch. If this fails, the generator changed: bump GENERATOR_VERSION, do not edit values."""
    seed = nola.derive_seed(0, "q_proj", (4, 8), 16)
    assert seed == 7548341057888424976
    bases = nola.generate(seed, 16, (4, 8))
    assert bases[0, 0, :4].tolist() == pytest.approx([-0.22700273990631104, -0.020959585905075073, 0.16488060355186462, -0.02295863628387451], abs=0)
    assert bases[15, 3, 4:].tolist() == pytest.approx([-0.1263827085494995, -0.12335789203643799, -0.2231290638446808, -0.17999783158302307], abs=0)
    assert nola.fingerprint(seed, 16, (4, 8)) == "e86309bed3b535f9"


def test_seeds_depend_on_every_input():
    base = nola.derive_seed(0, "q_proj", (4, 8), 16)
    others = [nola.derive_seed(1, "q_proj", (4, 8), 16), nola.derive_seed(0, "k_proj", (4, 8), 16),
              nola.derive_seed(0, "q_proj", (8, 4), 16), nola.derive_seed(0, "q_proj", (4, 8), 17)]
    assert len({base, *others}) == 5


def test_chunked_generation_equals_one_draw(monkeypatch):
    seed = nola.derive_seed(3, "x", (5, 7), 150)
    full = nola.generate(seed, 150, (5, 7))
    parts = torch.cat([nola.generate(seed, 150, (5, 7), lo, min(lo + 37, 150)) for lo in range(0, 150, 37)])
    assert torch.equal(full, parts)
    monkeypatch.setattr(nola, "CHUNK", 37)
    assert torch.equal(full, torch.cat([bases for _, _, bases in nola.chunks(seed, 150, (5, 7))]))
    assert abs(full.abs().max().item() * 150**0.5 - 1) < 0.01  # U(-1, 1) / sqrt(k)


def test_combine_matches_autograd_on_materialised_bases(monkeypatch):
    monkeypatch.setattr(nola, "CHUNK", 7)  # several chunks in forward and backward
    seed, k, shape = nola.derive_seed(0, "y", (6, 5), 20), 20, (6, 5)
    c = torch.randn(k, requires_grad=True)
    g = torch.randn(shape)
    (nola.combine(c, seed, shape) * g).sum().backward()
    ref_c = c.detach().clone().requires_grad_(True)
    bases = nola.generate(seed, k, shape)
    (torch.einsum("k,kij->ij", ref_c, bases) * g).sum().backward()
    assert torch.allclose(nola.combine(c.detach(), seed, shape), torch.einsum("k,kij->ij", c.detach(), bases), atol=1e-6)
    assert torch.allclose(c.grad, ref_c.grad, atol=1e-5)


def test_nola_linear_starts_at_zero_and_learns():
    torch.manual_seed(0)
    base = torch.nn.Linear(12, 10)
    layer = nola.NolaLinear(base, rank=4, k=8, l=6, alpha=8.0, seeds={"A": 1, "B": 2, "A0": 3})
    x = torch.randn(3, 12)
    assert torch.equal(layer(x), base(x))  # beta = 0: delta W = 0
    assert torch.count_nonzero(layer.delta()) == 0
    layer(x).pow(2).sum().backward()
    assert layer.beta_coef.grad.abs().sum() > 0  # A = A0 != 0, so beta learns from step one
    assert sum(p.numel() for p in layer.parameters() if p.requires_grad) - sum(p.numel() for p in base.parameters()) == 14


def _ok(r):
    import json

    assert r.exit_code == 0, r.stderr
    return json.loads(r.stdout)


NOLA = ["--kind", "nola", "--bases", "64,32", "--rank", "4", "--steps", "6", "--seq-len", "64", "--batch-size", "2", "--lr", "2e-2", "--json"]


def test_nola_adapter_trains_evaluates_and_merges_consistently(cli, tiny_base, small_text, tmp_path):
    import json

    s = _ok(cli("train", tiny_base, "-o", tmp_path / "n", "--data", small_text, *NOLA))
    assert s["trainable_params"] == 14 * (64 + 32)  # k + l numbers per module, whatever the rank or width
    m = json.loads((tmp_path / "n" / "calora.json").read_text())
    assert m["params"]["generator_version"] == nola.GENERATOR_VERSION and len(m["params"]["basis_fingerprints"]) == 14
    # forward with NOLA layers (bases combined on the fly) == the merged model (bases expanded to A, B)
    e1 = _ok(cli("eval", tiny_base, "--adapter", tmp_path / "n", "--ppl", small_text, "--seq-len", "64", "--json"))
    _ok(cli("merge", tiny_base, "--adapter", tmp_path / "n", "-o", tmp_path / "m", "--json"))
    e2 = _ok(cli("eval", tmp_path / "m", "--ppl", small_text, "--seq-len", "64", "--json"))
    base = _ok(cli("eval", tiny_base, "--ppl", small_text, "--seq-len", "64", "--json"))
    assert e1["perplexity"] == pytest.approx(e2["perplexity"], rel=1e-5)
    assert e1["perplexity"] != base["perplexity"]


def test_nola_training_is_deterministic(cli, tiny_base, small_text, tmp_path):
    for run in ("a", "b"):
        _ok(cli("train", tiny_base, "-o", tmp_path / run, "--data", small_text, *NOLA, "--seed", "4"))
    for name in ("nola.safetensors", "calora.json", "adapter_config.json"):
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes()


def test_shared_and_per_module_bases():
    shared = [nola.seeds_for(0, f"model.layers.{i}.self_attn.q_proj", 4, 64, 64, 8, 8, True) for i in range(2)]
    per = [nola.seeds_for(0, f"model.layers.{i}.self_attn.q_proj", 4, 64, 64, 8, 8, False) for i in range(2)]
    assert shared[0] == shared[1] and per[0]["A"] != per[1]["A"]


@pytest.mark.parametrize("tamper, message", [
    (lambda p: p.update(generator_version=99), "basis generator version 99"),
    (lambda p: next(iter(p["basis_fingerprints"].values())).update(A="0" * 16), "fingerprint mismatch"),
])
def test_nola_bad_manifests(cli, tiny_base, small_text, tmp_path, tamper, message):
    import json

    from helpers import one_line_error

    _ok(cli("train", tiny_base, "-o", tmp_path / "n", "--data", small_text, *NOLA))
    mp = tmp_path / "n" / "calora.json"
    m = json.loads(mp.read_text())
    tamper(m["params"])
    mp.write_text(json.dumps(m))
    assert message in one_line_error(cli("eval", tiny_base, "--adapter", tmp_path / "n", "--ppl", small_text, "--seq-len", "64"))


def _heldout_kl(model_dir, adapter, teacher_adapter, text):
    from calora_cli.artifacts import open_artifact
    from calora_cli.data import load_examples
    from calora_cli.models import load_model, load_tokenizer
    from calora_cli.adapters import attach as attach_adapter
    from calora_cli.distill import DistillSpec as RecoverSpec
    from calora_cli.distill import distill_terms

    ex = load_examples(text, load_tokenizer(model_dir), 64)
    b = ex.batch(torch.arange(min(8, len(ex))))
    t = attach_adapter(load_model(model_dir), open_artifact(teacher_adapter))
    s = load_model(model_dir)
    if adapter is not None:
        s = attach_adapter(s, open_artifact(adapter))
    with torch.no_grad():
        kw = dict(input_ids=b["input_ids"], attention_mask=b["attention_mask"])
        return distill_terms(s(**kw), t(**kw), b["attention_mask"], RecoverSpec("logits")).item()


def test_lora_compressed_to_nola_by_distillation(cli, tiny_base, tiny_lora, data_dir, small_text, tmp_path):
    train = data_dir / "shakespeare" / "train-tragedies.txt"
    s = _ok(cli("compress", tiny_lora, "-o", tmp_path / "n", "--method", "nola", "--bases", "256,128", "--data", train,
                "--steps", "40", "--seq-len", "64", "--batch-size", "4", "--lr", "5e-2", "--json"))
    assert s["bytes_nola"] < s["bytes_lora"]
    from safetensors.torch import load_file

    lora_params = sum(t.numel() for t in load_file(tiny_lora / "adapter_model.safetensors").values())
    assert s["compression_ratio"] == lora_params / (14 * (256 + 128))
    # on held-out text, base + NOLA is much closer to base + LoRA than the base alone
    before = _heldout_kl(tiny_base, None, tiny_lora, small_text)
    after = _heldout_kl(tiny_base, tmp_path / "n", tiny_lora, small_text)
    assert after < 0.5 * before, (before, after)


def test_nola_compress_bad_inputs(cli, tiny_lora, tiny_base, small_text, tmp_path):
    from helpers import one_line_error

    assert "pass --data FILE" in one_line_error(cli("compress", tiny_lora, "-o", tmp_path / "o", "--method", "nola"))
    _ok(cli("train", tiny_base, "-o", tmp_path / "n", "--data", small_text, *NOLA))
    line = one_line_error(cli("compress", tmp_path / "n", "-o", tmp_path / "o", "--method", "nola", "--data", small_text))
    assert "already a NOLA adapter" in line and not (tmp_path / "o").exists()


def test_weight_fit_is_exact_when_the_bases_span_the_factors():
    from calora_cli.methods.nola.fit import fit

    g = torch.Generator().manual_seed(0)
    r, d_in, d_out = 2, 6, 5
    seeds = nola.seeds_for(3, "model.layers.0.self_attn.q_proj", r, d_in, d_out, 16, 12, True)
    A_t, B_t = torch.randn(r, d_in, generator=g), torch.randn(d_out, r, generator=g)
    f = fit(A_t, B_t, nola.offset(seeds["A0"], (r, d_in)), seeds, k=16, l=12)  # k >= r*d_in, l >= d_out*r
    A, B = nola.expand(f.alpha, f.beta, seeds, r, d_in, d_out)
    ref = B_t @ A_t
    assert f.rel_error < 1e-5
    assert torch.linalg.norm(B @ A - ref) / torch.linalg.norm(ref) < 1e-5  # checked on the product itself


def test_weight_fit_of_a_generic_lora_leaves_most_of_it():
    from calora_cli.methods.nola.fit import fit

    g = torch.Generator().manual_seed(1)
    r, d = 4, 64
    seeds = nola.seeds_for(0, "model.layers.0.self_attn.q_proj", r, d, d, 32, 32, True)
    f = fit(torch.randn(r, d, generator=g), torch.randn(d, r, generator=g), nola.offset(seeds["A0"], (r, d)), seeds, 32, 32)
    assert 0.8 < f.rel_error <= 1.0  # 32 bases of a 256-dimensional factor space: ~k/(r d) of it


@pytest.mark.parametrize("bits, n", [(16, 33), (8, 33), (4, 33), (4, 32)])
def test_coefficient_quantization_round_trips_within_its_step(bits, n):
    c = torch.randn(n, generator=torch.Generator().manual_seed(bits + n))
    q, scale = nola.quantize_coefficients(c, bits)
    back = nola.dequantize_coefficients(q, scale, bits, n)
    if bits == 16:
        torch.testing.assert_close(back, c, rtol=1e-3, atol=0)
        return
    assert q.dtype == (torch.uint8 if bits == 4 else torch.int8)
    assert q.numel() == ((n + 1) // 2 if bits == 4 else n)
    assert ((back - c).abs() <= scale / 2 + 1e-7).all()
    assert float(back.abs().max()) == pytest.approx(float(c.abs().max()), rel=1e-6)  # the largest is a grid point


def test_expand_export_loads_in_peft_and_the_weight_fit_recovers_a_nola_born_adapter(cli, tiny_base, small_text, tmp_path):
    import json

    from peft import PeftModel
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    from calora_cli.artifacts import open_artifact
    from calora_cli.models import load_model
    from calora_cli.adapters import attach as attach_adapter

    _ok(cli("train", tiny_base, "-o", tmp_path / "n", "--data", small_text, *NOLA))
    _ok(cli("compress", tmp_path / "n", "-o", tmp_path / "lora", "--method", "expand", "--json"))
    x = torch.randint(0, 500, (2, 24), generator=torch.Generator().manual_seed(0))
    peft_model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_base), tmp_path / "lora")
    nola_model = attach_adapter(load_model(tiny_base), open_artifact(tmp_path / "n"))
    with torch.no_grad():
        torch.testing.assert_close(peft_model(x).logits, nola_model(x).logits, rtol=0, atol=1e-5)
    # back to NOLA with the weight fit alone: the same bases (seed 0, 64/32 bases) give the coefficients back
    s = _ok(cli("compress", tmp_path / "lora", "-o", tmp_path / "again", "--method", "nola", "--bases", "64,32",
                "--data", small_text, "--steps", "0", "--seq-len", "64", "--json"))
    assert s["mean_fit_delta_rel_error"] < 1e-5 and s["mean_output_rel_error"] < 1e-4
    a, b = load_file(tmp_path / "n" / "nola.safetensors"), load_file(tmp_path / "again" / "nola.safetensors")
    for k in a:
        assert torch.linalg.norm(b[k] - a[k]) <= 1e-4 * torch.linalg.norm(a[k]) + 1e-7, k
    assert json.loads((tmp_path / "again" / "calora.json").read_text())["params"]["init"] == "als"


def test_distillation_beats_the_weight_fit_on_held_out_outputs_and_4_bit_coefficients_load(cli, trained_base, data_dir,
                                                                                          small_text, tmp_path):
    train = data_dir / "shakespeare" / "train-tragedies.txt"
    # a LoRA that really changes the model, so there is something to match
    _ok(cli("train", trained_base, "-o", tmp_path / "lora", "--data", train, "--steps", "20", "--lr", "1e-2", "--seq-len", "64",
            "--batch-size", "4", "--json"))
    common = ["--method", "nola", "--bases", "64,32", "--data", train, "--seq-len", "64", "--batch-size", "4", "--json"]
    fit_only = _ok(cli("compress", tmp_path / "lora", "-o", tmp_path / "fit", *common, "--steps", "0"))
    distilled = _ok(cli("compress", tmp_path / "lora", "-o", tmp_path / "d", *common, "--steps", "20", "--lr", "1e-2"))
    assert fit_only["mean_fit_delta_rel_error"] > 0.8  # a generic LoRA: 64 bases hold little of it
    assert distilled["heldout_kl"] < fit_only["heldout_kl"]  # held-out examples, kept out of distillation
    q4 = _ok(cli("compress", tmp_path / "lora", "-o", tmp_path / "q4", *common, "--steps", "20", "--lr", "1e-2", "--coef-bits", "4"))
    assert q4["bytes_nola"] < distilled["bytes_nola"]
    ppl = {name: _ok(cli("eval", trained_base, "--adapter", tmp_path / name, "--ppl", small_text, "--seq-len", "64", "--json"))["perplexity"]
           for name in ("d", "q4")}
    assert ppl["q4"] == pytest.approx(ppl["d"], rel=0.02)  # 4-bit coefficients cost little


def test_nola_adapters_inherit_and_sparsify_as_their_expanded_lora(cli, tiny_base, small_text, calib_text, tmp_path):
    from helpers import one_line_error

    _ok(cli("train", tiny_base, "-o", tmp_path / "n", "--data", small_text, *NOLA))
    pruned = tmp_path / "pruned"
    _ok(cli("compress", tiny_base, "-o", pruned, "--method", "wanda", "--sparsity", "0.5", "--calib", calib_text,
            "--calib-samples", "4", "--seq-len", "64", "--json"))
    ev = ["--ppl", small_text, "--seq-len", "64", "--json"]
    direct = _ok(cli("eval", pruned, "--adapter", tmp_path / "n", *ev))["perplexity"]
    _ok(cli("inherit", tmp_path / "n", "--base", pruned, "-o", tmp_path / "inh", "--json"))
    assert _ok(cli("eval", pruned, "--adapter", tmp_path / "inh", *ev))["perplexity"] == pytest.approx(direct, rel=1e-5)
    _ok(cli("sparsify-adapter", tmp_path / "n", "--base", pruned, "-o", tmp_path / "s", "--json"))
    m = _ok(cli("merge", pruned, "--adapter", tmp_path / "s", "-o", tmp_path / "m", "--json"))
    assert m["zeros_filled"] == 0 and m["merged_modules"] == 14
    line = one_line_error(cli("recover", tmp_path / "n", "--base", pruned, "--teacher", tiny_base, "--teacher-adapter",
                              tmp_path / "n", "--data", small_text, "-o", tmp_path / "r"))
    assert "is a NOLA adapter" in line and not (tmp_path / "r").exists()


def test_evaluation_reuses_the_factors_until_a_coefficient_changes(monkeypatch):
    layer = nola.NolaLinear(torch.nn.Linear(16, 12), rank=2, k=8, l=8, alpha=4.0,
                            seeds=nola.seeds_for(0, "model.layers.0.self_attn.q_proj", 2, 16, 12, 8, 8, True))
    x = torch.randn(3, 16, generator=torch.Generator().manual_seed(0))
    calls = []
    real = nola.combine
    monkeypatch.setattr(nola, "combine", lambda *a: calls.append(1) or real(*a))
    with torch.no_grad():
        layer(x)
        layer(x)
        assert len(calls) == 2  # A and B once, then reused
        layer.beta_coef.data.fill_(0.5)  # a write that bumps no version counter
        y = layer(x)
    assert len(calls) == 4
    torch.testing.assert_close(y, layer.base(x) + layer.scale * (x @ layer.factors()[0].T) @ layer.factors()[1].T)
    layer(x).sum().backward()  # with gradients: rebuilt every call, and coefficients get gradients
    assert layer.beta_coef.grad is not None and len(calls) >= 6
