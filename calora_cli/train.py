"""The one training loop. Stages extend it with a loss function and step hooks, never a copy.

- `calora train` uses the plain causal-LM loss;
- recovery (CA-LoRA) adds a distillation term through `loss_fn`;
- LoSA re-applies masks through `after_step`.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterable, Iterator

from calora_cli.errors import CaloraError

if TYPE_CHECKING:
    import torch

Batch = dict[str, "torch.Tensor"]
LossFn = Callable[["torch.nn.Module", Batch], tuple["torch.Tensor", dict[str, float]]]


@dataclass
class TrainConfig:
    steps: int = 100
    lr: float = 1e-3
    batch_size: int = 8
    seq_len: int = 256
    seed: int = 0
    warmup: int | None = None  # default: 10% of the steps
    weight_decay: float = 0.0
    grad_clip: float = 1.0

    def check(self) -> None:
        if self.steps < 1:
            raise CaloraError(f"--steps must be at least 1, got {self.steps}")
        if not (self.lr > 0 and math.isfinite(self.lr)):
            raise CaloraError(f"--lr must be a positive number, got {self.lr}")
        if self.batch_size < 1:
            raise CaloraError(f"--batch-size must be at least 1, got {self.batch_size}")
        if self.seq_len < 2:
            raise CaloraError(f"--seq-len must be at least 2, got {self.seq_len}")

    def as_params(self) -> dict:
        return asdict(self)


def causal_lm_loss(model: "torch.nn.Module", batch: Batch) -> tuple["torch.Tensor", dict[str, float]]:
    out = model(**batch)
    return out.loss, {"loss": out.loss.item()}


def lr_lambda(cfg: TrainConfig) -> Callable[[int], float]:
    """Linear warm-up, then cosine decay to 10% of the peak."""
    warm = cfg.warmup if cfg.warmup is not None else max(1, cfg.steps // 10)

    def f(step: int) -> float:
        if step < warm:
            return (step + 1) / warm
        t = (step - warm) / max(1, cfg.steps - warm)
        return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, t)))

    return f


@dataclass
class Checkpoints:
    """Save the training state every `every` steps into `directory`; resume from it when asked.

    Everything is written as safetensors + JSON (no pickle), atomically, so a kill at any moment
    leaves either the previous checkpoint or the new one.
    """

    directory: Path
    every: int
    run: dict[str, Any]  # what the run was started with; a resume with other settings is refused

    FILE = "state.safetensors"

    def save(self, step: int, params, opt, sched, losses: list[float]) -> None:
        import torch
        from safetensors.torch import save_file

        from calora_cli import distributed

        # every process gathers (FSDP shards are collected whole), only the writer writes
        sd = opt.state_dict()
        tensors = {f"param.{i}": distributed.full(p).detach().contiguous() for i, p in enumerate(params)}
        for idx, st in sd["state"].items():
            for k, v in st.items():
                tensors[f"opt.{idx}.{k}"] = distributed.full(v).detach().contiguous() if hasattr(v, "detach") else torch.tensor(v)
        if not distributed.is_writer():
            return
        meta = {"step": step, "run": self.run, "param_groups": sd["param_groups"], "sched": sched.state_dict(), "losses": losses}
        self.directory.mkdir(parents=True, exist_ok=True)
        tmp = self.directory / (self.FILE + ".tmp")
        save_file(tensors, tmp, metadata={"meta": json.dumps(meta)})
        os.replace(tmp, self.directory / self.FILE)

    def load(self, params, opt, sched) -> tuple[int, list[float]]:
        from safetensors import safe_open

        path = self.directory / self.FILE
        if not path.exists():
            return 0, []
        with safe_open(path, framework="pt") as f:
            meta = json.loads(f.metadata()["meta"])
            if meta["run"] != self.run:
                raise CaloraError(f"checkpoint in {self.directory} is from a run with other settings; rerun without --resume")
            tensors = {k: f.get_tensor(k) for k in f.keys()}
        from calora_cli import distributed

        for i, p in enumerate(params):
            p.data.copy_(distributed.place_like(tensors[f"param.{i}"], p))
        state: dict = {}
        for k, v in tensors.items():
            if k.startswith("opt."):
                _, idx, name = k.split(".", 2)
                state.setdefault(int(idx), {})[name] = distributed.place_like(v, params[int(idx)])
        opt.load_state_dict({"state": state, "param_groups": meta["param_groups"]})
        sched.load_state_dict(meta["sched"])
        return meta["step"], meta["losses"]


def train_loop(
    model: "torch.nn.Module",
    params: Iterable["torch.nn.Parameter"],
    data: Iterator[Batch],
    cfg: TrainConfig,
    loss_fn: LossFn = causal_lm_loss,
    after_step: Callable[[int], None] | None = None,
    on_step: Callable[..., None] | None = None,
    checkpoints: Checkpoints | None = None,
    resume: bool = False,
) -> dict[str, float]:
    """Train `params` of `model` for cfg.steps batches of `data`; return loss metrics.

    Refuses to go on when the loss stops being finite (a NaN would otherwise be written out).
    With `checkpoints`, saves the state every N steps; with `resume`, continues from the last one
    (the data stream is replayed to the same position, so the result equals an uninterrupted run).
    """
    import torch

    from calora_cli import distributed

    params = [p for p in params if p.requires_grad]
    if not params:
        raise CaloraError("nothing to train: no trainable parameters")
    device = params[0].device
    wanted = {id(p) for p in params}
    names = [n for n, p in model.named_parameters() if id(p) in wanted]
    forward = distributed.wrap(model, device)  # DDP under torchrun/accelerate: gradients averaged over processes
    if distributed.sharded():  # FSDP replaced the parameters by sharded ones: train those
        by_name = dict(model.named_parameters())
        params = [by_name[n] for n in names]
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay, betas=(0.9, 0.999))
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(cfg))
    start, losses = (checkpoints.load(params, opt, sched) if checkpoints and resume else (0, []))
    for _ in range(start):
        next(data)
    if on_step is not None and start:
        on_step(start)
    model.train()
    for step in range(start, cfg.steps):
        batch = distributed.shard(next(data), cfg.batch_size)
        batch = {k: v.to(device) for k, v in batch.items()}
        loss, logs = loss_fn(forward, batch)
        if not torch.isfinite(loss):
            raise CaloraError(f"training diverged: loss is {loss.item()} at step {step + 1} (try a lower --lr)")
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if cfg.grad_clip:
            torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
        opt.step()
        sched.step()
        if after_step is not None:
            after_step(step)
        losses.append(distributed.mean(loss.item(), device))
        if on_step is not None:
            on_step(1, **logs)
        if checkpoints is not None and (step + 1) % checkpoints.every == 0 and step + 1 < cfg.steps:
            checkpoints.save(step + 1, params, opt, sched, losses)
    model.eval()
    tail = losses[-max(1, min(10, len(losses) // 5)) :]
    metrics = {"first_loss": losses[0], "final_loss": sum(tail) / len(tail), "steps": len(losses)}
    if distributed.world_size() > 1:
        metrics["distributed"] = {"processes": distributed.world_size(), "strategy": distributed.strategy()}
        from calora_cli.sharded_load import weights_read

        if (share := weights_read(model)) is not None:  # loaded straight into shards: this process's part
            metrics["distributed"]["weights_read"] = round(share, 4)
    return metrics
