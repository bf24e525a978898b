"""Temporary folders that show a model calora did not lay out as one it reads.

A bare .gguf file (gguf/view.py) or an AutoGPTQ checkpoint (its quantization settings in
quantize_config.json, which transformers does not read) is seen through a folder of links to its
files plus the few files calora and transformers need written out; the folder is removed when the
process ends, and nothing of the user's folder is changed.
"""

from __future__ import annotations

import atexit
import json
import shutil
import tempfile
from pathlib import Path

from calora_cli.errors import CaloraError

_VIEWS: list[str] = []


def _cleanup() -> None:
    for d in _VIEWS:
        shutil.rmtree(d, ignore_errors=True)


def temp_view(prefix: str) -> Path:
    """An empty folder removed at exit."""
    if not _VIEWS:
        atexit.register(_cleanup)
    view = Path(tempfile.mkdtemp(prefix=prefix))
    _VIEWS.append(str(view))
    return view


def needs_gptq_view(path: Path) -> bool:
    """An AutoGPTQ-layout folder: quantize_config.json beside a config.json without quantization_config."""
    if not (path / "quantize_config.json").is_file() or not (path / "config.json").is_file():
        return False
    try:
        return not json.loads((path / "config.json").read_text()).get("quantization_config")
    except (OSError, ValueError):
        return False  # a corrupt config.json is refused where the artifact is opened


def gptq_view(path: Path) -> Path:
    """An AutoGPTQ checkpoint as transformers loads GPTQ: quantize_config.json's settings as
    config.json's quantization_config (AutoGPTQ wrote the v1 zero format unless it says otherwise),
    its one weights file (named gptq_model-4bit-128g.safetensors and the like) as model.safetensors."""
    try:
        q = json.loads((path / "quantize_config.json").read_text())
        config = json.loads((path / "config.json").read_text())
    except (OSError, ValueError) as e:
        raise CaloraError(f"cannot read {path}'s quantize_config.json: {e}") from None
    if "bits" not in q:
        raise CaloraError(f"{path / 'quantize_config.json'} names no bits: not a GPTQ quantization config")
    fmt = q.get("checkpoint_format") or q.get("format") or "gptq"
    config["quantization_config"] = {
        "quant_method": q.get("quant_method", "gptq"), "bits": q["bits"], "group_size": q.get("group_size", 128),
        "desc_act": bool(q.get("desc_act", False)), "sym": bool(q.get("sym", True)), "checkpoint_format": fmt,
        "format": fmt,
    }
    view = temp_view("calora-gptq-view-")
    weights = sorted(path.glob("*.safetensors"))
    single = len(weights) == 1 and not list(path.glob("*.safetensors.index.json"))
    for f in path.iterdir():
        if f.is_file() and f.name not in ("config.json", "quantize_config.json"):
            name = "model.safetensors" if single and f == weights[0] else f.name
            (view / name).symlink_to(f.resolve())
    (view / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    return view
