"""`calora sparsify-adapter`: fit a LoRA to a sparse base (LoSA), with or without masked training."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from calora_cli.artifacts import atomic_output, check_output, data_input, open_artifact, write_manifest
from calora_cli.errors import CaloraError
from calora_cli.progress import progress
from calora_cli.stages.common import MASKS_FILE, RunOptions, check_fits, read_lora, seed_everything
from calora_cli.train import TrainConfig


def base_masks(base, modules: list[str]) -> dict:
    """(W != 0) of each adapted module's weight, read tensor by tensor from the base's files."""
    from calora_cli.tensor_io import load_tensors

    wanted = {f"{m}.weight": m for m in modules}
    masks = {wanted[n]: t != 0 for n, t in load_tensors(base.weights, wanted.__contains__).items()}
    missing = sorted(set(modules) - set(masks))
    if missing:
        raise CaloraError(f"the base has no weight for adapted module {missing[0]}")
    return masks


def sparsify_adapter(adapter: Path, base: Path, out: Path, opts: RunOptions, data: Path | None = None,
                     cfg: TrainConfig | None = None) -> dict:
    from safetensors.torch import save_file

    from calora_cli.adapters.masked import pack, removed_energy

    check_output(out, opts.force)
    if cfg is not None:
        cfg.check()
    base_art = open_artifact(base, expect="model", role="base")
    ad_art = open_artifact(adapter, expect="adapter", role="adapter")
    if json.loads((base_art.path / "config.json").read_text()).get("quantization_config"):
        raise CaloraError("sparsify-adapter needs a pruned, unquantized base (its zeros define the masks)")
    check_fits(ad_art, base_art, opts)
    factors, _ = read_lora(ad_art)
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
            for name in ("adapter_config.json", "adapter_model.safetensors"):
                shutil.copy2(ad_art.path / name, tmp / name)
        else:
            metrics.update(_train_masked(base_art, ad_art, data, cfg or TrainConfig(), opts, tmp))
            params.update(cfg.as_params() if cfg else TrainConfig().as_params())
        packed = {m: pack(mask) for m, mask in masks.items()}
        shapes = json.dumps({m: list(mask.shape) for m, mask in masks.items()}, sort_keys=True)
        # one metadata key only: safetensors writes metadata in hash-map order, so two keys would
        # make the file's bytes differ from run to run
        save_file(packed, tmp / MASKS_FILE, metadata={"shapes": shapes})
        inputs = {"adapter": ad_art.input_record(), "base": base_art.input_record()}
        if data is not None:
            inputs["data"] = data_input(data)
        write_manifest(tmp, kind="adapter", stage="sparsify-adapter", params=params, inputs=inputs, metrics=metrics,
                       base_fingerprint=base_art.fingerprint,
                       extra_files={MASKS_FILE: "LoSA masks: base weight != 0 per adapted module, packed bits (np.packbits)"})
    return {"output": str(out), "mean_removed_energy": metrics["mean_removed_energy"], "base_sparsity": metrics["base_sparsity"],
            **{k: v for k, v in metrics.items() if k in ("first_loss", "final_loss")}}


def _train_masked(base_art, ad_art, data: Path, cfg: TrainConfig, opts: RunOptions, tmp: Path) -> dict:
    """LoSA fine-tuning: the LoRA trains with its delta masked in every forward pass."""
    from calora_cli.adapters.masked import apply_masks
    from calora_cli.data import batches, load_examples
    from calora_cli.models import load_adapter, load_model, load_tokenizer
    from calora_cli.train import train_loop

    examples = load_examples(data, load_tokenizer(base_art.path), cfg.seq_len)
    seed_everything(cfg.seed)
    model = load_adapter(load_model(base_art.path, opts.device, opts.dtype), ad_art.path, trainable=True)
    apply_masks(model)
    with progress("losa", cfg.steps, opts.show_progress) as advance:
        metrics = train_loop(model, model.parameters(), batches(examples, cfg.batch_size, cfg.seed), cfg, on_step=advance)
    model.save_pretrained(tmp)
    (tmp / "README.md").unlink(missing_ok=True)
    return metrics
