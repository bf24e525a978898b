"""`calora train`: plain LoRA that peft reloads, deterministic, trained on text or prompt/completion."""

import json

import torch
from helpers import one_line_error

from calora_cli.artifacts import MANIFEST, open_artifact
from calora_cli.data import IGNORE, load_examples
from calora_cli.models import load_tokenizer


def _train(cli, base, data, out, *extra):
    r = cli("train", base, "-o", out, "--data", data, "--steps", "6", "--batch-size", "2",
            "--seq-len", "64", "--rank", "4", "--lr", "5e-3", "--json", *extra)
    assert r.exit_code == 0, r.stderr
    return json.loads(r.stdout)


def test_adapter_loads_in_peft_and_changes_the_model(tiny_base, tiny_lora):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(tiny_base)
    x = torch.randint(0, 500, (1, 16))
    before = base(x).logits
    model = PeftModel.from_pretrained(base, tiny_lora)
    after = model(x).logits
    assert (after - before).abs().max() > 1e-4  # a trained B is no longer zero
    targets = set(model.peft_config["default"].target_modules)
    assert targets == {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}


def test_manifest_records_lineage_and_loss(tiny_base, tiny_lora):
    art = open_artifact(tiny_lora, expect="adapter")
    m = art.manifest
    assert m["stage"] == "train" and m["kind"] == "adapter"
    assert m["base_fingerprint"] == open_artifact(tiny_base).fingerprint
    assert m["inputs"]["base"]["fingerprint"] == m["base_fingerprint"]
    assert m["params"]["rank"] == 4 and m["params"]["alpha"] == 8.0
    assert m["metrics"]["final_loss"] < m["metrics"]["first_loss"]


def test_same_seed_gives_byte_identical_files(cli, tiny_base, small_text, tmp_path):
    _train(cli, tiny_base, small_text, tmp_path / "a", "--seed", "3")
    _train(cli, tiny_base, small_text, tmp_path / "b", "--seed", "3")
    _train(cli, tiny_base, small_text, tmp_path / "c", "--seed", "4")
    files = sorted(p.name for p in (tmp_path / "a").iterdir())
    assert "adapter_model.safetensors" in files and MANIFEST in files
    for name in files:
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes(), name
    assert (tmp_path / "a" / "adapter_model.safetensors").read_bytes() != (tmp_path / "c" / "adapter_model.safetensors").read_bytes()


def test_prompt_completion_loss_is_on_the_completion_only(tiny_base, tmp_path):
    tok = load_tokenizer(tiny_base)
    rows = [{"prompt": "Who is there?\n", "completion": "Nay, answer me."}, {"prompt": "Long live", "completion": " the king!"}]
    p = tmp_path / "pc.jsonl"
    p.write_text("\n".join(json.dumps(r) for r in rows))
    ex = load_examples(p, tok, seq_len=64)
    for i, r in enumerate(rows):
        n_prompt = len(tok(r["prompt"], add_special_tokens=False)["input_ids"])
        n_comp = len(tok(r["completion"], add_special_tokens=False)["input_ids"]) + 1  # + eos
        labels = ex.labels[i]
        assert (labels[:n_prompt] == IGNORE).all()
        assert torch.equal(labels[n_prompt : n_prompt + n_comp], ex.input_ids[i, n_prompt : n_prompt + n_comp])
        assert (labels[n_prompt + n_comp :] == IGNORE).all()
        assert ex.attention_mask[i].sum() == n_prompt + n_comp


def test_train_on_jsonl(cli, tiny_base, tmp_path):
    p = tmp_path / "pc.jsonl"
    p.write_text("\n".join(json.dumps({"prompt": f"Line {i}:", "completion": " to be or not to be"}) for i in range(8)))
    s = _train(cli, tiny_base, p, tmp_path / "out")
    assert s["final_loss"] < s["first_loss"]


def test_bad_jsonl_rows(cli, tiny_base, tmp_path):
    p = tmp_path / "pc.jsonl"
    p.write_text('{"prompt": "a"}\n')
    line = one_line_error(cli("train", tiny_base, "-o", tmp_path / "out", "--data", p))
    assert "pc.jsonl:1: each line needs the fields prompt, completion" in line


def test_too_little_text_for_one_block(cli, tiny_base, tmp_path):
    p = tmp_path / "t.txt"
    p.write_text("To be.")
    line = one_line_error(cli("train", tiny_base, "-o", tmp_path / "out", "--data", p, "--seq-len", "64"))
    assert "fewer than one --seq-len block" in line


def test_a_run_that_will_not_fit_is_refused_up_front(cli, tiny_base, small_text, tmp_path, monkeypatch):
    from calora_cli import run

    monkeypatch.setattr(run, "available_memory", lambda: 10**6)  # 1 MB free
    line = one_line_error(cli("train", tiny_base, "--data", small_text, "-o", tmp_path / "out", "--steps", "1"))
    assert "train needs about" in line and "GB are free" in line and "--batch-size" in line
    assert not (tmp_path / "out").exists()
