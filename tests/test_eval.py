"""`calora eval`: perplexity against an independent computation, multiple choice by hand."""

import json
import math

import pytest
import torch
from helpers import one_line_error

from calora_cli.data import MCItem, tokenize_text
from calora_cli.evaluation.multiple_choice import accuracy, choice_logprobs
from calora_cli.evaluation.perplexity import perplexity, windows
from calora_cli.models import load_model, load_tokenizer


@pytest.fixture(scope="module")
def model_and_tok(tiny_base):
    return load_model(tiny_base), load_tokenizer(tiny_base)


def _reference_ppl(model, ids, seq_len, stride=None):
    """Plain transformers: mean loss per window, weighted by predicted tokens (HF's recipe)."""
    nll, count = 0.0, 0
    stride = stride or seq_len
    prev_end = 0
    for start in range(0, ids.numel(), stride):
        end = min(start + seq_len, ids.numel())
        x = ids[start:end][None]
        labels = x.clone()
        new = end - max(prev_end, start)  # tokens not scored by an earlier window
        labels[:, : x.shape[1] - new] = -100
        n = (labels[:, 1:] != -100).sum().item()
        if n:
            with torch.no_grad():
                nll += model(input_ids=x, labels=labels).loss.item() * n
            count += n
        prev_end = end
        if end == ids.numel():
            break
    return math.exp(nll / count), count


@pytest.mark.parametrize("seq_len, stride", [(64, None), (100, None), (64, 16)])
def test_perplexity_matches_plain_transformers(model_and_tok, small_text, seq_len, stride):
    model, tok = model_and_tok
    ids = tokenize_text(tok, small_text.read_text()[:6000])
    ref, ref_count = _reference_ppl(model, ids, seq_len, stride)
    got = perplexity(model, ids, seq_len=seq_len, stride=stride, batch_size=3)
    assert got.tokens == ref_count == ids.numel() - 1 - (0 if stride else (ids.numel() - 1) // seq_len)
    assert abs(got.perplexity - ref) / ref < 1e-4


@pytest.mark.parametrize("n, seq_len, stride", [(10, 4, None), (9, 4, None), (8, 4, None), (33, 8, 3), (5, 8, 2), (100, 16, 16)])
def test_windows_predict_each_token_once(n, seq_len, stride):
    seen = []
    for w in windows(n, seq_len, stride):
        assert w.end - w.start <= seq_len and w.start < w.score_from <= w.end
        seen += list(range(w.score_from, w.end))
    assert len(seen) == len(set(seen))
    if stride is None or stride >= seq_len:  # non-overlapping: the first token of each window is not predicted
        assert set(seen) == set(range(n)) - set(range(0, n, seq_len))
    else:
        assert set(seen) == set(range(1, n))


def test_multiple_choice_matches_hand_computation(model_and_tok):
    model, tok = model_and_tok
    items = [
        MCItem("To be, or not to be:", [" that is the question", " banana", " the king is dead"], 0),
        MCItem("Good night, sweet", [" prince", " potato"], 1),
        MCItem("Now is the winter of our", [" discontent", " dis"], 0),
    ]
    hand_acc = hand_norm = 0
    for it in items:
        sums = []
        for c in it.choices:
            ctx = tok(it.context, add_special_tokens=False)["input_ids"]
            whole = tok(it.context + c, add_special_tokens=False)["input_ids"]
            cont = whole[len(ctx) :]
            with torch.no_grad():
                logp = torch.log_softmax(model(torch.tensor([whole])).logits[0].double(), -1)
            sums.append(sum(logp[len(ctx) - 1 + k, t].item() for k, t in enumerate(cont)))
        got = choice_logprobs(model, tok, it, max_len=128)
        assert got == pytest.approx(sums, abs=1e-4)
        hand_acc += max(range(len(sums)), key=sums.__getitem__) == it.label
        norm = [s / len(c) for s, c in zip(sums, it.choices)]
        hand_norm += max(range(len(norm)), key=norm.__getitem__) == it.label
    r = accuracy(model, tok, items, max_len=128)
    assert (r.acc, r.acc_norm, r.n) == (hand_acc / 3, hand_norm / 3, 3)


def test_eval_cli_json_with_adapter(cli, tiny_base, tiny_lora, small_text, data_dir):
    tasks = data_dir / "tasks" / "quartz.jsonl"
    base = cli("eval", tiny_base, "--ppl", small_text, "--tasks", tasks, "--limit", "5", "--seq-len", "64", "--json")
    lora = cli("eval", tiny_base, "--adapter", tiny_lora, "--ppl", small_text, "--seq-len", "64", "--json")
    assert base.exit_code == 0 and lora.exit_code == 0, base.stderr + lora.stderr
    b, l = json.loads(base.stdout), json.loads(lora.stdout)  # stdout is exactly one JSON object
    assert set(b) >= {"perplexity", "tokens", "tasks"}
    assert b["tasks"]["quartz"]["n"] == 5 and 0 <= b["tasks"]["quartz"]["acc"] <= 1
    assert b["tokens"] == l["tokens"] > 0
    assert l["perplexity"] != b["perplexity"]


def test_eval_writes_results_file(cli, tiny_base, small_text, tmp_path):
    out = tmp_path / "new" / "dir" / "r.json"  # parents are created
    r = cli("eval", tiny_base, "--ppl", small_text, "--seq-len", "64", "-o", out, "-q", "--json")
    assert r.exit_code == 0, r.stderr
    assert json.loads(out.read_text()) == json.loads(r.stdout)  # the file holds what --json printed
    one_line_error(cli("eval", tiny_base, "--ppl", small_text, "--seq-len", "64", "-o", out))


def test_adapter_for_another_base_is_refused(cli, other_base, tiny_lora, small_text):
    line = one_line_error(cli("eval", other_base, "--adapter", tiny_lora, "--ppl", small_text, "--seq-len", "64"))
    assert "was trained on another base" in line and "--allow-base-mismatch" in line
    ok = cli("eval", other_base, "--adapter", tiny_lora, "--ppl", small_text, "--seq-len", "64", "--allow-base-mismatch", "--json")
    assert ok.exit_code == 0


def test_eval_bad_inputs(cli, tiny_base, tiny_lora, tmp_path):
    assert "nothing to evaluate" in one_line_error(cli("eval", tiny_base))
    bad = tmp_path / "t.jsonl"
    bad.write_text('{"context": "a", "choices": ["x", "y"], "label": 5}\n')
    assert "'label' must index into 'choices'" in one_line_error(cli("eval", tiny_base, "--tasks", bad))
    assert "is an adapter, expected a model" in one_line_error(cli("eval", tiny_lora, "--tasks", bad))
