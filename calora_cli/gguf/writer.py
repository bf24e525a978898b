"""A model's GGUF, written one tensor at a time.

GGUF puts every tensor's name, shape and type in the header, before the data. The plan (names,
shapes, types) comes from the checkpoint's headers alone, so the header is written first and each
tensor is then read from the checkpoint, put in llama.cpp's layout (names.py), cast and written,
in file order: memory holds one tensor, whatever the model's size.

Types as llama.cpp's converter chooses them: matrices in the chosen float type, vectors (norms,
biases) in F32. Quantized types are made afterwards from this file by llama.cpp's own quantizer.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable, Iterable

from calora_cli.arch import LAYERS_PREFIX
from calora_cli.errors import CaloraError
from calora_cli.gguf.metadata import add_hparams, add_vocab
from calora_cli.gguf.names import NameMap

# float type -> (GGML tensor type name, llama.cpp file type name)
FLOATS = {"F32": ("F32", "ALL_F32"), "F16": ("F16", "MOSTLY_F16"), "BF16": ("BF16", "MOSTLY_BF16")}


def _order(name: str, n_layers: int) -> tuple:
    """File order: what runs before the layers, the layers in turn, then the rest."""
    if name.startswith(LAYERS_PREFIX):
        i, rest = name[len(LAYERS_PREFIX):].split(".", 1)
        return (int(i), rest)
    return (-1 if "embed" in name else n_layers, name)


def write_model(out: Path, config: dict, tokenizer_dir: Path, tensors: dict[str, tuple],
                float_type: str, name: str, on_tensor: Callable[[], None] | None = None,
                file_type: str | None = None) -> dict:
    """Write `out` (a GGUF) from `tensors`: Hugging Face name -> (shape, a function that reads it),
    or (shape, a function that reads its llama.cpp blocks as uint8 rows, their GGML type) for a
    tensor already quantized (legacy.py). Returns {gguf name: hf name} of what was written."""
    import gguf
    import numpy as np
    import torch

    names = NameMap(config)
    ggml_type, float_file_type = FLOATS[float_type]
    file_type = file_type or float_file_type
    w = gguf.GGUFWriter(out, names.arch)
    w.add_type(gguf.GGUFType.MODEL)
    params = sum(int(np.prod(entry[0])) for hf, entry in tensors.items() if names.gguf_name(hf) is not None)
    w.add_size_label(gguf.size_label(params, 0, 0, 0))
    add_hparams(w, config, names.arch, int(gguf.LlamaFileType[file_type]))
    tokens = add_vocab(w, tokenizer_dir, config["vocab_size"])
    # llama.cpp looks up Phi-3's own special tokens, and fails to load without them, when the
    # model's name says phi3: such a name is left out for a vocabulary that lacks them
    phi3_tokens = {"<unk>", "<s>", "</s>", "<|endoftext|>"}
    if not (any(k in name.lower() for k in ("phi3", "phi-3")) and not phi3_tokens <= set(tokens)):
        w.add_name(name)
    w.add_quantization_version(gguf.GGML_QUANT_VERSION)

    n_layers = config["num_hidden_layers"]
    plan = []
    for hf in sorted(tensors, key=lambda n: _order(n, n_layers)):
        target = names.gguf_name(hf)
        if target is None:
            continue
        shape = tensors[hf][0]
        if len(tensors[hf]) == 3:  # already in llama.cpp's blocks
            kind = tensors[hf][2]
            qtype = gguf.GGMLQuantizationType[kind]
            block, size = gguf.GGML_QUANT_SIZES[qtype]
            row_bytes = shape[1] // block * size
            w.add_tensor_info(target, [shape[0], row_bytes], np.dtype(np.uint8), shape[0] * row_bytes, raw_dtype=qtype)
            plan.append((hf, target, kind))
            continue
        kind = ggml_type if len(shape) == 2 else "F32"
        qtype = gguf.GGMLQuantizationType[kind]
        np_dtype = {"F32": np.float32, "F16": np.float16, "BF16": np.int16}[kind]
        nbytes = int(np.prod(shape)) * np.dtype(np_dtype).itemsize
        w.add_tensor_info(target, shape, np.dtype(np_dtype), nbytes, raw_dtype=qtype if kind == "BF16" else None)
        plan.append((hf, target, kind))
    w.write_header_to_file(out)
    w.write_kv_data_to_file()
    w.write_ti_data_to_file()
    for hf, target, kind in plan:
        t = names.to_gguf(hf, tensors[hf][1]())
        if t.is_floating_point() and not bool(torch.isfinite(t).all()):
            raise CaloraError(f"the model has NaN or Inf values in {hf}")
        if kind not in FLOATS:
            data = t.contiguous().numpy()
        elif kind == "BF16":
            data = t.to(torch.bfloat16).contiguous().view(torch.int16).numpy()
        else:
            data = t.to(torch.float16 if kind == "F16" else torch.float32).contiguous().numpy()
        w.write_tensor_data(data)
        if on_tensor is not None:
            on_tensor()
    w.close()
    return {target: hf for hf, target, _ in plan}


def checkpoint_tensors(readers: Iterable) -> dict[str, tuple[list[int], Callable]]:
    """A safetensors checkpoint's tensors as write_model takes them (read on demand)."""
    out = {}
    for r in readers:
        for n in r.names():
            out[n] = (list(r.header[n]["shape"]), lambda r=r, n=n: r.get_tensor(n))
    return out
