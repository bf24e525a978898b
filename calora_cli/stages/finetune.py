"""`calora train`: LoRA fine-tuning with peft, the baseline and producer of LoRAs (`--kind nola`:
methods/nola/train.py)."""

from __future__ import annotations

from pathlib import Path

from calora_cli import distributed
from calora_cli.adapters.lora import save_trained
from calora_cli.arch import linear_module_names
from calora_cli.artifacts import (
    atomic_output,
    check_output,
    data_input,
    open_artifact,
    write_manifest,
)
from calora_cli.data import batches, load_examples
from calora_cli.errors import CaloraError
from calora_cli.models import load_model, load_tokenizer
from calora_cli.progress import progress
from calora_cli.runtime import import_stack
from calora_cli.run import RunOptions, check_training_memory, seed_everything
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
    check_training_memory("train", [base_art], opts.dtype, cfg.batch_size, cfg.seq_len)

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
        from calora_cli.methods.nola.train import train_nola

        return train_nola(base_art, data, examples, model, out, cfg, opts, rank, alpha, sorted(targets), bases, shared_bases,
                          coef_bits)
    lora = LoraConfig(r=rank, lora_alpha=alpha, target_modules=sorted(targets), lora_dropout=0.0, bias="none", task_type="CAUSAL_LM")
    import_stack(gptq=True)  # peft's LoRA dispatch imports gptqmodel whatever the base: quietly, here
    model = get_peft_model(model, lora)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)

    with progress("train", cfg.steps, opts.show_progress) as advance:
        metrics = train_loop(model, model.parameters(), batches(examples, cfg.batch_size, cfg.seed), cfg, on_step=advance)
    metrics.update(trainable_params=trainable, examples=len(examples))

    params = {"kind": "lora", "rank": rank, "alpha": alpha, "targets": sorted(targets), **cfg.as_params()}
    with atomic_output(out, opts.force) as tmp:
        save_trained(model, tmp, distributed.adapter_state(model))
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
