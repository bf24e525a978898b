"""`calora train --kind nola`: a NOLA adapter trained directly on a base, through the one loop."""

from __future__ import annotations

from calora_cli.artifacts import data_input
from calora_cli.data import batches
from calora_cli.methods.nola import format as nola_format
from calora_cli.methods.nola import layer as nola
from calora_cli.progress import progress
from calora_cli.train import train_loop


def train_nola(base_art, data, examples, model, out, cfg, opts, rank, alpha, targets, bases, shared, coef_bits) -> dict:
    """A NOLA adapter trained directly: only k + l coefficients per module (beta starts at 0)."""
    k, l = bases
    layers = nola.attach(model, targets, rank, k, l, alpha, cfg.seed, shared)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    with progress("train nola", cfg.steps, opts.show_progress) as advance:
        metrics = train_loop(model, model.parameters(), batches(examples, cfg.batch_size, cfg.seed), cfg, on_step=advance)
    metrics.update(trainable_params=trainable, examples=len(examples))
    params = {key: v for key, v in cfg.as_params().items() if key != "seed"}
    nola_format.save(out, opts, layers, rank, alpha, k, l, shared, cfg.seed, targets, params, metrics,
                     stage="train", inputs={"base": base_art.input_record(), "data": data_input(data)},
                     base_fingerprint=base_art.fingerprint, coef_bits=coef_bits)
    return {"output": str(out), "kind": "adapter", **metrics}
