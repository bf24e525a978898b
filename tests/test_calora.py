"""CA-LoRA: `calora inherit` and `calora recover` (recovery modules, distillation, resume)."""

import json
import math
import shutil

import pytest
import torch
from helpers import one_line_error
from safetensors.torch import load_file

from calora_cli.artifacts import open_artifact
from calora_cli.data import load_examples
from calora_cli.models import load_model, load_tokenizer
from calora_cli.adapters import attach as attach_adapter
from calora_cli.run import RunOptions
from calora_cli.stages.compress import CompressSpec, compress_model
from calora_cli.distill import distill_terms
from calora_cli.methods.ca_lora.recover import RecoverSpec, recover
from calora_cli.train import TrainConfig

Q = RunOptions(show_progress=False)


@pytest.fixture(scope="module")
def compressed(tiny_base, calib_text, tmp_path_factory):
    root = tmp_path_factory.mktemp("compressed")
    specs = {
        "wanda": CompressSpec("wanda", 0.5, calib=calib_text, calib_samples=8, seq_len=64),
        "gptq": CompressSpec("gptq", group_size=32, calib=calib_text, calib_samples=8, seq_len=64),
        "nf4": CompressSpec("nf4"),
    }
    for name, spec in specs.items():
        compress_model(tiny_base, root / name, spec, Q)
    return root


@pytest.fixture(scope="module")
def inherited(compressed, tiny_lora):
    from calora_cli.methods.ca_lora.inherit import inherit

    out = compressed.parent / "inherited"
    inherit(tiny_lora, compressed / "wanda", out, Q)
    return out


def _ok(r):
    assert r.exit_code == 0, r.stderr
    return json.loads(r.stdout)


@pytest.mark.parametrize("kind", ["wanda", "gptq", "nf4"])
def test_inherit_copies_factors_and_loads_in_peft(cli, compressed, tiny_lora, tmp_path, kind):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    s = _ok(cli("inherit", tiny_lora, "--base", compressed / kind, "-o", tmp_path / "i", "--json"))
    assert s["carried"] == 14 and s["skipped"] == 0
    src, got = load_file(tiny_lora / "adapter_model.safetensors"), load_file(tmp_path / "i" / "adapter_model.safetensors")
    assert src.keys() == got.keys() and all(torch.equal(src[k], got[k]) for k in src)
    m = open_artifact(tmp_path / "i").manifest
    assert m["base_fingerprint"] == open_artifact(compressed / kind).fingerprint
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(compressed / kind, device_map="cpu"), tmp_path / "i")
    layer = model.base_model.model.model.layers[0].self_attn.q_proj
    assert torch.equal(layer.lora_A["default"].weight.float(), src["base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"])


def test_inherit_refuses_an_adapter_for_another_base(cli, other_base, compressed, small_text, tmp_path):
    _ok(cli("train", other_base, "-o", tmp_path / "l", "--data", small_text, "--steps", "2", "--seq-len", "64", "--batch-size", "2", "--json"))
    line = one_line_error(cli("inherit", tmp_path / "l", "--base", compressed / "wanda", "-o", tmp_path / "out"))
    assert "was trained on another base" in line
    assert not (tmp_path / "out").exists()


def test_step_zero_equals_compressed_plus_inherited(compressed, inherited):
    from calora_cli.methods.ca_lora import recovery

    x = torch.randint(0, 500, (2, 20))
    model = attach_adapter(load_model(compressed / "wanda"), open_artifact(inherited), trainable=True)
    with torch.no_grad():
        before = model(x).logits
    modules = recovery.attach(model, 4, 8.0, seed=0)
    assert len(modules) == 14  # every linear of both blocks
    with torch.no_grad():
        after = model(x).logits
    assert torch.equal(before, after)
    assert all(m.D.weight.abs().sum() > 0 and (m.U.weight == 0).all() for m in modules.values())


def _heldout_distill(student_dir, adapter, teacher, teacher_adapter, text):
    tok = load_tokenizer(teacher)
    ex = load_examples(text, tok, 64)
    batch = ex.batch(torch.arange(min(8, len(ex))))
    t = attach_adapter(load_model(teacher), open_artifact(teacher_adapter))
    s = attach_adapter(load_model(student_dir), open_artifact(adapter))
    with torch.no_grad():
        kw = dict(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], output_hidden_states=True)
        return distill_terms(s(**kw), t(**kw), batch["attention_mask"], RecoverSpec()).item()


def test_recover_lowers_heldout_distillation_loss(cli, tiny_base, tiny_lora, compressed, inherited, data_dir, small_text, tmp_path):
    train = data_dir / "shakespeare" / "train-tragedies.txt"
    s = _ok(cli("recover", inherited, "--base", compressed / "wanda", "--teacher", tiny_base, "--teacher-adapter", tiny_lora,
                "--data", train, "-o", tmp_path / "r", "--steps", "30", "--seq-len", "64", "--batch-size", "4", "--lr", "3e-3",
                "--distill-weight", "100", "--json"))
    assert s["steps"] == 30
    before = _heldout_distill(compressed / "wanda", inherited, tiny_base, tiny_lora, small_text)
    after = _heldout_distill(compressed / "wanda", tmp_path / "r", tiny_base, tiny_lora, small_text)
    assert after < 0.9 * before, (before, after)
    m = open_artifact(tmp_path / "r").manifest
    assert "recovery.safetensors" in m["extra_files"] and m["params"]["recovery_dim"] == 4
    # eval loads the recovery modules; merge refuses them
    ev = ["--ppl", small_text, "--seq-len", "64", "--json"]
    e = _ok(cli("eval", compressed / "wanda", "--adapter", tmp_path / "r", *ev))
    # the trained recovery modules (U is no longer 0) change what the model computes
    lora_only = tmp_path / "r-lora-only"
    shutil.copytree(tmp_path / "r", lora_only)
    (lora_only / "calora.json").unlink()
    (lora_only / "recovery.safetensors").unlink()
    e_lora = _ok(cli("eval", compressed / "wanda", "--adapter", lora_only, *ev, "--allow-base-mismatch"))
    assert math.isfinite(e["perplexity"]) and e["perplexity"] != e_lora["perplexity"]
    assert "cannot be folded into weights" in one_line_error(cli("merge", compressed / "wanda", "--adapter", tmp_path / "r", "-o", tmp_path / "m"))


def test_resumed_run_equals_uninterrupted(tiny_base, tiny_lora, compressed, inherited, small_text, tmp_path):
    cfg = TrainConfig(steps=6, lr=3e-3, batch_size=2, seq_len=64, seed=1)
    args = (inherited, compressed / "wanda", tiny_base, tiny_lora, small_text)
    recover(*args, tmp_path / "full", cfg, RecoverSpec(checkpoint_every=2), Q)
    with pytest.raises(KeyboardInterrupt):
        recover(*args, tmp_path / "cut", cfg, RecoverSpec(checkpoint_every=2), Q, _stop_after=5)
    assert not (tmp_path / "cut").exists() and (tmp_path / "cut.ckpt" / "state.safetensors").exists()
    recover(*args, tmp_path / "cut", cfg, RecoverSpec(checkpoint_every=2, resume=True), Q)
    for name in ("adapter_model.safetensors", "recovery.safetensors"):
        assert (tmp_path / "full" / name).read_bytes() == (tmp_path / "cut" / name).read_bytes(), name
    assert not (tmp_path / "cut.ckpt").exists()


@pytest.mark.parametrize("distill", ["hidden", "both"])
def test_cached_teacher_trains_the_same_adapter(tiny_base, tiny_lora, compressed, inherited, small_text, tmp_path, distill):
    from safetensors.torch import load_file

    from calora_cli.data import load_examples
    from calora_cli.models import load_tokenizer
    from calora_cli.distill import TeacherCache

    cfg = TrainConfig(steps=8, lr=3e-3, batch_size=2, seq_len=64, seed=2)  # several epochs of the small text
    args = (inherited, compressed / "wanda", tiny_base, tiny_lora, small_text)
    recover(*args, tmp_path / "live", cfg, RecoverSpec(distill=distill, distill_weight=5), Q)
    recover(*args, tmp_path / "cached", cfg, RecoverSpec(distill=distill, distill_weight=5, cache_teacher=True), Q)
    # the cache comes from a streamed pass (the teacher read layer by layer, its LoRA folded into
    # the weights): the same function with other float rounding, so the adapters agree to ~1e-5
    for name in ("adapter_model.safetensors", "recovery.safetensors"):
        a, b = load_file(tmp_path / "live" / name), load_file(tmp_path / "cached" / name)
        for k in a:
            torch.testing.assert_close(b[k], a[k], rtol=1e-3, atol=5e-5)
    # the memory check counts what the cache really holds
    from calora_cli.models import load_model

    ex = load_examples(small_text, load_tokenizer(tiny_base), 64)
    teacher = load_model(tiny_base)
    cache = TeacherCache(teacher, ex, RecoverSpec(distill=distill), 4)
    held = sum(t.numel() * t.element_size() for t in (cache.hidden_states, cache.all_logits) if t is not None)
    assert held == TeacherCache.bytes_needed(ex, teacher.config, RecoverSpec(distill=distill))


def test_inheritance_only_has_no_recovery_modules(cli, tiny_base, tiny_lora, compressed, inherited, small_text, tmp_path,
                                                  monkeypatch):
    from calora_cli.methods.ca_lora import recover as recover_stage

    def no_teacher(*a, **k):
        raise AssertionError("the teacher was loaded, but --distill-weight 0 never runs it")

    monkeypatch.setattr(recover_stage, "load_teacher", no_teacher)
    _ok(cli("recover", inherited, "--base", compressed / "wanda", "--teacher", tiny_base, "--teacher-adapter", tiny_lora,
            "--data", small_text, "-o", tmp_path / "r", "--steps", "2", "--seq-len", "64", "--batch-size", "2",
            "--recovery-dim", "0", "--distill-weight", "0", "--json"))
    assert not (tmp_path / "r" / "recovery.safetensors").exists()
    _ok(cli("merge", compressed / "wanda", "--adapter", tmp_path / "r", "-o", tmp_path / "m", "--keep-sparsity", "--json"))


@pytest.mark.parametrize("extra, message", [(["--distill", "kl"], "--distill must be one of"),
                                            (["--temperature", "0"], "--temperature must be positive"),
                                            (["--recovery-dim", "-1"], "--recovery-dim must be >= 0")])
def test_recover_bad_options(cli, tiny_base, tiny_lora, compressed, inherited, small_text, tmp_path, extra, message):
    line = one_line_error(cli("recover", inherited, "--base", compressed / "wanda", "--teacher", tiny_base,
                              "--teacher-adapter", tiny_lora, "--data", small_text, "-o", tmp_path / "r", *extra))
    assert message in line and not (tmp_path / "r").exists()
