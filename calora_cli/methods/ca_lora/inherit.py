"""`calora inherit`: CA-LoRA knowledge inheritance, the existing LoRA carried onto a compressed model.

A and B are copied unchanged (as the reference code does: no rescaling, no refit), with the same
rank, alpha and targets, so the effective scaling is identical. Only modules present in the
compressed model with matching shapes are carried; the rest are reported.
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path

from calora_cli import adapters
from calora_cli.adapters import lora
from calora_cli.arch import PEFT_PREFIX, expected_shape
from calora_cli.artifacts import (
    atomic_output,
    check_output,
    data_input,
    open_artifact,
    read_safetensors_header,
    write_manifest,
)
from calora_cli.methods.ca_lora.transfer import CompensateSpec
from calora_cli.errors import CaloraError
from calora_cli.run import RunOptions, check_descends, check_fits, open_model

log = logging.getLogger(__name__)


def base_module_shapes(base) -> tuple[dict[str, tuple[int, int] | None], bool]:
    """Shape of every linear-like module in the base, from safetensors headers (no tensor read).

    Quantized bases store packed tensors, so their shapes come from config.json instead.
    """
    config = json.loads((base.path / "config.json").read_text())
    quantized = bool(config.get("quantization_config"))
    shapes: dict[str, tuple[int, int] | None] = {}
    if base.gguf:  # llama.cpp's names and layout, read back as Hugging Face's
        from calora_cli.gguf.reader import GGUFTensors

        source = GGUFTensors(base.weights[0], config)
        for name, info in source.header.items():
            module, _, leaf = name.rpartition(".")
            if leaf == "weight" and len(info["shape"]) == 2:
                shapes[module] = tuple(info["shape"])
        source.close()
        return shapes, True
    for shard in base.weights:
        for name, info in read_safetensors_header(shard).items():
            if name == "__metadata__":
                continue
            module, _, leaf = name.rpartition(".")
            if leaf in ("weight", "qweight"):
                shapes[module] = expected_shape(config, module) if quantized else tuple(info["shape"])
    return shapes, quantized


def inherit(adapter: Path | None, base: Path, out: Path, opts: RunOptions, compensation: CompensateSpec | None = None) -> dict:
    """Carry the LoRA over; with `compensation`, add a low-rank compensation of the compression
    error to it (transfer.py), still one plain peft LoRA. Without an adapter (`compensation`
    required): the compensation of the base alone, calibrated without any task LoRA, as an adapter
    of its own that a runtime applies beside each task's (llama.cpp applies several at once)."""
    from safetensors.torch import save_file

    check_output(out, opts.force)
    if adapter is None:
        if compensation is None:
            raise CaloraError("give the LoRA to carry over, or --compensate RANK for the base's own compensation")
        return _base_compensation(base, out, opts, compensation)
    ad_art = open_artifact(adapter, expect="adapter", role="adapter")
    base_art = open_model(base, "base", compensation.teacher if compensation is not None else None)
    teacher_art = None
    if compensation is not None:
        compensation.check()
        if adapters.describe(ad_art) != "lora":
            raise CaloraError(f"--compensate takes a plain LoRA; {adapter} is a {adapters.describe(ad_art)} adapter")
        teacher_art = open_artifact(compensation.teacher, expect="model", role="teacher")
        check_descends(base_art, teacher_art, "compressed from the teacher", opts)
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
    metrics: dict = {"carried": len(carried), "skipped": skipped}
    params: dict = {"quantized_base": quantized}
    inputs = {"adapter": ad_art.input_record(), "base": base_art.input_record()}
    with atomic_output(out, opts.force) as tmp:
        save_file(keep, tmp / "adapter_model.safetensors", metadata={"format": "pt"})
        (tmp / "adapter_config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
        if compensation is not None:
            t0 = time.time()
            config, keep, removed = _compensate(tmp, base_art, teacher_art, {m: factors[m] for m in carried}, config,
                                                compensation, opts)
            lora.write(tmp, config, keep)
            metrics.update(compensation_removed=removed, mean_compensation_removed=sum(removed.values()) / len(removed),
                           compensation_seconds=round(time.time() - t0, 2))
            params.update(compensation.params())
            inputs.update(teacher=teacher_art.input_record(), calib=data_input(compensation.calib))
        write_manifest(tmp, kind="adapter", stage="inherit", params=params, inputs=inputs, metrics=metrics,
                       base_fingerprint=base_art.fingerprint)
    for module, why in skipped.items():
        log.warning(f"not carried over: {module} ({why})")
    summary = {"output": str(out), "carried": len(carried), "skipped": len(skipped)}
    if compensation is not None:
        summary.update({k: metrics[k] for k in ("mean_compensation_removed", "compensation_seconds")})
    return summary


def _compensate(tmp: Path, base_art, teacher_art, factors: dict, config: dict, spec: CompensateSpec, opts: RunOptions):
    """The inherited LoRA (just written to `tmp`) on the compressed base, the compensation of each
    layer from its calibration inputs in that model, and the combined LoRA."""
    from calora_cli.arch import adapted_linears, decoder_layers
    from calora_cli.data import calibration_batch, read_text
    from calora_cli.methods.ca_lora.transfer import combined_lora, compensate_model
    from calora_cli.models import load_adapter, load_model, load_tokenizer
    from calora_cli.progress import progress
    from calora_cli.run import seed_everything

    seed_everything(opts.seed)
    calib = calibration_batch(load_tokenizer(base_art.path), read_text(spec.calib), spec.calib_samples, spec.seq_len, opts.seed)
    model = load_model(base_art.path, opts.device, opts.dtype)
    if factors:
        model = load_adapter(model, tmp)
    targets = sorted(adapted_linears(model)) if spec.all_linears or not factors else sorted(factors)
    with progress("compensate", len(decoder_layers(model.get_base_model() if factors else model)), opts.show_progress) as advance:
        comps, removed = compensate_model(model, targets, teacher_art.weights, calib, spec, on_block=advance)
    config, state = combined_lora(config, factors, comps)
    return config, state, removed


def _base_compensation(base: Path, out: Path, opts: RunOptions, spec: CompensateSpec) -> dict:
    """Every block linear's compensation, calibrated on the compressed base alone, as a peft LoRA."""
    base_art = open_model(base, "base", spec.teacher)
    spec.check()
    teacher_art = open_artifact(spec.teacher, expect="model", role="teacher")
    check_descends(base_art, teacher_art, "compressed from the teacher", opts)
    config = {"peft_type": "LORA", "task_type": "CAUSAL_LM", "bias": "none", "lora_dropout": 0.0,
              "base_model_name_or_path": str(base_art.path), "inference_mode": True}
    params = {"quantized_base": True, "base_only": True, **spec.params()}
    inputs = {"base": base_art.input_record(), "teacher": teacher_art.input_record(), "calib": data_input(spec.calib)}
    t0 = time.time()
    with atomic_output(out, opts.force) as tmp:
        config, state, removed = _compensate(tmp, base_art, teacher_art, {}, config, spec, opts)
        lora.write(tmp, config, state)
        metrics = {"carried": 0, "compensation_removed": removed,
                   "mean_compensation_removed": sum(removed.values()) / len(removed),
                   "compensation_seconds": round(time.time() - t0, 2)}
        write_manifest(tmp, kind="adapter", stage="inherit", params=params, inputs=inputs, metrics=metrics,
                       base_fingerprint=base_art.fingerprint)
    return {"output": str(out), "carried": 0, "skipped": 0,
            **{k: metrics[k] for k in ("mean_compensation_removed", "compensation_seconds")}}
