"""`calora info`: what an artifact is, where it came from, and what its weights look like."""

from __future__ import annotations

import json
import math
from pathlib import Path

from calora_cli.artifacts import open_artifact, read_safetensors_header, verify


def _tensor_counts(weights: list[Path]) -> tuple[int, dict[str, int]]:
    total, by_dtype = 0, {}
    for w in weights:
        for name, t in read_safetensors_header(w).items():
            if name == "__metadata__":
                continue
            n = math.prod(t["shape"])
            total += n
            by_dtype[t["dtype"]] = by_dtype.get(t["dtype"], 0) + n
    return total, by_dtype


def linear_sparsity(weights: list[Path]) -> dict[str, tuple[int, int]]:
    """(exact zeros, elements) of each 2-D weight of the decoder blocks, one tensor at a time."""
    from safetensors import safe_open

    out = {}
    for w in weights:
        with safe_open(w, framework="pt") as f:
            for name in f.keys():
                if ".layers." not in name or not name.endswith(".weight"):
                    continue
                t = f.get_tensor(name)
                if t.ndim == 2 and t.is_floating_point():
                    out[name] = (int((t == 0).sum().item()), t.numel())
    return out


def describe(path: Path, check: bool = False) -> dict:
    art = open_artifact(path, role="artifact")
    files = sorted(p for p in art.path.rglob("*") if p.is_file())
    n_params, by_dtype = _tensor_counts(art.weights)
    info: dict = {
        "path": str(art.path),
        "kind": art.kind,
        "fingerprint": art.fingerprint,
        "managed": art.manifest is not None,
        "files": len(files),
        "bytes": sum(p.stat().st_size for p in files),
        "tensor_elements": n_params,
        "dtypes": by_dtype,
    }
    if art.manifest is not None:
        m = art.manifest
        info.update(stage=m["stage"], params=m["params"], inputs=m["inputs"], metrics=m["metrics"])
        if "base_fingerprint" in m:
            info["base_fingerprint"] = m["base_fingerprint"]
    if art.kind == "model":
        cfg = json.loads((art.path / "config.json").read_text())
        info["architecture"] = (cfg.get("architectures") or ["?"])[0]
        q = cfg.get("quantization_config")
        info["quantization"] = (
            {k: q[k] for k in ("quant_method", "bits", "group_size", "load_in_4bit", "load_in_8bit", "bnb_4bit_quant_type") if k in q}
            if q
            else None
        )
        if q is None:
            sp = linear_sparsity(art.weights)
            rates = [z / n for z, n in sp.values()]
            info["sparsity"] = {
                "overall": sum(z for z, _ in sp.values()) / max(1, sum(n for _, n in sp.values())),
                "min": min(rates, default=0.0),
                "max": max(rates, default=0.0),
                "tensors": len(sp),
            }
    else:
        cfg = json.loads((art.path / "adapter_config.json").read_text())
        info["adapter"] = {k: cfg.get(k) for k in ("peft_type", "r", "lora_alpha", "target_modules")}
    if check:
        v = verify(art)
        info["verify"] = {"ok": v["ok"], "problems": v["problems"], "files_hashed": len(v["files"])}
    return info
