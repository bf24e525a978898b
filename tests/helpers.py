"""Helpers the tests share (fixtures live in conftest.py)."""

from __future__ import annotations

import os
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DATA = Path(os.environ.get("CALORA_SHARED_DATA", REPO.parent / "shared" / "data"))
SHK = DATA / "shakespeare"


def save_tiny_base(out: Path, seed: int = 0, vocab: int = 512, **shape) -> None:
    """A tiny random Llama + a BPE tokenizer trained on one play, saved by plain transformers."""
    from calora_cli.models import build_tiny_llama, train_bpe_tokenizer

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
