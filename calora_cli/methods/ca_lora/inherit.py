"""`calora inherit`: CA-LoRA knowledge inheritance, the existing LoRA carried onto a compressed model.

A and B are copied unchanged (as the reference code does: no rescaling, no refit), with the same
rank, alpha and targets, so the effective scaling is identical. Only modules present in the
compressed model with matching shapes are carried; the rest are reported.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import replace
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
    from calora_cli.formats import read_layout

    layout = read_layout(config, base.path)  # packed: GPTQ, AWQ, compressed-tensors
    header = {n: info for shard in base.weights for n, info in read_safetensors_header(shard).items() if n != "__metadata__"}
    for name, info in header.items():
        module, _, leaf = name.rpartition(".")
        if leaf == "weight" or (layout is not None and module not in shapes and layout.parts(module, header)):
            shapes[module] = expected_shape(config, module) if quantized else tuple(info["shape"])
    return shapes, quantized


def inherit(adapter: Path | None, base: Path, out: Path, opts: RunOptions, compensation: CompensateSpec | None = None,
            teacher: Path | None = None) -> dict:
    """Carry the LoRA over; with `compensation`, add a low-rank compensation of the compression
    error to it (transfer.py), still one plain peft LoRA. Without an adapter (`compensation`
    required): the compensation of the base alone, calibrated without any task LoRA, as an adapter
    of its own that a runtime applies beside each task's (llama.cpp applies several at once).

    A base that moved per-channel scales between layers (AWQ) computes in rescaled coordinates: with
    `teacher` (or the compensation's), the LoRA is carried into them (A diag(c), diag(r) B, fitted
    against the teacher's weights); without, it is carried unchanged, as peft would apply it, with a
    warning."""
    from safetensors.torch import save_file

    check_output(out, opts.force)
    if adapter is None:
        if compensation is None:
            raise CaloraError("give the LoRA to carry over, or --compensate RANK for the base's own compensation")
        return _base_compensation(base, out, opts, compensation)
    ad_art = open_artifact(adapter, expect="adapter", role="adapter")
    base_art = open_model(base, "base", compensation.teacher if compensation is not None else teacher)
    teacher_art = None
    if teacher is not None:
        teacher_art = open_artifact(teacher, expect="model", role="teacher")
        check_descends(base_art, teacher_art, "compressed from the teacher", opts)
    if compensation is not None:
        compensation.check()
        if adapters.describe(ad_art) != "lora":
            raise CaloraError(f"--compensate takes a plain LoRA; {adapter} is a {adapters.describe(ad_art)} adapter")
        teacher_art = open_artifact(compensation.teacher, expect="model", role="teacher")
        check_descends(base_art, teacher_art, "compressed from the teacher", opts)
    check_fits(ad_art, base_art, opts)
    if adapters.is_kind(ad_art, "masked"):
        raise CaloraError(f"adapter {adapter} is LoSA-masked to another base; inherit from the original LoRA")
    config, state = adapters.lora_files(ad_art)  # a NOLA adapter is carried over expanded, as a plain LoRA
    lora.check_config(config)
    quant = json.loads((base_art.path / "config.json").read_text()).get("quantization_config") or {}
    if config.get("use_dora") and quant.get("quant_method") in ("gptq", "awq"):
        raise CaloraError(f"adapter {adapter} is DoRA, and peft has no DoRA on {quant['quant_method'].upper()} layers: "
                          "merge it into the float model (calora merge TEACHER --adapter A) and compress the merged "
                          "model, or inherit it onto a pruned, bitsandbytes or GGUF base")
    if compensation is not None:
        factors = lora.factors_from_state(state, config, "--compensate (it adds a low-rank term to B·A)",
                                          "inherit without --compensate carries the adapter over as it is")
    else:
        factors = lora.linear_factors(state, config)
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
    keep = {k: v for k, v in state.items() if k.endswith((".lora_A.weight", ".lora_B.weight"))
            and k.split(".lora_")[0].removeprefix(PEFT_PREFIX) in carried}
    keep.update(_passengers(state, config, base_art, factors, carried))
    config["base_model_name_or_path"] = str(base_art.path)
    metrics: dict = {"carried": len(carried), "skipped": skipped}
    params: dict = {"quantized_base": quantized}
    inputs = {"adapter": ad_art.input_record(), "base": base_art.input_record()}
    if compensation is None and _moves_scales(base_art):
        if teacher_art is None:
            log.warning(f"{base_art.source or base_art.path} is AWQ, which computes in rescaled channels: the LoRA is "
                        "carried unchanged, as peft applies it; pass --teacher ORIGINAL to carry it into AWQ's channels")
        else:
            keep.update(_carried_into_scales(base_art, teacher_art, factors, carried, keep))
            params["coordinates"] = "carried into the base's channel scales (fitted against the teacher)"
            inputs["teacher"] = teacher_art.input_record()
    elif teacher is not None:
        log.warning("--teacher without --compensate changes nothing on a base that keeps the teacher's channels")
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


def _moves_scales(base_art) -> bool:
    from calora_cli.formats import read_layout

    layout = None if base_art.gguf else read_layout(json.loads((base_art.path / "config.json").read_text()), base_art.path)
    return bool(layout and layout.moves_scales)


def _carried_into_scales(base_art, teacher_art, factors: dict, carried: list[str], keep: dict) -> dict:
    """The carried LoRA's tensors in the base's channel scales: per module (r, c) with
    W_base ~ diag(r) W_teacher diag(c) (compensation.channel_scales), then A diag(c), diag(r) B,
    and a lora_bias scaled as the rows it adds to."""
    from calora_cli.methods.ca_lora.transfer import channel_scales_of

    new = {}
    for m, (r, c) in channel_scales_of(base_art, teacher_art, carried).items():
        stem = f"{PEFT_PREFIX}{m}"
        A, B = keep[f"{stem}.lora_A.weight"], keep[f"{stem}.lora_B.weight"]
        new[f"{stem}.lora_A.weight"] = (A.float() * c[None, :]).to(A.dtype)
        new[f"{stem}.lora_B.weight"] = (B.float() * r[:, None]).to(B.dtype)
        if f"{stem}.lora_B.bias" in keep:
            bias = keep[f"{stem}.lora_B.bias"]
            new[f"{stem}.lora_B.bias"] = (bias.float() * r).to(bias.dtype)
    return new


def _passengers(state: dict, config: dict, base_art, factors: dict, carried: list[str]) -> dict:
    """What the adapter holds beside its linears' factors, carried over unchanged where it fits the
    compressed base (peft applies each on load); a passenger of a module not carried, or of a shape
    the base does not have, is refused in one line: a partial DoRA or modules_to_save would change
    what the adapter computes."""
    tensors = base_tensor_shapes(base_art)
    out = {}
    for p in lora.passengers(state):
        t = state[p.key]
        if p.what in ("DoRA magnitude", "lora_bias"):
            if p.module not in carried:
                raise CaloraError(f"adapter's {p.what} {p.key} belongs to {p.module}, which is not carried over")
            want = (factors[p.module].B.shape[0],)
        elif p.what == "embedding LoRA":
            emb = tensors.get(p.target)
            if emb is None:
                raise CaloraError(f"adapter's embedding LoRA {p.key} adapts {p.module}, which the base does not have")
            want = (t.shape[0], emb[0]) if p.key.endswith("_A") else (emb[1], t.shape[1])
        elif p.what == "trainable tokens":
            emb = tensors.get(p.target)
            if emb is None:
                raise CaloraError(f"adapter's trainable tokens {p.key} replace rows of {p.module}, which the base does not have")
            rows = lora.token_rows(config, p, t)
            if max(rows) >= emb[0]:
                raise CaloraError(f"adapter's trainable token {max(rows)} lies beyond the base's vocabulary of {emb[0]}")
            want = (t.shape[0], emb[1])
        else:
            if p.target not in tensors:
                raise CaloraError(f"adapter holds {p.key}, a copy of {p.target} (modules_to_save, or a trained bias), "
                                  "which the compressed base does not have")
            want = tensors[p.target]
        if tuple(t.shape) != tuple(want):
            raise CaloraError(f"adapter's {p.what} {p.key} has shape {tuple(t.shape)}; the compressed base needs {tuple(want)}")
        out[p.key] = t
    return out


def base_tensor_shapes(base) -> dict[str, tuple[int, ...]]:
    """Every tensor of the base under its Hugging Face name, from headers (nothing read): a quantized
    linear's weight as the dense shape it stands for, a tied head as the embedding's shape."""
    config = json.loads((base.path / "config.json").read_text())
    shapes: dict[str, tuple[int, ...]] = {}
    if base.gguf:
        from calora_cli.gguf.reader import GGUFTensors

        source = GGUFTensors(base.weights[0], config)
        shapes = {n: tuple(info["shape"]) for n, info in source.header.items()}
        source.close()
    else:
        for shard in base.weights:
            for name, info in read_safetensors_header(shard).items():
                if name != "__metadata__":
                    shapes[name] = tuple(info["shape"])
    from calora_cli.formats import read_layout

    layout = None if base.gguf else read_layout(config, base.path)
    for module in sorted({n.rpartition(".")[0] for n in shapes}) if layout else ():
        if layout.parts(module, shapes):  # GPTQ, AWQ, compressed-tensors: stored packed
            dense = expected_shape(config, module)
            if dense is not None:
                shapes[f"{module}.weight"] = tuple(dense)
    if "lm_head.weight" not in shapes and "model.embed_tokens.weight" in shapes:
        shapes["lm_head.weight"] = shapes["model.embed_tokens.weight"]  # tied: peft saves a copy for modules_to_save
    return shapes


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
        comps, removed, scales = compensate_model(model, targets, teacher_art.weights, calib, spec, on_block=advance,
                                                  rescaled=_moves_scales(base_art))
    for m, (r, c) in scales.items():  # the LoRA carried into the base's coordinates, as compensate_model carried it
        if m in factors:
            f = factors[m]
            factors[m] = replace(f, A=f.A.float() * c[None, :], B=f.B.float() * r[:, None])
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
