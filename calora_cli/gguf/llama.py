"""The llama.cpp binding (llama-cpp-python): its quantizer, its tokenizer, its forward pass.

llama.cpp itself is the reference for everything calora writes in GGUF: files are quantized by its
own quantizer (not a re-implementation of the K-quant search), and `eval --engine llama.cpp` scores
with its logits, several LoRA adapters applied at once as `llama-server --lora A --lora B` does.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
from pathlib import Path
from typing import TYPE_CHECKING, Iterator

from calora_cli.errors import CaloraError

if TYPE_CHECKING:
    import torch

INSTALL = "pip install 'calora[llamacpp]' (llama-cpp-python, built from source: about 10 minutes of CPU)"


def binding():
    try:
        import llama_cpp
    except ImportError:
        raise CaloraError(f"llama.cpp is not installed: {INSTALL}") from None
    return llama_cpp


@contextlib.contextmanager
def _quiet_stderr() -> Iterator[None]:
    """llama.cpp logs from C to file descriptor 2; `verbose=False` does not silence the loader's
    and quantizer's lines, so the descriptor itself is pointed at /dev/null meanwhile (unless --debug)."""
    if os.environ.get("CALORA_DEBUG"):
        yield
        return
    import sys

    sys.stderr.flush()
    saved = os.dup(2)
    devnull = os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(devnull, 2)
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)
        os.close(devnull)


def quantize(src: Path, dst: Path, gguf_type: str, imatrix: dict[str, "torch.Tensor"] | None = None,
             threads: int | None = None) -> None:
    """llama.cpp's `llama_model_quantize` from a float GGUF to `gguf_type` (a TYPES key), with an
    importance matrix when given (GGUF tensor name -> per-input-channel mean of squared activations:
    what `llama-imatrix` computes and `llama-quantize --imatrix` hands over)."""
    from calora_cli.gguf import TYPES

    llama_cpp = binding()
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = getattr(llama_cpp, f"LLAMA_FTYPE_{TYPES[gguf_type]}")
    params.nthread = threads or os.cpu_count() or 1
    keep = []  # the ctypes buffers must outlive the call
    if imatrix:
        entries = (llama_cpp.llama_model_imatrix_data * (len(imatrix) + 1))()
        for k, (name, values) in enumerate(sorted(imatrix.items())):
            buf = (ctypes.c_float * values.numel())(*values.float().tolist())
            keep += [buf, name.encode()]
            entries[k].name = keep[-1]
            entries[k].data = ctypes.cast(buf, ctypes.POINTER(ctypes.c_float))
            entries[k].size = values.numel()
        entries[len(imatrix)].name = None  # the list ends at a null name
        params.imatrix = ctypes.cast(entries, ctypes.POINTER(llama_cpp.llama_model_imatrix_data))
        keep.append(entries)
    with _quiet_stderr():
        rc = llama_cpp.llama_model_quantize(str(src).encode(), str(dst).encode(), ctypes.byref(params))
    if rc != 0:
        raise CaloraError(f"llama.cpp's quantizer failed on {src} ({gguf_type}, return code {rc})")


@contextlib.contextmanager
def _plain_cpu_buffers(llama_cpp) -> Iterator[None]:
    """Load the weights into llama.cpp's plain CPU buffers, not its "extra" buffer types (weights
    repacked for AMX tiles or interleaved SIMD layouts): on a Xeon with AMX (Sapphire Rapids, found
    2026-12-07) llama_decode of a K-quant model with them crashes the process (segmentation fault),
    and without them it runs. The plain path computes the same block dot products (activations
    rounded to 8 bits), on every CPU alike. Llama() builds its model parameters from
    llama_model_default_params() and exposes no switch for use_extra_bufts, so that one call is
    wrapped while the model loads."""
    module = llama_cpp.llama_cpp
    default = module.llama_model_default_params

    def params():
        p = default()
        p.use_extra_bufts = False
        return p

    module.llama_model_default_params = params
    try:
        yield
    finally:
        module.llama_model_default_params = default


class Engine:
    """A GGUF model loaded in llama.cpp with any number of LoRA GGUFs applied at once (scale 1 each,
    or as given), scoring token sequences."""

    def __init__(self, model: Path, adapters: list[Path] | None = None, scales: list[float] | None = None,
                 n_ctx: int = 512, threads: int | None = None):
        llama_cpp = binding()
        self._lib = llama_cpp
        with _quiet_stderr(), _plain_cpu_buffers(llama_cpp):
            try:
                self.llm = llama_cpp.Llama(model_path=str(model), n_ctx=n_ctx, n_batch=n_ctx, n_ubatch=n_ctx,
                                           logits_all=True, verbose=False, n_threads=threads or os.cpu_count(),
                                           seed=0)
            except (ValueError, RuntimeError) as e:
                raise CaloraError(f"llama.cpp cannot load {model}: {str(e).splitlines()[0]}") from None
        self.n_ctx = n_ctx
        self._last: list[int] = []  # the sequence in the cache
        self.adapters = []
        for path in adapters or []:
            with _quiet_stderr():
                a = llama_cpp.llama_adapter_lora_init(self.llm._model.model, str(path).encode())
            if not a:
                self.close()
                raise CaloraError(f"llama.cpp refuses the LoRA {path} on {model} (another architecture, or "
                                  "tensors whose shapes do not match the model's)")
            self.adapters.append(a)
        if self.adapters:
            n = len(self.adapters)
            arr = (llama_cpp.llama_adapter_lora_p_ctypes * n)(*self.adapters)
            sc = (ctypes.c_float * n)(*(scales or [1.0] * n))
            if llama_cpp.llama_set_adapters_lora(self.llm._ctx.ctx, arr, n, sc):
                self.close()
                raise CaloraError(f"llama.cpp could not apply the adapters to {model}")

    def tokenize(self, text: str) -> list[int]:
        """llama.cpp's own tokenization, no BOS added, special tokens as plain text."""
        return self.llm.tokenize(text.encode("utf-8"), add_bos=False, special=False)

    def detokenize(self, ids: list[int]) -> str:
        return self.llm.detokenize(list(ids)).decode("utf-8", errors="replace")

    def logits(self, ids: list[int]) -> "torch.Tensor":
        """(len(ids), vocab) float32 logits of one sequence. The tokens it shares at its start with
        the sequence scored before are not run again: their cache entries and logits are kept (the
        choices of a multiple-choice item share their context), the rest of the cache is dropped."""
        import torch

        ids = [int(i) for i in ids]
        if len(ids) > self.n_ctx:
            raise AssertionError(f"{len(ids)} tokens exceed the context of {self.n_ctx}")
        kept = 0
        for a, b in zip(self._last, ids[:-1]):  # at least one token is run, so the context is current
            if a != b:
                break
            kept += 1
        self.llm.n_tokens = kept  # eval drops the cache from here on
        self.llm.eval(ids[kept:])
        self._last = ids
        return torch.from_numpy(self.llm.scores[: len(ids)].copy())

    def close(self) -> None:
        for a in self.adapters:
            self._lib.llama_adapter_lora_free(a)
        self.adapters = []
        llm, self.llm = getattr(self, "llm", None), None
        if llm is not None:
            llm.close()


class TokenizerView:
    """llama.cpp's tokenizer behind the few calls calora's scorers make of a Hugging Face one."""

    def __init__(self, engine: Engine, pad_token_id: int | None):
        self.engine, self.pad_token_id = engine, pad_token_id

    def __call__(self, text: str, add_special_tokens: bool = False, **_):
        return {"input_ids": self.engine.tokenize(text)}

    def decode(self, ids) -> str:
        return self.engine.detokenize([int(i) for i in ids])
