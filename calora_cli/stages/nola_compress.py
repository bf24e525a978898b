"""`calora compress ADAPTER --method nola`: an existing LoRA compressed into NOLA coefficients.

A weight fit cannot do this for a generic LoRA: a random k-dimensional subspace holds only about
k/(r*d) of a factor, so ||delta W|| error stays near 1 (research/nola.md measured 0.986-0.9999).
So it is distillation: alpha and beta train so that base + NOLA matches base + LoRA (the teacher)
on text, through the one training loop. The weight-space error is reported for information.
"""

from __future__ import annotations

import json
from pathlib import Path

from calora_cli.artifacts import check_output, data_input, open_artifact
from calora_cli.errors import CaloraError
from calora_cli.progress import progress
from calora_cli.stages.common import NOLA_FILE, RunOptions, attach_adapter, check_fits, is_nola, read_lora, seed_everything
from calora_cli.stages.recover import RecoverSpec, distill_terms
from calora_cli.train import TrainConfig, train_loop


def compress_lora(adapter: Path, out: Path, data: Path, cfg: TrainConfig, opts: RunOptions, bases: tuple[int, int],
                  base: Path | None = None, distill: str = "logits", shared: bool = True) -> dict:
    import torch

    from calora_cli.adapters import nola
    from calora_cli.data import batches, load_examples
    from calora_cli.models import load_model, load_tokenizer
    from calora_cli.stages.finetune import save_nola

    check_output(out, opts.force)
    cfg.check()
    spec = RecoverSpec(distill=distill)
    spec.check()
    if min(bases) < 1:
        raise CaloraError(f"--bases must be positive, got {bases}")
    ad = open_artifact(adapter, expect="adapter", role="adapter")
    if is_nola(ad):
        raise CaloraError(f"adapter {adapter} is already a NOLA adapter")
    if base is None:
        recorded = (ad.manifest or {}).get("inputs", {}).get("base", {}).get("path")
        if not recorded:
            raise CaloraError(f"adapter {adapter} records no base model: pass --base MODEL")
        base = Path(recorded)
    base_art = open_artifact(base, expect="model", role="base")
    check_fits(ad, base_art, opts)
    factors, masked = read_lora(ad)
    if masked:
        raise CaloraError("LoSA-masked adapters cannot be compressed into NOLA (the mask is not a low-rank basis)")
    ranks = {f.A.shape[0] for f in factors.values()}
    scales = {round(f.scale, 12) for f in factors.values()}
    if len(ranks) != 1 or len(scales) != 1:
        raise CaloraError("adapters with per-module ranks or alphas (rank_pattern/alpha_pattern) are not supported for NOLA")
    rank = ranks.pop()
    alpha = scales.pop() * rank
    targets = sorted({nola.module_type(m) for m in factors})
    k, l = bases
    examples = load_examples(data, load_tokenizer(base_art.path), cfg.seq_len)

    seed_everything(cfg.seed)
    teacher = attach_adapter(load_model(base_art.path, opts.device, opts.dtype), ad)
    teacher.requires_grad_(False).eval()
    student = load_model(base_art.path, opts.device, opts.dtype)
    layers = nola.attach(student, targets, rank, k, l, alpha, cfg.seed, shared)
    missing = sorted(set(factors) - set(layers))
    if missing:
        raise CaloraError(f"the base has no module {missing[0]} that the LoRA adapts")
    hidden = spec.distill in ("hidden", "both")

    def loss_fn(model, batch):
        out_s = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], output_hidden_states=hidden)
        with torch.no_grad():
            out_t = teacher(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], output_hidden_states=hidden)
        d = distill_terms(out_s, out_t, batch["attention_mask"], spec)
        return d, {"distill": float(d)}

    with progress("lora -> nola", cfg.steps, opts.show_progress) as advance:
        metrics = train_loop(student, student.parameters(), batches(examples, cfg.batch_size, cfg.seed), cfg,
                             loss_fn=loss_fn, on_step=advance)
    weight_err = {}
    with torch.no_grad():
        for m, f in factors.items():
            ref = f.delta()
            weight_err[m] = (torch.linalg.norm(layers[m].delta() - ref) / torch.linalg.norm(ref).clamp(min=1e-30)).item()
    lora_params = sum(f.A.numel() + f.B.numel() for f in factors.values())
    metrics.update(
        lora_params=lora_params,
        nola_coefficients=len(layers) * (k + l),
        compression_ratio=lora_params / (len(layers) * (k + l)),
        delta_weight_rel_error=weight_err,
        mean_delta_weight_rel_error=sum(weight_err.values()) / len(weight_err),
    )
    params = {"from_lora": True, "distill": distill, **{key: v for key, v in cfg.as_params().items() if key != "seed"}}
    save_nola(out, opts, layers, rank, alpha, k, l, shared, cfg.seed, targets, params, metrics, stage="compress",
              inputs={"adapter": ad.input_record(), "base": base_art.input_record(), "data": data_input(data)},
              base_fingerprint=base_art.fingerprint)
    lora_bytes = sum(p.stat().st_size for p in ad.weights)
    nola_bytes = (out / NOLA_FILE).stat().st_size
    return {"output": str(out), "first_loss": metrics["first_loss"], "final_loss": metrics["final_loss"],
            "compression_ratio": metrics["compression_ratio"], "bytes_lora": lora_bytes, "bytes_nola": nola_bytes,
            "mean_delta_weight_rel_error": metrics["mean_delta_weight_rel_error"]}
