"""`calora compress`: quantize or prune a base model, block by block, into a new model artifact."""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path

from calora_cli.arch import check_supported
from calora_cli.artifacts import (
    atomic_output,
    check_output,
    data_input,
    open_artifact,
    safetensors_files,
    write_manifest,
)
from calora_cli.compress import METHODS, PRUNERS, QUANTIZERS, pruner
from calora_cli.compress.masks import parse_pattern
from calora_cli.data import calibration_batch, read_text
from calora_cli.errors import CaloraError
from calora_cli.models import load_tokenizer
from calora_cli.progress import progress
from calora_cli.run import RunOptions, seed_everything


@dataclass
class CompressSpec:
    method: str
    sparsity: float | None = None
    pattern: str = "unstructured"
    allocation: str = "uniform"
    rmi_delta: float | None = None
    bits: int = 4
    group_size: int = 128
    calib: Path | None = None
    calib_samples: int = 32
    seq_len: int = 256
    then: str | None = None
    activation_gb: float = 2.0  # activations between layers kept in memory; beyond, spilled to disk
    gguf_type: str | None = None
    solver: str = "llama.cpp"

    def check(self, config: dict) -> tuple[int, int] | None:
        """Validate before any heavy work; return the N:M pattern (or None)."""
        if self.method not in METHODS:
            raise CaloraError(f"unknown --method {self.method!r} (choose from {', '.join(METHODS)})")
        nm = None
        if self.method == "gguf":
            from calora_cli.gguf import FLOAT_TYPES, TYPES

            if self.gguf_type not in TYPES:
                raise CaloraError(f"--method gguf needs --gguf-type, one of {', '.join(TYPES)}; got {self.gguf_type!r}")
            if self.solver not in ("llama.cpp", "gptq"):
                raise CaloraError(f"--solver must be llama.cpp or gptq, got {self.solver!r}")
            if self.solver == "gptq" and self.gguf_type in FLOAT_TYPES:
                raise CaloraError(f"--solver gptq chooses codes on a quantized grid; {self.gguf_type} has none")
            if self.solver == "gptq" and self.calib is None:
                raise CaloraError("--solver gptq needs calibration text for its Hessians: pass --calib FILE")
        elif self.gguf_type is not None:
            raise CaloraError("--gguf-type goes with --method gguf")
        elif self.solver != "llama.cpp":
            raise CaloraError("--solver goes with --method gguf")
        if config.get("quantization_config"):
            q = config["quantization_config"].get("quant_method", "quantized")
            raise CaloraError(f"the model is already quantized ({q}); compress the unquantized model "
                              "(prune, then quantize: --then gptq)")
        if self.method in PRUNERS:
            nm = parse_pattern(self.pattern)
            if nm is None:
                if self.sparsity is None or not 0 < self.sparsity < 1:
                    raise CaloraError(f"--sparsity must lie in (0, 1), got {self.sparsity}")
            else:
                implied = 1 - nm[0] / nm[1]
                if self.sparsity is not None and abs(self.sparsity - implied) > 1e-9:
                    raise CaloraError(f"--sparsity {self.sparsity} contradicts --pattern {self.pattern} ({implied:g} sparsity)")
                self.sparsity = implied
            if self.allocation not in ("uniform", "rmi"):
                raise CaloraError(f"--allocation must be uniform or rmi, got {self.allocation!r}")
            if self.allocation == "rmi" and nm is not None:
                raise CaloraError("--allocation rmi sets per-layer rates; an N:M pattern fixes them: use one or the other")
            if self.rmi_delta is not None and not 0 < self.rmi_delta < min(self.sparsity, 1 - self.sparsity):
                raise CaloraError(f"--rmi-delta must lie in (0, {min(self.sparsity, 1 - self.sparsity):g}), got {self.rmi_delta}")
            if self.then not in (None, "gptq"):
                raise CaloraError(f"--then must be gptq (prune, then quantize), got {self.then!r}")
        elif self.then is not None:
            raise CaloraError("--then follows a pruning method (e.g. --method wanda --then gptq)")
        if self.method == "gptq" or self.then == "gptq":
            from calora_cli.compress.gptq import check_bits_for_gptq, check_group_size

            check_bits_for_gptq(self.bits)
            check_group_size(config, self.group_size)
        needs_calib = self.method in ("wanda", "sparsegpt", "gptq") or self.then == "gptq" or self.allocation == "rmi"
        if needs_calib and self.calib is None:
            raise CaloraError(f"--method {self.method} needs calibration text: pass --calib FILE")
        if not self.activation_gb > 0:
            raise CaloraError(f"--activation-memory must be positive (GB), got {self.activation_gb}")
        if self.calib_samples < 1 or self.seq_len < 2:
            raise CaloraError("--calib-samples must be at least 1 and --seq-len at least 2")
        return nm

    def params(self) -> dict:
        p = {k: getattr(self, k) for k in ("method", "calib_samples", "seq_len")}
        if self.method in PRUNERS:
            p.update(sparsity=self.sparsity, pattern=self.pattern, allocation=self.allocation, then=self.then)
            if self.allocation == "rmi":
                p["rmi_delta"] = self.rmi_delta
        if self.method == "gptq" or self.then == "gptq":
            p.update(bits=self.bits, group_size=self.group_size)
        if self.method in ("rtn-int8", "nf4"):
            p["bits"] = 8 if self.method == "rtn-int8" else 4
        if self.method == "gguf":
            p.update(gguf_type=self.gguf_type, imatrix=self.calib is not None, solver=self.solver)
        return p


def compress_model(model_dir: Path, out: Path, spec: CompressSpec, opts: RunOptions) -> dict:
    check_output(out, opts.force)
    src = open_artifact(model_dir, expect="model", role="model")
    if src.gguf:
        raise CaloraError(f"model {src.path} is already a GGUF (llama.cpp quantized); compress the unquantized model")
    config = json.loads((src.path / "config.json").read_text())
    check_supported(config, src.path)
    nm = spec.check(config)
    calib_text = read_text(spec.calib) if spec.calib is not None else None
    tokenizer = load_tokenizer(src.path)
    seed_everything(opts.seed)
    calib = calibration_batch(tokenizer, calib_text, spec.calib_samples, spec.seq_len, opts.seed) if calib_text else None
    t0 = time.time()
    metrics: dict = {}

    with atomic_output(out, opts.force) as tmp:
        run = _gguf if spec.method == "gguf" else _stream
        metrics.update(run(src, tmp, calib, spec, nm, opts))
        _finish(tmp, src, spec, metrics)
    return _summary(out, spec, t0, metrics)


def _finish(tmp: Path, src, spec: CompressSpec, metrics: dict) -> None:
    inputs = {"model": src.input_record()}
    if spec.calib is not None:
        inputs["calib"] = data_input(spec.calib)
    write_manifest(tmp, kind="model", stage="compress", params=spec.params(), inputs=inputs, metrics=metrics,
                   lineage=src.lineage)


def _summary(out: Path, spec: CompressSpec, t0: float, metrics: dict) -> dict:
    size = sum(p.stat().st_size for p in [*safetensors_files(out), *out.glob("*.gguf")])
    return {"output": str(out), "method": spec.method, "seconds": round(time.time() - t0, 2), "weights_bytes": size,
            **{k: v for k, v in metrics.items() if not isinstance(v, (dict, list))}}


def _stream(src, into: Path, calib, spec: CompressSpec, nm, opts: RunOptions) -> dict:
    """Prune and/or quantize (GPTQ, bitsandbytes) `src` into the directory `into`, one decoder layer
    at a time (streaming.py): the model is never resident, and its checkpoint's dtype is kept on disk."""
    from calora_cli.compress import sparsity_allocation as allocation
    from calora_cli.compress.sequential import input_grams, prune_sequential
    from calora_cli.runtime import resolve_device, torch_dtype
    from calora_cli.streaming import LayerSource, LayerWriter, Spill

    prunes = spec.method in PRUNERS
    quantizes = spec.method in QUANTIZERS or spec.then == "gptq"
    source = LayerSource(src.path, src.weights, torch_dtype(opts.dtype), resolve_device(opts.device))
    spill = Spill(int(spec.activation_gb * 1e9), into / ".spill")
    writer = None
    try:
        n_blocks = len(source.layers)
        if calib is not None:
            source.embed()
        rates = None
        if prunes and spec.allocation == "rmi":
            delta = spec.rmi_delta if spec.rmi_delta is not None else allocation.default_delta(spec.sparsity)
            spec.rmi_delta = delta
            with progress("rmi statistics", n_blocks, opts.show_progress) as advance:
                grams = input_grams(source.model, calib, blocks=_counted(source.blocks(), advance), keep=spill)
            rates = allocation.rmi(spec.sparsity, allocation.importance(allocation.cka_matrix(grams)), delta)
        elif prunes:
            rates = allocation.uniform(spec.sparsity, n_blocks)
        method = pruner(spec.method) if prunes else None
        quantize = plan = on_quantized = quantize_needs = quantization_config = None
        if quantizes:
            quantize, plan, quantize_needs, quantization_config = _quantizer(spec, source.config.model_type,
                                                                             source.compute_dtype)
        writer = LayerWriter(into, source, plan=plan)
        if quantizes:
            on_quantized = _packed_into(writer)
        label = spec.method + (f"+{spec.then}" if spec.then else "")
        with progress(label, n_blocks, opts.show_progress) as advance:
            reports = list(prune_sequential(source.model, calib, rates, method.prune if prunes else None,
                                            method.NEEDS if prunes else None, nm, on_block=advance,
                                            blocks=source.blocks_after_embedding(writer), keep=spill, quantize=quantize,
                                            on_quantized=on_quantized, quantize_needs=quantize_needs,
                                            pruner_compensates=prunes and method.COMPENSATES))
        writer.finish()
    finally:
        spill.remove()
        source.close()
        if writer is not None:
            writer.close()
    out: dict = {}
    if prunes:
        out["sparsity"] = sum(r.zeros for r in reports) / sum(r.elements for r in reports)
        out["layer_rates"] = [r.rate for r in reports]
        out["layer_sparsity"] = [r.sparsity for r in reports]
    if calib is not None:
        out["block_rel_error"] = [r.rel_error for r in reports]
        out["mean_block_rel_error"] = sum(out["block_rel_error"]) / len(reports)
    if quantizes:
        config_path = into / "config.json"
        config = json.loads(config_path.read_text())
        config["quantization_config"] = quantization_config
        config_path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    return out


def _gguf(src, into: Path, calib, spec: CompressSpec, nm, opts: RunOptions) -> dict:
    from calora_cli.compress.gguf import convert

    return convert(src, into, spec.gguf_type, calib, opts, spec.solver, spec.activation_gb)


def _quantizer(spec: CompressSpec, model_type: str, compute_dtype):
    """The quantizer of one linear, the output plan that stores each block linear's weight as its
    quantized tensors, what the quantizer needs of the inputs, and config.json's quantization_config."""
    from calora_cli.arch import FAMILIES, LAYERS_PREFIX
    from calora_cli.compress import bnb, gptq

    linears = set(FAMILIES[model_type])
    if spec.method in ("nf4", "rtn-int8"):
        def quantize(name, weight, stats, keep):
            return bnb.quantize(spec.method, weight)

        def replaced(name, shape):
            return bnb.entries(spec.method, name, shape, str(compute_dtype).removeprefix("torch."))

        needs, config = bnb.NEEDS, bnb.quantization_config(spec.method, compute_dtype)
    else:
        def quantize(name, weight, stats, keep):
            return gptq.quantize(weight, stats.take_hessian(), spec.bits, spec.group_size, keep=keep)

        def replaced(name, shape):
            return gptq.packed_entries(name, shape, spec.bits, spec.group_size)

        needs, config = gptq.NEEDS, gptq.quantization_config(spec.bits, spec.group_size)

    def plan(name, dtype, shape):
        parts = name.rsplit(".", 2)
        if name.startswith(LAYERS_PREFIX) and len(shape) == 2 and parts[-1] == "weight" and parts[-2] in linears:
            return replaced(name, shape)
        return [(name, dtype, shape)]

    return quantize, plan, needs, config


def _packed_into(writer):
    from calora_cli.arch import LAYERS_PREFIX

    def hand_over(i: int, packed: dict) -> None:
        writer.replace(i, {f"{LAYERS_PREFIX}{i}.{name}.{part}": t for name, parts in packed.items()
                           for part, t in parts.items()})

    return hand_over


def _counted(blocks, advance):
    for block in blocks:
        yield block
        advance(1)
