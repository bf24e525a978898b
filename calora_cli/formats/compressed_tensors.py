"""compressed-tensors checkpoints (llm-compressor's format, most current W4A16/W8A8/FP8 releases):
`pack-quantized` (weight_packed int32 + weight_scale, weight_shape, optional weight_zero_point),
`int-quantized` and `float-quantized` (FP8) (weight stored as int8 / float8 + weight_scale),
`naive-quantized`. Which linears are quantized, and how, is the config's config_groups (targets,
ignore); each module's tensors are decompressed with the compressed-tensors package's own
compressor for its format, so calora computes with what that library computes.

Not read: act-order groups (weight_g_idx), which compressed-tensors 0.20 removed and no longer
reads either, and sparse (2:4 compressed) or block-scaled FP4 formats."""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

from calora_cli.errors import CaloraError
from calora_cli.formats import Layout

FORMATS = ("pack-quantized", "int-quantized", "float-quantized", "naive-quantized")
SUFFIXES = ("weight", "weight_packed", "weight_scale", "weight_zero_point", "weight_shape")


def _matches(target: str, module: str) -> bool:
    """compressed-tensors' target rule for a linear named `module`: "re:PATTERN" matched from the
    start of the name, a class name (every module here is a Linear), or the name itself."""
    if target.startswith("re:"):
        return re.match(target[3:], module) is not None
    return target in ("Linear", "torch.nn.Linear") or target == module


@dataclass
class CompressedTensorsLayout(Layout):
    path: Path
    groups: list[tuple[list[str], dict, str]]  # (targets, scheme, format) in config order
    ignore: list[str] = field(default_factory=list)
    method: str = "compressed-tensors"

    def _group(self, module: str):
        if any(_matches(t, module) for t in self.ignore):
            return None
        return next((g for g in self.groups if any(_matches(t, module) for t in g[0])), None)

    def parts(self, module, names):
        if f"{module}.weight_scale" not in names or self._group(module) is None:
            return None
        if f"{module}.weight_g_idx" in names:
            raise CaloraError(f"model {self.path} stores act-order groups (weight_g_idx at {module}), which "
                              "compressed-tensors 0.20 no longer reads; re-save it with a current llm-compressor")
        return [f"{module}.{s}" for s in SUFFIXES if f"{module}.{s}" in names]

    def dequantize(self, module, tensors):
        from compressed_tensors.compressors import BaseCompressor
        from compressed_tensors.quantization import QuantizationScheme

        targets, scheme, fmt = self._group(module)
        compressor = BaseCompressor.get_value_from_registry(fmt)
        state = {n.removeprefix(module + "."): t for n, t in tensors.items()}
        state["weight_scale"] = state["weight_scale"].float()
        out = compressor.decompress(state, QuantizationScheme(targets=targets, **scheme))
        return out["weight"].float()

    def dense_shape(self, module, header, read):
        if f"{module}.weight" in header:
            return list(header[f"{module}.weight"]["shape"])
        return [int(v) for v in read(f"{module}.weight_shape").tolist()]  # pack-quantized

    def describe(self):
        parts = []
        for targets, scheme, fmt in self.groups:
            w = scheme.get("weights") or {}
            kind = "FP" if w.get("type") == "float" else "int"
            grid = f"group {w['group_size']}" if w.get("strategy") == "group" else f"per {w.get('strategy')}"
            act = ", activations quantized" if scheme.get("input_activations") else ""
            parts.append(f"{fmt} {kind}{w.get('num_bits')} {grid}" + ("" if w.get("symmetric", True) else " asymmetric") + act)
        return "compressed-tensors " + "; ".join(parts)

    @property
    def weight_only(self) -> bool:
        return not any(scheme.get("input_activations") for _, scheme, _ in self.groups)


def layout(q: dict, path: Path) -> CompressedTensorsLayout:
    try:
        import compressed_tensors  # noqa: F401
    except ImportError:
        raise CaloraError(f"model {path} is a compressed-tensors checkpoint: install the compressed-tensors package "
                          "(pip install 'calora[compressed-tensors]') to read it") from None
    if q.get("sparsity_config"):
        raise CaloraError(f"model {path} is a sparse compressed-tensors checkpoint ({q['sparsity_config'].get('format')}); "
                          "calora reads its quantized formats, not its sparse ones: decompress it first")
    groups = []
    for name, g in (q.get("config_groups") or {}).items():
        fmt = g.get("format") or q.get("format")
        if fmt not in FORMATS:
            raise CaloraError(f"model {path}: compressed-tensors format {fmt!r} ({name}) is not read by calora "
                              f"(it reads {', '.join(FORMATS)})")
        scheme = {k: g[k] for k in ("weights", "input_activations", "output_activations") if g.get(k)}
        if not scheme.get("weights"):
            raise CaloraError(f"model {path}: compressed-tensors group {name} quantizes no weights")
        groups.append((list(g.get("targets") or []), scheme, fmt))
    if not groups:
        raise CaloraError(f"model {path}: its compressed-tensors quantization_config has no config_groups")
    return CompressedTensorsLayout(path=Path(path), groups=groups, ignore=list(q.get("ignore") or []))
