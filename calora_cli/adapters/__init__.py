"""Adapter kinds: the one registry through which every stage reads and attaches an adapter artifact.

A kind is the adapter's trained core, one module each:
  detect(artifact) -> bool        whether the artifact is of this kind (the first that says so wins)
  files(artifact) -> (config, state)  the plain peft LoRA standing for it (config dict, state dict)
  factors(artifact) -> {module: LoraFactors}
  attach(model, artifact, trainable) -> model with the adapter in its forward
An extra rides on a peft LoRA (LoSA masks, CA-LoRA recovery modules):
  detect(artifact) -> bool;  apply(peft_model, artifact, trainable)

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


def factors(artifact) -> dict:
    """The adapter's LoRA factors per module (a NOLA adapter expanded from its seed)."""
    return _kind(artifact)[1].factors(artifact)


def lora_files(artifact) -> tuple[dict, dict]:
    """(adapter_config, state dict) of the plain peft LoRA standing for the adapter."""
    return _kind(artifact)[1].files(artifact)


def attach(model, artifact, trainable: bool = False):
    """The model with the adapter loaded the way its kind needs, extras applied in registry order."""
    model = _kind(artifact)[1].attach(model, artifact, trainable)
    for name in extras_of(artifact):
        importlib.import_module(EXTRAS[name]).apply(model, artifact, trainable)
    return model
