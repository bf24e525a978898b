"""`calora inherit --compensate R`: the inherited LoRA plus a low-rank compensation of what
compression removed, as one plain peft LoRA, with no training.

For each adapted linear (every block linear with --compensate-all): dW = W - W_hat, W from the
uncompressed teacher's safetensors, W_hat what the compressed layer computes (probed through the
layer itself, so GPTQ, bitsandbytes, RTN and pruned bases are treated alike, with their kernels'
rounding); its rank-R factors B_c A_c in the space of the layer's calibration inputs
(compensation.py). Those inputs are the compressed model's *with the inherited LoRA attached*:
the compensation is applied in that model, so it must fit the inputs that model produces (the
teacher's inputs would fit a model that never runs). Layers are visited block by block, one
teacher weight read at a time.

The result concatenates the factors: A' = [A; A_c], B' = [s B, B_c] with the LoRA's scale s folded
into B and scaling 1 (lora_alpha = rank), so B' A' = s B A + B_c A_c exactly; modules whose ranks
differ go in rank_pattern / alpha_pattern.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from calora_cli.errors import CaloraError
from calora_cli.methods.ca_lora.compensation import SPACES, compensate


@dataclass
class CompensateSpec:
    rank: int
    teacher: Path | None = None
    calib: Path | None = None
    calib_samples: int = 32
    seq_len: int = 256
    space: str = "eigen"
    all_linears: bool = False

    def check(self) -> None:
        if self.rank < 1:
            raise CaloraError(f"--compensate must be a rank of at least 1, got {self.rank}")
        if self.space not in SPACES:
            raise CaloraError(f"--compensate-space must be one of {', '.join(SPACES)}, got {self.space!r}")
        if self.teacher is None:
            raise CaloraError("--compensate needs the uncompressed model: pass --teacher ORIGINAL")
        if self.calib is None:
            raise CaloraError("--compensate needs calibration text: pass --calib FILE")
        if self.calib_samples < 1 or self.seq_len < 2:
            raise CaloraError("--calib-samples must be at least 1 and --seq-len at least 2")

    def params(self) -> dict:
        return {"compensate_rank": self.rank, "compensate_space": self.space, "compensate_all": self.all_linears,
                "calib_samples": self.calib_samples, "seq_len": self.seq_len}


def layer_weight(layer, chunk: int = 1024) -> "torch.Tensor":  # noqa: F821
    """(out, in) weight a linear-like layer computes with, in float32: its outputs on the identity,
    less its bias. The same for nn.Linear, GPTQ and bitsandbytes layers (kernel rounding included)."""
    import torch

    d_in = layer.in_features
    ref = next((p for p in layer.parameters() if p.is_floating_point()), None)
    device = ref.device if ref is not None else torch.device("cpu")
    dtype = ref.dtype if ref is not None else torch.float32
    rows = []
    with torch.no_grad():
        zero = layer(torch.zeros(1, d_in, device=device, dtype=dtype)).float()
        for lo in range(0, d_in, chunk):
            eye = torch.eye(d_in, device=device, dtype=dtype)[lo : lo + chunk]
            rows.append(layer(eye).float() - zero)
    return torch.cat(rows).T.contiguous().cpu()


def compensate_model(model, targets: list[str], teacher_weights: list[Path], calib, spec: CompensateSpec,
                     on_block=None, rescaled: bool = False) -> tuple[dict, dict, dict]:
    """Compensation factors, the share of error removed, and (with `rescaled`) each module's
    channel scales (r, c), per module, block by block.

    `model`: the compressed model with the inherited LoRA attached (peft); `targets`: the modules
    to compensate. `rescaled`: the base moved per-channel scales between layers (AWQ): each
    module's teacher weight is carried into the base's coordinates, diag(r) W diag(c), and so is
    its LoRA (A diag(c), diag(r) B, in the attached model before the block runs, so the layers
    after it see the inputs the carried LoRA gives)."""
    from calora_cli.arch import adapted_linears, decoder_layers
    from calora_cli.compress.sequential import InputStats, block_outputs, capture_inputs
    from calora_cli.methods.ca_lora.compensation import channel_scales
    from calora_cli.tensor_io import ShardReader

    inner = model.get_base_model() if hasattr(model, "get_base_model") else model
    linears = adapted_linears(model)
    readers = [ShardReader(w) for w in teacher_weights]
    where = {n: r for r in readers for n in r.names()}
    comps, scales = {}, {}
    try:
        inputs = capture_inputs(inner, calib)
        for i, block in enumerate(decoder_layers(inner)):
            mine = [m for m in targets if m.startswith(f"model.layers.{i}.")]
            # AWQ's scales are fitted, and the LoRA carried over, before the block runs; otherwise the
            # layer is probed after its first forward, as kernels that set up state on it expect
            weights = {m: _weights(m, linears[m], where, spec) for m in mine} if rescaled else {}
            for m, (W, W_hat) in weights.items():
                r, c = scales[m] = channel_scales(W, W_hat)
                W.mul_(r[:, None]).mul_(c[None, :])
                layer = linears[m]
                for key in getattr(layer, "lora_A", {}):
                    layer.lora_A[key].weight.data.mul_(c[None, :].to(layer.lora_A[key].weight))
                    layer.lora_B[key].weight.data.mul_(r[:, None].to(layer.lora_B[key].weight))
            stats = {m: InputStats("hessian") for m in mine}
            handles = [linears[m].register_forward_hook(lambda mod, args, out, s=stats[m]: s.add(args[0])) for m in mine]
            try:
                inputs = list(block_outputs(block, inputs))
            finally:
                for h in handles:
                    h.remove()
            for m in mine:
                W, W_hat = weights.pop(m) if rescaled else _weights(m, linears[m], where, spec)
                comps[m] = compensate(W - W_hat, stats[m].xtx, spec.rank, spec.space)
            if on_block is not None:
                on_block(1)
    finally:
        for r in readers:
            r.file.close()
    return comps, {m: c.removed for m, c in comps.items()}, scales


def channel_scales_of(base_art, teacher_art, modules: list[str]) -> dict:
    """{module: (r, c)} with the base's dequantized weight ~ diag(r) W_teacher diag(c), one
    module's two weights read at a time (a base that moved channel scales: AWQ)."""
    import torch

    from calora_cli.methods.ca_lora.compensation import channel_scales
    from calora_cli.streaming import LayerSource
    from calora_cli.tensor_io import ShardReader

    source = LayerSource(base_art.path, base_art.weights, torch.float32, torch.device("cpu"))
    readers = [ShardReader(w) for w in teacher_art.weights]
    where = {n: r for r in readers for n in r.names()}
    try:
        scales = {}
        for m in modules:
            name = f"{m}.weight"
            W_hat = source.dequantized(name)
            if name not in where or W_hat is None:
                raise CaloraError(f"cannot fit {m}'s channel scales: the teacher or the base has no quantized weight {name}")
            W = where[name].get_tensor(name).float()
            if W.shape != W_hat.shape:
                raise CaloraError(f"shape mismatch at {m}: teacher {tuple(W.shape)}, compressed model {tuple(W_hat.shape)}")
            scales[m] = channel_scales(W, W_hat)
        return scales
    finally:
        source.close()
        for r in readers:
            r.file.close()


def _weights(m: str, layer, where: dict, spec: CompensateSpec):
    """The teacher's weight of module `m` and what the compressed layer computes with, checked."""
    name = f"{m}.weight"
    if name not in where:
        raise CaloraError(f"the teacher has no weight {name}")
    W = where[name].get_tensor(name).float()
    W_hat = layer_weight(getattr(layer, "base_layer", layer))
    if W.shape != W_hat.shape:
        raise CaloraError(f"shape mismatch at {m}: teacher {tuple(W.shape)}, compressed model {tuple(W_hat.shape)}")
    if spec.rank > min(W.shape):
        raise CaloraError(f"--compensate {spec.rank} exceeds the rank of {m} ({min(W.shape)})")
    return W, W_hat


def combined_lora(config: dict, factors: dict, comps: dict) -> tuple[dict, dict]:
    """One peft LoRA (config, state) whose delta is each module's LoRA delta plus its compensation."""
    import torch

    from calora_cli.arch import PEFT_PREFIX

    state, ranks = {}, {}
    for m in sorted(set(factors) | set(comps)):
        As, Bs = [], []
        if m in factors:
            As.append(factors[m].A.float())
            Bs.append(factors[m].B.float() * factors[m].scale)
        if m in comps:
            As.append(comps[m].A)
            Bs.append(comps[m].B)
        A, B = torch.cat(As), torch.cat(Bs, dim=1)
        state[f"{PEFT_PREFIX}{m}.lora_A.weight"] = A.contiguous()
        state[f"{PEFT_PREFIX}{m}.lora_B.weight"] = B.contiguous()
        ranks[m] = A.shape[0]
    top = max(ranks.values())
    new = {k: v for k, v in config.items() if k not in ("rank_pattern", "alpha_pattern")}
    new.update(r=top, lora_alpha=top, use_rslora=False, use_dora=False,
               target_modules=sorted({m.rsplit(".", 1)[-1] for m in ranks}),
               # scaling 1 everywhere: alpha equals the rank, module by module
               rank_pattern={m: r for m, r in ranks.items() if r != top},
               alpha_pattern={m: r for m, r in ranks.items() if r != top})
    return json.loads(json.dumps(new)), state
