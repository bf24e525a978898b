"""`calora eval --harness`: lm-evaluation-harness tasks on calora's models, offline, through the
local task files in recipes/tasks (the shipped items), against calora's own scorer."""

from __future__ import annotations

import json
import sys

import pytest
from helpers import DATA, REPO, SHK, one_line_error

TASKS = REPO / "recipes" / "tasks"
SIQA, QUARTZ = DATA / "tasks" / "socialiqa.jsonl", DATA / "tasks" / "quartz.jsonl"
PLAY = SHK / "plays" / "histories--richard-ii.txt"


def _ok(r) -> dict:
    assert r.exit_code == 0, r.stderr
    return json.loads(r.stdout)


def _both(cli, model, *extra, limit=40):
    """calora's own scorer and lm-eval's on the same items, in one run."""
    return _ok(cli("eval", model, *extra, "--tasks", SIQA, "--tasks", QUARTZ, "--limit", str(limit), "--seq-len", "128",
                   "--harness", "socialiqa_local,quartz_local", "--harness-include", TASKS, "--json"))


def _same_scores(r) -> None:
    for ours, theirs in (("socialiqa", "socialiqa_local"), ("quartz", "quartz_local")):
        h = r["harness"][theirs]
        assert h["n"] == r["tasks"][ours]["n"]
        assert h["acc"] == pytest.approx(r["tasks"][ours]["acc"], abs=1e-12), ours
        assert h["acc_norm"] == pytest.approx(r["tasks"][ours]["acc_norm"], abs=1e-12), ours
        assert h["acc_stderr"] > 0


def test_harness_acc_equals_calora_s_own_scorer(cli, tiny_base, tiny_lora):
    _same_scores(_both(cli, tiny_base, "--adapter", tiny_lora))


def test_bits_per_byte_agrees_with_lm_eval_s_rolling_task(cli, tiny_base):
    # calora's windows of 65 tokens every 64 are lm-eval's rolling windows of 64 (one token of
    # context each); the only difference left is the text's first token, which lm-eval predicts
    # from the end-of-text token and calora does not predict
    r = _ok(cli("eval", tiny_base, "--ppl", PLAY, "--seq-len", "65", "--stride", "64", "--harness", "richard_ii_rolling",
                "--harness-include", TASKS, "--json"))
    h = r["harness"]["richard_ii_rolling"]
    assert r["bits_per_byte"] == pytest.approx(h["bits_per_byte"], rel=1e-3)
    assert r["byte_perplexity"] == pytest.approx(h["byte_perplexity"], rel=1e-3)
    assert r["bytes"] < len(PLAY.read_bytes())  # the unpredicted first token's bytes are not counted


def test_harness_runs_nola_and_recovery_adapters_as_calora_does(cli, tiny_base, tiny_lora, tmp_path):
    text = SHK / "plays" / "histories--richard-ii.txt"
    _ok(cli("train", tiny_base, "--data", text, "--kind", "nola", "--bases", "16", "--steps", "3", "--seq-len", "32",
            "--batch-size", "2", "--lr", "5e-2", "-o", tmp_path / "nola", "--json"))
    _ok(cli("compress", tiny_base, "--method", "magnitude", "--sparsity", "0.5", "-o", tmp_path / "pruned", "--json"))
    _ok(cli("recover", tiny_lora, "--base", tmp_path / "pruned", "--teacher", tiny_base, "--teacher-adapter", tiny_lora,
            "--data", text, "--steps", "3", "--seq-len", "32", "--batch-size", "2", "--lr", "1e-2", "-o", tmp_path / "rec",
            "--json"))
    _same_scores(_both(cli, tiny_base, "--adapter", tmp_path / "nola", limit=20))
    _same_scores(_both(cli, tmp_path / "pruned", "--adapter", tmp_path / "rec", limit=20))


def test_missing_lm_eval_is_one_line(cli, tiny_base, monkeypatch):
    monkeypatch.setitem(sys.modules, "lm_eval", None)  # import lm_eval now raises ImportError
    line = one_line_error(cli("eval", tiny_base, "--harness", "socialiqa_local", "--harness-include", TASKS))
    assert "pip install -e '.[harness]'" in line


def test_a_task_that_needs_a_download_is_one_line(cli, tiny_base, tmp_path):
    out = tmp_path / "r.json"
    line = one_line_error(cli("eval", tiny_base, "--harness", "social_iqa", "--limit", "2", "-o", out))
    assert "social_iqa" in line and "offline" in line
    assert not out.exists()
    line = one_line_error(cli("eval", tiny_base, "--harness", "no_such_task"))
    assert "unknown --harness task 'no_such_task'" in line
