"""Streaming safetensors I/O: write a file one tensor at a time (peak memory ~ one tensor).

The caller plans the output's names, dtypes and shapes, so the header is known before any tensor
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


def _torch_dtypes() -> dict:
    import torch

    return {code: getattr(torch, name) for name, code in DTYPES.items()}


def tensor_names(path: Path) -> list[str]:
    """Tensor names in on-disk order."""
    header = read_safetensors_header(path)
    return sorted((k for k in header if k != "__metadata__"), key=lambda k: header[k]["data_offsets"][0])


def tensor_bytes(path: Path) -> int:
    """Bytes of tensor data in a safetensors file (an index's total_size counts these)."""
    header = read_safetensors_header(path)
    return sum(v["data_offsets"][1] - v["data_offsets"][0] for k, v in header.items() if k != "__metadata__")


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


# safetensors' dtype names
DTYPES = {"float32": "F32", "float16": "F16", "bfloat16": "BF16", "float64": "F64", "int32": "I32", "int64": "I64",
          "int16": "I16", "int8": "I8", "uint8": "U8", "bool": "BOOL"}


def dtype_code(dtype: "torch.dtype") -> str:
    return DTYPES[str(dtype).removeprefix("torch.")]


def write_tensors(dst: Path, entries: list[tuple[str, str, list[int]]], produce: Callable[[str], "torch.Tensor"],
                  metadata: dict | None = None) -> None:
    """Write a safetensors file whose layout is known up front: `entries` are (name, dtype code, shape)
    in file order; `produce(name)` gives each tensor in that order, so only one is held at a time."""
    import torch

    header: dict = {"__metadata__": metadata} if metadata else {}
    offset = 0
    torch_dtypes = _torch_dtypes()
    for name, code, shape in entries:
        n = torch.tensor([], dtype=torch_dtypes[code]).element_size()
        for s in shape:
            n *= s
        header[name] = {"dtype": code, "shape": list(shape), "data_offsets": [offset, offset + n]}
        offset += n
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)  # the format pads the header to 8 bytes with spaces
    with open(dst, "wb") as out:
        out.write(struct.pack("<Q", len(raw)))
        out.write(raw)
        for name, code, shape in entries:
            t = produce(name)
            if dtype_code(t.dtype) != code or list(t.shape) != list(shape):
                raise AssertionError(f"{name}: planned {code}{tuple(shape)}, produced {t.dtype}{tuple(t.shape)}")
            out.write(t.contiguous().view(torch.uint8).numpy().tobytes() if t.numel() else b"")


def rewrite(src: Path, dst: Path, transform: Callable[[str, "torch.Tensor"], "torch.Tensor"]) -> None:
    """dst = src with each tensor passed through `transform` (same dtype and shape), streamed."""
    from safetensors import safe_open

    header = read_safetensors_header(src)
    entries = [(n, header[n]["dtype"], header[n]["shape"]) for n in tensor_names(src)]
    try:
        with safe_open(src, framework="pt") as f:
            write_tensors(dst, entries, lambda name: transform(name, f.get_tensor(name)), header.get("__metadata__"))
    except (OSError, RuntimeError) as e:
        raise CaloraError(f"cannot read {src}: {str(e).splitlines()[0]}") from e


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
