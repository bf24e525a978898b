"""A GGUF's tensors, read one at a time under their Hugging Face names and layout.

The file is memory-mapped (gguf's reader); each tensor is dequantized with gguf's own dequantizers
when it is asked for, so calora computes with exactly the weights llama.cpp holds (llama.cpp's
kernels then add their own activation rounding, which no float computation reproduces). Names and
the q/k row permutation are mapped back (names.py). The object reads like a safetensors ShardReader
(`names`, `get_tensor`), so the streaming engine and the whole-model loader take either.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from calora_cli.errors import CaloraError
from calora_cli.gguf.names import NameMap, arch_of

if TYPE_CHECKING:
    import torch


def open_gguf(path: Path):
    """gguf's reader on a file, with a corrupt or truncated file refused in one line."""
    from gguf import GGUFReader

    path = Path(path)
    try:
        return GGUFReader(path, "r")
    except Exception as e:  # gguf raises ValueError, struct errors, KeyError or IndexError on bad bytes
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise CaloraError(f"corrupt GGUF file {path}: {first}") from None


def field(reader, key: str, default=None):
    f = reader.fields.get(key)
    if f is None:
        return default
    try:
        return f.contents()
    except Exception:
        return default


class GGUFTensors:
    """A model GGUF, read as a checkpoint of Hugging Face tensors (a tied head, absent from the
    file, is read from the embedding by the caller, as for safetensors)."""

    def __init__(self, path: Path, config: dict):
        from calora_cli.gguf.names import hf_names

        self.path = Path(path)
        self.reader = open_gguf(self.path)
        self.map = NameMap(config)
        arch = field(self.reader, "general.architecture")
        if arch != arch_of(config):
            raise CaloraError(f"GGUF {self.path} is a {arch or 'file without general.architecture'} model, its config "
                              f"(model_type {config.get('model_type')}) needs llama.cpp's {arch_of(config)}")
        if field(self.reader, "general.type", "model") != "model":
            raise CaloraError(f"GGUF {self.path} is {field(self.reader, 'general.type')!r}, not a model "
                              "(a LoRA GGUF is an adapter: pass it with --adapter or export it)")
        self.tensors = {t.name: t for t in self.reader.tensors}
        blocks = field(self.reader, f"{arch}.block_count")
        if blocks != config["num_hidden_layers"]:
            raise CaloraError(f"GGUF {self.path} has {blocks} blocks, its config {config['num_hidden_layers']}")
        embd = self.tensors.get("token_embd.weight")
        if embd is None or int(embd.shape[1]) != config["vocab_size"]:
            rows = None if embd is None else int(embd.shape[1])
            raise CaloraError(f"GGUF {self.path} has a vocabulary of {rows} tokens, its config {config['vocab_size']}")
        self.where: dict[str, str] = {}
        for hf in hf_names(config):
            target = self.map.gguf_name(hf, strict=False)
            if target is not None and target in self.tensors:
                self.where[hf] = target
        self.header = {hf: {"shape": self.shape(hf), "dtype": self.tensor_type(hf)} for hf in self.where}
        unread = {t for t in set(self.tensors) - set(self.where.values()) if t.startswith("blk.")}
        if unread:
            raise CaloraError(f"GGUF {self.path} holds tensors a {config['model_type']} model of this config does not "
                              f"have: {', '.join(sorted(unread)[:3])}")

    def names(self) -> list[str]:
        return list(self.where)

    def shape(self, hf: str) -> list[int]:
        return [int(d) for d in reversed(self.tensors[self.where[hf]].shape)]

    def tensor_type(self, hf: str) -> str:
        return self.tensors[self.where[hf]].tensor_type.name

    def get_tensor(self, hf: str, buffers=None) -> "torch.Tensor":
        """The tensor in float32, in Hugging Face's layout."""
        import numpy as np
        import torch
        from gguf.quants import dequantize

        t = self.tensors[self.where[hf]]
        try:
            values = dequantize(np.asarray(t.data), t.tensor_type)
        except NotImplementedError:
            raise CaloraError(f"GGUF {self.path}: {t.name} is {t.tensor_type.name}, which gguf cannot dequantize") from None
        shape = self.shape(hf)
        out = torch.from_numpy(np.ascontiguousarray(values, dtype=np.float32).reshape(shape))
        return self.map.from_gguf(hf, out)

    def close(self) -> None:
        self.tensors, self.reader = {}, None  # the memory map goes with its last reference

    @property
    def file(self):
        return self  # ShardReader callers close `reader.file`
