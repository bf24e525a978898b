"""`calora inherit`: CA-LoRA knowledge inheritance, the existing LoRA carried onto a compressed model.

A and B are copied unchanged (as the reference code does: no rescaling, no refit), with the same
rank, alpha and targets, so the effective scaling is identical. Only modules present in the
compressed model with matching shapes are carried; the rest are reported.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

from calora_cli import adapters
from calora_cli.arch import PEFT_PREFIX, expected_shape
from calora_cli.artifacts import (
    atomic_output,
    check_output,
    open_artifact,
    read_safetensors_header,
    write_manifest,
)
from calora_cli.errors import CaloraError
from calora_cli.run import RunOptions, check_fits

log = logging.getLogger(__name__)


def base_module_shapes(base) -> tuple[dict[str, tuple[int, int] | None], bool]:
    """Shape of every linear-like module in the base, from safetensors headers (no tensor read).

    Quantized bases store packed tensors, so their shapes come from config.json instead.
    """
    config = json.loads((base.path / "config.json").read_text())
    quantized = bool(config.get("quantization_config"))
    shapes: dict[str, tuple[int, int] | None] = {}
    for shard in base.weights:
        for name, info in read_safetensors_header(shard).items():
            if name == "__metadata__":
                continue
            module, _, leaf = name.rpartition(".")
            if leaf in ("weight", "qweight"):
                shapes[module] = expected_shape(config, module) if quantized else tuple(info["shape"])
    return shapes, quantized


def inherit(adapter: Path, base: Path, out: Path, opts: RunOptions) -> dict:
    from safetensors.torch import save_file

    check_output(out, opts.force)
    ad_art = open_artifact(adapter, expect="adapter", role="adapter")
    base_art = open_artifact(base, expect="model", role="base")
    check_fits(ad_art, base_art, opts)
    factors = adapters.factors(ad_art)
    if adapters.is_kind(ad_art, "masked"):
        raise CaloraError(f"adapter {adapter} is LoSA-masked to another base; inherit from the original LoRA")
    shapes, quantized = base_module_shapes(base_art)
    carried, skipped = [], {}
    for module, f in sorted(factors.items()):
        want = (f.B.shape[0], f.A.shape[1])
        if module not in shapes:
            skipped[module] = "not in the compressed model"
        elif shapes[module] is not None and tuple(shapes[module]) != want:
            skipped[module] = f"shape {tuple(shapes[module])} != adapter's {want}"
        else:
            carried.append(module)
    if not carried:
        first = next(iter(skipped.items()))
        raise CaloraError(f"no module of the adapter fits the compressed model ({first[0]}: {first[1]})")
    config, state = adapters.lora_files(ad_art)  # a NOLA adapter is carried over expanded, as a plain LoRA
    keep = {k: v for k, v in state.items() if k.split(".lora_")[0].removeprefix(PEFT_PREFIX) in carried}
    config["base_model_name_or_path"] = str(base_art.path)
    with atomic_output(out, opts.force) as tmp:
        save_file(keep, tmp / "adapter_model.safetensors", metadata={"format": "pt"})
        (tmp / "adapter_config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
        metrics = {"carried": len(carried), "skipped": skipped}
        write_manifest(tmp, kind="adapter", stage="inherit", params={"quantized_base": quantized},
                       inputs={"adapter": ad_art.input_record(), "base": base_art.input_record()},
                       metrics=metrics, base_fingerprint=base_art.fingerprint)
    for module, why in skipped.items():
        log.warning(f"not carried over: {module} ({why})")
    return {"output": str(out), "carried": len(carried), "skipped": len(skipped)}
