"""`calora export ARTIFACT --format gguf`: a base and its adapters for llama.cpp.

OUT holds the base as `model.gguf` (written from a Hugging Face model, in a float type or, with
--gguf-type, quantized by llama.cpp; copied when the base already is GGUF), each adapter as
`adapters/<name>.gguf` (llama.cpp's LoRA format, gguf/adapter.py), and config.json and the
tokenizer, so OUT is also a calora GGUF model artifact (`calora eval OUT --engine llama.cpp`).

Only what llama.cpp can run is exported: linear low-rank deltas (LoRA in every peft variant that is
a delta, NOLA expanded from its seed, a compensated LoRA). CA-LoRA recovery modules (a GELU between
their factors), DoRA (a per-row renormalisation) and LoSA's masked deltas (llama.cpp would add the
delta unmasked) are refused, each in one line naming the way out.
"""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

from calora_cli.artifacts import (
    atomic_output,
    check_adapter_base,
    check_output,
    companion_files,
    open_artifact,
    write_manifest,
)
from calora_cli.errors import CaloraError
from calora_cli.run import RunOptions, open_model

FORMATS = ("gguf",)


def export(model: Path, adapter_dirs: list[Path], out: Path, fmt: str, opts: RunOptions,
           gguf_type: str | None = None, requantize: str | None = None) -> dict:
    from calora_cli.compress import gguf as method
    from calora_cli.gguf import FLOAT_TYPES, GGUF_FILE, TYPES
    from calora_cli.gguf.adapter import exportable_factors, write_lora

    if fmt not in FORMATS:
        raise CaloraError(f"--format must be one of {', '.join(FORMATS)}, got {fmt!r}")
    check_output(out, opts.force)
    base = open_model(model)
    config = json.loads((base.path / "config.json").read_text())
    gptq = (config.get("quantization_config") or {}).get("quant_method") == "gptq"
    if config.get("quantization_config") and not gptq:
        q = config["quantization_config"].get("quant_method", "quantized")
        raise CaloraError(f"model {base.path} is {q}-quantized, which llama.cpp cannot load; export the unquantized "
                          "model with --gguf-type TYPE (llama.cpp's quantizer), or merge --dense first")
    for flag, value in (("--gguf-type", gguf_type), ("--requantize", requantize)):
        if value is not None and value not in TYPES:
            raise CaloraError(f"{flag} must be one of {', '.join(TYPES)}, got {value!r}")
    if gptq and gguf_type is not None:
        raise CaloraError("a GPTQ model is written as its own Q4_0/Q4_1 grid, or quantized again with --requantize TYPE; "
                          "--gguf-type is for unquantized models")
    if requantize is not None and not gptq:
        raise CaloraError("--requantize is for GPTQ models; quantize an unquantized model with --gguf-type TYPE")
    if base.gguf and gguf_type is not None:
        raise CaloraError(f"model {base.path} is already a GGUF; it is copied as it is (leave out --gguf-type)")
    arts, names = [], []
    for a in adapter_dirs:
        art = open_artifact(a, expect="adapter", role="adapter")
        check_adapter_base(art, base, opts.allow_base_mismatch)
        name = art.path.name
        if name in names:
            raise CaloraError(f"two adapters are named {name}; each is written as adapters/<its folder name>.gguf")
        arts.append(art)
        names.append(name)
    factors = [exportable_factors(art) for art in arts]  # refuses what llama.cpp cannot run, before any work
    t0 = time.time()
    with atomic_output(out, opts.force) as tmp:
        if base.gguf:
            shutil.copy2(base.weights[0], tmp / GGUF_FILE)
            for f in companion_files(base.path):
                shutil.copy2(f, tmp / f.name)
            metrics = {"gguf_type": "copied", "tensor_types": method.fallbacks(method.tensor_types(tmp / GGUF_FILE))}
        elif gptq:
            metrics = method.convert_gptq(base, tmp, requantize, opts)
        else:
            metrics = method.convert(base, tmp, gguf_type or _stored_type(base), None, opts)
        written = {}
        if arts:
            (tmp / "adapters").mkdir()
        for art, name, f in zip(arts, names, factors):
            written[name] = write_lora(tmp / "adapters" / f"{name}.gguf", f, config, name)
        metrics["adapters"] = written
        inputs = {"model": base.input_record(), **{f"adapter:{n}": a.input_record() for n, a in zip(names, arts)}}
        write_manifest(tmp, kind="model", stage="export", params={"format": fmt, "gguf_type": gguf_type, "requantize": requantize,
                                                                   "adapters": names},
                       inputs=inputs, metrics=metrics, lineage=base.lineage)
    serve = serve_commands(out, names)
    return {"output": str(out), "format": fmt, "model": str(out / GGUF_FILE),
            "adapters": {n: str(out / "adapters" / f"{n}.gguf") for n in names},
            "gguf_bytes": (out / GGUF_FILE).stat().st_size, "seconds": round(time.time() - t0, 2), "llama_cpp": serve}


def _stored_type(base) -> str:
    """The float GGUF type of the checkpoint's own precision (F32, F16 or BF16): nothing rounded."""
    from calora_cli.tensor_io import ShardReader

    with ShardReader(base.weights[0]) as r:
        stored = {r.header[n]["dtype"] for n in r.names()}
    return next((t for t in ("BF16", "F16") if t in stored), "F32")


def serve_commands(out: Path, names: list[str]) -> dict:
    """The llama.cpp command lines that serve the export."""
    model = out / "model.gguf"
    loras = [out / "adapters" / f"{n}.gguf" for n in names]
    cmds = {"server": f"llama-server -m {model}" + "".join(f" --lora {p}" for p in loras[:1])}
    if len(loras) > 1:
        cmds["server_switched"] = (f"llama-server -m {model} --lora-init-without-apply"
                                   + "".join(f" --lora {p}" for p in loras)
                                   + "  # then per request: \"lora\": [{\"id\": K, \"scale\": 1.0}] (ids in --lora order)")
    if loras:
        cmds["cli"] = f"llama-cli -m {model} --lora {loras[0]}"
    return cmds
