"""`compress --method gguf`: a model as llama.cpp's GGUF, in one of llama.cpp's quant types.

Two steps, each bounded in memory by one tensor (or one decoder layer):
1. calora writes the float GGUF (F32, F16 or BF16: the checkpoint's own precision unless the type
   asked for is a float type) one tensor at a time (gguf/writer.py);
2. llama.cpp's own quantizer (`llama_model_quantize`) turns it into the asked type, choosing per
   tensor as `llama-quantize` does, fallbacks included (K-quants need rows of a multiple of 256
   values: narrower tensors fall back to a legacy type, which the manifest reports).

`--calib FILE` computes llama.cpp's importance matrix in the streaming engine: for each block
linear, the mean over calibration tokens of each input channel's squared activation (what
`llama-imatrix` collects), under the tensor's GGUF name, handed to the quantizer.

`--solver gptq` then keeps llama.cpp's scales and mins and chooses the codes again with GPTQ's
error feedback (`solve_codes`): the same file size and layout, other codes.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable

NEEDS = "norms"


def importance_matrix(source, calib, config: dict, on_block: Callable[[int], None] | None = None) -> dict:
    """GGUF tensor name -> per-input-channel mean of squared activations, block by block, from a
    streaming.LayerSource (the model is never resident)."""
    from calora_cli.arch import LAYERS_PREFIX
    from calora_cli.compress.sequential import capture_inputs, collect_stats
    from calora_cli.gguf.names import NameMap

    names = NameMap(config)
    source.embed()
    inputs = capture_inputs(source.model, calib)
    source.release_embedding()
    out = {}
    for i, block in enumerate(source.blocks()):
        stats, inputs = collect_stats(block, inputs, NEEDS)
        for path, s in stats.items():
            target = names.gguf_name(f"{LAYERS_PREFIX}{i}.{path}.weight")
            if target is not None:
                out[target] = s.sq_mean.float().cpu()
        if on_block is not None:
            on_block(1)
    return out


def solve_codes(src, path: Path, calib, config: dict, opts, activation_gb: float,
                on_block: Callable[[int], None] | None = None) -> dict:
    """`--solver gptq`: keep the scales and mins llama.cpp's quantizer chose for every block linear of
    the GGUF at `path`, and choose the codes again with GPTQ (compress/gptq.quantize_on_grid),
    block by block with the earlier blocks already solved, as calora's GPTQ does. The file is
    rewritten in place, byte for byte the same size and layout: only code bits change. Tensors of
    a type without a grid here (grids.SOLVABLE) keep llama.cpp's codes, and the forward pass carries
    their dequantized weights. Returns how many tensors of each type were solved."""
    import numpy as np
    import torch
    from gguf import GGUFReader
    from gguf.quants import dequantize

    from calora_cli.arch import LAYERS_PREFIX
    from calora_cli.compress.gptq import Quantized, quantize_on_grid
    from calora_cli.compress.sequential import prune_sequential
    from calora_cli.gguf.grids import LAYOUT, decode, encode
    from calora_cli.gguf.names import NameMap
    from calora_cli.runtime import resolve_device, torch_dtype
    from calora_cli.streaming import LayerSource, Spill

    names = NameMap(config)
    reader = GGUFReader(path, "r+")  # tensors are views of the mapped file: writing them rewrites it
    tensors = {t.name: t for t in reader.tensors}
    solved: dict[str, int] = {}
    block = [0]

    def quantize(name, weight, stats, keep):
        hf = f"{LAYERS_PREFIX}{block[0]}.{name}.weight"
        t = tensors[names.gguf_name(hf)]
        kind = t.tensor_type.name
        hessian = stats.take_hessian()
        if kind not in LAYOUT:
            shape = [int(x) for x in reversed(t.shape)]
            held = torch.from_numpy(dequantize(t.data, t.tensor_type).reshape(shape).copy())
            return Quantized(names.from_gguf(hf, held).to(weight.dtype), {})
        scale, offset, _ = decode(kind, np.asarray(t.data))
        _, _, qmin, qmax = LAYOUT[kind]
        grid = [names.from_gguf(hf, torch.from_numpy(a)) for a in (scale, offset)]
        q, codes = quantize_on_grid(weight, hessian, *grid, qmin, qmax)
        t.data[...] = encode(kind, np.asarray(t.data), names.to_gguf(hf, codes).numpy())
        solved[kind] = solved.get(kind, 0) + 1
        return Quantized(q.to(weight.dtype), {})

    def next_block(i, packed):
        block[0] = i + 1

    source = LayerSource(src.path, src.weights, torch_dtype(opts.dtype), resolve_device(opts.device))
    spill = Spill(int(activation_gb * 1e9), path.parent / ".spill")
    try:
        source.embed()
        for _ in prune_sequential(source.model, calib, None, None, None, None, on_block=on_block,
                                  blocks=source.blocks_after_embedding(), keep=spill, quantize=quantize, on_quantized=next_block):
            pass
    finally:
        spill.remove()
        source.close()
        reader.data.flush()
        del tensors, reader
    return dict(sorted(solved.items()))


def float_type_for(gguf_type: str, storage: str) -> str:
    """The float GGUF written before quantizing: the type itself when it is a float type, else the
    checkpoint's own precision (nothing rounded before llama.cpp's quantizer sees it)."""
    from calora_cli.gguf import FLOAT_TYPES

    if gguf_type in FLOAT_TYPES:
        return gguf_type
    return {"F32": "F32", "F16": "F16", "BF16": "BF16"}.get(storage, "F32")


def tensor_types(path: Path) -> dict[str, str]:
    """GGUF tensor name -> its type name, as written."""
    from calora_cli.gguf.reader import open_gguf

    return {t.name: t.tensor_type.name for t in open_gguf(path).tensors}


def fallbacks(types: dict[str, str]) -> dict[str, int]:
    """How many 2-D weights llama.cpp stored in each type: for a K-quant on narrow tensors, the
    legacy types it fell back to show here beside the K types."""
    counts: dict[str, int] = {}
    for name, t in types.items():
        if name.endswith(".weight") and "norm" not in name:
            counts[t] = counts.get(t, 0) + 1
    return dict(sorted(counts.items()))


def convert(src, into: Path, gguf_type: str, calib, opts, solver: str = "llama.cpp", activation_gb: float = 2.0) -> dict:
    """`src` (a dense safetensors model artifact) as `into`/model.gguf of `gguf_type`, with its config
    and tokenizer files beside it (what reads the GGUF back as a Hugging Face model); returns the
    metrics. calora writes the float GGUF one tensor at a time; llama.cpp's quantizer makes the type
    from it, with an importance matrix from `calib` (token windows) when given."""
    import json
    import shutil

    from calora_cli.artifacts import companion_files
    from calora_cli.gguf import FLOAT_TYPES, GGUF_FILE
    from calora_cli.gguf.writer import checkpoint_tensors, write_model
    from calora_cli.progress import progress
    from calora_cli.runtime import resolve_device, torch_dtype
    from calora_cli.streaming import LayerSource
    from calora_cli.tensor_io import ShardReader

    config = json.loads((src.path / "config.json").read_text())
    readers = [ShardReader(w) for w in src.weights]
    try:
        tensors = checkpoint_tensors(readers)
        storage = next(r.header[n]["dtype"] for r in readers for n in r.names() if n.endswith(".weight"))
        float_type = float_type_for(gguf_type, storage)
        target = into / GGUF_FILE
        staging = target if gguf_type in FLOAT_TYPES else into / ".float.gguf"
        with progress(f"gguf {float_type}", len(tensors), opts.show_progress) as advance:
            write_model(staging, config, src.path, tensors, float_type, src.path.name, on_tensor=lambda: advance(1))
    finally:
        for r in readers:
            r.file.close()
    imatrix = None
    if calib is not None:
        source = LayerSource(src.path, src.weights, torch_dtype(opts.dtype), resolve_device(opts.device))
        try:
            with progress("importance matrix", len(source.layers), opts.show_progress) as advance:
                imatrix = importance_matrix(source, calib, config, on_block=advance)
        finally:
            source.close()
    if staging != target:
        from calora_cli.gguf.llama import quantize

        with progress(f"llama.cpp quantize {gguf_type}", None, opts.show_progress):
            quantize(staging, target, gguf_type, imatrix)
        staging.unlink()
    solved = None
    if solver == "gptq":
        with progress("gptq codes on llama.cpp's grids", config["num_hidden_layers"], opts.show_progress) as advance:
            solved = solve_codes(src, target, calib, config, opts, activation_gb, on_block=advance)
    for f in companion_files(src.path):
        shutil.copy2(f, into / f.name)
    out = {"gguf_type": gguf_type, "float_type": float_type, "tensor_types": fallbacks(tensor_types(target)),
           "gguf_bytes": target.stat().st_size, "imatrix_tensors": len(imatrix or {})}
    if solved is not None:
        out["gptq_solved"] = solved
    return out


def convert_gptq(src, into: Path, requantize: str | None, opts) -> dict:
    """A GPTQ model as GGUF: without `requantize`, its 4-bit group-32 grids written as Q4_0/Q4_1
    blocks unchanged (gguf/legacy.py; the embedding Q8_0, as llama.cpp's Q4_0 files have it); with
    it, dequantized and quantized again by llama.cpp's quantizer into that type."""
    import json
    import logging
    import shutil

    from calora_cli.artifacts import companion_files
    from calora_cli.gguf import GGUF_FILE
    from calora_cli.gguf.legacy import gptq_tensors
    from calora_cli.gguf.writer import write_model
    from calora_cli.progress import progress
    from calora_cli.tensor_io import ShardReader

    config = json.loads((src.path / "config.json").read_text())
    plain = {k: v for k, v in config.items() if k != "quantization_config"}
    readers = [ShardReader(w) for w in src.weights]
    target = into / GGUF_FILE
    try:
        tensors, file_type = gptq_tensors(readers, config, lossless=requantize is None)
        staging = target if requantize is None else into / ".float.gguf"
        with progress("gguf", len(tensors), opts.show_progress) as advance:
            write_model(staging, plain, src.path, tensors, "F32", src.path.name, on_tensor=lambda: advance(1),
                        file_type=file_type)
    finally:
        for r in readers:
            r.file.close()
    if requantize is not None:
        from calora_cli.gguf.llama import quantize

        logging.getLogger(__name__).warning(f"re-quantizing GPTQ model {src.path} into {requantize}: GPTQ's codes are "
                                            "rounded again by llama.cpp's quantizer")
        quantize(staging, target, requantize)
        staging.unlink()
    for f in companion_files(src.path):
        shutil.copy2(f, into / f.name)
    (into / "config.json").write_text(json.dumps(plain, indent=2, sort_keys=True) + "\n")
    return {"gguf_type": requantize or file_type.removeprefix("MOSTLY_"), "from_gptq": "requantized" if requantize else "lossless",
            "tensor_types": fallbacks(tensor_types(target)), "gguf_bytes": target.stat().st_size}
