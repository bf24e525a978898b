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


def test_streamed_harness_scores_what_lm_eval_scores_on_the_whole_model(cli, tiny_base, tiny_lora):
    """--stream hands lm-eval a model read one decoder layer at a time (one pass per task and request
    kind, the hidden states spilled to disk past a tiny bound): the same accuracies and rolling
    perplexity as lm-eval's own wrapper on the whole model."""
    args = ["--adapter", tiny_lora, "--limit", "30", "--seq-len", "96", "--batch-size", "3", "--json",
            "--harness", "socialiqa_local,quartz_local,richard_ii_rolling", "--harness-include", TASKS]
    whole = _ok(cli("eval", tiny_base, *args, "--no-stream"))
    streamed = _ok(cli("eval", tiny_base, *args, "--stream", "--activation-memory", "0.0005"))
    assert streamed["streamed"] and "streamed" not in whole
    for task in ("socialiqa_local", "quartz_local"):
        w, s = whole["harness"][task], streamed["harness"][task]
        assert s["n"] == w["n"] == 30
        assert s["acc"] == w["acc"] and s["acc_norm"] == w["acc_norm"], task
    w, s = whole["harness"]["richard_ii_rolling"], streamed["harness"]["richard_ii_rolling"]
    for metric in ("word_perplexity", "byte_perplexity", "bits_per_byte"):
        assert s[metric] == pytest.approx(w[metric], rel=1e-5), metric


def test_streamed_scoring_equals_hflm_request_by_request(tiny_base):
    """Log-prob and greedy flag of each (context, continuation), including contexts cut from the left
    and one-token continuations, against HFLM's _loglikelihood_tokens on the same model."""
    import torch
    from lm_eval.models.huggingface import HFLM
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from calora_cli.evaluation.harness import score_continuations

    model = AutoModelForCausalLM.from_pretrained(tiny_base).eval()
    tok = AutoTokenizer.from_pretrained(tiny_base)
    g = torch.Generator().manual_seed(0)
    pairs = [(torch.randint(3, 500, (int(n_ctx),), generator=g).tolist(), torch.randint(3, 500, (int(n_cont),), generator=g).tolist())
             for n_ctx, n_cont in [(5, 1), (40, 3), (70, 9), (2, 30), (63, 1), (90, 20)]]
    # a continuation that is the model's own greedy choice, so the flag is tested both ways
    with torch.no_grad():
        pairs.append((pairs[0][0], [int(model(torch.tensor([pairs[0][0]])).logits[0, -1].argmax())]))
    hf = HFLM(pretrained=model, tokenizer=tok, batch_size=2, max_length=48)
    theirs = hf._loglikelihood_tokens([(None, c, x) for c, x in pairs], disable_tqdm=True)

    def logits_for(batches):
        with torch.no_grad():
            for k, b in enumerate(batches):
                yield k, model(**b).logits

    ours = score_continuations(pairs, logits_for, batch_size=3, max_length=48)
    assert [g for _, g in ours] == [g for _, g in theirs] and ours[-1][1]
    assert [lp for lp, _ in ours] == pytest.approx([lp for lp, _ in theirs], rel=1e-5, abs=1e-5)


def test_a_generating_task_is_refused_in_one_line_when_streamed(tiny_base):
    from types import SimpleNamespace

    from transformers import AutoTokenizer

    from calora_cli.errors import CaloraError
    from calora_cli.evaluation.harness import streamed_lm

    lm = streamed_lm(lambda batches: iter(()), AutoTokenizer.from_pretrained(tiny_base), 2, 64)
    with pytest.raises(CaloraError, match="task gsm8k generates text.*without --stream"):
        lm.generate_until([SimpleNamespace(task_name="gsm8k", args=("2+2=", {}))])
