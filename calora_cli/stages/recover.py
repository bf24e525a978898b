"""`calora recover`: CA-LoRA knowledge recovery on a compressed model.

Student: compressed model + inherited LoRA (trainable) + recovery modules beside every block
linear (trainable, output layer at zero). Teacher: uncompressed model + original LoRA, frozen, run
on the same batch. Loss = task cross-entropy + beta * distillation (final hidden state MSE, as the
reference code, and/or temperature-scaled logit KL). Training goes through the one loop in
train.py, which it extends with this loss; nothing is copied.
"""

from __future__ import annotations

import os
import shutil
from dataclasses import dataclass
from pathlib import Path

from calora_cli import distributed
from calora_cli.artifacts import atomic_output, check_output, data_input, open_artifact, write_manifest
from calora_cli.errors import CaloraError
from calora_cli.progress import progress
from calora_cli.stages.common import RECOVERY_FILE, RunOptions, attach_adapter, check_fits, is_nola, seed_everything
from calora_cli.train import Checkpoints, TrainConfig, train_loop

DISTILL = ("hidden", "logits", "both")


@dataclass
class RecoverSpec:
    distill: str = "hidden"
    distill_weight: float = 1.0
    temperature: float = 1.0
    recovery_dim: int | None = None  # default: the LoRA rank; 0: no recovery modules
    checkpoint_every: int = 50
    resume: bool = False
    cache_teacher: bool = False

    def check(self) -> None:
        if self.distill not in DISTILL:
            raise CaloraError(f"--distill must be one of {', '.join(DISTILL)}, got {self.distill!r}")
        if self.distill_weight < 0:
            raise CaloraError(f"--distill-weight must be >= 0, got {self.distill_weight}")
        if self.temperature <= 0:
            raise CaloraError(f"--temperature must be positive, got {self.temperature}")
        if self.recovery_dim is not None and self.recovery_dim < 0:
            raise CaloraError(f"--recovery-dim must be >= 0, got {self.recovery_dim}")
        if self.checkpoint_every < 1:
            raise CaloraError(f"--checkpoint-every must be at least 1, got {self.checkpoint_every}")


def distill_terms(student_out, teacher_out, mask, spec: RecoverSpec):
    """Distillation loss over real (non-padding) tokens: hidden-state MSE and/or logit KL * T^2."""
    import torch.nn.functional as F

    m = mask.to(student_out.logits.dtype)
    n = m.sum().clamp(min=1)
    total = 0.0
    if spec.distill in ("hidden", "both"):
        hs, ht = student_out.hidden_states[-1], teacher_out.hidden_states[-1]
        total = total + (((hs.float() - ht.float()) ** 2).mean(-1) * m).sum() / n
    if spec.distill in ("logits", "both"):
        T = spec.temperature
        log_s = F.log_softmax(student_out.logits.float() / T, -1)
        log_t = F.log_softmax(teacher_out.logits.float() / T, -1)
        kl = (log_t.exp() * (log_t - log_s)).sum(-1)
        total = total + (kl * m).sum() / n * T * T
    return total


class TeacherCache:
    """The teacher's outputs on every training example, computed once (`--cache-teacher`).

    Worth it when training sees each example more than once; it holds the final hidden states
    and/or the logits of every example, so it is refused when that would not fit in memory.
    """

    def __init__(self, teacher, examples, spec: RecoverSpec, batch_size: int):
        import torch

        self.hidden = spec.distill in ("hidden", "both")
        self.logits = spec.distill in ("logits", "both")
        hs, lg = [], []
        with torch.no_grad():
            for lo in range(0, len(examples), batch_size):
                b = examples.batch(torch.arange(lo, min(lo + batch_size, len(examples))))
                out = teacher(input_ids=b["input_ids"], attention_mask=b["attention_mask"], output_hidden_states=self.hidden)
                if self.hidden:
                    hs.append(out.hidden_states[-1])
                if self.logits:
                    lg.append(out.logits)
        self.hidden_states = torch.cat(hs) if hs else None
        self.all_logits = torch.cat(lg) if lg else None

    @staticmethod
    def bytes_needed(examples, config, spec: RecoverSpec) -> int:
        n, seq = examples.input_ids.shape
        width = (config.hidden_size if spec.distill in ("hidden", "both") else 0) + (
            config.vocab_size if spec.distill in ("logits", "both") else 0)
        return n * seq * width * 4

    def outputs(self, index):
        """What distill_terms reads of a teacher forward, for the examples at `index`."""
        import types

        return types.SimpleNamespace(hidden_states=[self.hidden_states[index]] if self.hidden else None,
                                     logits=self.all_logits[index] if self.logits else None)


def make_loss(teacher, spec: RecoverSpec, cache: TeacherCache | None = None):
    import torch

    def loss_fn(model, batch):
        index = batch.pop("index", None)
        hidden = spec.distill in ("hidden", "both")
        out = model(**batch, output_hidden_states=hidden)
        ce = out.loss
        if spec.distill_weight == 0:
            return ce, {"ce": ce.item()}
        if cache is not None:
            t = cache.outputs(index)
        else:
            with torch.no_grad():
                t = teacher(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], output_hidden_states=hidden)
        d = distill_terms(out, t, batch["attention_mask"], spec)
        return ce + spec.distill_weight * d, {"ce": ce.item(), "distill": float(d.detach()) if torch.is_tensor(d) else float(d)}

    return loss_fn


def recover(adapter: Path, base: Path, teacher: Path, teacher_adapter: Path, data: Path, out: Path,
            cfg: TrainConfig, spec: RecoverSpec, opts: RunOptions, _stop_after: int | None = None) -> dict:
    from safetensors.torch import save_file

    from calora_cli.adapters import recovery
    from calora_cli.data import batches, load_examples
    from calora_cli.models import load_model, load_tokenizer

    check_output(out, opts.force)
    cfg.check()
    spec.check()
    ad = open_artifact(adapter, expect="adapter", role="adapter")
    if is_nola(ad):
        raise CaloraError(f"{adapter} is a NOLA adapter: `calora inherit` it onto the compressed model first "
                          "(it carries a NOLA adapter over as its expanded LoRA), then recover that")
    base_art = open_artifact(base, expect="model", role="base")
    t_art = open_artifact(teacher, expect="model", role="teacher")
    ta = open_artifact(teacher_adapter, expect="adapter", role="teacher adapter")
    for a, m in ((ad, base_art), (ta, t_art)):
        check_fits(a, m, opts)
    if t_art.fingerprint not in base_art.lineage and not opts.allow_base_mismatch:
        raise CaloraError(f"{base} was not compressed from the teacher {teacher}; pass --allow-base-mismatch to use it anyway")
    examples = load_examples(data, load_tokenizer(base_art.path), cfg.seq_len)

    seed_everything(cfg.seed)
    teacher_model = attach_adapter(load_model(t_art.path, opts.device, opts.dtype, shardable=True), ta)
    teacher_model.requires_grad_(False).eval()
    distributed.shard_model(teacher_model, teacher_model.device)  # under FSDP the teacher is sharded too
    student = attach_adapter(load_model(base_art.path, opts.device, opts.dtype, shardable=True), ad, trainable=True)
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

    cache = None
    if spec.cache_teacher and spec.distill_weight > 0:
        need = TeacherCache.bytes_needed(examples, teacher_model.config, spec)
        free = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
        if need > free // 2:
            raise CaloraError(f"--cache-teacher would hold {need / 1e9:.1f} GB of teacher outputs, more than half the "
                              f"{free / 1e9:.1f} GB free: drop --cache-teacher (outputs are then computed each step)")
        with progress("teacher cache", None, opts.show_progress):
            cache = TeacherCache(teacher_model, examples, spec, cfg.batch_size)
    with progress("recover", cfg.steps, opts.show_progress) as advance:
        metrics = train_loop(student, student.parameters(),
                             batches(examples, cfg.batch_size, cfg.seed, with_index=cache is not None), cfg,
                             loss_fn=make_loss(teacher_model, spec, cache), after_step=stop, on_step=advance,
                             checkpoints=ckpt, resume=spec.resume)

    inputs = {"adapter": ad.input_record(), "base": base_art.input_record(), "teacher": t_art.input_record(),
              "teacher_adapter": ta.input_record(), "data": data_input(data)}
    with atomic_output(out, opts.force) as tmp:
        student.save_pretrained(tmp, state_dict=distributed.adapter_state(student))
        (tmp / "README.md").unlink(missing_ok=True)
        extra = {}
        if modules is not None:
            save_file(recovery.state(modules), tmp / RECOVERY_FILE, metadata={"format": "calora-recovery-v1"})
            extra[RECOVERY_FILE] = "CA-LoRA recovery modules: (alpha/r) U GELU(D x) beside each block linear; D, U per module"
        write_manifest(tmp, kind="adapter", stage="recover", params=run, inputs=inputs, metrics=metrics,
                       base_fingerprint=base_art.fingerprint, extra_files=extra)
    shutil.rmtree(ckpt.directory, ignore_errors=True)
    return {"output": str(out), **metrics}
