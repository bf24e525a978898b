"""Which process this is in a torchrun/accelerate launch, read from the launcher's environment.

The ground floor of the distributed support: artifacts (only rank 0 writes) and model loading
(FSDP skeletons) ask it, so it imports nothing of calora's but the error type.
"""

from __future__ import annotations

import os

from calora_cli.errors import CaloraError


def world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def rank() -> int:
    return int(os.environ.get("RANK", "0"))


def is_writer() -> bool:
    """Whether this process writes outputs and prints results (rank 0, or a single process)."""
    return rank() == 0


def strategy() -> str:
    """'fsdp' or 'ddp' (the default): how a multi-process run spreads the model."""
    chosen = os.environ.get("CALORA_DISTRIBUTED", "").strip().lower()
    if not chosen and os.environ.get("ACCELERATE_USE_FSDP", "").lower() in ("1", "true"):
        chosen = "fsdp"
    chosen = chosen or "ddp"
    if chosen not in ("ddp", "fsdp"):
        raise CaloraError(f"CALORA_DISTRIBUTED must be ddp or fsdp, got {chosen!r}")
    return chosen


def sharded() -> bool:
    """Whether this run shards models over processes (FSDP)."""
    return world_size() > 1 and strategy() == "fsdp"
