"""`calora compress ADAPTER --method nola|expand`: a LoRA into NOLA coefficients, and back.

LoRA -> NOLA starts from the weight fit (alternating least squares, fit.py), which is
exact for adapters that were NOLA to begin with but leaves a relative error near 1 for a generic
LoRA (a random k-dimensional subspace holds only about k/(r*d) of a factor). So the default is
then distillation: alpha and beta train so that base + NOLA matches base + LoRA (the teacher) on
text, through the one training loop. The report measures fidelity on held-out examples of that
text: each layer's relative output error, and the perplexity of student and teacher.

NOLA -> LoRA (`--method expand`) writes the expanded A and B as a plain peft LoRA.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from pathlib import Path

from calora_cli import adapters
from calora_cli.adapters import lora
from calora_cli.artifacts import (
    atomic_output,
    check_output,
    data_input,
    open_artifact,
    write_manifest,
)
from calora_cli.distill import DistillSpec, distill_terms, load_teacher
from calora_cli.errors import CaloraError
from calora_cli.methods.nola import format as nola_format
from calora_cli.progress import progress
from calora_cli.run import RunOptions, check_fits, check_training_memory, seed_everything
from calora_cli.train import TrainConfig, train_loop

log = logging.getLogger(__name__)

INITS = ("als", "zero")
HELD_OUT = 0.1  # share of the examples kept out of distillation for the report


@dataclass
class NolaSpec:
    bases: tuple[int, int] = (1024, 1024)
    distill: str = "logits"
    init: str = "als"
    coef_bits: int = 32
    steps: int = 200  # distillation steps; 0 = the weight fit alone
    shared: bool = True

    def check(self) -> None:
        from calora_cli.methods.nola.layer import COEF_BITS

        if min(self.bases) < 1:
            raise CaloraError(f"--bases must be positive, got {self.bases}")
        if self.init not in INITS:
            raise CaloraError(f"--init must be one of {', '.join(INITS)}, got {self.init!r}")
        if self.coef_bits not in COEF_BITS:
            raise CaloraError(f"--coef-bits must be one of {', '.join(map(str, COEF_BITS))}, got {self.coef_bits}")
        if self.steps < 0:
            raise CaloraError(f"--steps must be >= 0, got {self.steps}")
        if self.steps == 0 and self.init == "zero":
            raise CaloraError("--steps 0 --init zero would store an empty adapter: use --init als or train")
        DistillSpec(distill=self.distill).check()


def _source(adapter: Path, base: Path | None, opts: RunOptions):
    ad = open_artifact(adapter, expect="adapter", role="adapter")
    if nola_format.detect(ad):
        raise CaloraError(f"adapter {adapter} is already a NOLA adapter")
    if base is None:
        recorded = (ad.manifest or {}).get("inputs", {}).get("base", {}).get("path")
        if not recorded:
            raise CaloraError(f"adapter {adapter} records no base model: pass --base MODEL")
        base = Path(recorded)
    base_art = open_artifact(base, expect="model", role="base")
    check_fits(ad, base_art, opts)
    factors = adapters.factors(ad, "NOLA (random bases for A and B)", "compress a plain LoRA; this one runs as it is "
                               "(calora eval)")
    if adapters.is_kind(ad, "masked"):
        raise CaloraError("LoSA-masked adapters cannot be compressed into NOLA (the mask is not a low-rank basis)")
    ranks = {f.A.shape[0] for f in factors.values()}
    scales = {round(f.scale, 12) for f in factors.values()}
    if len(ranks) != 1 or len(scales) != 1:
        raise CaloraError("adapters with per-module ranks or alphas (rank_pattern/alpha_pattern) are not supported for NOLA")
    return ad, base_art, factors


def weight_fit(layers: dict, factors: dict) -> dict[str, float]:
    """Load each layer with the ALS fit of its LoRA factors; returns each fit's relative delta-W error."""
    from calora_cli.methods.nola import fit as nola_fit

    errors = {}
    for m, f in sorted(factors.items()):
        layer = layers[m]
        # B_t absorbs the ratio of scales, so the fitted NOLA delta equals the LoRA's
        result = nola_fit.fit(f.A.float(), f.B.float() * (f.scale / layer.scale), layer.A0, layer.seeds, layer.k, layer.l)
        layer.alpha_coef.data.copy_(result.alpha)
        layer.beta_coef.data.copy_(result.beta)
        errors[m] = result.rel_error
    return errors


def output_errors(student, teacher, layers: dict, factors: dict, held) -> dict:
    """On held-out batches: each NOLA layer's relative output error against its LoRA delta (on the
    layer's own inputs), the model's output error (logit KL to the teacher), and the perplexity of
    student and teacher."""
    import torch

    num = dict.fromkeys(layers, 0.0)
    den = dict.fromkeys(layers, 0.0)
    deltas = {m: (layers[m].delta().detach(), factors[m].delta()) for m in layers}

    def hook(name):
        def record(module, args, output):
            x = args[0].detach().float().reshape(-1, args[0].shape[-1])
            got, want = x @ deltas[name][0].T, x @ deltas[name][1].T
            num[name] += float(((got - want) ** 2).sum())
            den[name] += float((want**2).sum())
        return record

    # the hooks sit on the student's NOLA layers only; the teacher is another model
    handles = [layer.register_forward_hook(hook(m)) for m, layer in layers.items()]
    nll = {"student": 0.0, "teacher": 0.0}
    tokens = kl = real = 0.0
    try:
        with torch.no_grad():
            for batch in held:
                n = int((batch["labels"][:, 1:] != -100).sum())
                out_s, out_t = student(**batch), teacher(**batch)
                nll["student"] += float(out_s.loss) * n
                nll["teacher"] += float(out_t.loss) * n
                tokens += n
                m = int(batch["attention_mask"].sum())
                kl += float(distill_terms(out_s, out_t, batch["attention_mask"], DistillSpec("logits"))) * m
                real += m
    finally:
        for h in handles:
            h.remove()
    per_layer = {m: math.sqrt(num[m] / den[m]) if den[m] else 0.0 for m in layers}
    overall = math.sqrt(sum(num.values()) / sum(den.values())) if sum(den.values()) else 0.0
    return {
        "output_rel_error": per_layer,
        "mean_output_rel_error": overall,
        "heldout_ppl_nola": math.exp(nll["student"] / max(tokens, 1)),
        "heldout_ppl_lora": math.exp(nll["teacher"] / max(tokens, 1)),
        "heldout_kl": kl / max(real, 1),  # KL(teacher || student) per token: the model-level output error
        "heldout_tokens": int(tokens),
    }


def compress_lora(adapter: Path, out: Path, data: Path, cfg: TrainConfig, spec: NolaSpec, opts: RunOptions,
                  base: Path | None = None) -> dict:
    import torch

    from calora_cli.data import batches, load_examples
    from calora_cli.methods.nola import layer as nola
    from calora_cli.models import load_model, load_tokenizer
    from calora_cli.ranks import sharded

    check_output(out, opts.force)
    spec.check()
    if sharded():  # its report expands and compares layers outside the forward, where FSDP holds only shards
        raise CaloraError("compress --method nola runs under DDP only, not CALORA_DISTRIBUTED=fsdp")
    if spec.steps:
        cfg.check()
    ad, base_art, factors = _source(adapter, base, opts)
    f0 = next(iter(factors.values()))
    rank, alpha = f0.A.shape[0], f0.scale * f0.A.shape[0]
    targets = sorted({nola.module_type(m) for m in factors})
    k, l = spec.bases
    examples = load_examples(data, load_tokenizer(base_art.path), cfg.seq_len)
    check_training_memory("compress --method nola (student and teacher)", [base_art, base_art], opts.dtype,
                          cfg.batch_size, cfg.seq_len)
    n_held = max(1, round(len(examples) * HELD_OUT)) if len(examples) > 1 else 0
    train_idx = torch.arange(len(examples) - n_held)
    held_idx = torch.arange(len(examples) - n_held, len(examples)) if n_held else torch.arange(len(examples))

    seed_everything(cfg.seed)
    teacher = load_teacher(base_art, ad, opts)
    student = load_model(base_art.path, opts.device, opts.dtype)
    layers = nola.attach(student, targets, rank, k, l, alpha, cfg.seed, spec.shared)
    missing = sorted(set(factors) - set(layers))
    if missing:
        raise CaloraError(f"the base has no module {missing[0]} that the LoRA adapts")
    layers = {m: layers[m] for m in factors}
    metrics: dict = {}
    if spec.init == "als":
        with progress("weight fit", None, opts.show_progress):
            fit_err = weight_fit(layers, factors)
        metrics.update(fit_delta_rel_error=fit_err, mean_fit_delta_rel_error=sum(fit_err.values()) / len(fit_err))
        if metrics["mean_fit_delta_rel_error"] > 0.5:
            log.warning(f"the weight fit leaves a relative delta-W error of {metrics['mean_fit_delta_rel_error']:.3f}: "
                      "expected for a LoRA that was not NOLA (a random subspace holds little of it); "
                      + ("distillation follows" if spec.steps else "distil with --steps N to match its behaviour"))
    if spec.steps:
        distill = DistillSpec(distill=spec.distill)
        hidden = distill.distill in ("hidden", "both")

        def loss_fn(model, batch):
            kw = dict(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], output_hidden_states=hidden)
            out_s = model(**kw)
            with torch.no_grad():
                out_t = teacher(**kw)
            d = distill_terms(out_s, out_t, batch["attention_mask"], distill)
            return d, {"distill": float(d)}

        train = examples.subset(train_idx) if n_held else examples
        with progress("lora -> nola", cfg.steps, opts.show_progress) as advance:
            metrics.update(train_loop(student, student.parameters(), batches(train, cfg.batch_size, cfg.seed), cfg,
                                      loss_fn=loss_fn, on_step=advance))
    nola.round_coefficients(layers, spec.coef_bits)  # report what is stored
    held = [examples.batch(held_idx[i : i + cfg.batch_size]) for i in range(0, len(held_idx), cfg.batch_size)]
    student.eval()
    metrics.update(output_errors(student, teacher, layers, factors, held))
    with torch.no_grad():
        weight_err = {m: float(torch.linalg.norm(layers[m].delta() - f.delta()) / torch.linalg.norm(f.delta()).clamp(min=1e-30))
                      for m, f in factors.items()}
    lora_params = sum(f.A.numel() + f.B.numel() for f in factors.values())
    metrics.update(
        lora_params=lora_params,
        nola_coefficients=len(layers) * (k + l),
        compression_ratio=lora_params / (len(layers) * (k + l)),
        delta_weight_rel_error=weight_err,
        mean_delta_weight_rel_error=sum(weight_err.values()) / len(weight_err),
    )
    params = {"from_lora": True, "distill": spec.distill, "init": spec.init, "distill_steps": spec.steps,
              **{key: v for key, v in cfg.as_params().items() if key not in ("seed", "steps")}}
    nola_format.save(out, opts, layers, rank, alpha, k, l, spec.shared, cfg.seed, targets, params, metrics, stage="compress",
                     inputs={"adapter": ad.input_record(), "base": base_art.input_record(), "data": data_input(data)},
                     base_fingerprint=base_art.fingerprint, coef_bits=spec.coef_bits)
    lora_bytes = sum(p.stat().st_size for p in ad.weights)
    nola_bytes = (out / nola_format.NOLA_FILE).stat().st_size
    keys = ("first_loss", "final_loss", "compression_ratio", "mean_delta_weight_rel_error", "mean_fit_delta_rel_error",
            "mean_output_rel_error", "heldout_kl", "heldout_ppl_nola", "heldout_ppl_lora")
    return {"output": str(out), **{key: metrics[key] for key in keys if key in metrics},
            "bytes_lora": lora_bytes, "bytes_nola": nola_bytes}


def expand_nola(adapter: Path, out: Path, opts: RunOptions) -> dict:
    """A NOLA adapter as a plain peft LoRA directory (A, B expanded from the seed), which peft loads."""
    check_output(out, opts.force)
    ad = open_artifact(adapter, expect="adapter", role="adapter")
    if not nola_format.detect(ad):
        raise CaloraError(f"--method expand takes a NOLA adapter; {adapter} is a plain LoRA already")
    config, state = nola_format.files(ad)
    p = ad.manifest["params"]
    inputs = {"adapter": ad.input_record()}
    if "base" in ad.manifest.get("inputs", {}):
        inputs["base"] = ad.manifest["inputs"]["base"]  # what the NOLA adapter was made on, for later stages
    with atomic_output(out, opts.force) as tmp:
        lora.write(tmp, config, state)
        write_manifest(tmp, kind="adapter", stage="compress", params={"method": "expand", "kind": "lora", "rank": p["rank"],
                       "alpha": p["alpha"], "targets": p["targets"]}, inputs=inputs,
                       metrics={"lora_params": sum(t.numel() for t in state.values())}, base_fingerprint=ad.base_fingerprint)
    return {"output": str(out), "modules": len(state) // 2, "rank": p["rank"]}
