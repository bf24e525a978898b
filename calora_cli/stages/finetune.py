"""`calora train`: plain LoRA fine-tuning with peft, the baseline and producer of LoRAs."""

from __future__ import annotations

from pathlib import Path

from calora_cli import distributed
from calora_cli.artifacts import atomic_output, check_output, data_input, open_artifact, write_manifest
from calora_cli.data import batches, load_examples
from calora_cli.errors import CaloraError
from calora_cli.models import linear_module_names, load_model, load_tokenizer
from calora_cli.progress import progress
from calora_cli.stages.common import RunOptions, seed_everything
from calora_cli.train import TrainConfig, train_loop


def train_lora(
    base: Path,
    data: Path,
    out: Path,
    cfg: TrainConfig,
    opts: RunOptions,
    rank: int = 8,
    alpha: float | None = None,
    targets: list[str] | None = None,
    kind: str = "lora",
    bases: tuple[int, int] = (1024, 1024),
    shared_bases: bool = True,
    coef_bits: int = 32,
) -> dict:
    cfg.check()
    if rank < 1:
        raise CaloraError(f"--rank must be at least 1, got {rank}")
    if kind not in ("lora", "nola"):
        raise CaloraError(f"--kind must be lora or nola, got {kind!r}")
    if kind == "nola" and min(bases) < 1:
        raise CaloraError(f"--bases must be positive, got {bases}")
    if coef_bits not in (32, 16, 8, 4):
        raise CaloraError(f"--coef-bits must be one of 32, 16, 8, 4, got {coef_bits}")
    check_output(out, opts.force)
    base_art = open_artifact(base, expect="model", role="base")
    tokenizer = load_tokenizer(base)
    examples = load_examples(data, tokenizer, cfg.seq_len)

    from peft import LoraConfig, get_peft_model

    seed_everything(cfg.seed)
    model = load_model(base, opts.device, opts.dtype, shardable=True)
    available = linear_module_names(model)
    targets = targets or available
    unknown = sorted(set(targets) - set(available))
    if unknown:
        raise CaloraError(f"--targets {','.join(unknown)} not found in the model (it has {','.join(available)})")
    alpha = float(alpha if alpha is not None else 2 * rank)
    if kind == "nola":
        return _train_nola(base_art, data, examples, model, out, cfg, opts, rank, alpha, sorted(targets), bases, shared_bases,
                           coef_bits)
    lora = LoraConfig(r=rank, lora_alpha=alpha, target_modules=sorted(targets), lora_dropout=0.0, bias="none", task_type="CAUSAL_LM")
    model = get_peft_model(model, lora)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)

    with progress("train", cfg.steps, opts.show_progress) as advance:
        metrics = train_loop(model, model.parameters(), batches(examples, cfg.batch_size, cfg.seed), cfg, on_step=advance)
    metrics.update(trainable_params=trainable, examples=len(examples))

    params = {"kind": "lora", "rank": rank, "alpha": alpha, "targets": sorted(targets), **cfg.as_params()}
    with atomic_output(out, opts.force) as tmp:
        model.save_pretrained(tmp, state_dict=distributed.adapter_state(model))
        write_manifest(
            tmp,
            kind="adapter",
            stage="train",
            params=params,
            inputs={"base": base_art.input_record(), "data": data_input(data)},
            metrics=metrics,
            base_fingerprint=base_art.fingerprint,
        )
    return {"output": str(out), "kind": "adapter", **metrics}


def _train_nola(base_art, data, examples, model, out, cfg, opts, rank, alpha, targets, bases, shared, coef_bits) -> dict:
    """A NOLA adapter trained directly: only k + l coefficients per module (beta starts at 0)."""
    from calora_cli.adapters import nola

    k, l = bases
    layers = nola.attach(model, targets, rank, k, l, alpha, cfg.seed, shared)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    with progress("train nola", cfg.steps, opts.show_progress) as advance:
        metrics = train_loop(model, model.parameters(), batches(examples, cfg.batch_size, cfg.seed), cfg, on_step=advance)
    metrics.update(trainable_params=trainable, examples=len(examples))
    params = {key: v for key, v in cfg.as_params().items() if key != "seed"}
    save_nola(out, opts, layers, rank, alpha, k, l, shared, cfg.seed, targets, params, metrics,
              stage="train", inputs={"base": base_art.input_record(), "data": data_input(data)},
              base_fingerprint=base_art.fingerprint, coef_bits=coef_bits)
    return {"output": str(out), "kind": "adapter", **metrics}


def save_nola(out, opts, layers, rank, alpha, k, l, shared, seed, targets, params, metrics, *, stage, inputs,
              base_fingerprint, coef_bits: int = 32) -> None:
    """Write a NOLA adapter artifact: coefficients, a descriptive adapter_config.json, the manifest."""
    import json

    from safetensors.torch import save_file

    from calora_cli.adapters import nola
    from calora_cli.stages.common import NOLA_FILE

    shapes = {p: [m.out_features, m.in_features] for p, m in layers.items()}
    fingerprints = {p: {"A": nola.fingerprint(m.seeds["A"], k, (rank, m.in_features)),
                        "B": nola.fingerprint(m.seeds["B"], l, (m.out_features, rank))} for p, m in layers.items()}
    params = {"kind": "nola", "rank": rank, "alpha": alpha, "k": k, "l": l, "shared": shared, "seed": seed,
              "generator_version": nola.GENERATOR_VERSION, "targets": targets, "basis_fingerprints": fingerprints,
              "coef_bits": coef_bits, **params}
    with atomic_output(out, opts.force) as tmp:
        # a single metadata key: safetensors writes metadata in hash-map order (see sparsify.py)
        save_file(nola.coefficients(layers, coef_bits), tmp / NOLA_FILE, metadata={"shapes": json.dumps(shapes, sort_keys=True)})
        config = {"peft_type": "NOLA", "r": rank, "lora_alpha": alpha, "target_modules": targets,
                  "note": "a calora NOLA adapter: see calora.json; merge or eval it with calora"}
        (tmp / "adapter_config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
        write_manifest(tmp, kind="adapter", stage=stage, params=params, inputs=inputs, metrics=metrics,
                       base_fingerprint=base_fingerprint,
                       extra_files={NOLA_FILE: "NOLA coefficients (alpha, beta per module); bases regenerate from the seed"})
