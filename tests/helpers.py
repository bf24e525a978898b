"""Helpers the tests share (fixtures live in conftest.py)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "recipes"))  # tiny_models: the test-model builders
DATA = Path(os.environ.get("CALORA_SHARED_DATA", REPO.parent / "shared" / "data"))
SHK = DATA / "shakespeare"


def save_tiny_base(out: Path, seed: int = 0, vocab: int = 512, **shape) -> None:
    """A tiny random Llama + a BPE tokenizer trained on one play, saved by plain transformers."""
    from tiny_models import build_tiny_llama, train_bpe_tokenizer

    tok = train_bpe_tokenizer([(SHK / "plays" / "tragedies--hamlet.txt").read_text()], vocab)
    model = build_tiny_llama(
        len(tok), seed=seed, pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id, **shape,
    )
    model.save_pretrained(out)
    tok.save_pretrained(out)


def one_line_error(result) -> str:
    """Assert a clean CLI failure: exit 2, one line on stderr, no traceback; return that line."""
    assert result.exit_code == 2, (result.exit_code, result.stdout, result.stderr)
    lines = [ln for ln in result.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1, result.stderr
    assert "Traceback" not in result.stderr
    assert lines[0].startswith("calora: error: ")
    return lines[0]


def launch(args, processes: int, strategy: str = "ddp", torchrun: bool = False) -> dict:
    """Run the CLI as a subprocess (under torchrun when processes > 1 or asked); return rank 0's --json summary."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "GPTQMODEL_DISABLE_PACK_EXT": "1", "OMP_NUM_THREADS": "1",
           "CALORA_DISTRIBUTED": strategy}
    launcher = [sys.executable, "-m", "calora_cli"] if processes == 1 and not torchrun else [
        sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={processes}", "-m", "calora_cli"]
    r = subprocess.run([*launcher, *map(str, args)], capture_output=True, text=True, env=env)
    assert r.returncode == 0, r.stderr[-3000:]
    summaries = [line for line in r.stdout.splitlines() if line.startswith("{")]
    assert len(summaries) == 1, r.stdout  # only rank 0 prints
    return json.loads(summaries[0])


def assert_same_safetensors(a_dir: Path, b_dir: Path, atol: float) -> None:
    """Both artifacts hold the same safetensors files, tensors and keys; floats within atol, the rest equal."""
    import torch
    from safetensors.torch import load_file

    files = sorted(p.name for p in Path(a_dir).glob("*.safetensors"))
    assert files == sorted(p.name for p in Path(b_dir).glob("*.safetensors")) and files
    for name in files:
        a, b = load_file(Path(a_dir) / name), load_file(Path(b_dir) / name)
        assert a.keys() == b.keys()
        for k in a:
            if a[k].is_floating_point():
                torch.testing.assert_close(b[k], a[k], rtol=0, atol=atol)
            else:
                assert torch.equal(a[k], b[k]), k


def tallied(terminalreporter, key: str) -> list:
    """The values passing tests recorded under `key` with `record_property`: the suites' counts for
    the CI log, gathered from the test reports, so they are whole under pytest-xdist too."""
    return [value for report in terminalreporter.stats.get("passed", []) if report.when == "call"
            for k, value in report.user_properties if k == key]


def transformers_nll(model_dir: Path, text: Path, adapter: Path | None = None, window: int = 64) -> float:
    """-(mean log-probability) of the text's tokens in windows of `window`, as calora's eval windows
    them, under transformers' own loading of `model_dir` (and peft's of `adapter`): the reference
    calora's numbers are checked against."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    ids = tok(text.read_text(), add_special_tokens=False, return_tensors="pt").input_ids[0]
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32, device_map="cpu")
    if adapter is not None:
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, adapter)
    model.eval()
    total, count = 0.0, 0
    with torch.no_grad():
        for lo in range(0, len(ids) - 1, window):
            x = ids[lo : lo + window]
            if len(x) < 2:
                break
            logp = torch.log_softmax(model(input_ids=x[None]).logits[0, :-1].float(), -1)
            total -= float(logp.gather(1, x[1:, None]).sum())
            count += len(x) - 1
    return total / count
