"""Datasets for the local lm-eval tasks in this folder: the items shipped in ../shared/data, read
from disk (lm-eval's default is a hub download, which these machines cannot reach).

The data folder is $CALORA_SHARED_DATA, else ../shared/data beside the repository."""

import json
import os
from pathlib import Path

DATA = Path(os.environ.get("CALORA_SHARED_DATA", Path(__file__).resolve().parents[2].parent / "shared" / "data"))


def _jsonl(path: Path):
    import datasets

    if not path.exists():
        raise FileNotFoundError(f"{path} (set CALORA_SHARED_DATA to the shared data folder)")
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return datasets.DatasetDict({"test": datasets.Dataset.from_list(rows)})


def socialiqa(**kwargs):
    return _jsonl(DATA / "tasks" / "socialiqa.jsonl")


def quartz(**kwargs):
    return _jsonl(DATA / "tasks" / "quartz.jsonl")


def next_line(**kwargs):
    return _jsonl(DATA / "shakespeare" / "tasks" / "next-line-valid.jsonl")


def richard_ii(**kwargs):
    import datasets

    text = (DATA / "shakespeare" / "plays" / "histories--richard-ii.txt").read_text()
    return datasets.DatasetDict({"test": datasets.Dataset.from_list([{"text": text}])})
