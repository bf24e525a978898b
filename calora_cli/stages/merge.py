"""`calora merge`: fold adapters into a base, one tensor at a time, keeping sparsity when asked."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from calora_cli.artifacts import MANIFEST, atomic_output, check_output, open_artifact, write_manifest
from calora_cli.errors import CaloraError
from calora_cli.progress import progress
from calora_cli.stages.common import RunOptions, check_fits, has_recovery, read_lora
from calora_cli.tensor_io import rewrite, tensor_names


def merge(base: Path, adapters: list[Path], out: Path, opts: RunOptions, weights: list[float] | None = None,
          keep_sparsity: bool = False) -> dict:
    check_output(out, opts.force)
    if not adapters:
        raise CaloraError("give at least one --adapter")
    weights = weights if weights is not None else [1.0] * len(adapters)
    if len(weights) != len(adapters):
        raise CaloraError(f"--weights has {len(weights)} values for {len(adapters)} adapters")
    base_art = open_artifact(base, expect="model", role="base")
    q = json.loads((base_art.path / "config.json").read_text()).get("quantization_config")
    if q:
        raise CaloraError(
            f"merging into a {q.get('quant_method', 'quantized')} base is not built yet: merge into the unquantized model, "
            "then `calora compress` the merged model"
        )
    arts = [open_artifact(a, expect="adapter", role="adapter") for a in adapters]
    for art in arts:
        if has_recovery(art):
            raise CaloraError(
                f"adapter {art.path} carries CA-LoRA recovery modules, which are non-linear (GELU) and cannot be folded "
                "into weights; deploy the compressed model with the adapter attached (calora eval --adapter)"
            )
    plan: dict[str, list] = {}
    masked_any = False
    for art, w in zip(arts, weights):
        check_fits(art, base_art, opts)
        factors, masked = read_lora(art)
        masked_any |= masked
        for module, f in factors.items():
            plan.setdefault(f"{module}.weight", []).append((w, f))
    keep = keep_sparsity or masked_any
    present = {name for shard in base_art.weights for name in tensor_names(shard)}
    missing = sorted(set(plan) - present)
    if missing:
        raise CaloraError(f"the base has no weight {missing[0]} that the adapter adapts ({len(missing)} missing)")

    stats = {"merged_modules": 0, "zeros_before": 0, "zeros_after": 0, "elements": 0}

    def fold(name, W):
        if name not in plan:
            return W
        delta = sum(w * f.delta() for w, f in plan[name])
        if delta.shape != W.shape:
            raise CaloraError(f"shape mismatch at {name}: the base weight is {tuple(W.shape)}, the adapter's delta {tuple(delta.shape)}")
        if keep:
            delta = delta * (W != 0)
        new = (W.float() + delta).to(W.dtype)
        stats["merged_modules"] += 1
        stats["zeros_before"] += int((W == 0).sum())
        stats["zeros_after"] += int((new == 0).sum())
        stats["elements"] += W.numel()
        advance()
        return new

    with atomic_output(out, opts.force) as tmp, progress("merge", len(plan), opts.show_progress) as advance:
        for f in base_art.path.iterdir():
            if f.is_file() and f.suffix != ".safetensors" and f.name != MANIFEST:
                shutil.copy2(f, tmp / f.name)
        for shard in base_art.weights:
            rewrite(shard, tmp / shard.relative_to(base_art.path), fold)
        n = max(1, stats["elements"])
        metrics = {
            "merged_modules": stats["merged_modules"],
            "sparsity_before": stats["zeros_before"] / n,
            "sparsity_after": stats["zeros_after"] / n,
            "zeros_filled": max(0, stats["zeros_before"] - stats["zeros_after"]),
        }
        inputs = {"base": base_art.input_record(), **{f"adapter{i}": a.input_record() for i, a in enumerate(arts)}}
        params = {"weights": weights, "keep_sparsity": keep, "adapters": len(arts)}
        write_manifest(tmp, kind="model", stage="merge", params=params, inputs=inputs, metrics=metrics, lineage=base_art.lineage)
    if metrics["zeros_filled"] and not keep:
        opts.warn(f"the merge filled {metrics['zeros_filled']} zeros of the base's adapted layers "
                  f"(sparsity {metrics['sparsity_before']:.1%} -> {metrics['sparsity_after']:.1%}); "
                  "use --keep-sparsity or a sparsified adapter to keep them")
    return {"output": str(out), **metrics}
