"""`calora merge` and `calora sparsify-adapter`: peft parity, exact zeros, masked training (LoSA)."""

import json
import shutil

import pytest
import torch
from helpers import one_line_error
from safetensors.torch import load_file, save_file

from calora_cli.methods.losa.masks import apply_masks
from calora_cli.run import RunOptions
from calora_cli.stages.compress import CompressSpec, compress_model


@pytest.fixture(scope="module")
def pruned_base(tiny_base, calib_text, tmp_path_factory):
    out = tmp_path_factory.mktemp("pruned") / "wanda50"
    compress_model(tiny_base, out, CompressSpec("wanda", 0.5, calib=calib_text, calib_samples=8, seq_len=64),
                   RunOptions(show_progress=False))
    return out


def _ok(r):
    assert r.exit_code == 0, r.stderr
    return json.loads(r.stdout)


def _linears(path):
    sd = {}
    for f in sorted(path.glob("*.safetensors")):
        sd.update(load_file(f))
    return {k: v for k, v in sd.items() if ".layers." in k and k.endswith("proj.weight")}


def _logits(model, seed=0):
    x = torch.randint(0, 500, (2, 24), generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        return model(x).logits


def test_dense_merge_equals_peft(cli, tiny_base, tiny_lora, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    s = _ok(cli("merge", tiny_base, "--adapter", tiny_lora, "-o", tmp_path / "m", "--json"))
    assert s["merged_modules"] == 14
    ref = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_base), tiny_lora).merge_and_unload()
    ours = AutoModelForCausalLM.from_pretrained(tmp_path / "m")
    ref_sd, ours_sd = ref.state_dict(), ours.state_dict()
    for k, v in ours_sd.items():
        assert torch.allclose(v, ref_sd[k], atol=1e-6), k
    assert torch.allclose(_logits(ours), _logits(ref), atol=1e-5)
    m = json.loads((tmp_path / "m" / "calora.json").read_text())
    assert m["stage"] == "merge" and m["lineage"][0] == m["inputs"]["base"]["fingerprint"]


def test_keep_sparsity_keeps_every_zero_and_matches_masked_forward(cli, pruned_base, tiny_lora, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    s = _ok(cli("merge", pruned_base, "--adapter", tiny_lora, "-o", tmp_path / "m", "--keep-sparsity", "--json"))
    base, merged = _linears(pruned_base), _linears(tmp_path / "m")
    for k in base:
        assert torch.equal(merged[k] == 0, base[k] == 0), k
    assert s["sparsity_after"] == s["sparsity_before"] == 0.5 and s["zeros_filled"] == 0
    # the same function computed another way: peft LoRA on the sparse base, delta masked in forward
    peft_model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(pruned_base), tiny_lora)
    apply_masks(peft_model)
    assert torch.allclose(_logits(AutoModelForCausalLM.from_pretrained(tmp_path / "m")), _logits(peft_model), atol=1e-5)


def test_naive_merge_fills_zeros_and_says_so(cli, pruned_base, tiny_lora, tmp_path):
    r = cli("merge", pruned_base, "--adapter", tiny_lora, "-o", tmp_path / "m", "--json")
    s = _ok(r)
    assert s["sparsity_after"] < 0.01 and s["zeros_filled"] > 0
    assert "filled" in r.stderr and "--keep-sparsity" in r.stderr


def test_weighted_merge_equals_peft_cat(cli, tiny_base, tiny_lora, small_text, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    _ok(cli("train", tiny_base, "-o", tmp_path / "b", "--data", small_text, "--steps", "3", "--seq-len", "64",
            "--batch-size", "2", "--rank", "2", "--seed", "9", "--lr", "1e-2", "--json"))
    _ok(cli("merge", tiny_base, "--adapter", tiny_lora, "--adapter", tmp_path / "b", "--weights", "0.7,0.3",
            "-o", tmp_path / "m", "--json"))
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_base), tiny_lora, adapter_name="a")
    model.load_adapter(tmp_path / "b", adapter_name="b")
    model.add_weighted_adapter(["a", "b"], [0.7, 0.3], "mix", combination_type="cat")
    model.set_adapter("mix")
    ref = model.merge_and_unload().state_dict()
    for k, v in AutoModelForCausalLM.from_pretrained(tmp_path / "m").state_dict().items():
        assert torch.allclose(v, ref[k], atol=1e-6), k


def test_sharded_base_gives_sharded_output(cli, tiny_base, tiny_lora, tmp_path, monkeypatch):
    from transformers import AutoModelForCausalLM

    from calora_cli import merge as merge_module

    sharded = tmp_path / "sharded"
    AutoModelForCausalLM.from_pretrained(tiny_base).save_pretrained(sharded, max_shard_size="100KB")
    for f in tiny_base.iterdir():
        if f.name.startswith("tokenizer"):
            shutil.copy2(f, sharded / f.name)
    shards = sorted(p.name for p in sharded.glob("*.safetensors"))
    assert len(shards) > 2
    _ok(cli("merge", sharded, "--adapter", tiny_lora, "-o", tmp_path / "m", "--json", "--allow-base-mismatch"))
    assert sorted(p.name for p in (tmp_path / "m").glob("*.safetensors")) == shards
    assert (tmp_path / "m" / "model.safetensors.index.json").exists()
    _ok(cli("merge", tiny_base, "--adapter", tiny_lora, "-o", tmp_path / "single", "--json"))
    a = AutoModelForCausalLM.from_pretrained(tmp_path / "m").state_dict()
    b = AutoModelForCausalLM.from_pretrained(tmp_path / "single").state_dict()
    assert all(torch.equal(a[k], b[k]) for k in b)
    # the shards' hashes are taken while writing: the manifest must hold what the files hash to
    from calora_cli.artifacts import file_sha256

    files = json.loads((tmp_path / "m" / "calora.json").read_text())["files"]
    assert {n for n in files if n.endswith(".safetensors")} == set(shards)
    for name, rec in files.items():
        assert rec == {"size": (tmp_path / "m" / name).stat().st_size, "sha256": file_sha256(tmp_path / "m" / name)}
    # shards are merged on several threads: one at a time gives the same bytes, manifest included
    assert merge_module.SHARD_WORKERS > 1
    monkeypatch.setattr(merge_module, "SHARD_WORKERS", 1)
    _ok(cli("merge", sharded, "--adapter", tiny_lora, "-o", tmp_path / "m1", "--json", "--allow-base-mismatch"))
    names = sorted(p.name for p in (tmp_path / "m").iterdir())
    assert names == sorted(p.name for p in (tmp_path / "m1").iterdir())
    assert all((tmp_path / "m" / n).read_bytes() == (tmp_path / "m1" / n).read_bytes() for n in names)


def test_sparsify_reports_removed_energy_and_round_trips_masks(cli, pruned_base, tiny_lora, small_text, tmp_path):
    from calora_cli.artifacts import open_artifact
    from calora_cli.adapters import factors as adapter_factors
    from calora_cli.adapters import is_kind
    from calora_cli.methods.losa.format import stored_masks

    s = _ok(cli("sparsify-adapter", tiny_lora, "--base", pruned_base, "-o", tmp_path / "s", "--json"))
    art = open_artifact(tmp_path / "s")
    masks = stored_masks(art)
    base = _linears(pruned_base)
    factors, masked = adapter_factors(art), is_kind(art, "masked")
    assert masked and len(masks) == 14
    energies = []
    for module, f in factors.items():
        W = base[f"{module}.weight"]
        assert torch.equal(masks[module], W != 0)
        d = f.delta()
        energies.append(((d * (W == 0)) ** 2).sum().item() / (d**2).sum().item())
    assert s["mean_removed_energy"] == pytest.approx(sum(energies) / len(energies), rel=1e-6)
    assert 0.3 < s["mean_removed_energy"] < 0.7  # half the entries masked: about half the energy
    # eval applies the masks: same perplexity as the kept-sparsity merge
    e1 = _ok(cli("eval", pruned_base, "--adapter", tmp_path / "s", "--ppl", small_text, "--seq-len", "64", "--json"))
    _ok(cli("merge", pruned_base, "--adapter", tmp_path / "s", "-o", tmp_path / "m", "--json"))
    e2 = _ok(cli("eval", tmp_path / "m", "--ppl", small_text, "--seq-len", "64", "--json"))
    assert e1["perplexity"] == pytest.approx(e2["perplexity"], rel=1e-5)


def test_masked_training_never_touches_masked_out_weights(cli, pruned_base, tiny_lora, small_text, tmp_path):
    s = _ok(cli("sparsify-adapter", tiny_lora, "--base", pruned_base, "-o", tmp_path / "s", "--data", small_text,
                "--steps", "4", "--seq-len", "64", "--batch-size", "2", "--lr", "1e-2", "--json"))
    assert s["final_loss"] < s["first_loss"]
    m = _ok(cli("merge", pruned_base, "--adapter", tmp_path / "s", "-o", tmp_path / "m", "--json"))
    assert m["zeros_filled"] == 0
    base, merged = _linears(pruned_base), _linears(tmp_path / "m")
    assert all(torch.equal(merged[k] == 0, base[k] == 0) for k in base)
    assert any(not torch.equal(merged[k], base[k]) for k in base)  # training did change kept weights


def test_masked_gradient_is_exact_through_the_mask(pruned_base, tiny_lora):
    """LoSA's masked LoRA gets the exact gradient of W + s*(B@A)*M: compare with autograd on that formula."""
    from peft import PeftModel
    from torch.func import functional_call
    from transformers import AutoModelForCausalLM

    from calora_cli.methods.losa.masks import lora_layers

    x = torch.randint(0, 500, (2, 16), generator=torch.Generator().manual_seed(1))
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(pruned_base), tiny_lora, is_trainable=True)
    masks = apply_masks(model)
    model(x, labels=x).loss.backward()

    plain = AutoModelForCausalLM.from_pretrained(pruned_base)
    factors, weights = {}, {}
    for module, layer in lora_layers(model).items():
        A = layer.lora_A["default"].weight.detach().clone().requires_grad_(True)
        B = layer.lora_B["default"].weight.detach().clone().requires_grad_(True)
        factors[module] = (A, B, layer)
        W = plain.get_submodule(module).weight.detach()
        weights[f"{module}.weight"] = W + layer.scaling["default"] * (B @ A) * masks[module]
    functional_call(plain, weights, (x,), {"labels": x}).loss.backward()
    for module, (A, B, layer) in factors.items():
        assert torch.allclose(layer.lora_A["default"].weight.grad, A.grad, atol=1e-6), module
        assert torch.allclose(layer.lora_B["default"].weight.grad, B.grad, atol=1e-6), module
    # peft's own merge path (get_delta_weight) is masked too
    for module, layer in lora_layers(model).items():
        with torch.no_grad():
            assert (layer.get_delta_weight("default")[~masks[module]] == 0).all(), module


@pytest.mark.parametrize("case", ["weights", "nan", "shape", "dense-sparsify", "changed-base"])
def test_merge_and_sparsify_bad_inputs(cli, tiny_base, pruned_base, tiny_lora, calib_text, tmp_path, case):
    out = tmp_path / "out"
    if case == "weights":
        line = one_line_error(cli("merge", tiny_base, "--adapter", tiny_lora, "--weights", "0.5,0.5", "-o", out))
        assert "--weights has 2 values for 1 adapters" in line
    elif case == "nan":
        bad = tmp_path / "bad"
        shutil.copytree(tiny_lora, bad)
        sd = load_file(bad / "adapter_model.safetensors")
        k = sorted(sd)[0]
        sd[k] = sd[k].clone()
        sd[k][0, 0] = float("nan")
        save_file(sd, bad / "adapter_model.safetensors", metadata={"format": "pt"})
        assert "holds NaN or Inf" in one_line_error(cli("merge", tiny_base, "--adapter", bad, "-o", out))
    elif case == "shape":
        bad = tmp_path / "bad"
        shutil.copytree(tiny_lora, bad)
        sd = load_file(bad / "adapter_model.safetensors")
        sd = {k: (v[:, :32].clone() if "lora_A" in k else v) for k, v in sd.items()}
        save_file(sd, bad / "adapter_model.safetensors", metadata={"format": "pt"})
        assert "shape mismatch" in one_line_error(cli("merge", tiny_base, "--adapter", bad, "-o", out))
    elif case == "dense-sparsify":
        assert "has no zeros in the adapted layers" in one_line_error(cli("sparsify-adapter", tiny_lora, "--base", tiny_base, "-o", out))
    elif case == "changed-base":
        s = tmp_path / "s"
        _ok(cli("sparsify-adapter", tiny_lora, "--base", pruned_base, "-o", s, "--json"))
        other = tmp_path / "other"
        _ok(cli("compress", tiny_base, "-o", other, "--method", "magnitude", "--sparsity", "0.6", "--json"))
        line = one_line_error(cli("eval", other, "--adapter", s, "--ppl", calib_text, "--seq-len", "64", "--allow-base-mismatch"))
        assert "stored mask does not match the base's zeros" in line
    assert not out.exists()


def test_sparsified_adapter_is_deterministic(cli, pruned_base, tiny_lora, tmp_path):
    for run in ("a", "b", "c"):
        _ok(cli("sparsify-adapter", tiny_lora, "--base", pruned_base, "-o", tmp_path / run, "--json"))
    for name in ("masks.safetensors", "calora.json", "adapter_model.safetensors"):
        assert len({(tmp_path / r / name).read_bytes() for r in "abc"}) == 1, name


def test_reused_read_buffers_hash_and_copy_every_byte_even_when_hashing_lags(tmp_path, monkeypatch):
    """merge reads each tensor into one of two buffers it reuses, while the writer hashes the last
    one on another thread: a buffer must not be overwritten before its hash is taken. A hash made
    slow on purpose would catch a writer that let two buffers wait (the file's bytes are right,
    its recorded hash is not)."""
    import hashlib
    import time

    from calora_cli import tensor_io
    from calora_cli.artifacts import file_sha256

    g = torch.Generator().manual_seed(0)
    src_tensors = {f"t{i}": torch.randn(64 + 8 * i, 32, generator=g) for i in range(7)}
    src_tensors["empty"] = torch.empty(0, 32)
    src = tmp_path / "src.safetensors"
    save_file(src_tensors, src)

    real_sha256 = hashlib.sha256  # tensor_io.hashlib is hashlib itself

    class SlowSha256:
        def __init__(self):
            self.h = real_sha256()

        def update(self, buf):
            time.sleep(0.02)  # the reader races ahead meanwhile
            self.h.update(buf)

        def hexdigest(self):
            return self.h.hexdigest()

    monkeypatch.setattr(tensor_io.hashlib, "sha256", SlowSha256)
    monkeypatch.setattr(tensor_io.ShardReader, "CHUNK", 1024)  # raw copies come in many chunks
    buffers = tensor_io.ReadBuffers()
    names = tensor_io.tensor_names(src)
    header = tensor_io.read_safetensors_header(src)
    entries = [(n, header[n]["dtype"], header[n]["shape"]) for n in names]
    dst = tmp_path / "dst.safetensors"
    with tensor_io.ShardReader(src) as f:
        # every other tensor whole (into a buffer), the rest as raw chunks (into the same buffers)
        digest = tensor_io.write_tensors(
            dst, entries, lambda n: f.get_tensor(n, buffers) if names.index(n) % 2 else f.raw(n, buffers), hashed=True)
    monkeypatch.undo()
    assert digest == file_sha256(dst)
    out = load_file(dst)
    assert set(out) == set(src_tensors) and all(torch.equal(out[k], v) for k, v in src_tensors.items())


def test_bf16_base_merges_in_float32_and_stays_bf16(cli, tiny_base, tiny_lora, tmp_path):
    """Half-precision layers are merged in a float32 buffer reused from layer to layer and rounded
    back: the output must equal W + delta computed in float32 and rounded once, layer by layer."""
    from transformers import AutoModelForCausalLM

    from calora_cli.adapters import factors
    from calora_cli.artifacts import open_artifact

    bf16 = tmp_path / "bf16"
    AutoModelForCausalLM.from_pretrained(tiny_base, dtype=torch.bfloat16).save_pretrained(bf16, max_shard_size="200KB")
    for f in tiny_base.iterdir():
        if f.name.startswith("tokenizer"):
            shutil.copy2(f, bf16 / f.name)
    _ok(cli("merge", bf16, "--adapter", tiny_lora, "-o", tmp_path / "m", "--json", "--allow-base-mismatch"))
    base, ours = _linears(bf16), _linears(tmp_path / "m")
    plan = factors(open_artifact(tiny_lora))
    assert set(ours) == set(base) and all(v.dtype == torch.bfloat16 for v in ours.values())
    for name, W in base.items():
        module = name.removesuffix(".weight")
        ref = (W.float() + plan[module].delta()).to(torch.bfloat16) if module in plan else W
        # float32 sums in another order may land a hair either side of a bf16 rounding boundary
        mismatched = (ours[name] != ref).float().mean().item()
        assert mismatched < 0.01, (name, mismatched)
        torch.testing.assert_close(ours[name].float(), ref.float(), rtol=8e-3, atol=1e-6)
    assert sum(module.removesuffix(".weight") in plan for module in base) == 14
