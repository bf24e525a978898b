"""Distillation from a frozen teacher: the losses, a cache of the teacher's outputs, loading it.

CA-LoRA's recovery, LoSA's fine-tuning with --distill-from and LoRA -> NOLA compression all train
a student to match a teacher (the uncompressed model + the original adapter) on the same batch.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

from calora_cli.errors import CaloraError

DISTILL = ("hidden", "logits", "both")


@dataclass
class DistillSpec:
    """What the student matches: the final hidden state (MSE, as CA-LoRA's reference code), the
    logits (temperature-scaled KL), or both; weighted against the task loss."""

    distill: str = "hidden"
    distill_weight: float = 1.0
    temperature: float = 1.0

    def check(self) -> None:
        if self.distill not in DISTILL:
            raise CaloraError(f"--distill must be one of {', '.join(DISTILL)}, got {self.distill!r}")
        if self.distill_weight < 0:
            raise CaloraError(f"--distill-weight must be >= 0, got {self.distill_weight}")
        if self.temperature <= 0:
            raise CaloraError(f"--temperature must be positive, got {self.temperature}")

    def teacher_use(self, cache: bool) -> str | None:
        """How the loss sees the teacher, which decides whether it is resident while training:
        None when the loss never runs it (weight 0), "cached" when its outputs come from one
        streamed pass before training (never resident), "live" when it runs beside the student."""
        if self.distill_weight == 0:
            return None
        return "cached" if cache else "live"


def distill_terms(student_out, teacher_out, mask, spec: DistillSpec):
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

    def __init__(self, teacher, examples, spec: DistillSpec, batch_size: int):
        import torch

        def outputs():
            with torch.no_grad():
                for b in _batches(examples, batch_size):
                    out = teacher(**b, output_hidden_states=spec.distill in ("hidden", "both"))
                    yield (out.hidden_states[-1] if out.hidden_states else None), out.logits

        self._fill(spec, outputs())

    def _fill(self, spec: DistillSpec, outputs) -> None:
        """Keep what distillation reads of each batch's (final hidden state, logits)."""
        import torch

        self.hidden = spec.distill in ("hidden", "both")
        self.logits = spec.distill in ("logits", "both")
        hs, lg = [], []
        for hidden, logits in outputs:
            if self.hidden:
                hs.append(hidden)
            if self.logits:
                lg.append(logits)
        self.hidden_states = torch.cat(hs) if hs else None
        self.all_logits = torch.cat(lg) if lg else None

    @classmethod
    def streamed(cls, teacher_art, adapter_art, examples, spec: DistillSpec, batch_size: int, opts) -> "TeacherCache":
        """The same cache from one pass that reads the teacher one decoder layer at a time (its
        adapter folded into each layer as it is read): the teacher is never resident."""
        from calora_cli.adapters import block_patcher
        from calora_cli.evaluation.streamed import outputs_per_batch
        from calora_cli.runtime import resolve_device, torch_dtype
        from calora_cli.streaming import LayerSource

        self = cls.__new__(cls)
        source = LayerSource(teacher_art.path, teacher_art.weights, torch_dtype(opts.dtype), resolve_device(opts.device))
        try:
            self._fill(spec, ((hidden, logits) for _, hidden, logits in
                              outputs_per_batch(source, list(_batches(examples, batch_size)), block_patcher(adapter_art))))
        finally:
            source.close()
        return self

    @staticmethod
    def bytes_needed(examples, config, spec: DistillSpec) -> int:
        n, seq = examples.input_ids.shape
        width = (config.hidden_size if spec.distill in ("hidden", "both") else 0) + (
            config.vocab_size if spec.distill in ("logits", "both") else 0)
        return n * seq * width * 4

    def outputs(self, index):
        """What distill_terms reads of a teacher forward, for the examples at `index`."""
        import types

        return types.SimpleNamespace(hidden_states=[self.hidden_states[index]] if self.hidden else None,
                                     logits=self.all_logits[index] if self.logits else None)


def _batches(examples, batch_size: int):
    """The examples in order, batch_size at a time, as the teacher's inputs."""
    import torch

    for lo in range(0, len(examples), batch_size):
        b = examples.batch(torch.arange(lo, min(lo + batch_size, len(examples))))
        yield {"input_ids": b["input_ids"], "attention_mask": b["attention_mask"]}


def make_loss(teacher, spec: DistillSpec, cache: TeacherCache | None = None):
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


def load_teacher(model_art, adapter_art, opts):
    """The teacher: a model with an adapter, frozen, in eval mode (sharded too under FSDP)."""
    from calora_cli import distributed
    from calora_cli.adapters import attach
    from calora_cli.models import load_model

    teacher = attach(load_model(model_art.path, opts.device, opts.dtype, shardable=True), adapter_art)
    teacher.requires_grad_(False).eval()
    distributed.shard_model(teacher, teacher.device)
    return teacher


def cache_teacher(teacher_art, adapter_art, examples, spec: DistillSpec, batch_size: int, opts) -> TeacherCache:
    """The teacher's outputs on every example from one streamed pass, refused when they would not
    fit in half the free memory."""
    from transformers import AutoConfig

    from calora_cli.progress import progress

    config = AutoConfig.from_pretrained(teacher_art.path, trust_remote_code=False, local_files_only=True)
    need = TeacherCache.bytes_needed(examples, config, spec)
    free = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    if need > free // 2:
        raise CaloraError(f"--cache-teacher would hold {need / 1e9:.1f} GB of teacher outputs, more than half the "
                          f"{free / 1e9:.1f} GB free: drop --cache-teacher (outputs are then computed each step)")
    with progress("teacher cache (streamed)", None, opts.show_progress):
        return TeacherCache.streamed(teacher_art, adapter_art, examples, spec, batch_size, opts)
