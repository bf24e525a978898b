"""Load models, tokenizers and adapters from local directories; build tiny models for tests.

Everything loads from disk only: safetensors weights, no remote code, no hub.
"""

from __future__ import annotations

import contextlib
import io
import os
from pathlib import Path
from typing import TYPE_CHECKING, Iterator

from calora_cli.errors import CaloraError

if TYPE_CHECKING:
    import torch
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

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
        return torch.device(name)
    raise CaloraError(f"unknown --device {name!r} (use cpu or cuda[:N])")


_STACK_READY = False


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


def _quiet_transformers() -> None:
    """Import the ML stack once, quietly."""
    global _STACK_READY
    if _STACK_READY:
        return
    with library_chatter_hidden():
        import peft  # noqa: F401
        import transformers  # noqa: F401

        with contextlib.suppress(Exception):
            import gptqmodel  # noqa: F401
    from transformers.utils import logging

    logging.set_verbosity_error()
    logging.disable_progress_bar()
    _STACK_READY = True


def load_model(path: Path, device: str = "cpu", dtype: str = "float32") -> "PreTrainedModel":
    """A causal LM from a local Hugging Face directory (dense, pruned, GPTQ or bitsandbytes)."""
    from transformers import AutoModelForCausalLM

    _quiet_transformers()
    dev = resolve_device(device)
    try:
        with library_chatter_hidden():
            model = AutoModelForCausalLM.from_pretrained(
                path,
                dtype=torch_dtype(dtype),
                use_safetensors=True,
                trust_remote_code=False,
                local_files_only=True,
                device_map={"": str(dev)},
            )
    except (OSError, ValueError, KeyError, RuntimeError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise CaloraError(f"cannot load model {path}: {first}") from e
    import torch

    for name, p in model.named_parameters():
        if p.is_floating_point() and not bool(torch.isfinite(p).all()):
            raise CaloraError(f"model {path} has NaN or Inf values in {name}")
    model.eval()
    return model


def load_tokenizer(path: Path) -> "PreTrainedTokenizerBase":
    from transformers import AutoTokenizer

    _quiet_transformers()
    try:
        tok = AutoTokenizer.from_pretrained(path, trust_remote_code=False, local_files_only=True)
    except (OSError, ValueError, KeyError) as e:
        raise CaloraError(f"cannot load a tokenizer from {path}: {str(e).splitlines()[0]}") from e
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return tok


def load_adapter(model: "PreTrainedModel", path: Path, trainable: bool = False):
    """Attach a peft adapter saved on disk (safetensors only) to `model`."""
    _quiet_transformers()
    from peft import PeftModel

    try:
        return PeftModel.from_pretrained(model, path, is_trainable=trainable, local_files_only=True)
    except (OSError, ValueError, KeyError, RuntimeError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise CaloraError(f"cannot load adapter {path} onto the model: {first}") from e


def linear_module_names(model: "PreTrainedModel") -> list[str]:
    """The short names (q_proj, up_proj, ...) of the linear layers inside the decoder blocks."""
    import torch

    names = set()
    for full, mod in model.named_modules():
        if ".layers." in full and isinstance(mod, torch.nn.Linear):
            names.add(full.rsplit(".", 1)[-1])
    if not names:  # quantized linears are not nn.Linear subclasses: fall back on the usual names
        names = {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}
    return sorted(names)


def build_tiny_llama(
    vocab_size: int,
    hidden: int = 64,
    layers: int = 2,
    heads: int = 4,
    kv_heads: int | None = None,
    intermediate: int = 128,
    max_positions: int = 512,
    seed: int = 0,
    pad_token_id: int | None = None,
    bos_token_id: int | None = None,
    eos_token_id: int | None = None,
) -> "PreTrainedModel":
    """A randomly initialised LlamaForCausalLM built from a config in code (no download)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=hidden,
        intermediate_size=intermediate,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads or heads,
        max_position_embeddings=max_positions,
        tie_word_embeddings=True,
        pad_token_id=pad_token_id,
        bos_token_id=bos_token_id,
        eos_token_id=eos_token_id,
    )
    torch.manual_seed(seed)
    return LlamaForCausalLM(cfg).eval()


def train_bpe_tokenizer(texts: list[str], vocab_size: int = 8192):
    """A byte-level BPE tokenizer trained locally (no download), as a transformers fast tokenizer.

    Special tokens: <s> (bos), </s> (eos), <pad>. Deterministic for equal texts and vocab size.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=["<pad>", "<s>", "</s>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>")
