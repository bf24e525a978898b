"""Adapter kinds: the one registry through which every stage reads and attaches an adapter artifact.

A kind is the adapter's trained core, one module each:
  detect(artifact) -> bool        whether the artifact is of this kind (the first that says so wins)
  files(artifact) -> (config, state)  the plain peft LoRA standing for it (config dict, state dict)
  factors(artifact) -> {module: LoraFactors}
  attach(model, artifact, trainable) -> model with the adapter in its forward
An extra rides on a peft LoRA (LoSA masks, CA-LoRA recovery modules):
  detect(artifact) -> bool;  apply(peft_model, artifact, trainable)
  and, for evaluation one decoder layer at a time, apply_block(artifact, i, block) -> hook handles

Kinds live with their methods (methods/<method>/format.py); the registry names their modules and
imports them when asked, so that this package sits below the methods that use it.
"""

from __future__ import annotations

import importlib
from types import ModuleType

KINDS = {"nola": "calora_cli.methods.nola.format", "lora": "calora_cli.adapters.lora"}
EXTRAS = {"masked": "calora_cli.methods.losa.format", "recovery": "calora_cli.methods.ca_lora.format"}


def _kind(artifact) -> tuple[str, ModuleType]:
    for name, path in KINDS.items():
        module = importlib.import_module(path)
        if module.detect(artifact):
            return name, module
    raise AssertionError("the plain LoRA kind detects every adapter")


def kind_of(artifact) -> str:
    """'nola' or 'lora': what the adapter's trained core is."""
    return _kind(artifact)[0]


def extras_of(artifact) -> list[str]:
    """The extras an adapter carries beside its LoRA ('masked', 'recovery')."""
    return [name for name, path in EXTRAS.items() if importlib.import_module(path).detect(artifact)]


def is_kind(artifact, name: str) -> bool:
    """Whether `artifact` is of kind `name` or carries the extra `name`."""
    return kind_of(artifact) == name or name in extras_of(artifact)


def describe(artifact) -> str:
    """The kind and its extras in one word: lora, nola, lora+masked, lora+recovery."""
    return "+".join([kind_of(artifact), *extras_of(artifact)])


def factors(artifact, doing: str = "this stage", instead: str = "use a plain LoRA") -> dict:
    """The adapter's LoRA factors per module (a NOLA adapter expanded from its seed). What the
    adapter holds beside them (DoRA magnitudes, modules_to_save, ...) is refused in one line saying
    that `doing` cannot take it, and `instead`."""
    return _kind(artifact)[1].factors(artifact, doing, instead)


def lora_files(artifact) -> tuple[dict, dict]:
    """(adapter_config, state dict) of the plain peft LoRA standing for the adapter."""
    return _kind(artifact)[1].files(artifact)


def attach(model, artifact, trainable: bool = False):
    """The model with the adapter loaded the way its kind needs, extras applied in registry order."""
    model = _kind(artifact)[1].attach(model, artifact, trainable)
    for name in extras_of(artifact):
        importlib.import_module(EXTRAS[name]).apply(model, artifact, trainable)
    return model


def block_patcher(artifact):
    """For streamed evaluation (a model read one decoder layer at a time): a function that puts the
    adapter into decoder layer i once it is materialized. The LoRA's delta (a NOLA adapter
    expanded) is folded into the layer's weights in their compute dtype, masked to the weight's
    non-zeros for a LoSA adapter, and the extras that are not deltas (recovery modules) hook the
    layer; it returns the hook handles."""
    deltas = factors(artifact)
    masked = is_kind(artifact, "masked")
    extras = [importlib.import_module(EXTRAS[n]) for n in extras_of(artifact)]

    def patch(i: int, block) -> list:
        import torch

        prefix = f"model.layers.{i}."
        with torch.no_grad():
            for name, layer in block.named_modules():
                f = deltas.get(prefix + name)
                if f is None:
                    continue
                w = layer.weight
                delta = f.delta().to(w.device)
                if masked:
                    delta = delta * (w != 0)
                w.add_(delta.to(w.dtype))
        handles = []
        for extra in extras:
            handles += extra.apply_block(artifact, i, block)
        return handles

    return patch
