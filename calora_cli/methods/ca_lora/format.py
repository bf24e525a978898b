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


def apply_block(artifact, i: int, block) -> list:
    """Streamed evaluation: layer i's recovery modules, hooked beside its linears."""
    from safetensors import safe_open

    from calora_cli.methods.ca_lora.recovery import Recovery

    params = artifact.manifest["params"]
    prefix = f"model.layers.{i}."
    handles = []
    with safe_open(artifact.path / RECOVERY_FILE, framework="pt") as f:
        names = set(f.keys())
        for name, layer in block.named_modules():
            if f"{prefix}{name}.D" not in names:
                continue
            rec = Recovery(layer.in_features, layer.out_features, params["recovery_dim"], params["recovery_alpha"])
            rec.D.weight.data.copy_(f.get_tensor(f"{prefix}{name}.D"))
            rec.U.weight.data.copy_(f.get_tensor(f"{prefix}{name}.U"))
            rec.to(layer.weight.device)
            handles.append(layer.register_forward_hook(lambda mod, args, out, r=rec: out + r(args[0]).to(out.dtype)))
    return handles
