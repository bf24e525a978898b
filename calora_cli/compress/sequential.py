"""Block-by-block calibration, as GPTQ's reference, Wanda and SparseGPT do it.

Capture the inputs of decoder block 0 for the calibration batch, then for each block: gather the
statistics its linears need from one pass, compress them, run the block again so its outputs
(with compression error included) become the next block's inputs.

The blocks come from `blocks`: the decoder layers of a model in memory, or streaming.LayerSource's
generator, which materializes one layer from the checkpoint at a time and writes and frees it once
it is done; activations go through `keep` (a list, or streaming.Activations, which spills beyond a
bound). The same code therefore runs in memory and streamed, and gives the same tensors.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Iterator

from calora_cli.arch import LAYERS_PREFIX, block_linears, decoder_layers
from calora_cli.compress.masks import zeros

if TYPE_CHECKING:
    import torch

Captured = list[tuple["torch.Tensor", dict]]


class _Stop(Exception):
    pass


def capture_inputs(model, calib: "torch.Tensor", batch_size: int = 8) -> Captured:
    """Hidden states (and the keyword arguments) entering decoder block 0, one entry per micro-batch."""
    return capture_batches(model, ({"input_ids": calib[i : i + batch_size]} for i in range(0, calib.shape[0], batch_size)))


def capture_batches(model, batches) -> Captured:
    """What enters decoder block 0 for each batch of model inputs (input_ids, attention_mask):
    its hidden states and keyword arguments (position embeddings, mask), one entry per batch.
    Nothing past block 0 runs, so a skeleton with only its embedding materialized will do."""
    import torch

    layers = decoder_layers(model)
    captured: Captured = []

    def hook(module, args, kwargs):
        kwargs = dict(kwargs)
        hs = args[0] if args else kwargs.pop("hidden_states")
        captured.append((hs.detach(), kwargs))
        raise _Stop

    handle = layers[0].register_forward_pre_hook(hook, with_kwargs=True)
    device = next(model.parameters()).device
    try:
        with torch.no_grad():
            for batch in batches:
                try:
                    model(**{k: v.to(device) for k, v in batch.items()}, use_cache=False)
                except _Stop:
                    pass
    finally:
        handle.remove()
    return captured


def block_outputs(block, inputs) -> Iterator[tuple["torch.Tensor", dict]]:
    """The block's output for each micro-batch of inputs, one at a time."""
    import torch

    with torch.no_grad():
        for hs, kw in inputs:
            y = block(hs, **kw)
            yield (y[0] if isinstance(y, tuple) else y), kw


def run_block(block, inputs) -> Captured:
    return list(block_outputs(block, inputs))


def _release(activations) -> None:
    """Drop a generation of activations (and its spilled files) once nothing reads it."""
    if hasattr(activations, "drop"):
        activations.drop()


@dataclass
class InputStats:
    """Running statistics of a linear layer's inputs: what Wanda ("norms") or SparseGPT and GPTQ
    ("hessian") need; `needs` names one, several, or none."""

    needs: "str | frozenset[str] | None"
    tokens: int = 0
    sq_sum: "torch.Tensor | None" = None
    xtx: "torch.Tensor | None" = None
    scaled: bool = False  # xtx already turned into the Hessian, in place

    def __post_init__(self) -> None:
        self.needs = needs_of(self.needs)

    def add(self, x: "torch.Tensor") -> None:
        x = x.reshape(-1, x.shape[-1]).float()
        self.tokens += x.shape[0]
        if "norms" in self.needs:
            s = (x**2).sum(0)
            self.sq_sum = s if self.sq_sum is None else self.sq_sum + s
        if "hessian" in self.needs:
            h = x.T @ x
            self.xtx = h if self.xtx is None else self.xtx + h

    def take_hessian(self) -> "torch.Tensor":
        """The Hessian, handed over: these statistics no longer hold it, so the consumer can free it
        as soon as it has made its own (permuted) copy."""
        h = self.hessian
        self.xtx = None
        return h

    @property
    def sq_mean(self) -> "torch.Tensor":
        return self.sq_sum / self.tokens

    @property
    def hessian(self) -> "torch.Tensor":
        """2 XᵀX / n, formed in place the first time (XᵀX itself is not needed again, and for a wide
        layer it is hundreds of MB): callers must not modify it."""
        if not self.scaled:
            self.xtx.mul_(2).div_(self.tokens)  # the same rounding as 2 * xtx / tokens
            self.scaled = True
        return self.xtx


def needs_of(*needs) -> frozenset[str]:
    """The union of what several methods need (each a name, a set of names, or None)."""
    out: set[str] = set()
    for n in needs:
        if isinstance(n, str):
            out.add(n)
        elif n:
            out.update(n)
    return frozenset(out)


def collect_stats(block, inputs, needs, keep: Callable = list, only=None) -> tuple[dict[str, InputStats], Captured]:
    """One pass of the block: statistics of its linears' inputs (those named in `only`, or all),
    and the block's outputs."""
    linears = block_linears(block)
    names = list(linears) if only is None else only
    stats = {name: InputStats(needs) for name in names}
    handles = [
        linears[name].register_forward_hook(lambda mod, args, out, s=stats[name]: s.add(args[0])) for name in names
    ] if needs_of(needs) else []
    try:
        outputs = keep(block_outputs(block, inputs))
    finally:
        for h in handles:
            h.remove()
    return stats, outputs


def relative_error(reference: Captured, got: Captured) -> float:
    """||got - ref||^2 / ||ref||^2 over every calibration token and channel."""
    num = sum(((g - r).double() ** 2).sum().item() for (g, _), (r, _) in zip(got, reference))
    den = sum((r.double() ** 2).sum().item() for r, _ in reference)
    return num / den if den else 0.0


@dataclass
class BlockReport:
    index: int
    rate: float | None
    sparsity: dict[str, float] = field(default_factory=dict)
    rel_error: float = 0.0
    zeros: int = 0
    elements: int = 0


def prune_sequential(
    model,
    calib: "torch.Tensor | None",
    rates: list[float] | None,
    prune_fn: Callable | None,
    needs,
    nm: tuple[int, int] | None,
    on_block: Callable[..., None] | None = None,
    blocks=None,
    keep: Callable = list,
    quantize: Callable | None = None,
    on_quantized: Callable[[int, dict], None] | None = None,
    quantize_needs="hessian",
    pruner_compensates: bool = False,
) -> Iterator[BlockReport]:
    """Prune (`prune_fn`), quantize (`quantize`), or both, every linear of every decoder block in
    place; yield a report per block.

    Pruning alone takes every linear's statistics from one pass of the dense block. With
    `quantize(name, weight, stats, keep) -> gptq.Quantized` needing input statistics
    (`quantize_needs`: GPTQ's Hessian), the block's linears are solved group by group in execution
    order (arch.sequential_groups), each group's statistics from the block with the earlier groups
    already compressed (round-to-nearest needs none: one pass); a pruned linear is quantized with its own mask, so
    its zeros stay zero (joint). Unless the pruner already compensated what it removed
    (`pruner_compensates`: SparseGPT), the quantizer is handed the dense weights under the mask, so
    GPTQ compensates the removal as it does rounding. `on_quantized(i, {linear: packed parts})`
    receives what replaces block i's weights in the output. Without calibration data (magnitude),
    blocks are pruned from their weights alone and no output error is measured. `blocks`/`keep`: see the module's docstring.
    """
    import torch

    from calora_cli.arch import sequential_groups

    solves = quantize is not None and bool(needs_of(quantize_needs))
    needs = needs_of(needs, quantize_needs if solves else None)
    # GPTQ runs the calibration windows one at a time, as optimum does for gptqmodel's solver: the
    # Hessians then sum in the reference's order (GPTQ is sensitive to last-bit differences)
    micro = 1 if solves else 8
    inputs = keep(capture_inputs(model, calib, batch_size=micro)) if calib is not None else None
    for i, block in enumerate(decoder_layers(model) if blocks is None else blocks):
        report = BlockReport(i, rates[i] if rates else None)
        linears = block_linears(block)
        packed = {}
        if inputs is None:
            stats, dense_out = {}, None
            stages = [list(linears)]
        elif not solves:
            stats, dense_out = collect_stats(block, inputs, needs, keep)
            stages = [list(linears)]
        else:
            stages = sequential_groups(linears)
            dense_out = None
        for k, names in enumerate(stages):
            if solves:
                stats, out = collect_stats(block, inputs, needs, keep, only=names)
                if k == 0:
                    dense_out = out  # nothing of the block is compressed yet
                else:
                    _release(out)
            with torch.no_grad():
                for name in names:
                    lin = linears[name]
                    new = dense = lin.weight.data
                    if prune_fn is not None:
                        new = prune_fn(dense, stats.get(name), rates[i], nm)
                    if quantize is not None:
                        mask = (new != 0) if prune_fn is not None else None
                        # magnitude/Wanda leave the kept weights as they were: the solve then starts
                        # from the dense weights, so the pruned ones' error lands on the kept ones
                        target = new if pruner_compensates else dense
                        q = quantize(name, target, stats.get(name), mask)
                        new, packed[name] = q.weight, q.parts
                    lin.weight.data.copy_(new)
                    z, n = zeros([lin.weight.data])
                    report.sparsity[name] = z / n
                    report.zeros += z
                    report.elements += n
        if inputs is not None:
            previous, inputs = inputs, keep(block_outputs(block, inputs))
            _release(previous)
            report.rel_error = relative_error(dense_out, inputs)
            _release(dense_out)
        if on_quantized is not None:
            on_quantized(i, packed)
        if on_block is not None:
            on_block(1)
        yield report


def input_grams(model, calib: "torch.Tensor", blocks=None, keep: Callable = list) -> list["torch.Tensor"]:
    """The n x n Gram matrix of each decoder block's input (each sample flattened), dense model."""
    import torch

    grams = []
    inputs = keep(capture_inputs(model, calib, batch_size=calib.shape[0]))
    for block in decoder_layers(model) if blocks is None else blocks:
        x = torch.cat([hs.reshape(hs.shape[0], -1) for hs, _ in inputs]).double()
        grams.append(x @ x.T)
        previous, inputs = inputs, keep(block_outputs(block, inputs))
        _release(previous)
    return grams


def block_errors(model, calib: "torch.Tensor", dense_block: Callable[[int], "torch.nn.Module"]) -> list[float]:
    """Relative output error of each (already compressed) block against a dense twin, on the same inputs.

    `dense_block(i)` builds block i with the uncompressed weights; one is alive at a time.
    """
    inputs = capture_inputs(model, calib)
    errors = []
    for i, block in enumerate(decoder_layers(model)):
        ref_block = dense_block(i).to(inputs[0][0].device, inputs[0][0].dtype)
        reference = run_block(ref_block, inputs)
        del ref_block
        inputs = run_block(block, inputs)
        errors.append(relative_error(reference, inputs))
    return errors


def block_errors_against(model, src_weights: list[Path], calib) -> dict:
    """Relative output error of each (compressed) block against the same block with the weights
    stored in `src_weights` (the uncompressed model's safetensors files), read one block at a time."""
    if calib is None:
        return {}
    from calora_cli.tensor_io import load_tensors

    layer_cls = type(decoder_layers(model)[0])
    config = model.config

    def dense_block(i: int):
        block = layer_cls(config, layer_idx=i)
        prefix = f"{LAYERS_PREFIX}{i}."
        state = load_tensors(src_weights, lambda name: name.startswith(prefix))
        block.load_state_dict({k[len(prefix):]: v for k, v in state.items()})
        return block.eval()

    errs = block_errors(model, calib, dense_block)
    return {"block_rel_error": errs, "mean_block_rel_error": sum(errs) / len(errs)}
