"""`calora recover`: CA-LoRA knowledge recovery on a compressed model.

Student: compressed model + inherited LoRA (trainable) + recovery modules beside every block
linear (trainable, output layer at zero). Teacher: uncompressed model + original LoRA, frozen, run
on the same batch. Loss = task cross-entropy + beta * distillation (distill.py: final hidden state
MSE, as the reference code, and/or temperature-scaled logit KL). Training goes through the one loop in
train.py, which it extends with this loss; nothing is copied.
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path

from calora_cli import adapters, distributed
from calora_cli.adapters.lora import check_config, save_trained
from calora_cli.artifacts import (
    atomic_output,
    check_output,
    data_input,
    open_artifact,
    write_manifest,
)
from calora_cli.distill import DistillSpec, cache_teacher, load_teacher, make_loss
from calora_cli.errors import CaloraError
from calora_cli.methods.ca_lora import format as ca_format
from calora_cli.progress import progress
from calora_cli.run import RunOptions, check_descends, check_fits, check_training_memory, open_model, seed_everything
from calora_cli.train import Checkpoints, TrainConfig, train_loop


@dataclass
class RecoverSpec(DistillSpec):
    recovery_dim: int | None = None  # default: the LoRA rank; 0: no recovery modules
    checkpoint_every: int = 50
    resume: bool = False
    cache_teacher: bool = False

    def check(self) -> None:
        super().check()
        if self.recovery_dim is not None and self.recovery_dim < 0:
            raise CaloraError(f"--recovery-dim must be >= 0, got {self.recovery_dim}")
        if self.checkpoint_every < 1:
            raise CaloraError(f"--checkpoint-every must be at least 1, got {self.checkpoint_every}")


def recover(adapter: Path, base: Path, teacher: Path, teacher_adapter: Path, data: Path, out: Path,
            cfg: TrainConfig, spec: RecoverSpec, opts: RunOptions, _stop_after: int | None = None) -> dict:
    from calora_cli.data import batches, load_examples
    from calora_cli.methods.ca_lora import recovery
    from calora_cli.models import load_model, load_tokenizer

    check_output(out, opts.force)
    cfg.check()
    spec.check()
    ad = open_artifact(adapter, expect="adapter", role="adapter")
    if adapters.kind_of(ad) == "nola":
        raise CaloraError(f"{adapter} is a NOLA adapter: `calora inherit` it onto the compressed model first "
                          "(it carries a NOLA adapter over as its expanded LoRA), then recover that")
    check_config(adapters.lora_files(ad)[0])  # fan_in_fan_out, layer_replication, unconverted PiSSA: as every stage
    base_art = open_model(base, "base", teacher)
    t_art = open_artifact(teacher, expect="model", role="teacher")
    ta = open_artifact(teacher_adapter, expect="adapter", role="teacher adapter")
    for a, m in ((ad, base_art), (ta, t_art)):
        check_fits(a, m, opts)
    check_descends(base_art, t_art, "compressed from the teacher", opts)
    examples = load_examples(data, load_tokenizer(base_art.path), cfg.seq_len)
    use = spec.teacher_use(spec.cache_teacher)
    live, cached = use == "live", use == "cached"
    check_training_memory("recover (student and teacher)" if live else "recover", [base_art, t_art] if live else [base_art],
                          opts.dtype, cfg.batch_size, cfg.seq_len)

    seed_everything(cfg.seed)
    teacher_model = load_teacher(t_art, ta, opts) if live else None
    student = adapters.attach(load_model(base_art.path, opts.device, opts.dtype, shardable=True), ad, trainable=True)
    lora_cfg = student.peft_config["default"]
    rank = spec.recovery_dim if spec.recovery_dim is not None else lora_cfg.r
    modules = recovery.attach(student, rank, lora_cfg.lora_alpha, seed=cfg.seed) if rank else None

    run = {**cfg.as_params(), "distill": spec.distill, "distill_weight": spec.distill_weight,
           "temperature": spec.temperature, "recovery_dim": rank, "recovery_alpha": lora_cfg.lora_alpha,
           "cache_teacher": spec.cache_teacher}
    ckpt = Checkpoints(out.with_name(out.name + ".ckpt"), spec.checkpoint_every, {**run, "adapter": ad.fingerprint})
    if not spec.resume:
        shutil.rmtree(ckpt.directory, ignore_errors=True)

    def stop(step: int) -> None:
        if _stop_after is not None and step + 1 == _stop_after:
            raise KeyboardInterrupt  # tests: an interrupted run, to resume

    cache = cache_teacher(t_art, ta, examples, spec, cfg.batch_size, opts) if cached else None
    with progress("recover", cfg.steps, opts.show_progress) as advance:
        metrics = train_loop(student, student.parameters(),
                             batches(examples, cfg.batch_size, cfg.seed, with_index=cache is not None), cfg,
                             loss_fn=make_loss(teacher_model, spec, cache), after_step=stop, on_step=advance,
                             checkpoints=ckpt, resume=spec.resume)

    inputs = {"adapter": ad.input_record(), "base": base_art.input_record(), "teacher": t_art.input_record(),
              "teacher_adapter": ta.input_record(), "data": data_input(data)}
    with atomic_output(out, opts.force) as tmp:
        save_trained(student, tmp, distributed.adapter_state(student))
        extra = {}
        if modules is not None:
            ca_format.save(tmp, modules)
            extra[ca_format.RECOVERY_FILE] = ca_format.RECOVERY_NOTE
        write_manifest(tmp, kind="adapter", stage="recover", params=run, inputs=inputs, metrics=metrics,
                       base_fingerprint=base_art.fingerprint, extra_files=extra)
    shutil.rmtree(ckpt.directory, ignore_errors=True)
    return {"output": str(out), **metrics}
