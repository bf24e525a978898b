"""Where and how tensors compute (device, dtype), and importing the ML stack without its chatter."""

from __future__ import annotations

import contextlib
import io
import os
from typing import TYPE_CHECKING, Iterator

from calora_cli.errors import CaloraError
from calora_cli.ranks import world_size

if TYPE_CHECKING:
    import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")

DTYPES = ("float32", "bfloat16", "float16")


def torch_dtype(name: str) -> "torch.dtype":
    import torch

    if name not in DTYPES:
        raise CaloraError(f"unknown --dtype {name!r} (choose from {', '.join(DTYPES)})")
    return getattr(torch, name)


def resolve_device(name: str) -> "torch.device":
    import torch

    if name == "cpu":
        return torch.device("cpu")
    if name.startswith("cuda"):
        if not torch.cuda.is_available():
            raise CaloraError(f"--device {name} was asked for, but no CUDA device is available")
        try:
            dev = torch.device(name)
        except RuntimeError:
            raise CaloraError(f"unknown --device {name!r} (use cpu or cuda[:N])") from None
        if dev.index is None and world_size() > 1:
            # under torchrun/accelerate a bare `cuda` means this process's own GPU, as the launchers intend
            local, count = int(os.environ.get("LOCAL_RANK", "0")), torch.cuda.device_count()
            if local >= count:
                raise CaloraError(f"this process (LOCAL_RANK {local}) has no GPU of its own: {count} visible")
            dev = torch.device("cuda", local)
        if dev.index is not None:
            torch.cuda.set_device(dev)  # nccl and FSDP work on the current device
        return dev
    raise CaloraError(f"unknown --device {name!r} (use cpu or cuda[:N])")


_STACK_READY = False
_GPTQ_READY = False


@contextlib.contextmanager
def library_chatter_hidden() -> Iterator[None]:
    """Swallow what libraries print to stdout/stderr (unless CALORA_DEBUG is set).

    gptqmodel prints a banner on import and logs kernel choices and its own progress bars when it
    loads or quantizes; torchao logs missing CUDA kernels. None of it concerns the user, calora
    reports progress itself, and it would clutter CI logs.
    """
    if os.environ.get("CALORA_DEBUG"):
        yield
        return
    sink = io.StringIO()
    with contextlib.redirect_stdout(sink), contextlib.redirect_stderr(sink):
        yield


def import_stack(gptq: bool = False) -> None:
    """Import the ML stack once, quietly; with `gptq`, also the GPTQ kernels' package.

    gptqmodel is imported only for a GPTQ model that transformers or peft will build layers for,
    and before peft builds LoRA layers (its LoRA dispatch imports gptqmodel for any base): its
    import costs a command seconds of start-up and 0.15 GB of resident memory. Imported here, its
    banner and logs are hidden; transformers and peft then find it already imported."""
    global _STACK_READY, _GPTQ_READY
    if gptq and not _GPTQ_READY:
        with library_chatter_hidden(), contextlib.suppress(Exception):
            import gptqmodel  # noqa: F401
        _GPTQ_READY = True
    if _STACK_READY:
        return
    with library_chatter_hidden():
        import peft  # noqa: F401
        import transformers  # noqa: F401
    from transformers.utils import logging

    logging.set_verbosity_error()
    logging.disable_progress_bar()
    _STACK_READY = True
