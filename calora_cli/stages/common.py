"""What every stage does around its algorithm: options, seeding, loading inputs."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from calora_cli.artifacts import Artifact, check_adapter_base, open_artifact
from calora_cli.errors import CaloraError

MASKS_FILE = "masks.safetensors"
RECOVERY_FILE = "recovery.safetensors"
NOLA_FILE = "nola.safetensors"


@dataclass
class RunOptions:
    """Options every command shares (parsed by cli.py)."""

    device: str = "cpu"
    dtype: str = "float32"
    seed: int = 0
    force: bool = False
    show_progress: bool = True
    allow_base_mismatch: bool = False
    warn: Callable[[str], None] = field(default=lambda msg: None)


def seed_everything(seed: int) -> None:
    import random

    import torch

    random.seed(seed)
    torch.manual_seed(seed)


def check_fits(adapter: Artifact, model: Artifact, opts: RunOptions) -> None:
    """Refuse an adapter made for a model `model` does not descend from (unless
    --allow-base-mismatch); warn when the adapter records no base to check against."""
    note = check_adapter_base(adapter, model, opts.allow_base_mismatch)
    if note:
        opts.warn(note)


def open_model_and_adapter(model: Path, adapter: Path | None, opts: RunOptions) -> tuple[Artifact, Artifact | None]:
    """Check a model (and an adapter meant for it) before anything heavy is loaded."""
    model_art = open_artifact(model, expect="model", role="model")
    adapter_art = None
    if adapter is not None:
        adapter_art = open_artifact(adapter, expect="adapter", role="adapter")
        check_fits(adapter_art, model_art, opts)
    return model_art, adapter_art


def is_nola(adapter: Artifact) -> bool:
    return (adapter.manifest or {}).get("params", {}).get("kind") == "nola"


def read_nola(adapter: Artifact):
    """NOLA coefficients, module shapes and hyper-parameters; checks generator version and bases."""
    import json

    from safetensors import safe_open

    from calora_cli.adapters import nola

    p = adapter.manifest["params"]
    if p.get("generator_version") != nola.GENERATOR_VERSION:
        raise CaloraError(f"NOLA adapter {adapter.path} uses basis generator version {p.get('generator_version')!r}; "
                          f"this calora has version {nola.GENERATOR_VERSION}")
    with safe_open(adapter.path / NOLA_FILE, framework="pt") as f:
        shapes = json.loads(f.metadata()["shapes"])
        stored = {k: f.get_tensor(k) for k in f.keys()}
    sizes = {f"{path}.{name}": n for path in shapes for name, n in (("nola_alpha", p["k"]), ("nola_beta", p["l"]))}
    coeffs = nola.read_coefficients(stored, sizes, p.get("coef_bits", 32))
    for path, (d_out, d_in) in shapes.items():
        seeds = nola.seeds_for(p["seed"], path, p["rank"], d_in, d_out, p["k"], p["l"], p["shared"])
        want = p["basis_fingerprints"].get(path)
        got = {"A": nola.fingerprint(seeds["A"], p["k"], (p["rank"], d_in)), "B": nola.fingerprint(seeds["B"], p["l"], (d_out, p["rank"]))}
        if want != got:
            raise CaloraError(f"NOLA bases for {path} do not regenerate as recorded (fingerprint mismatch): "
                              "the adapter was made by an incompatible generator")
    return coeffs, shapes, p


def nola_factors(adapter: Artifact) -> dict:
    from calora_cli.adapters import nola
    from calora_cli.adapters.lora import LoraFactors

    coeffs, shapes, p = read_nola(adapter)
    modules = {
        path: (coeffs[f"{path}.nola_alpha"], coeffs[f"{path}.nola_beta"],
               nola.seeds_for(p["seed"], path, p["rank"], d_in, d_out, p["k"], p["l"], p["shared"]), p["rank"], d_in, d_out)
        for path, (d_out, d_in) in shapes.items()
    }
    return {path: LoraFactors(path, A, B, p["alpha"] / p["rank"]) for path, (A, B) in nola.expand_all(modules).items()}


def read_lora(adapter: Artifact):
    """The LoRA factors of an adapter artifact (safetensors only; NOLA expanded), and whether it is LoSA-masked."""
    import json

    from safetensors.torch import load_file

    from calora_cli.adapters.lora import factors_from_state

    if is_nola(adapter):
        return nola_factors(adapter), False
    config = json.loads((adapter.path / "adapter_config.json").read_text())
    weights = adapter.path / "adapter_model.safetensors"
    if not weights.exists():
        raise CaloraError(f"adapter {adapter.path} has no adapter_model.safetensors")
    factors = factors_from_state(load_file(weights), config)
    return factors, is_masked(adapter)


def lora_files(adapter: Artifact) -> tuple[dict, dict]:
    """(adapter_config, state dict) of a peft LoRA standing for the adapter: its own files, or a
    NOLA adapter expanded to A and B (bases regenerated from its seed)."""
    import json

    from safetensors.torch import load_file

    if not is_nola(adapter):
        weights = adapter.path / "adapter_model.safetensors"
        if not weights.exists():
            raise CaloraError(f"adapter {adapter.path} has no adapter_model.safetensors")
        return json.loads((adapter.path / "adapter_config.json").read_text()), load_file(weights)
    from peft import LoraConfig

    from calora_cli.adapters.lora import PREFIX

    p = adapter.manifest["params"]
    state = {}
    for m, f in sorted(nola_factors(adapter).items()):
        state[f"{PREFIX}{m}.lora_A.weight"] = f.A.contiguous()
        state[f"{PREFIX}{m}.lora_B.weight"] = f.B.contiguous()
    config = LoraConfig(r=p["rank"], lora_alpha=p["alpha"], target_modules=sorted(p["targets"]), lora_dropout=0.0,
                        bias="none", task_type="CAUSAL_LM").to_dict()
    return json.loads(json.dumps(config, default=lambda o: sorted(o) if isinstance(o, set) else str(o))), state


def write_lora(directory: Path, config: dict, state: dict) -> None:
    import json

    from safetensors.torch import save_file

    directory.mkdir(parents=True, exist_ok=True)
    save_file(state, directory / "adapter_model.safetensors", metadata={"format": "pt"})
    (directory / "adapter_config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")


def is_masked(adapter: Artifact) -> bool:
    return bool((adapter.manifest or {}).get("params", {}).get("masked"))


def stored_masks(adapter: Artifact) -> dict:
    """The packed LoSA masks a sparsified adapter carries, unpacked, by module name."""
    import json

    from safetensors import safe_open

    from calora_cli.adapters.masked import unpack

    path = adapter.path / MASKS_FILE
    if not path.exists():
        raise CaloraError(f"masked adapter {adapter.path} lacks {MASKS_FILE}")
    with safe_open(path, framework="pt") as f:
        shapes = json.loads(f.metadata()["shapes"])
        return {name: unpack(f.get_tensor(name), tuple(shapes[name])) for name in f.keys()}


def has_recovery(adapter: Artifact) -> bool:
    return RECOVERY_FILE in (adapter.manifest or {}).get("extra_files", {})


def attach_adapter(model, adapter: Artifact, trainable: bool = False):
    """Load an adapter onto a model the way its kind needs: plain peft LoRA, LoSA-masked, or with
    CA-LoRA recovery modules."""
    from calora_cli.models import load_adapter

    if is_nola(adapter):
        from calora_cli.adapters import nola

        coeffs, shapes, p = read_nola(adapter)
        layers = nola.attach(model, sorted({nola.module_type(m) for m in shapes}), p["rank"], p["k"], p["l"], p["alpha"],
                             p["seed"], p["shared"])
        if set(layers) != set(shapes):
            raise CaloraError(f"NOLA adapter {adapter.path} adapts other modules than the model has")
        nola.load_coefficients(layers, coeffs)
        for layer in layers.values():
            layer.requires_grad_(False)
            layer.alpha_coef.requires_grad_(trainable)
            layer.beta_coef.requires_grad_(trainable)
        return model
    peft_model = load_adapter(model, adapter.path, trainable=trainable)
    if is_masked(adapter):
        from calora_cli.adapters.masked import apply_masks

        apply_masks(peft_model, stored_masks(adapter))
    if has_recovery(adapter):
        from safetensors.torch import load_file

        from calora_cli.adapters import recovery

        params = adapter.manifest["params"]
        modules = recovery.attach(peft_model, params["recovery_dim"], params["recovery_alpha"])
        recovery.load_state(modules, load_file(adapter.path / RECOVERY_FILE))
        modules.requires_grad_(trainable)
    return peft_model
