"""Quantized checkpoints made by the tools users make them with, from a plain model saved by
transformers: GPTQ (through transformers' GPTQConfig) and AWQ by GPTQModel, compressed-tensors
formats by the compressed-tensors package (what llm-compressor calls to save; its calibration is
min-max here, as its RTN scheme's).

GPTQModel runs in a subprocess of its own: once it has quantized in a process, llama.cpp's forward
pass in that process crashes (a segmentation fault in llama_decode, found when a test worker ran a
GPTQModel fixture and then a llama.cpp test); its thread pools are sized once per process (AWQ on 2
cores needs GPTQMODEL_CPU_WORKERS=2), and its AWQ writes logs into the working directory."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

SCHEMES = {  # name -> (format, weight args, input-activation args)
    "w4a16-asym": ("pack-quantized", dict(num_bits=4, type="int", symmetric=False, strategy="group", group_size=32), None),
    "w8a16": ("int-quantized", dict(num_bits=8, type="int", symmetric=True, strategy="channel"), None),
    "fp8": ("float-quantized", dict(num_bits=8, type="float", symmetric=True, strategy="channel"), None),
    "w8a8": ("int-quantized", dict(num_bits=8, type="int", symmetric=True, strategy="channel"),
             dict(num_bits=8, type="int", symmetric=True, strategy="token", dynamic=True)),
}


def _in_subprocess(*args: str) -> None:
    env = {**os.environ, "GPTQMODEL_CPU_WORKERS": "2", "OMP_NUM_THREADS": "1"}
    work = Path(args[2]).parent / f"{Path(args[2]).name}.work"
    work.mkdir(parents=True, exist_ok=True)
    r = subprocess.run([sys.executable, __file__, *args], capture_output=True, text=True, env=env, cwd=work)
    assert r.returncode == 0, r.stderr[-3000:]


def awq(base: Path, out: Path, calib_text: Path, group_size: int = 64) -> Path:
    """`base` quantized to 4-bit AWQ (GEMM layout, zero points) by GPTQModel on the CPU."""
    _in_subprocess("awq", str(base), str(out), str(calib_text), str(group_size))
    return out


def gptq(base: Path, out: Path, calib_text: Path, **config) -> Path:
    """`base` quantized by GPTQModel through transformers' GPTQConfig (as users make GPTQ models),
    saved by transformers."""
    _in_subprocess("gptq", str(base), str(out), str(calib_text), json.dumps(config))
    return out


def _gptq(base: str, out: str, calib_text: str, config: str) -> None:
    import torch
    from transformers import AutoModelForCausalLM, GPTQConfig

    from calora_cli.data import calibration_batch
    from calora_cli.models import load_tokenizer

    tok = load_tokenizer(Path(base))
    windows = calibration_batch(tok, Path(calib_text).read_text(), 8, 64, seed=0)
    data = [{"input_ids": w[None], "attention_mask": torch.ones(1, w.numel(), dtype=torch.long)} for w in windows]
    model = AutoModelForCausalLM.from_pretrained(base, quantization_config=GPTQConfig(dataset=data, **json.loads(config)),
                                                 device_map="cpu", dtype=torch.float32)
    model.config.quantization_config.dataset = None
    model.save_pretrained(out)
    tok.save_pretrained(out)


def _awq(base: str, out: str, calib_text: str, group_size: str) -> None:
    import torch
    from gptqmodel import GPTQModel, QuantizeConfig
    from gptqmodel.quantization import FORMAT, METHOD
    from gptqmodel.utils.backend import BACKEND
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(base)
    ids = tok(Path(calib_text).read_text()[:100_000], add_special_tokens=False).input_ids
    calib = [{"input_ids": torch.tensor([ids[i * 64:(i + 1) * 64]]), "attention_mask": torch.ones(1, 64, dtype=torch.long)}
             for i in range(16)]
    config = QuantizeConfig(bits=4, group_size=int(group_size), sym=False, method=METHOD.AWQ, format=FORMAT.GEMM)
    model = GPTQModel.load(base, config, device="cpu", dtype=torch.float16)
    model.quantize(calib, batch_size=1, backend=BACKEND.AWQ_TORCH)  # the CPU kernel (the default asks for CUDA)
    model.save(out)


def compressed_tensors(base: Path, out: Path, scheme: str) -> Path:
    """`base` quantized by compressed-tensors in one of SCHEMES, saved compressed as llm-compressor
    saves it. Beside it, `out`-reference: a plain model holding the same quantized weights
    (compressed-tensors' own fake-quantization with the same scales), for where transformers cannot
    load the compressed checkpoint itself."""
    import torch
    from compressed_tensors.compressors import ModelCompressor
    from compressed_tensors.quantization import (
        QuantizationArgs,
        QuantizationConfig,
        QuantizationScheme,
        QuantizationStatus,
        apply_quantization_config,
    )
    from compressed_tensors.quantization.lifecycle.forward import fake_quantize
    from compressed_tensors.quantization.utils.helpers import calculate_qparams
    from transformers import AutoModelForCausalLM, AutoTokenizer

    fmt, weights, inputs = SCHEMES[scheme]
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    reference = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    q = QuantizationScheme(targets=["Linear"], weights=QuantizationArgs(**weights),
                           input_activations=QuantizationArgs(**inputs) if inputs else None)
    apply_quantization_config(model, QuantizationConfig(config_groups={"group_0": q}, ignore=["lm_head"], format=fmt,
                                                        quantization_status=QuantizationStatus.INITIALIZED))
    args = q.weights
    for name, m in model.named_modules():
        if not hasattr(m, "weight_scale"):
            continue
        W = m.weight.data
        if args.strategy == "group":
            lo, hi = W.view(W.shape[0], -1, args.group_size).amin(-1), W.view(W.shape[0], -1, args.group_size).amax(-1)
        else:
            lo, hi = W.amin(1, keepdim=True), W.amax(1, keepdim=True)
        scale, zero = calculate_qparams(lo, hi, args)
        m.weight_scale.data = scale.to(m.weight_scale.dtype).reshape(m.weight_scale.shape)
        if hasattr(m, "weight_zero_point"):
            m.weight_zero_point.data = zero.to(m.weight_zero_point.dtype).reshape(m.weight_zero_point.shape)
        zp = getattr(m, "weight_zero_point", None)
        reference.get_submodule(name).weight.data = fake_quantize(W, m.weight_scale.data, zp, args)
    compressor = ModelCompressor.from_pretrained_model(model, quantization_format=fmt)
    compressor.compress_model(model)
    model.save_pretrained(out)
    compressor.update_config(out)
    tok = AutoTokenizer.from_pretrained(base)
    tok.save_pretrained(out)
    ref = out.parent / f"{out.name}-reference"
    reference.save_pretrained(ref)
    tok.save_pretrained(ref)
    assert json.loads((out / "config.json").read_text())["quantization_config"]["format"] == fmt
    return out


if __name__ == "__main__":
    {"awq": _awq, "gptq": _gptq}[sys.argv[1]](*sys.argv[2:])
