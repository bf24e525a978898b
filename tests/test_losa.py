"""LoSA's error-driven rank allocation and distillation in `calora sparsify-adapter`."""

import json

import pytest
import torch
from helpers import one_line_error
from safetensors.torch import load_file

from calora_cli.adapters.lora import factors_from_state
from calora_cli.methods.losa.ranks import allocate, resize
from calora_cli.run import RunOptions
from calora_cli.stages.compress import CompressSpec, compress_model


@pytest.fixture(scope="module")
def pruned_deep(deep_base, calib_text, tmp_path_factory):
    out = tmp_path_factory.mktemp("pruned-deep") / "wanda60"
    compress_model(deep_base, out, CompressSpec("wanda", 0.6, calib=calib_text, calib_samples=8, seq_len=64),
                   RunOptions(show_progress=False))
    return out


@pytest.fixture(scope="module")
def deep_lora(deep_base, small_text, tmp_path_factory):
    from calora_cli.stages.finetune import train_lora
    from calora_cli.train import TrainConfig

    out = tmp_path_factory.mktemp("deep-lora") / "lora"
    train_lora(deep_base, small_text, out, TrainConfig(steps=3, batch_size=2, seq_len=32), RunOptions(show_progress=False), rank=4)
    return out


def _ok(r):
    assert r.exit_code == 0, r.stderr
    return json.loads(r.stdout)


@pytest.mark.parametrize("errors, mean, cap", [
    ([0.1, 0.2, 0.3, 0.4], 8, 16),
    ([1e-6, 1e-6, 1e-6, 5.0], 8, 16),  # one block takes what the cap allows, the rest is spread
    ([0.5, 0.1, 0.1, 0.1, 0.1, 0.1], 4, 6),
    ([0.0, 0.0, 0.0], 5, 10),
])
def test_allocation_meets_the_budget_and_follows_the_errors(errors, mean, cap):
    ranks = allocate(errors, mean, cap)
    assert sum(ranks) == mean * len(errors)
    assert all(1 <= r <= cap for r in ranks)
    order = sorted(range(len(errors)), key=lambda i: errors[i])
    assert all(ranks[a] <= ranks[b] for a, b in zip(order, order[1:]) if errors[a] < errors[b])
    if len(set(errors)) == 1:
        assert ranks == [mean] * len(errors)


def test_allocation_refuses_impossible_budgets():
    from calora_cli.errors import CaloraError

    with pytest.raises(CaloraError, match="rank budget 9 per layer"):
        allocate([0.1, 0.2], 9, 8)
    with pytest.raises(CaloraError, match="finite"):
        allocate([0.1, float("nan")], 4, 8)


def test_resize_truncates_to_the_best_low_rank_delta_and_grows_without_changing_it(tiny_lora):
    state = load_file(tiny_lora / "adapter_model.safetensors")
    config = json.loads((tiny_lora / "adapter_config.json").read_text())
    before = factors_from_state(state, config)
    modules = sorted(before)
    r = before[modules[0]].A.shape[0]
    ranks = {m: (2 if i % 2 else r + 3) for i, m in enumerate(modules)}
    new_state, new_config = resize(state, config, ranks, seed=0)
    after = factors_from_state(new_state, new_config)
    for m in modules:
        assert after[m].A.shape[0] == ranks[m] == new_config["rank_pattern"][m]
        d_before, d_after = before[m].delta().double(), after[m].delta().double()
        if ranks[m] > r:
            torch.testing.assert_close(d_after, d_before, rtol=0, atol=1e-6)  # new components start at B = 0
        else:
            U, S, Vh = torch.linalg.svd(d_before)  # the Eckart-Young reference, on the full product
            best = U[:, :2] * S[:2] @ Vh[:2]
            torch.testing.assert_close(d_after, best, rtol=0, atol=1e-6)


def test_error_allocation_trains_loads_and_merges_exactly_sparse(cli, deep_base, pruned_deep, deep_lora, small_text, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    train = ["--data", small_text, "--steps", "2", "--batch-size", "2", "--seq-len", "32"]
    s = _ok(cli("sparsify-adapter", deep_lora, "--base", pruned_deep, "-o", tmp_path / "a", *train,
                "--rank-allocation", "error", "--json"))
    errors = json.loads((pruned_deep / "calora.json").read_text())["metrics"]["block_rel_error"]
    assert s["block_ranks"] == allocate(errors, 4, 8) and sum(s["block_ranks"]) == 4 * 4
    assert len(set(s["block_ranks"])) > 1  # the blocks did lose different amounts
    # peft reloads it at the allocated ranks
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(pruned_deep), tmp_path / "a")
    for name, m in model.named_modules():
        if name.endswith("q_proj") and hasattr(m, "lora_A"):
            block = int(name.split(".layers.")[1].split(".")[0])
            assert m.lora_A["default"].weight.shape[0] == s["block_ranks"][block]
    merged = _ok(cli("merge", pruned_deep, "--adapter", tmp_path / "a", "-o", tmp_path / "m", "--json"))
    assert merged["zeros_filled"] == 0 and merged["sparsity_after"] >= merged["sparsity_before"]


def test_distillation_weight_zero_never_loads_the_teacher(cli, deep_base, pruned_deep, deep_lora, small_text, tmp_path,
                                                         monkeypatch):
    import calora_cli.distill

    def no_teacher(*a, **k):
        raise AssertionError("the teacher was loaded, but --distill-weight 0 never runs it")

    monkeypatch.setattr(calora_cli.distill, "load_teacher", no_teacher)
    train = ["--data", small_text, "--steps", "2", "--batch-size", "2", "--seq-len", "32", "--lr", "1e-2", "--json"]
    plain = _ok(cli("sparsify-adapter", deep_lora, "--base", pruned_deep, "-o", tmp_path / "plain", *train))
    zero = _ok(cli("sparsify-adapter", deep_lora, "--base", pruned_deep, "-o", tmp_path / "zero", *train,
                   "--distill-from", deep_base, "--distill-weight", "0"))
    assert zero["first_loss"] == plain["first_loss"]


def test_distillation_from_the_dense_model_changes_the_training(cli, deep_base, pruned_deep, deep_lora, small_text, tmp_path):
    train = ["--data", small_text, "--steps", "2", "--batch-size", "2", "--seq-len", "32", "--lr", "1e-2", "--json"]
    plain = _ok(cli("sparsify-adapter", deep_lora, "--base", pruned_deep, "-o", tmp_path / "plain", *train))
    dist = _ok(cli("sparsify-adapter", deep_lora, "--base", pruned_deep, "-o", tmp_path / "dist", *train,
                   "--distill-from", deep_base, "--distill", "logits", "--distill-weight", "5"))
    # the first loss is taken before any update: it differs exactly by the distillation term, which is > 0
    assert dist["first_loss"] > plain["first_loss"]
    m = json.loads((tmp_path / "dist" / "calora.json").read_text())
    assert m["params"]["distill_from"] and m["inputs"]["distill_from"]["fingerprint"]
    a = load_file(tmp_path / "plain" / "adapter_model.safetensors")
    b = load_file(tmp_path / "dist" / "adapter_model.safetensors")
    assert any(not torch.equal(a[k], b[k]) for k in a)
    # the teacher's outputs from one streamed pass (it is never loaded whole): the same training, to
    # float rounding (the streamed teacher folds its LoRA into the weights)
    cached = _ok(cli("sparsify-adapter", deep_lora, "--base", pruned_deep, "-o", tmp_path / "cached", *train,
                     "--distill-from", deep_base, "--distill", "logits", "--distill-weight", "5", "--cache-teacher"))
    assert cached["first_loss"] == pytest.approx(dist["first_loss"], rel=1e-5)
    c = load_file(tmp_path / "cached" / "adapter_model.safetensors")
    for k in b:
        torch.testing.assert_close(c[k], b[k], rtol=1e-3, atol=5e-5)


@pytest.mark.parametrize("case", ["no-data", "bad-mode", "wrong-teacher", "bad-weight"])
def test_losa_options_bad_input(cli, other_base, pruned_deep, deep_lora, small_text, tmp_path, case):
    out = tmp_path / "out"
    train = ["--data", small_text, "--steps", "1", "--seq-len", "32"]
    args = {
        "no-data": ["--rank-allocation", "error"],
        "bad-mode": [*train, "--rank-allocation", "svd"],
        "wrong-teacher": [*train, "--distill-from", other_base],
        "bad-weight": [*train, "--distill-from", other_base, "--distill-weight", "-1"],
    }[case]
    line = one_line_error(cli("sparsify-adapter", deep_lora, "--base", pruned_deep, "-o", out, *args))
    assert {"no-data": "give --data too", "bad-mode": "--rank-allocation must be one of uniform, error",
            "wrong-teacher": "was not pruned from", "bad-weight": "--distill-weight must be >= 0"}[case] in line
    assert not out.exists()
