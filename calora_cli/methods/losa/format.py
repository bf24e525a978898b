"""The LoSA extra of an adapter: the base's keep-masks (masks.safetensors, packed bits), which the
LoRA's delta is multiplied by in every forward, so the adapter merges into the sparse base exactly."""

from __future__ import annotations

import json
from pathlib import Path

from calora_cli.errors import CaloraError

MASKS_FILE = "masks.safetensors"
MASKS_NOTE = "LoSA masks: base weight != 0 per adapted module, packed bits (np.packbits)"


def detect(artifact) -> bool:
    return bool((artifact.manifest or {}).get("params", {}).get("masked"))


def stored_masks(artifact) -> dict:
    """The packed LoSA masks a sparsified adapter carries, unpacked, by module name."""
    from safetensors import safe_open

    from calora_cli.methods.losa.masks import unpack

    path = artifact.path / MASKS_FILE
    if not path.exists():
        raise CaloraError(f"masked adapter {artifact.path} lacks {MASKS_FILE}")
    with safe_open(path, framework="pt") as f:
        shapes = json.loads(f.metadata()["shapes"])
        return {name: unpack(f.get_tensor(name), tuple(shapes[name])) for name in f.keys()}


def apply(peft_model, artifact, trainable: bool = False) -> None:
    from calora_cli.methods.losa.masks import apply_masks

    apply_masks(peft_model, stored_masks(artifact))


def save(directory: Path, masks: dict) -> None:
    from safetensors.torch import save_file

    from calora_cli.methods.losa.masks import pack

    packed = {m: pack(mask) for m, mask in masks.items()}
    shapes = json.dumps({m: list(mask.shape) for m, mask in masks.items()}, sort_keys=True)
    # one metadata key only: safetensors writes metadata in hash-map order, so two keys would
    # make the file's bytes differ from run to run
    save_file(packed, directory / MASKS_FILE, metadata={"shapes": shapes})


def apply_block(artifact, i: int, block) -> list:
    """Streamed evaluation: the delta was masked as it was folded in; check the stored masks still
    match this layer's zeros (as apply does for a whole model)."""
    prefix = f"model.layers.{i}."
    stored = stored_masks(artifact)
    for name, layer in block.named_modules():
        mask = stored.get(prefix + name)
        if mask is not None and not bool((mask.to(layer.weight.device) == (layer.weight != 0)).all()):
            raise CaloraError(f"{prefix + name}: the adapter's stored mask does not match the base's zeros "
                              "(was the base pruned again?)")
    return []
