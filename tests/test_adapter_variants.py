"""Adapters as users bring them (peft's LoRA variants), through the stages that take an adapter.

Each adapter is made by peft itself on the pretrained test model, with every trainable tensor
moved away from its initial value (peft starts B, the bias and the token deltas at zero), and saved
by peft. `inherit` carries each over to a pruned and a GPTQ base unchanged, tensor for tensor, and
calora's evaluation of the result equals peft's own forward on that base; the stages that compute
with the delta B·A alone refuse what they cannot take in one line that says what to do instead.
"""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import pytest
import torch
from helpers import one_line_error, transformers_nll

VARIANTS = {
    "dora": dict(target_modules=["q_proj", "v_proj"], use_dora=True),
    "modules_to_save": dict(target_modules=["q_proj", "v_proj"], modules_to_save=["lm_head"]),
    "embedding": dict(target_modules=["q_proj", "embed_tokens"]),
    "trainable_tokens": dict(target_modules=["q_proj", "v_proj"], trainable_token_indices=[1, 5, 9]),
    "lora_bias": dict(target_modules=["q_proj", "v_proj"], lora_bias=True),
    "rslora_patterns": dict(target_modules="all-linear", use_rslora=True, rank_pattern={"v_proj": 2},
                            alpha_pattern={"layers.1.self_attn.q_proj": 3}),
    "layers_to_transform": dict(target_modules=["q_proj", "v_proj"], layers_to_transform=[1]),
}


def _make(base: Path, out: Path, **config) -> Path:
    """A peft adapter on `base`, every trainable tensor perturbed, saved by peft."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(base), LoraConfig(r=4, lora_alpha=8, **config))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p) * (0.02 if p.dim() > 1 else 0.1))
    model.save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def bases(tmp_path_factory, trained_base, calib_text) -> dict[str, Path]:
    from typer.testing import CliRunner

    from calora_cli.cli import app

    root = tmp_path_factory.mktemp("bases")
    made = {"pruned": ["--method", "magnitude", "--sparsity", "0.5"],
            "gptq": ["--method", "gptq", "--group-size", "32", "--calib", calib_text, "--calib-samples", "4",
                     "--seq-len", "64"]}
    for name, args in made.items():
        r = CliRunner().invoke(app, ["compress", str(trained_base), "-o", str(root / name), *map(str, args), "-q"])
        assert r.exit_code == 0, r.output
    return {name: root / name for name in made}


@pytest.fixture(scope="module")
def made(tmp_path_factory, trained_base) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("adapters")
    return {name: _make(trained_base, root / name, **config) for name, config in VARIANTS.items()}


def _refusal(result) -> str:
    """A one-line refusal (exit 2, no traceback) after the warning a peft folder without calora's
    manifest gets (it records no base to check against)."""
    from types import SimpleNamespace

    lines = [ln for ln in result.stderr.splitlines() if ln.strip() and "records no base" not in ln]
    return one_line_error(SimpleNamespace(exit_code=result.exit_code, stdout=result.stdout, stderr="\n".join(lines)))


@pytest.mark.parametrize("variant", sorted(VARIANTS))
@pytest.mark.parametrize("base", ["pruned", "gptq"])
def test_inherit_carries_every_variant_unchanged(cli, tmp_path, bases, made, variant, base, small_text):
    from safetensors.torch import load_file

    out = tmp_path / "inherited"
    r = cli("inherit", made[variant], "--base", bases[base], "-o", out, "--json", "--quiet")
    if variant == "dora" and base == "gptq":  # peft's GPTQ layer has no DoRA
        assert "GPTQ" in _refusal(r) and not out.exists()
        return
    assert r.exit_code == 0, r.stderr
    theirs = load_file(made[variant] / "adapter_model.safetensors")
    ours = load_file(out / "adapter_model.safetensors")
    assert set(ours) == set(theirs)
    assert all(torch.equal(ours[k], theirs[k]) for k in theirs)

    # calora's evaluation of the inherited adapter equals peft's forward of the original on this base
    text = tmp_path / "t.txt"
    text.write_text(small_text.read_text()[:3000])
    ours = json.loads(cli("eval", bases[base], "--adapter", out, "--ppl", text, "--seq-len", "64",
                          "--json", "--quiet").stdout)
    assert abs(math.log(ours["perplexity"]) - transformers_nll(bases[base], text, made[variant])) < 1e-5


EXTRA_VARIANTS = ("dora", "modules_to_save", "embedding", "trainable_tokens", "lora_bias")


@pytest.mark.parametrize("stage", ["compensate", "stream", "sparsify", "nola", "export"])
@pytest.mark.parametrize("variant", EXTRA_VARIANTS)
def test_stages_on_the_delta_refuse_what_they_cannot_take(cli, tmp_path, bases, made, trained_base, calib_text,
                                                          variant, stage):
    out = tmp_path / "out"
    calib = ["--calib", calib_text, "--calib-samples", "2", "--seq-len", "32"]
    args = {
        "compensate": ["inherit", made[variant], "--base", bases["pruned"], "-o", out, "--compensate", "2",
                       "--teacher", trained_base, *calib],
        "stream": ["eval", bases["pruned"], "--adapter", made[variant], "--ppl", calib_text, "--stream", "-o", out],
        "sparsify": ["sparsify-adapter", made[variant], "--base", bases["pruned"], "-o", out],
        "nola": ["compress", made[variant], "-o", out, "--method", "nola", "--base", trained_base, "--data", calib_text,
                 "--steps", "0"],
        "export": ["export", bases["pruned"], "--adapter", made[variant], "-o", out],
    }[stage]
    line = _refusal(cli(*args))
    assert not out.exists()
    what = {"dora": "DoRA", "modules_to_save": "modules_to_save", "embedding": "embedding LoRA",
            "trainable_tokens": "trainable tokens", "lora_bias": "lora_bias"}[variant]
    assert what in line, line
    assert ":" in line.split(what, 1)[1], line  # and then what to do instead


def _peft_logits(base: Path, adapter: Path, ids: torch.Tensor) -> torch.Tensor:
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32), adapter).eval()
    with torch.no_grad():
        return model(input_ids=ids[None]).logits[0]


MERGEABLE = ("dora", "modules_to_save", "embedding", "trainable_tokens", "rslora_patterns", "layers_to_transform")


@pytest.mark.parametrize("variant", MERGEABLE)
def test_merge_equals_peft_forward(cli, tmp_path, bases, made, variant):
    """The merged pruned model, loaded by transformers, computes what peft's forward of the adapter
    on the same base computes (DoRA's rows renormalized on this base's weight, a tied head given
    its own copy and untied, the embedding's LoRA and token rows folded into the table)."""
    from transformers import AutoModelForCausalLM

    out = tmp_path / "merged"
    r = cli("merge", bases["pruned"], "--adapter", made[variant], "-o", out, "--json", "--quiet")
    assert r.exit_code == 0, r.stderr
    ids = torch.arange(1, 60) * 7 % 500
    merged = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    with torch.no_grad():
        ours = merged(input_ids=ids[None]).logits[0]
    theirs = _peft_logits(bases["pruned"], made[variant], ids)
    assert torch.allclose(ours, theirs, atol=2e-5, rtol=1e-4), float((ours - theirs).abs().max())
    plain = AutoModelForCausalLM.from_pretrained(bases["pruned"], dtype=torch.float32).eval()
    with torch.no_grad():
        assert not torch.allclose(plain(input_ids=ids[None]).logits[0], theirs, atol=1e-3)  # the adapter does act
    if variant == "modules_to_save":
        assert json.loads((out / "config.json").read_text())["tie_word_embeddings"] is False


def test_dora_merge_keeps_sparsity_exactly(cli, tmp_path, bases, made):
    """--keep-sparsity with DoRA: the delta masked to the base's non-zeros, then each row rescaled to
    the magnitude: every zero of the pruned base stays zero, and each row's norm is the magnitude."""
    from safetensors.torch import load_file

    out = tmp_path / "merged"
    r = cli("merge", bases["pruned"], "--adapter", made["dora"], "-o", out, "--keep-sparsity", "--json", "--quiet")
    assert r.exit_code == 0, r.stderr
    base = load_file(next(bases["pruned"].glob("*.safetensors")))
    ours = load_file(next(out.glob("*.safetensors")))
    magnitude = load_file(made["dora"] / "adapter_model.safetensors")
    for key, m in magnitude.items():
        if not key.endswith("lora_magnitude_vector"):
            continue
        name = key.removeprefix("base_model.model.").removesuffix(".lora_magnitude_vector") + ".weight"
        assert torch.equal(ours[name][base[name] == 0], torch.zeros(int((base[name] == 0).sum())))
        assert (base[name] == 0).float().mean() > 0.4
        assert torch.allclose(ours[name].norm(dim=1), m, rtol=1e-5)


def test_lora_bias_on_a_base_without_biases_is_refused(cli, tmp_path, bases, made):
    out = tmp_path / "merged"
    line = _refusal(cli("merge", bases["pruned"], "--adapter", made["lora_bias"], "-o", out))
    assert "bias" in line and not out.exists()


@pytest.mark.parametrize("edit, says", [
    ({"layer_replication": [[0, 2], [1, 2]]}, "layer_replication"),
    ({"init_lora_weights": "pissa"}, "path_initial_model_for_weight_conversion"),
    ({"fan_in_fan_out": True}, "fan_in_fan_out"),
])
@pytest.mark.parametrize("stage", ["inherit", "merge", "compensate", "recover", "sparsify", "nola", "export", "stream"])
def test_variants_no_stage_computes_are_refused(cli, tmp_path, bases, made, trained_base, calib_text, edit, says, stage):
    adapter = tmp_path / "adapter"
    shutil.copytree(made["rslora_patterns"], adapter)
    config = json.loads((adapter / "adapter_config.json").read_text())
    (adapter / "adapter_config.json").write_text(json.dumps({**config, **edit}))
    out = tmp_path / "out"
    pruned, calib = bases["pruned"], ["--calib", calib_text, "--calib-samples", "2", "--seq-len", "32"]
    args = {
        "inherit": ["inherit", adapter, "--base", pruned],
        "merge": ["merge", pruned, "--adapter", adapter],
        "compensate": ["inherit", adapter, "--base", pruned, "--compensate", "2", "--teacher", trained_base, *calib],
        "recover": ["recover", adapter, "--base", pruned, "--teacher", trained_base, "--teacher-adapter", adapter,
                    "--data", calib_text, "--steps", "1", "--seq-len", "32"],
        "sparsify": ["sparsify-adapter", adapter, "--base", pruned],
        "nola": ["compress", adapter, "--method", "nola", "--base", trained_base, "--data", calib_text, "--steps", "0"],
        "export": ["export", pruned, "--adapter", adapter],
        "stream": ["eval", pruned, "--adapter", adapter, "--ppl", calib_text, "--stream"],
    }[stage]
    assert says in _refusal(cli(*args, "-o", out)) and not out.exists()


@pytest.mark.parametrize("variant", ["modules_to_save", "embedding", "trainable_tokens"])
def test_keep_sparsity_merges_extras_as_the_plain_merge_does(cli, tmp_path, bases, made, variant):
    """merge --keep-sparsity with extras: every zero of the pruned base's adapted linears stays
    zero, and what the extras change (a head copy, the embedding's LoRA, token rows) is written as
    the plain merge writes it (those tensors are not pruned: nothing to keep)."""
    from safetensors.torch import load_file

    kept, plain = tmp_path / "kept", tmp_path / "plain"
    for out, flags in ((kept, ["--keep-sparsity"]), (plain, [])):
        r = cli("merge", bases["pruned"], "--adapter", made[variant], "-o", out, *flags, "--json", "--quiet")
        assert r.exit_code == 0, r.stderr
    base = load_file(next(bases["pruned"].glob("*.safetensors")))
    ours, theirs = (load_file(next(p.glob("*.safetensors"))) for p in (kept, plain))
    linears = [n for n in base if ".layers." in n and n.endswith("proj.weight")]
    assert all(torch.equal(ours[n][base[n] == 0], torch.zeros(int((base[n] == 0).sum()))) for n in linears)
    assert any(not torch.equal(ours[n], base[n]) for n in linears)
    others = [n for n in theirs if n not in linears]
    changed = [n for n in others if n not in base or not torch.equal(theirs[n], base[n])]
    assert changed and all(torch.equal(ours[n], theirs[n]) for n in others)


@pytest.mark.parametrize("variant", ["dora", "modules_to_save", "trainable_tokens", "embedding", "lora_bias"])
def test_recover_trains_the_variant_as_peft_does(cli, tmp_path, bases, made, trained_base, small_text, variant):
    """recover attaches the adapter through peft (trainable) on the compressed base: the result holds
    the variant's tensors, moved by training, and evaluates."""
    from safetensors.torch import load_file

    out = tmp_path / "recovered"
    r = cli("recover", made[variant], "--base", bases["pruned"], "--teacher", trained_base, "--teacher-adapter",
            made[variant], "--data", small_text, "-o", out, "--steps", "1", "--batch-size", "2", "--seq-len", "32",
            "--recovery-dim", "0", "--json", "--quiet")
    assert r.exit_code == 0, r.stderr[-1500:]
    theirs = load_file(made[variant] / "adapter_model.safetensors")
    ours = load_file(out / "adapter_model.safetensors")
    assert set(ours) == set(theirs)
    extra = {"dora": "lora_magnitude_vector", "modules_to_save": "lm_head", "trainable_tokens": "token_adapter",
             "embedding": "lora_embedding", "lora_bias": "lora_B.bias"}[variant]
    assert any(extra in k and not torch.equal(ours[k], theirs[k]) for k in theirs), sorted(theirs)
    e = cli("eval", bases["pruned"], "--adapter", out, "--ppl", small_text, "--seq-len", "32", "--json", "--quiet")
    assert e.exit_code == 0 and math.isfinite(json.loads(e.stdout)["perplexity"])


def test_info_describes_every_variant(cli, made):
    for variant, adapter in made.items():
        r = cli("info", adapter, "--json")
        assert r.exit_code == 0, (variant, r.stderr)
        assert json.loads(r.stdout)["adapter"]["peft_type"] == "LORA", variant


def test_lora_bias_merges_into_qwen2_biases_as_peft(cli, tmp_path):
    """lora_bias on a base with biases (Qwen2's q/k/v): merge adds lora_B's bias to the base's, as
    peft's merge does; the merged model computes peft's forward of the adapter."""
    from helpers import SHK
    from tiny_models import build_tiny, train_bpe_tokenizer
    from transformers import AutoModelForCausalLM

    tok = train_bpe_tokenizer([(SHK / "plays" / "tragedies--hamlet.txt").read_text()[:50000]], 300)
    base = tmp_path / "qwen2"
    build_tiny("qwen2", len(tok), pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id,
               eos_token_id=tok.eos_token_id).save_pretrained(base)
    tok.save_pretrained(base)
    adapter = _make(base, tmp_path / "adapter", target_modules=["q_proj", "k_proj", "v_proj"], lora_bias=True)
    out = tmp_path / "merged"
    r = cli("merge", base, "--adapter", adapter, "-o", out, "--json", "--quiet")
    assert r.exit_code == 0, r.stderr
    ids = torch.arange(1, 60) * 7 % 290
    merged = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    with torch.no_grad():
        ours = merged(input_ids=ids[None]).logits[0]
    torch.testing.assert_close(ours, _peft_logits(base, adapter, ids), rtol=2e-5, atol=2e-5)


def test_dora_merges_into_a_gptq_base(cli, tmp_path, bases, made):
    """DoRA into GPTQ: with --dense, the merged weights equal peft's own merge of the adapter into the
    GPTQ base's dequantized weights (DoRA's norm taken on those, as peft takes it on a quantized
    base); without, the same merge re-quantized into GPTQ, which loads in transformers."""
    from peft import PeftModel
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    from calora_cli.compress.gptq_format import PARTS, dequantize, is_v1

    dense = tmp_path / "dense"
    r = cli("merge", bases["gptq"], "--adapter", made["dora"], "-o", dense, "--dense", "--json", "--quiet")
    assert r.exit_code == 0, r.stderr
    # the reference: the GPTQ base dequantized into a plain model, DoRA merged there by peft
    packed = load_file(next(bases["gptq"].glob("*.safetensors")))
    v1 = is_v1(json.loads((bases["gptq"] / "config.json").read_text())["quantization_config"])
    plain = AutoModelForCausalLM.from_pretrained(dense, dtype=torch.float32)
    state = plain.state_dict()
    for name in [n for n in packed if n.endswith(".qweight")]:
        m = name.removesuffix(".qweight")
        state[f"{m}.weight"] = dequantize({p: packed[f"{m}.{p}"] for p in PARTS}, 4, v1)
    plain.load_state_dict(state)
    reference = PeftModel.from_pretrained(plain, made["dora"]).merge_and_unload().state_dict()
    ours = load_file(next(dense.glob("*.safetensors")))
    for name in [n for n in ours if ".layers." in n and n.endswith(("q_proj.weight", "v_proj.weight"))]:
        torch.testing.assert_close(ours[name], reference[name], rtol=1e-5, atol=1e-6)
    requantized = tmp_path / "gptq"
    r = cli("merge", bases["gptq"], "--adapter", made["dora"], "-o", requantized, "--json", "--quiet")
    assert r.exit_code == 0, r.stderr
    assert json.loads((requantized / "config.json").read_text())["quantization_config"]["bits"] == 4
    AutoModelForCausalLM.from_pretrained(requantized, dtype=torch.float32)
