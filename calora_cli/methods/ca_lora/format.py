"""The CA-LoRA extra of an adapter: recovery modules (recovery.safetensors, D and U per block
linear), attached beside the LoRA. They hold a GELU, so only calora (eval, recover) runs them."""

from __future__ import annotations

from pathlib import Path

RECOVERY_FILE = "recovery.safetensors"
RECOVERY_NOTE = "CA-LoRA recovery modules: (alpha/r) U GELU(D x) beside each block linear; D, U per module"


def detect(artifact) -> bool:
    return RECOVERY_FILE in (artifact.manifest or {}).get("extra_files", {})


def apply(peft_model, artifact, trainable: bool = False) -> None:
    from safetensors.torch import load_file

    from calora_cli.methods.ca_lora import recovery

    params = artifact.manifest["params"]
    modules = recovery.attach(peft_model, params["recovery_dim"], params["recovery_alpha"])
    recovery.load_state(modules, load_file(artifact.path / RECOVERY_FILE))
    modules.requires_grad_(trainable)


def save(directory: Path, modules) -> None:
    from safetensors.torch import save_file

    from calora_cli.methods.ca_lora import recovery

    save_file(recovery.state(modules), directory / RECOVERY_FILE, metadata={"format": "calora-recovery-v1"})
