"""Datasets: text files and JSONL, tokenised and packed into training or calibration batches.

Two training formats:
- `.txt`: causal LM on packed text (the whole file tokenised once, cut into seq_len blocks);
- `.jsonl` of {"prompt", "completion"}: loss on the completion tokens only.
And one evaluation format, `.jsonl` of {"context", "choices", "label"} (multiple choice).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterator

from calora_cli.errors import CaloraError

if TYPE_CHECKING:
    import torch

IGNORE = -100  # label value the loss skips (transformers' convention)


def read_text(path: Path) -> str:
    path = Path(path)
    if not path.is_file():
        raise CaloraError(f"data file {path} does not exist")
    raw = path.read_bytes()
    if b"\0" in raw[:4096]:
        raise CaloraError(f"data file {path} is binary, expected UTF-8 text")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise CaloraError(f"data file {path} is not UTF-8 text (byte {e.start})") from None
    if not text.strip():
        raise CaloraError(f"data file {path} is empty")
    return text


def read_jsonl(path: Path, required: tuple[str, ...]) -> list[dict[str, Any]]:
    rows = []
    for i, line in enumerate(read_text(path).splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise CaloraError(f"{path}:{i}: not valid JSON ({e.msg})") from None
        if not isinstance(row, dict) or any(k not in row for k in required):
            raise CaloraError(f"{path}:{i}: each line needs the fields {', '.join(required)}")
        rows.append(row)
    return rows


@dataclass
class MCItem:
    context: str
    choices: list[str]
    label: int


def read_multiple_choice(path: Path) -> list[MCItem]:
    items = []
    for i, row in enumerate(read_jsonl(path, ("context", "choices", "label")), 1):
        choices, label = row["choices"], row["label"]
        if not (isinstance(choices, list) and len(choices) >= 2 and all(isinstance(c, str) for c in choices)):
            raise CaloraError(f"{path}: item {i}: 'choices' must be a list of at least two strings")
        if not (isinstance(label, int) and 0 <= label < len(choices)):
            raise CaloraError(f"{path}: item {i}: 'label' must index into 'choices'")
        items.append(MCItem(str(row["context"]), choices, label))
    return items


def tokenize_text(tokenizer, text: str) -> "torch.Tensor":
    """The whole text as one id sequence, no special tokens added."""
    import torch

    return torch.tensor(tokenizer(text, add_special_tokens=False)["input_ids"], dtype=torch.long)


def pack(ids: "torch.Tensor", seq_len: int) -> "torch.Tensor":
    """Consecutive non-overlapping blocks of seq_len tokens; the ragged tail is dropped."""
    n = ids.numel() // seq_len
    if n == 0:
        raise CaloraError(f"the data holds {ids.numel()} tokens, fewer than one --seq-len block of {seq_len}")
    return ids[: n * seq_len].view(n, seq_len)


@dataclass
class Examples:
    """Training examples as padded tensors: input_ids, attention_mask, labels (IGNORE = no loss)."""

    input_ids: "torch.Tensor"
    attention_mask: "torch.Tensor"
    labels: "torch.Tensor"

    def __len__(self) -> int:
        return self.input_ids.shape[0]

    def batch(self, idx: "torch.Tensor") -> dict[str, "torch.Tensor"]:
        return {"input_ids": self.input_ids[idx], "attention_mask": self.attention_mask[idx], "labels": self.labels[idx]}

    def subset(self, idx: "torch.Tensor") -> "Examples":
        return Examples(**self.batch(idx))


def load_examples(path: Path, tokenizer, seq_len: int) -> Examples:
    """Training examples from a .txt (packed causal LM) or a prompt/completion .jsonl."""
    import torch

    path = Path(path)
    if path.suffix == ".jsonl":
        rows = read_jsonl(path, ("prompt", "completion"))
        seqs, labels = [], []
        for r in rows:
            p = tokenizer(str(r["prompt"]), add_special_tokens=False)["input_ids"]
            c = tokenizer(str(r["completion"]), add_special_tokens=False)["input_ids"]
            if tokenizer.eos_token_id is not None:
                c = c + [tokenizer.eos_token_id]
            ids = (p + c)[-seq_len:]  # keep the completion when too long
            lab = ([IGNORE] * len(p) + c)[-seq_len:]
            seqs.append(ids)
            labels.append(lab)
        width = max(len(s) for s in seqs)
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
        input_ids = torch.full((len(seqs), width), pad, dtype=torch.long)
        lab_t = torch.full((len(seqs), width), IGNORE, dtype=torch.long)
        mask = torch.zeros((len(seqs), width), dtype=torch.long)
        for i, (s, lab) in enumerate(zip(seqs, labels)):
            input_ids[i, : len(s)] = torch.tensor(s)
            lab_t[i, : len(lab)] = torch.tensor(lab)
            mask[i, : len(s)] = 1
        return Examples(input_ids, mask, lab_t)
    blocks = pack(tokenize_text(tokenizer, read_text(path)), seq_len)
    return Examples(blocks, torch.ones_like(blocks), blocks.clone())


def batches(examples: Examples, batch_size: int, seed: int, with_index: bool = False) -> Iterator[dict[str, "torch.Tensor"]]:
    """An endless stream of batches: seeded shuffles, one epoch after another (`with_index`: each
    batch also carries its examples' indices under "index")."""
    import torch

    g = torch.Generator().manual_seed(seed)
    n = len(examples)
    while True:
        order = torch.randperm(n, generator=g)
        for i in range(0, n - batch_size + 1 if n >= batch_size else 1, batch_size):
            idx = order[i : i + batch_size]
            yield {**examples.batch(idx), "index": idx} if with_index else examples.batch(idx)


def calibration_batch(tokenizer, text: str, samples: int, seq_len: int, seed: int):
    """`samples` windows of `seq_len` tokens at seeded random offsets of the text (as the references draw them)."""
    import torch

    ids = tokenize_text(tokenizer, text)
    if ids.numel() < seq_len:
        raise CaloraError(f"calibration text holds {ids.numel()} tokens, fewer than --seq-len {seq_len}")
    g = torch.Generator().manual_seed(seed)
    starts = torch.randint(0, ids.numel() - seq_len + 1, (samples,), generator=g)
    return torch.stack([ids[s : s + seq_len] for s in starts.tolist()])
