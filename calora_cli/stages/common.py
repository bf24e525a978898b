"""What every stage does around its algorithm: options, seeding, loading inputs."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from calora_cli.artifacts import Artifact, check_adapter_base, open_artifact


@dataclass
class RunOptions:
    """Options every command shares (parsed by cli.py)."""

    device: str = "cpu"
    dtype: str = "float32"
    seed: int = 0
    force: bool = False
    show_progress: bool = True
    allow_base_mismatch: bool = False
    warn: Callable[[str], None] = field(default=lambda msg: None)


def seed_everything(seed: int) -> None:
    import random

    import torch

    random.seed(seed)
    torch.manual_seed(seed)


def open_model_and_adapter(model: Path, adapter: Path | None, opts: RunOptions) -> tuple[Artifact, Artifact | None]:
    """Check a model (and an adapter meant for it) before anything heavy is loaded."""
    model_art = open_artifact(model, expect="model", role="model")
    adapter_art = None
    if adapter is not None:
        adapter_art = open_artifact(adapter, expect="adapter", role="adapter")
        note = check_adapter_base(adapter_art, model_art, opts.allow_base_mismatch)
        if note:
            opts.warn(note)
    return model_art, adapter_art
