"""`calora train`: plain LoRA fine-tuning with peft, the baseline and producer of LoRAs."""

from __future__ import annotations

from pathlib import Path

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
) -> dict:
    cfg.check()
    if rank < 1:
        raise CaloraError(f"--rank must be at least 1, got {rank}")
    check_output(out, opts.force)
    base_art = open_artifact(base, expect="model", role="base")
    tokenizer = load_tokenizer(base)
    examples = load_examples(data, tokenizer, cfg.seq_len)

    from peft import LoraConfig, get_peft_model

    seed_everything(cfg.seed)
    model = load_model(base, opts.device, opts.dtype)
    available = linear_module_names(model)
    targets = targets or available
    unknown = sorted(set(targets) - set(available))
    if unknown:
        raise CaloraError(f"--targets {','.join(unknown)} not found in the model (it has {','.join(available)})")
    alpha = float(alpha if alpha is not None else 2 * rank)
    lora = LoraConfig(r=rank, lora_alpha=alpha, target_modules=sorted(targets), lora_dropout=0.0, bias="none", task_type="CAUSAL_LM")
    model = get_peft_model(model, lora)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)

    with progress("train", cfg.steps, opts.show_progress) as advance:
        metrics = train_loop(model, model.parameters(), batches(examples, cfg.batch_size, cfg.seed), cfg, on_step=advance)
    metrics.update(trainable_params=trainable, examples=len(examples))

    params = {"kind": "lora", "rank": rank, "alpha": alpha, "targets": sorted(targets), **cfg.as_params()}
    with atomic_output(out, opts.force) as tmp:
        model.save_pretrained(tmp)
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
