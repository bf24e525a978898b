"""Training-free transfer: `calora inherit --compensate R` (EoRA-style compensation + the LoRA)."""

from __future__ import annotations

import json

import pytest
import torch
from helpers import SHK, one_line_error
from safetensors.torch import load_file

TEXT = SHK / "plays" / "histories--richard-ii.txt"
CAL = ["--calib", TEXT, "--calib-samples", "8", "--seq-len", "32"]


def _problem(seed=0, out=48, inn=32, tokens=400):
    g = torch.Generator().manual_seed(seed)
    delta = torch.randn(out, inn, generator=g) * 0.1
    x = torch.randn(tokens, inn, generator=g) @ torch.randn(inn, inn, generator=g)  # correlated inputs
    return delta, x.T @ x


def test_compensation_equals_gptqmodel_eora_on_the_same_weights_and_inputs():
    from gptqmodel.eora.eora import eora_compute_lora

    from calora_cli.methods.ca_lora.compensation import compensate

    delta, cov = _problem()
    for rank in (1, 8, 24):
        ours = compensate(delta, cov, rank)
        A, B = eora_compute_lora(delta.clone(), "layer", cov.clone(), rank, torch.float32, torch.device("cpu"))
        # factors are unique only up to signs of singular vectors; their product is unique
        torch.testing.assert_close(ours.B @ ours.A, B @ A, rtol=0, atol=1e-5)


def test_full_rank_reproduces_the_residual_and_eigen_beats_plain_on_the_weighted_error():
    from calora_cli.methods.ca_lora.compensation import compensate, weighted_error

    delta, cov = _problem()
    for space in ("eigen", "plain"):
        full = compensate(delta, cov, 32, space)
        torch.testing.assert_close(full.B @ full.A, delta, rtol=0, atol=1e-5)
        assert full.removed == pytest.approx(1.0, abs=1e-6)
    removed = {space: [compensate(delta, cov, r, space).removed for r in (1, 4, 16)] for space in ("eigen", "plain")}
    assert removed["eigen"] == sorted(removed["eigen"])  # more rank, more removed
    assert all(e > p for e, p in zip(removed["eigen"], removed["plain"]))  # EoRA's space is the optimal one
    c = compensate(delta, cov, 4)
    assert c.removed == pytest.approx(1 - weighted_error(delta - c.B @ c.A, cov) / weighted_error(delta, cov))


def test_the_probe_reads_the_weight_a_layer_computes_with():
    from calora_cli.methods.ca_lora.transfer import layer_weight

    lin = torch.nn.Linear(20, 12)
    torch.testing.assert_close(layer_weight(lin, chunk=7), lin.weight.detach(), rtol=0, atol=1e-6)


@pytest.fixture(scope="module")
def bases(tiny_base, tmp_path_factory):
    from calora_cli.run import RunOptions
    from calora_cli.stages.compress import CompressSpec, compress_model

    root = tmp_path_factory.mktemp("comp-bases")
    q = RunOptions(show_progress=False)
    compress_model(tiny_base, root / "wanda", CompressSpec("wanda", 0.5, calib=TEXT, calib_samples=8, seq_len=32), q)
    compress_model(tiny_base, root / "gptq", CompressSpec("gptq", group_size=32, calib=TEXT, calib_samples=8, seq_len=32), q)
    compress_model(tiny_base, root / "nf4", CompressSpec("nf4"), q)
    return root


def _ok(r) -> dict:
    assert r.exit_code == 0, r.stderr
    return json.loads(r.stdout)


def _logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits.float()


def test_compensated_adapter_is_the_lora_plus_the_compensation_and_closes_the_gap(cli, tiny_base, tiny_lora, bases, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    wanda = bases / "wanda"
    plain = tmp_path / "inherited"
    _ok(cli("inherit", tiny_lora, "--base", wanda, "-o", plain, "--json"))
    s = _ok(cli("inherit", tiny_lora, "--base", wanda, "-o", tmp_path / "c", "--compensate", "8", "--teacher", tiny_base,
                *CAL, "--json"))
    assert 0 < s["mean_compensation_removed"] < 1
    m = json.loads((tmp_path / "c" / "calora.json").read_text())
    per_layer = m["metrics"]["compensation_removed"]
    assert len(per_layer) == 14 and all(0 < v <= 1 for v in per_layer.values())
    config = json.loads((tmp_path / "c" / "adapter_config.json").read_text())
    assert config["r"] == 4 + 8 and config["lora_alpha"] == 12
    state = load_file(tmp_path / "c" / "adapter_model.safetensors")

    ids = torch.randint(3, 500, (2, 24), generator=torch.Generator().manual_seed(1))
    combined = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(wanda), tmp_path / "c").eval()
    # the same LoRA, and the compensation (the last 8 ranks) applied separately by hooks
    separate = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(wanda), plain).eval()
    for name, module in separate.named_modules():
        if hasattr(module, "lora_A") and hasattr(module, "base_layer"):
            A = state[f"{name}.lora_A.weight"][4:]
            B = state[f"{name}.lora_B.weight"][:, 4:]
            module.register_forward_hook(lambda mod, args, out, A=A, B=B: out + args[0] @ A.T @ B.T)
    torch.testing.assert_close(_logits(combined, ids), _logits(separate, ids), rtol=0, atol=1e-5)

    # and it brings the compressed model toward the uncompressed one + the LoRA (no training)
    teacher = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_base), tiny_lora).eval()
    plain_model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(wanda), plain).eval()
    t = _logits(teacher, ids)
    assert ((_logits(combined, ids) - t) ** 2).mean() < 0.7 * ((_logits(plain_model, ids) - t) ** 2).mean()


@pytest.mark.parametrize("kind", ["gptq", "nf4"])
def test_compensated_adapters_load_on_quantized_bases(cli, tiny_base, tiny_lora, bases, tmp_path, kind):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    out = tmp_path / "c"
    s = _ok(cli("inherit", tiny_lora, "--base", bases / kind, "-o", out, "--compensate", "4", "--teacher", tiny_base,
                *CAL, "--compensate-all", "--json"))
    assert 0 < s["mean_compensation_removed"] < 1
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(bases / kind, device_map="cpu"), out).eval()
    ids = torch.randint(3, 500, (1, 16), generator=torch.Generator().manual_seed(2))
    assert _logits(model, ids).isfinite().all()
    e = _ok(cli("eval", bases / kind, "--adapter", out, "--ppl", TEXT, "--seq-len", "64", "--json"))
    assert e["perplexity"] == e["perplexity"]


def test_recover_starts_exactly_at_the_compensated_model(cli, tiny_base, tiny_lora, bases, tmp_path):
    from calora_cli.adapters import attach
    from calora_cli.artifacts import open_artifact
    from calora_cli.methods.ca_lora import recovery
    from calora_cli.models import load_model

    out = tmp_path / "c"
    _ok(cli("inherit", tiny_lora, "--base", bases / "wanda", "-o", out, "--compensate", "4", "--teacher", tiny_base,
            *CAL, "--json"))
    ids = torch.randint(3, 500, (2, 24), generator=torch.Generator().manual_seed(3))
    model = attach(load_model(bases / "wanda"), open_artifact(out))
    before = _logits(model, ids)
    recovery.attach(model, model.peft_config["default"].r, model.peft_config["default"].lora_alpha, seed=0)
    assert torch.equal(_logits(model, ids), before)  # recovery modules start at zero
    s = _ok(cli("recover", out, "--base", bases / "wanda", "--teacher", tiny_base, "--teacher-adapter", tiny_lora,
                "--data", TEXT, "--steps", "2", "--seq-len", "32", "--batch-size", "2", "-o", tmp_path / "r", "--json"))
    assert s["steps"] == 2


@pytest.mark.parametrize("case", ["rank-0", "rank-too-big", "foreign-teacher", "no-calib", "no-teacher", "nola", "recovery"])
def test_bad_compensation_inputs(cli, tiny_base, other_base, tiny_lora, bases, tmp_path, case):
    args = ["--compensate", "4", "--teacher", tiny_base, *CAL]
    adapter = tiny_lora
    if case == "rank-0":
        args[1], want = "0", "--compensate must be a rank of at least 1"
    elif case == "rank-too-big":
        args[1], want = "65", "exceeds the rank of"
    elif case == "foreign-teacher":
        args[3], want = other_base, "was not compressed from"
    elif case == "no-calib":
        args, want = args[:4], "needs calibration text"
    elif case == "no-teacher":
        args, want = [args[0], args[1], *CAL], "--teacher ORIGINAL"
    elif case == "nola":
        adapter, want = tmp_path / "nola", "plain LoRA"
        _ok(cli("train", tiny_base, "--data", TEXT, "--kind", "nola", "--bases", "8", "--steps", "1", "--seq-len", "32",
                "--batch-size", "2", "-o", adapter, "--json"))
    else:
        adapter, want = tmp_path / "rec", "plain LoRA"
        _ok(cli("recover", tiny_lora, "--base", bases / "wanda", "--teacher", tiny_base, "--teacher-adapter", tiny_lora,
                "--data", TEXT, "--steps", "1", "--seq-len", "32", "--batch-size", "2", "-o", adapter, "--json"))
    line = one_line_error(cli("inherit", adapter, "--base", bases / "wanda", "-o", tmp_path / "out", *args))
    assert want in line, line
    assert not (tmp_path / "out").exists()


def test_a_compensated_adapter_trains_masked_and_merges_keeping_the_zeros(cli, tiny_base, tiny_lora, bases, tmp_path):
    wanda = bases / "wanda"
    _ok(cli("inherit", tiny_lora, "--base", wanda, "-o", tmp_path / "c", "--compensate", "4", "--teacher", tiny_base,
            *CAL, "--json"))
    s = _ok(cli("sparsify-adapter", tmp_path / "c", "--base", wanda, "-o", tmp_path / "m", "--data", TEXT, "--steps", "2",
                "--seq-len", "32", "--batch-size", "2", "--json"))
    assert s["mean_removed_energy"] > 0.5  # on a Wanda base the compensation sits on the pruned weights
    merged = _ok(cli("merge", wanda, "--adapter", tmp_path / "m", "-o", tmp_path / "merged", "--json"))
    assert merged["sparsity_after"] == merged["sparsity_before"] and merged["zeros_filled"] == 0


def test_a_compensated_adapter_merges_into_dense_and_gptq_bases_like_any_lora(cli, tiny_base, bases, tmp_path):
    """--compensate-all gives modules of two ranks (rank_pattern / alpha_pattern): the merge must
    scale each by its own alpha. Folded into the pruned base (unmasked) it is the attached model
    exactly; into the GPTQ base, dense, it is the attached model up to gptqmodel's float16 kernel,
    and re-quantized it stays within the 4-bit merge's stated 2% of perplexity."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    lora = tmp_path / "qv"  # a LoRA on q and v only: the other five linears get the compensation alone
    _ok(cli("train", tiny_base, "--data", TEXT, "--targets", "q_proj,v_proj", "--steps", "2", "--seq-len", "32",
            "--batch-size", "2", "-o", lora, "--json"))
    ids = torch.randint(3, 500, (2, 24), generator=torch.Generator().manual_seed(4))
    for kind, atol in (("wanda", 1e-5), ("gptq", 5e-2)):
        comp = tmp_path / f"c-{kind}"
        _ok(cli("inherit", lora, "--base", bases / kind, "-o", comp, "--compensate", "4", "--teacher", tiny_base,
                *CAL, "--compensate-all", "--json"))
        config = json.loads((comp / "adapter_config.json").read_text())
        assert set(config["rank_pattern"].values()) == {4} and config["r"] == 8 + 4  # q, v: r + 4; the rest 4
        flags = ["--dense"] if kind == "gptq" else []
        merged = _ok(cli("merge", bases / kind, "--adapter", comp, "-o", tmp_path / f"m-{kind}", *flags, "--json"))
        assert merged["merged_modules"] == 7 * 2  # every linear of both blocks, compensated
        attached = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(bases / kind, device_map="cpu"), comp).eval()
        folded = AutoModelForCausalLM.from_pretrained(tmp_path / f"m-{kind}").eval()
        torch.testing.assert_close(_logits(folded, ids), _logits(attached, ids), rtol=0, atol=atol)
    requant = _ok(cli("merge", bases / "gptq", "--adapter", tmp_path / "c-gptq", "-o", tmp_path / "q", "--json"))
    assert requant["merged_modules"] == 14
    ppl = {m: _ok(cli("eval", tmp_path / m, "--ppl", TEXT, "--seq-len", "64", "--json"))["perplexity"] for m in ("m-gptq", "q")}
    assert abs(ppl["q"] / ppl["m-gptq"] - 1) < 0.02
