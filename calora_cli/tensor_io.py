"""Streaming safetensors I/O: rewrite a file one tensor at a time (peak memory ~ one tensor).

The output keeps every tensor's name, dtype and shape, so its header is known before any tensor
is computed: write the header, then each tensor's bytes in order.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Iterator

from calora_cli.artifacts import read_safetensors_header
from calora_cli.errors import CaloraError

if TYPE_CHECKING:
    import torch


def tensor_names(path: Path) -> list[str]:
    """Tensor names in on-disk order."""
    header = read_safetensors_header(path)
    return sorted((k for k in header if k != "__metadata__"), key=lambda k: header[k]["data_offsets"][0])


def iter_tensors(path: Path) -> Iterator[tuple[str, "torch.Tensor"]]:
    from safetensors import safe_open

    try:
        with safe_open(path, framework="pt") as f:
            for name in tensor_names(path):
                yield name, f.get_tensor(name)
    except (OSError, RuntimeError) as e:
        if isinstance(e, CaloraError):
            raise
        raise CaloraError(f"cannot read {path}: {str(e).splitlines()[0]}") from e


def rewrite(src: Path, dst: Path, transform: Callable[[str, "torch.Tensor"], "torch.Tensor"]) -> None:
    """dst = src with each tensor passed through `transform` (same dtype and shape), streamed."""
    import torch

    header = read_safetensors_header(src)
    names = tensor_names(src)
    out_header: dict = {}
    if "__metadata__" in header:
        out_header["__metadata__"] = header["__metadata__"]
    offset = 0
    for name in names:
        lo, hi = header[name]["data_offsets"]
        out_header[name] = {"dtype": header[name]["dtype"], "shape": header[name]["shape"], "data_offsets": [offset, offset + hi - lo]}
        offset += hi - lo
    raw = json.dumps(out_header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)  # the format pads the header to 8 bytes with spaces
    with open(dst, "wb") as out:
        out.write(struct.pack("<Q", len(raw)))
        out.write(raw)
        for name, tensor in iter_tensors(src):
            new = transform(name, tensor)
            if new.dtype != tensor.dtype or new.shape != tensor.shape:
                raise AssertionError(f"transform changed {name}: {tensor.dtype}{tuple(tensor.shape)} -> {new.dtype}{tuple(new.shape)}")
            out.write(new.contiguous().view(torch.uint8).numpy().tobytes() if new.numel() else b"")


def load_tensors(files: list[Path], wanted: Callable[[str], bool]) -> dict[str, "torch.Tensor"]:
    """The tensors whose names `wanted` accepts, read from whichever shard holds them."""
    from safetensors import safe_open

    out = {}
    for path in files:
        names = [n for n in tensor_names(path) if wanted(n)]
        if names:
            with safe_open(path, framework="pt") as f:
                out.update({n: f.get_tensor(n) for n in names})
    return out
