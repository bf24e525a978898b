"""`calora sparsify-adapter`: fit a LoRA to a sparse base (LoSA), with or without masked training."""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass, field
from pathlib import Path

from calora_cli import adapters, distributed
from calora_cli.adapters import lora
from calora_cli.artifacts import (
    atomic_output,
    check_output,
    data_input,
    open_artifact,
    write_manifest,
)
from calora_cli.distill import DistillSpec
from calora_cli.errors import CaloraError
from calora_cli.methods.losa import format as losa_format
from calora_cli.progress import progress
from calora_cli.run import RunOptions, check_descends, check_fits, check_training_memory, open_model, seed_everything
from calora_cli.train import TrainConfig


def base_masks(base, modules: list[str]) -> dict:
    """(W != 0) of each adapted module's weight, read tensor by tensor from the base's files."""
    from calora_cli.tensor_io import load_tensors

    wanted = {f"{m}.weight": m for m in modules}
    if base.gguf:  # llama.cpp's file: the zeros it holds, as read back (exact in its float types)
        import json

        from calora_cli.gguf.reader import GGUFTensors

        source = GGUFTensors(base.weights[0], json.loads((base.path / "config.json").read_text()))
        masks = {m: source.get_tensor(n) != 0 for n, m in wanted.items() if n in source.where}
        source.close()
    else:
        masks = {wanted[n]: t != 0 for n, t in load_tensors(base.weights, wanted.__contains__).items()}
    missing = sorted(set(modules) - set(masks))
    if missing:
        raise CaloraError(f"the base has no weight for adapted module {missing[0]}")
    return masks


def _quantized_gguf(base) -> bool:
    from calora_cli.gguf.reader import open_gguf

    return any(t.tensor_type.name not in ("F32", "F16", "BF16") for t in open_gguf(base.weights[0]).tensors)


@dataclass
class LosaSpec:
    """What LoSA fine-tuning adds to plain masked training."""

    rank_allocation: str = "uniform"
    max_rank: int | None = None  # default: twice the adapter's rank
    distill_from: Path | None = None  # the dense model the adapter was trained on: teacher = it + the adapter
    distill: DistillSpec = field(default_factory=DistillSpec)
    cache_teacher: bool = False  # the teacher's outputs from one streamed pass: it is never resident

    def check(self) -> None:
        from calora_cli.methods.losa.ranks import MODES

        if self.rank_allocation not in MODES:
            raise CaloraError(f"--rank-allocation must be one of {', '.join(MODES)}, got {self.rank_allocation!r}")
        if self.max_rank is not None and self.max_rank < 1:
            raise CaloraError(f"--max-rank must be at least 1, got {self.max_rank}")
        self.distill.check()


def sparsify_adapter(adapter: Path, base: Path, out: Path, opts: RunOptions, data: Path | None = None,
                     cfg: TrainConfig | None = None, losa: LosaSpec | None = None) -> dict:
    from calora_cli.methods.losa.masks import removed_energy

    check_output(out, opts.force)
    losa = losa or LosaSpec()
    losa.check()
    if cfg is not None:
        cfg.check()
    if data is None and (losa.rank_allocation != "uniform" or losa.distill_from is not None):
        raise CaloraError("--rank-allocation error and --distill-from shape LoSA fine-tuning: give --data too")
    base_art = open_model(base, "base")
    ad_art = open_artifact(adapter, expect="adapter", role="adapter")
    if json.loads((base_art.path / "config.json").read_text()).get("quantization_config"):
        raise CaloraError("sparsify-adapter needs a pruned, unquantized base (its zeros define the masks)")
    if base_art.gguf and _quantized_gguf(base_art):
        raise CaloraError(f"{base_art.source or base_art.path} is a quantized GGUF, whose zeros are rounding, not "
                          "pruning; sparsify against the pruned model (or its F32/F16/BF16 GGUF)")
    check_fits(ad_art, base_art, opts)
    factors = adapters.factors(ad_art, LOSA_DOING, LOSA_INSTEAD)
    masks = base_masks(base_art, sorted(factors))
    for m, f in factors.items():
        if masks[m].shape != (f.B.shape[0], f.A.shape[1]):
            raise CaloraError(f"shape mismatch at {m}: base weight {tuple(masks[m].shape)}, adapter delta {(f.B.shape[0], f.A.shape[1])}")
    zeros = sum(int((~m).sum()) for m in masks.values())
    if zeros == 0:
        raise CaloraError(f"base {base} has no zeros in the adapted layers: prune it first (calora compress --method wanda ...)")
    energy = {m: removed_energy(f.delta(), masks[m]) for m, f in factors.items()}
    metrics: dict = {
        "removed_energy": energy,
        "mean_removed_energy": sum(energy.values()) / len(energy),
        "base_sparsity": zeros / sum(m.numel() for m in masks.values()),
    }
    params: dict = {"masked": True}

    with atomic_output(out, opts.force) as tmp:
        if data is None:
            lora.write(tmp, *adapters.lora_files(ad_art))  # a NOLA adapter becomes its expanded LoRA
        else:
            cfg = cfg or TrainConfig()
            teacher = _teacher(losa, base_art, opts)
            metrics.update(_train_masked(base_art, ad_art, data, cfg, losa, teacher, opts, tmp))
            params.update(cfg.as_params())
            params.update(rank_allocation=losa.rank_allocation, distill_from=teacher is not None)
            if teacher is not None:
                params.update(distill=losa.distill.distill, distill_weight=losa.distill.distill_weight,
                              temperature=losa.distill.temperature, cache_teacher=losa.cache_teacher)
        losa_format.save(tmp, masks)
        inputs = {"adapter": ad_art.input_record(), "base": base_art.input_record()}
        if data is not None:
            inputs["data"] = data_input(data)
        if losa.distill_from is not None:
            inputs["distill_from"] = open_artifact(losa.distill_from, expect="model", role="teacher").input_record()
        write_manifest(tmp, kind="adapter", stage="sparsify-adapter", params=params, inputs=inputs, metrics=metrics,
                       base_fingerprint=base_art.fingerprint,
                       extra_files={losa_format.MASKS_FILE: losa_format.MASKS_NOTE})
    return {"output": str(out), "mean_removed_energy": metrics["mean_removed_energy"], "base_sparsity": metrics["base_sparsity"],
            **{k: v for k, v in metrics.items() if k in ("first_loss", "final_loss", "block_ranks", "distributed")}}


def _teacher(losa: LosaSpec, base_art, opts: RunOptions):
    """The dense model the base was pruned from (for distillation and for measuring block errors)."""
    if losa.distill_from is None:
        return None
    t_art = open_artifact(losa.distill_from, expect="model", role="teacher")
    check_descends(base_art, t_art, "pruned from", opts)
    return t_art


def _block_errors(base_art, teacher, model, examples, opts: RunOptions) -> list[float]:
    """Each block's relative output error against its dense twin: recorded by `calora compress`,
    else measured on the first training examples against --distill-from."""
    import torch

    recorded = (base_art.manifest or {}).get("metrics", {}).get("block_rel_error")
    if recorded:
        return recorded
    if teacher is None:
        raise CaloraError(f"base {base_art.path} records no block errors (not pruned by calora compress with calibration "
                          "text): pass --distill-from ORIGINAL to measure them")
    from calora_cli.compress.sequential import block_errors_against
    from calora_cli.sharded_load import pending

    if pending(model):
        raise CaloraError(f"base {base_art.path} records no block errors, and under FSDP they cannot be measured "
                          "(no process holds whole layers): prune it with calora compress and calibration text, "
                          "or run with CALORA_DISTRIBUTED=ddp")

    calib = examples.batch(torch.arange(min(8, len(examples))))["input_ids"]
    return block_errors_against(model, teacher.weights, calib)["block_rel_error"]


LOSA_DOING = "LoSA's masking (it masks the delta B·A)"
LOSA_INSTEAD = "sparsify a plain LoRA; this one runs on the sparse base as it is (calora eval), not exactly sparse"


def _allocated_adapter(ad_art, errors: list[float], losa: LosaSpec, seed: int, into: Path) -> tuple[Path, list[int]]:
    """The adapter resized to error-allocated ranks, written to `into` for peft to load."""
    from calora_cli.methods.losa import ranks as rank_allocation

    config, state = adapters.lora_files(ad_art)
    factors = adapters.factors(ad_art, LOSA_DOING, LOSA_INSTEAD)
    ranks_seen = {f.A.shape[0] for f in factors.values()}
    if len(ranks_seen) != 1:
        raise CaloraError(f"--rank-allocation error needs an adapter with one rank everywhere, found {sorted(ranks_seen)}")
    r = ranks_seen.pop()
    ranks = rank_allocation.allocate(errors, r, losa.max_rank or 2 * r)
    per_module = {m: ranks[rank_allocation.block_of(m)] for m in factors}
    state, config = rank_allocation.resize(state, config, per_module, seed)
    lora.write(into, config, state)
    return into, ranks


def _train_masked(base_art, ad_art, data: Path, cfg: TrainConfig, losa: LosaSpec, teacher, opts: RunOptions, tmp: Path) -> dict:
    """LoSA fine-tuning: the LoRA trains with its delta masked in every forward pass, optionally at
    error-allocated ranks and with distillation from the dense model + the original adapter."""
    from calora_cli.data import batches, load_examples
    from calora_cli.distill import cache_teacher, load_teacher, make_loss
    from calora_cli.methods.losa.masks import apply_masks
    from calora_cli.models import load_adapter, load_model, load_tokenizer
    from calora_cli.train import causal_lm_loss, train_loop

    examples = load_examples(data, load_tokenizer(base_art.path), cfg.seq_len)
    use = losa.distill.teacher_use(losa.cache_teacher) if teacher is not None else None
    cached = use == "cached"
    resident = [base_art] + ([teacher] if use == "live" else [])
    check_training_memory("sparsify-adapter", resident, opts.dtype, cfg.batch_size, cfg.seq_len)
    seed_everything(cfg.seed)
    model = load_model(base_art.path, opts.device, opts.dtype, shardable=True)
    metrics: dict = {}
    source = ad_art.path
    if adapters.kind_of(ad_art) == "nola":  # LoSA trains A and B themselves: a NOLA adapter trains as its expanded LoRA
        source = tmp / ".resized"
        lora.write(source, *adapters.lora_files(ad_art))
    if losa.rank_allocation == "error":
        errors = _block_errors(base_art, teacher, model, examples, opts)
        source, ranks = _allocated_adapter(ad_art, errors, losa, cfg.seed, tmp / ".resized")
        metrics.update(block_errors=errors, block_ranks=ranks)
    model = load_adapter(model, source, trainable=True)
    apply_masks(model)
    loss_fn = causal_lm_loss
    if teacher is not None:
        loss_fn = make_loss(load_teacher(teacher, ad_art, opts) if use == "live" else None, losa.distill,
                            cache_teacher(teacher, ad_art, examples, losa.distill, cfg.batch_size, opts) if cached else None)
    with progress("losa", cfg.steps, opts.show_progress) as advance:
        metrics.update(train_loop(model, model.parameters(), batches(examples, cfg.batch_size, cfg.seed, with_index=cached),
                                  cfg, loss_fn=loss_fn, on_step=advance))
    lora.save_trained(model, tmp, distributed.adapter_state(model))
    shutil.rmtree(tmp / ".resized", ignore_errors=True)
    return metrics
