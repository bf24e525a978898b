"""The NOLA adapter artifact: a seed and mixture coefficients (nola.safetensors), no factors.

Also the NOLA kind of the adapters registry: it regenerates the bases from the seed, checks them
against the fingerprints the artifact records, and attaches NOLA layers or expands to a LoRA.
"""

from __future__ import annotations

import json
from pathlib import Path

from calora_cli.errors import CaloraError

NOLA_FILE = "nola.safetensors"


def detect(artifact) -> bool:
    return (artifact.manifest or {}).get("params", {}).get("kind") == "nola"


def read(artifact):
    """NOLA coefficients, module shapes and hyper-parameters; checks generator version and bases."""
    from safetensors import safe_open

    from calora_cli.methods.nola import layer as nola

    p = artifact.manifest["params"]
    if p.get("generator_version") != nola.GENERATOR_VERSION:
        raise CaloraError(f"NOLA adapter {artifact.path} uses basis generator version {p.get('generator_version')!r}; "
                          f"this calora has version {nola.GENERATOR_VERSION}")
    with safe_open(artifact.path / NOLA_FILE, framework="pt") as f:
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


def factors(artifact, doing: str = "", instead: str = "") -> dict:  # a NOLA adapter holds factors alone
    from calora_cli.adapters.lora import LoraFactors
    from calora_cli.methods.nola import layer as nola

    coeffs, shapes, p = read(artifact)
    modules = {
        path: (coeffs[f"{path}.nola_alpha"], coeffs[f"{path}.nola_beta"],
               nola.seeds_for(p["seed"], path, p["rank"], d_in, d_out, p["k"], p["l"], p["shared"]), p["rank"], d_in, d_out)
        for path, (d_out, d_in) in shapes.items()
    }
    return {path: LoraFactors(path, A, B, p["alpha"] / p["rank"]) for path, (A, B) in nola.expand_all(modules).items()}


def files(artifact) -> tuple[dict, dict]:
    """The adapter expanded to A and B (bases regenerated from its seed), as a peft LoRA."""
    from peft import LoraConfig

    from calora_cli.arch import PEFT_PREFIX

    p = artifact.manifest["params"]
    state = {}
    for m, f in sorted(factors(artifact).items()):
        state[f"{PEFT_PREFIX}{m}.lora_A.weight"] = f.A.contiguous()
        state[f"{PEFT_PREFIX}{m}.lora_B.weight"] = f.B.contiguous()
    config = LoraConfig(r=p["rank"], lora_alpha=p["alpha"], target_modules=sorted(p["targets"]), lora_dropout=0.0,
                        bias="none", task_type="CAUSAL_LM").to_dict()
    return json.loads(json.dumps(config, default=lambda o: sorted(o) if isinstance(o, set) else str(o))), state


def attach(model, artifact, trainable: bool = False):
    """NOLA layers in place of the adapted linears, coefficients loaded (trainable if asked)."""
    from calora_cli.methods.nola import layer as nola

    coeffs, shapes, p = read(artifact)
    layers = nola.attach(model, sorted({nola.module_type(m) for m in shapes}), p["rank"], p["k"], p["l"], p["alpha"],
                         p["seed"], p["shared"])
    if set(layers) != set(shapes):
        raise CaloraError(f"NOLA adapter {artifact.path} adapts other modules than the model has")
    nola.load_coefficients(layers, coeffs)
    for lay in layers.values():
        lay.requires_grad_(False)
        lay.alpha_coef.requires_grad_(trainable)
        lay.beta_coef.requires_grad_(trainable)
    return model


def save(out: Path, opts, layers, rank, alpha, k, l, shared, seed, targets, params, metrics, *, stage, inputs,
         base_fingerprint, coef_bits: int = 32) -> None:
    """Write a NOLA adapter artifact: coefficients, a descriptive adapter_config.json, the manifest."""
    from safetensors.torch import save_file

    from calora_cli.artifacts import atomic_output, write_manifest
    from calora_cli.methods.nola import layer as nola

    shapes = {p: [m.out_features, m.in_features] for p, m in layers.items()}
    fingerprints = {p: {"A": nola.fingerprint(m.seeds["A"], k, (rank, m.in_features)),
                        "B": nola.fingerprint(m.seeds["B"], l, (m.out_features, rank))} for p, m in layers.items()}
    params = {"kind": "nola", "rank": rank, "alpha": alpha, "k": k, "l": l, "shared": shared, "seed": seed,
              "generator_version": nola.GENERATOR_VERSION, "targets": targets, "basis_fingerprints": fingerprints,
              "coef_bits": coef_bits, **params}
    with atomic_output(out, opts.force) as tmp:
        # a single metadata key: safetensors writes metadata in hash-map order, so two keys would
        # make the file's bytes differ from run to run
        save_file(nola.coefficients(layers, coef_bits), tmp / NOLA_FILE, metadata={"shapes": json.dumps(shapes, sort_keys=True)})
        config = {"peft_type": "NOLA", "r": rank, "lora_alpha": alpha, "target_modules": targets,
                  "note": "a calora NOLA adapter: see calora.json; merge or eval it with calora"}
        (tmp / "adapter_config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
        write_manifest(tmp, kind="adapter", stage=stage, params=params, inputs=inputs, metrics=metrics,
                       base_fingerprint=base_fingerprint,
                       extra_files={NOLA_FILE: "NOLA coefficients (alpha, beta per module); bases regenerate from the seed"})
