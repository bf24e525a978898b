"""`calora info`: what an artifact is, where it came from, and what its weights look like."""

from __future__ import annotations

import json
import math
from pathlib import Path

from calora_cli.artifacts import open_artifact, read_safetensors_header, verify
from calora_cli.compress.masks import zeros
from calora_cli.errors import CaloraError


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
                    out[name] = zeros([t])
    return out


def _gguf_counts(path: Path) -> tuple[int, dict]:
    """Elements, and tensors of each GGML type, of a GGUF."""
    from calora_cli.gguf.reader import open_gguf

    tensors = open_gguf(path).tensors
    by_type: dict[str, int] = {}
    for t in tensors:
        by_type[t.tensor_type.name] = by_type.get(t.tensor_type.name, 0) + 1
    return sum(int(t.n_elements) for t in tensors), dict(sorted(by_type.items()))


def describe(path: Path, check: bool = False) -> dict:
    art = open_artifact(path, role="artifact")
    files = sorted(p for p in art.path.rglob("*") if p.is_file())
    n_params, by_dtype = _gguf_counts(art.weights[0]) if art.gguf else _tensor_counts(art.weights)
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
        if q and not art.gguf:
            from calora_cli.formats import read_layout

            try:
                layout = read_layout(cfg, art.path)
            except CaloraError:  # a format calora does not read: info still describes the rest
                layout = None
            if layout is not None:
                info["quantization"]["format"] = layout.describe()
        if art.gguf:
            info["quantization"] = {"quant_method": "gguf", "tensor_types": by_dtype}
        elif q is None:
            sp = linear_sparsity(art.weights)
            rates = [z / n for z, n in sp.values()]
            info["sparsity"] = {
                "overall": sum(z for z, _ in sp.values()) / max(1, sum(n for _, n in sp.values())),
                "min": min(rates, default=0.0),
                "max": max(rates, default=0.0),
                "tensors": len(sp),
            }
    else:
        from calora_cli.adapters import describe as adapter_kind

        info["adapter_kind"] = adapter_kind(art)
        cfg = json.loads((art.path / "adapter_config.json").read_text())
        info["adapter"] = {k: cfg.get(k) for k in ("peft_type", "r", "lora_alpha", "target_modules")}
    if check:
        v = verify(art)
        info["verify"] = {"ok": v["ok"], "problems": v["problems"], "files_hashed": len(v["files"])}
    return info


def _short(fp: str | None) -> str:
    return (fp or "?").removeprefix("sha256:")[:12]


def _size(n: float, unit: str = "B") -> str:
    for prefix in ("", "K", "M", "G", "T"):
        if abs(n) < 1000 or prefix == "T":
            return f"{n:.0f} {prefix}{unit}" if prefix == "" else f"{n:.2f} {prefix}{unit}"
        n /= 1000
    return f"{n} {unit}"


def _value(v) -> str:
    if isinstance(v, float):
        return f"{v:.6g}"
    if isinstance(v, (list, tuple)):
        return ", ".join(_value(x) for x in v[:8]) + (f", ... ({len(v)} in all)" if len(v) > 8 else "")
    return str(v)


def summary_rows(info: dict) -> list[tuple[str, str]]:
    """What a person reads first about an artifact, as (label, text) rows; `--json` has everything."""
    rows = [("kind", info["kind"] + (f" ({info['adapter_kind']})" if info.get("adapter_kind") else "")),
            ("path", info["path"]), ("fingerprint", _short(info["fingerprint"]))]
    if info.get("stage"):
        p = info.get("params") or {}
        shown = {k: v for k, v in p.items() if not isinstance(v, (dict, list)) and v is not None}
        rows.append(("stage", info["stage"] + (" (" + ", ".join(f"{k}={_value(v)}" for k, v in shown.items()) + ")" if shown else "")))
    else:
        rows.append(("stage", "none (made outside calora; fingerprinted on the fly)"))
    for role, rec in (info.get("inputs") or {}).items():
        rows.append((f"input: {role}", f"{rec.get('path', '?')} ({_short(rec.get('fingerprint'))})"))
    if info.get("base_fingerprint"):
        rows.append(("made for base", _short(info["base_fingerprint"])))
    dtypes = ", ".join(f"{d} {_size(n, '')}".rstrip() for d, n in sorted(info.get("dtypes", {}).items()))
    rows.append(("size", f"{_size(info['bytes'])} in {info['files']} files; {_size(info['tensor_elements'], '')} "
                         f"tensor elements ({dtypes})".replace("  ", " ")))
    if info["kind"] == "model":
        rows.append(("architecture", info.get("architecture", "?")))
        q = info.get("quantization")
        if q:
            if q.get("format"):
                rows.append(("quantization", q["format"]))
            else:
                rows.append(("quantization", ", ".join(f"{k}={v}" for k, v in q.items())))
        else:
            rows.append(("quantization", "none"))
        sp = info.get("sparsity")
        if sp:
            rows.append(("sparsity", f"{sp['overall']:.2%} of block weights (per tensor {sp['min']:.2%} to {sp['max']:.2%}, "
                                     f"{sp['tensors']} tensors)"))
    elif info.get("adapter"):
        a = info["adapter"]
        targets = a.get("target_modules")
        rows.append(("adapter", f"{a.get('peft_type')} rank {a.get('r')}, alpha {a.get('lora_alpha')}"
                                + (f", on {', '.join(sorted(targets))}" if isinstance(targets, list) else f", on {targets}" if targets else "")))
    for k, v in (info.get("metrics") or {}).items():
        if not isinstance(v, dict):
            rows.append((f"metric: {k}", _value(v)))
    if "verify" in info:
        v = info["verify"]
        rows.append(("verify", f"ok ({v['files_hashed']} files hashed)" if v["ok"] else "FAILED: " + "; ".join(v["problems"])))
    return rows
