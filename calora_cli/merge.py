"""`calora merge`: fold adapters into a base, one tensor at a time, keeping sparsity when asked.

Dense and pruned bases: W' = W + sum_k w_k s_k B_k A_k (masked to W != 0 when sparsity is kept).
GPTQ bases: each adapted linear is dequantized, merged, and re-quantized round-to-nearest onto a
fresh grid with the same bits, group size and groups (peft refuses to merge into GPTQ layers);
`--dense` instead writes every linear dequantized and drops the quantization config; AWQ and
compressed-tensors bases (formats/) merge with --dense only.
"""

from __future__ import annotations

import json
import logging
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from calora_cli.adapters import is_kind
from calora_cli.artifacts import (
    atomic_output,
    check_output,
    companion_files,
    open_artifact,
    read_safetensors_header,
    write_manifest,
)
from calora_cli.errors import CaloraError
from calora_cli.progress import progress
from calora_cli.run import RunOptions, check_fits, open_model
from calora_cli.tensor_io import ReadBuffers, ShardReader, dtype_code, tensor_names, write_tensors

if TYPE_CHECKING:
    from calora_cli.formats import Layout

log = logging.getLogger(__name__)


GRIDS = ("fresh", "keep")


@dataclass
class Gptq:
    """What re-quantizing needs from a GPTQ base's quantization_config."""

    bits: int
    sym: bool
    v1: bool
    grid: str = "fresh"

    @classmethod
    def from_config(cls, q: dict, grid: str) -> "Gptq":
        from calora_cli.compress.gptq_format import check_bits, is_v1

        check_bits(q["bits"])
        return cls(bits=q["bits"], sym=bool(q.get("sym", True)), v1=is_v1(q), grid=grid)


def _quantization(config: dict, grid: str, dense: bool, where) -> tuple["Layout | None", Gptq | None]:
    """The base's quantized layout (formats/) and, for a GPTQ base merged into GPTQ, what
    re-quantizing needs. AWQ and compressed-tensors bases merge with --dense only."""
    from calora_cli.formats import is_load_time, layout_of

    if is_load_time(config):
        raise CaloraError(
            "merging into a bitsandbytes base is not supported: bitsandbytes quantizes when the model loads, so merge "
            "into the unquantized model and `calora compress` the result with the same method"
        )
    layout = layout_of(config, where)
    if layout is None or layout.method != "gptq":
        if layout is not None and not dense:
            raise CaloraError(f"{where} is {layout.describe()}, and merge re-quantizes into GPTQ only: pass --dense to "
                              "write the merged model dequantized (then compress it again), or keep the adapter apart")
        return layout, None
    return layout, Gptq.from_config(config["quantization_config"], grid)


class _Folder:
    """Adds the planned deltas to weights and keeps the counts the report needs."""

    def __init__(self, plan: dict, keep: bool, advance, extras=None):
        from calora_cli.adapters.lora import Extras

        self.plan, self.keep, self.advance = plan, keep, advance
        self.extras = extras if extras is not None else Extras()
        self.targets = self.extras.targets()
        self._work = ReadBuffers(slots=1)  # the float32 copy of a half-precision layer, reused
        self.stats = {"merged_modules": 0, "zeros_before": 0, "zeros_after": 0, "elements": 0,
                      "requant_error": 0.0, "delta_kept": 0.0, "requantized": 0}

    def _factors(self, module: str, W) -> list:
        """The module's (weight, factors), each checked against the base weight's shape."""
        for _, f in self.plan[module]:
            if f.shape != tuple(W.shape):
                raise CaloraError(f"shape mismatch at {module}: the base weight is {tuple(W.shape)}, the adapter's delta {f.shape}")
        return self.plan[module]

    def delta(self, module: str, W):
        (w0, f0), *rest = self._factors(module, W)
        delta = f0.delta().mul_(w0)
        for w, f in rest:
            delta.add_(f.delta(), alpha=w)
        delta = delta.mul_(W != 0) if self.keep else delta
        if module in self.extras.magnitude:
            merged = W.float() + delta
            delta = self._renormed(module, merged).sub_(W.float())
        return delta

    def _renormed(self, module: str, merged):
        """DoRA, as peft merges it: each output row of the merged weight rescaled to the adapter's
        magnitude (the norm of the weight it is merged into: this base's, a compressed one's when
        the base is compressed). Zeros stay zeros: a row is only scaled."""
        m = self.extras.magnitude[module].float()
        if m.shape != (merged.shape[0],):
            raise CaloraError(f"shape mismatch at {module}: DoRA magnitude {tuple(m.shape)}, weight {tuple(merged.shape)}")
        return merged.mul_((m / merged.norm(dim=1)).unsqueeze(1))

    def edit(self, name: str, t):
        """A base tensor `t` the adapter's extras change (Extras.targets): replaced by the adapter's
        copy, then its embedding LoRA added, token rows replaced, its lora_bias added."""
        import torch

        x = self.extras
        module = name.rsplit(".", 1)[0]
        if name in x.replaces:  # then the rest applies to the adapter's copy (an embedding saved beside its LoRA)
            new = x.replaces[name]
            if tuple(new.shape) != tuple(t.shape):
                raise CaloraError(f"shape mismatch at {name}: the base's is {tuple(t.shape)}, the adapter's copy "
                                  f"{tuple(new.shape)}")
            new = new.float().clone()
        else:
            new = t.float().clone()
        if module in x.embedding:
            f = x.embedding[module]
            if f.shape != tuple(new.shape):
                raise CaloraError(f"shape mismatch at {module}: the base table is {tuple(new.shape)}, the adapter's "
                                  f"embedding LoRA {f.shape}")
            f.add_to(new)
        if module in x.tokens:
            rows, values = x.tokens[module]
            if max(rows) >= new.shape[0] or values.shape[1] != new.shape[1]:
                raise CaloraError(f"the adapter's trainable tokens do not fit {name} {tuple(new.shape)}")
            new.index_copy_(0, torch.tensor(rows), values.float())
        if name.endswith(".bias") and module in x.bias:
            new.add_(x.bias[module])
        return new.to(t.dtype)

    def count(self, zeros_before: int, new) -> None:
        import torch

        self.stats["merged_modules"] += 1
        self.stats["zeros_before"] += zeros_before
        self.stats["zeros_after"] += new.numel() - int(torch.count_nonzero(new))
        self.stats["elements"] += new.numel()
        self.advance()

    def dense(self, module: str, W):
        import torch

        # count_nonzero: several times faster than summing a (W == 0) mask on big layers
        zeros = W.numel() - int(torch.count_nonzero(W))
        zero = (W == 0) if self.keep and zeros else None  # taken before W changes (float32 W is updated in place)
        # W is this merge's own copy: each adapter's product accumulates into it (float32 W in place,
        # others in a float32 buffer kept for the next layer), no delta is materialized
        if W.dtype == torch.float32:
            new = W
        else:
            new = self._work.take(4 * W.numel()).view(torch.float32).view(W.shape).copy_(W)
        for w, f in self._factors(module, W):
            f.add_to(new, w)
        if zero is not None:
            new.masked_fill_(zero, 0)
        if module in self.extras.magnitude:
            self._renormed(module, new)
        new = W.copy_(new)  # rounds as .to(W.dtype) does, into memory already there
        self.count(zeros, new)
        return new

    def requantized(self, module: str, parts: dict, gptq: Gptq) -> dict:
        import torch

        from calora_cli.compress.gptq_format import (
            dequantize,
            quantize_rtn,
            round_onto_grid,
        )

        W = dequantize(parts, gptq.bits, gptq.v1)
        delta = self.delta(module, W)
        if gptq.grid == "keep":  # the layer's own scales and zero points
            new = round_onto_grid(W + delta, parts, gptq.bits, gptq.v1)
        else:
            new = quantize_rtn(W + delta, parts["g_idx"], gptq.bits, gptq.sym, gptq.v1, parts["scales"].dtype)
        W_new = dequantize(new, gptq.bits, gptq.v1)
        # how far re-quantizing moved the merged weight, and how much of the delta survived the grid
        self.stats["requant_error"] += float((W_new - W - delta).norm() / (W + delta).norm().clamp_min(1e-12))
        self.stats["delta_kept"] += float(((W_new - W) * delta).sum() / (delta * delta).sum().clamp_min(1e-30))
        self.stats["requantized"] += 1
        self.count(W.numel() - int(torch.count_nonzero(W)), W_new)
        return new


def _dense_dtype(config: dict):
    import torch

    name = config.get("dtype") or config.get("torch_dtype") or "float32"
    return getattr(torch, name) if isinstance(getattr(torch, name, None), torch.dtype) else torch.float32


def _merge_shard(src: Path, dst: Path, folder: _Folder, layout, gptq: Gptq | None, dense: bool, dense_dtype,
                 added: list = ()) -> str:
    """Merge one shard into dst; returns its sha256 (computed while writing). A quantized linear's
    stored parts are re-quantized (GPTQ) or, with --dense, replaced by its merged float weight."""
    from calora_cli.compress.gptq_format import PARTS

    header = read_safetensors_header(src)
    names = tensor_names(src)
    stored: dict[str, list[str]] = {}  # quantized module -> its stored tensors
    if layout is not None:
        for m in sorted({n.rpartition(".")[0] for n in names}):
            parts = layout.parts(m, header)
            if parts:
                lost = [p for p in parts if p not in header]
                if lost:
                    raise CaloraError(f"{src.name}: quantized layer {m} has no {lost[0]} in the same file")
                stored[m] = parts
    done: dict[str, dict] = {}
    buffers = ReadBuffers()  # each tensor read is written before the read after next, as ReadBuffers needs
    with ShardReader(src) as f:
        entries = []
        for n in names:
            module = n.rpartition(".")[0]
            if module in stored and n in stored[module]:
                if dense:
                    if n == stored[module][0]:  # one float weight where its parts were
                        shape = layout.dense_shape(module, header, f.get_tensor)
                        entries.append((f"{module}.weight", dtype_code(dense_dtype), shape))
                    continue
            entries.append((n, header[n]["dtype"], header[n]["shape"]))
        extra = dict(added)
        entries += [(n, header["model.embed_tokens.weight"]["dtype"], list(t.shape)) for n, t in extra.items()]

        def produce(name: str):
            module, _, part = name.rpartition(".")
            # a quantized layer's merged float weight (--dense), or its GPTQ parts re-quantized; its
            # bias (Qwen2's q/k/v) is stored plain and passes through
            if module in stored and dense and part == "weight":
                W = layout.dequantize(module, {p: f.get_tensor(p) for p in stored[module]})
                return folder.dense(module, W).to(dense_dtype) if module in folder.plan else W.to(dense_dtype)
            if module in stored and name in stored[module] and module in folder.plan:
                if module not in done:
                    done[module] = folder.requantized(module, {p: f.get_tensor(f"{module}.{p}") for p in PARTS}, gptq)
                return done[module].pop(part)
            if part == "weight" and module in folder.plan:
                return folder.dense(module, f.get_tensor(name, buffers))
            if name in extra:  # a tied head's own table, in the embedding's dtype
                if isinstance(extra[name], str):
                    return f.raw(extra[name], buffers)
                return extra[name].to(f.get_tensor("model.embed_tokens.weight", buffers).dtype)
            if name in folder.targets:
                return folder.edit(name, f.get_tensor(name, buffers))
            return f.raw(name, buffers)  # unchanged: copied in chunks, never held whole

        return write_tensors(dst, entries, produce, header.get("__metadata__"), hashed=True)


SHARD_WORKERS = 2


def _merge_shards(base_art, tmp: Path, plan: dict, keep: bool, advance, layout, gptq: Gptq | None, dense: bool,
                  dense_dtype, extras=None, added: dict | None = None):
    """Merge every shard into tmp, SHARD_WORKERS shards at a time on threads (file reads and writes,
    hashing and torch's arithmetic all release the GIL, so one shard's I/O overlaps another's
    compute: alone, the reading, the adapters' products and the hashing of a shard run one after
    another). Each shard counts into its own folder, summed in shard order, so the manifest's
    floats do not depend on which thread finished first. Returns ({shard: sha256}, stats)."""
    from concurrent.futures import ThreadPoolExecutor

    shards = list(base_art.weights)
    folders = [_Folder(plan, keep, advance, extras) for _ in shards]
    with ThreadPoolExecutor(max_workers=max(1, min(SHARD_WORKERS, len(shards)))) as pool:
        futures = [pool.submit(_merge_shard, shard, tmp / shard.relative_to(base_art.path), f, layout, gptq, dense, dense_dtype,
                               (added or {}).get(shard, ()))
                   for shard, f in zip(shards, folders)]
        try:
            digests = [future.result() for future in futures]
        except BaseException:
            for future in futures:  # the first failure ends the merge: start no further shard
                future.cancel()
            raise
    stats = {k: sum(f.stats[k] for f in folders) for k in folders[0].stats}
    return {s.relative_to(base_art.path).as_posix(): d for s, d in zip(shards, digests)}, stats


def _reindex(folder: Path) -> None:
    """Rebuild a sharded model's index from its shards (dequantizing renamed and dropped tensors)."""
    from calora_cli.tensor_io import tensor_bytes

    for index in folder.glob("*.safetensors.index.json"):
        doc = json.loads(index.read_text())
        weight_map, total = {}, 0
        for shard in sorted(set(doc["weight_map"].values())):
            for name in tensor_names(folder / shard):
                weight_map[name] = shard
            total += tensor_bytes(folder / shard)
        doc["weight_map"] = dict(sorted(weight_map.items()))
        doc.setdefault("metadata", {})["total_size"] = total
        index.write_text(json.dumps(doc, indent=2) + "\n")


def merge(base: Path, adapters: list[Path], out: Path, opts: RunOptions, weights: list[float] | None = None,
          keep_sparsity: bool = False, dense: bool = False, grid: str = "fresh") -> dict:
    check_output(out, opts.force)
    if not adapters:
        raise CaloraError("give at least one --adapter")
    weights = weights if weights is not None else [1.0] * len(adapters)
    if len(weights) != len(adapters):
        raise CaloraError(f"--weights has {len(weights)} values for {len(adapters)} adapters")
    base_art = open_model(base, "base")
    config = json.loads((base_art.path / "config.json").read_text())
    if base_art.gguf and not dense:
        raise CaloraError(f"{base_art.source or base_art.path} is a GGUF: merge it into a dense model (--dense), or keep "
                          "the adapter apart for llama.cpp to apply at run time (calora export --adapter)")
    if grid not in GRIDS:
        raise CaloraError(f"--grid must be one of {', '.join(GRIDS)}, got {grid!r}")
    layout, gptq = _quantization(config, grid, dense, base_art.source or base_art.path)
    if dense and layout is None:
        log.warning("--dense has no effect: the base is not quantized")
    arts = [open_artifact(a, expect="adapter", role="adapter") for a in adapters]
    for art in arts:
        if is_kind(art, "recovery"):
            raise CaloraError(
                f"adapter {art.path} carries CA-LoRA recovery modules, which are non-linear (GELU) and cannot be folded "
                "into weights; deploy the compressed model with the adapter attached (calora eval --adapter)"
            )
    plan, extras = _plan(arts, weights, base_art, opts)
    keep = keep_sparsity or any(is_kind(art, "masked") for art in arts)
    if base_art.gguf:
        return _merge_gguf(base_art, config, arts, plan, keep, weights, out, opts, extras)
    names = {shard: tensor_names(shard) for shard in base_art.weights}
    added = _added_tensors(extras, names, config, gptq is not None and not dense)
    have = {n for ns in names.values() for n in ns}
    missing = sorted(m for m in plan if f"{m}.weight" not in have and not (layout and layout.parts(m, have)))
    if missing:
        raise CaloraError(f"the base has no weight {missing[0]} that the adapter adapts ({len(missing)} missing)")

    with atomic_output(out, opts.force) as tmp, progress("merge", len(plan), opts.show_progress) as advance:
        for f in companion_files(base_art.path, with_index=True):  # same shard names: the index still holds
            shutil.copy2(f, tmp / f.name)
        if layout and dense:
            config.pop("quantization_config")
            (tmp / "quantize_config.json").unlink(missing_ok=True)
        if added:  # a tied head given its own copy (modules_to_save): the merged model unties it, as peft's does
            config["tie_word_embeddings"] = False
        if (layout and dense) or added:
            (tmp / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
        hashes, stats = _merge_shards(base_art, tmp, plan, keep, advance, layout, gptq, dense, _dense_dtype(config),
                                      extras, added)
        if (layout and dense) or added:
            _reindex(tmp)
        n = max(1, stats["elements"])
        metrics = {
            "merged_modules": stats["merged_modules"],
            "sparsity_before": stats["zeros_before"] / n,
            "sparsity_after": stats["zeros_after"] / n,
            "zeros_filled": max(0, stats["zeros_before"] - stats["zeros_after"]),
        }
        if stats["requantized"]:
            metrics["requant_rel_error"] = stats["requant_error"] / stats["requantized"]
            metrics["delta_kept"] = stats["delta_kept"] / stats["requantized"]
        inputs = {"base": base_art.input_record(), **{f"adapter{i}": a.input_record() for i, a in enumerate(arts)}}
        params = {"weights": weights, "keep_sparsity": keep, "adapters": len(arts)}
        if layout:
            params["quantized"] = "dense" if dense else f"gptq{gptq.bits} re-quantized round-to-nearest, {grid} grid"
        write_manifest(tmp, kind="model", stage="merge", params=params, inputs=inputs, metrics=metrics,
                       lineage=base_art.lineage, known_hashes=hashes)
    # a GPTQ layer's zero codes are values, not pruning, unless the base was pruned before GPTQ
    pruned = layout is None or bool((base_art.manifest or {}).get("params", {}).get("sparsity"))
    if metrics["zeros_filled"] and not keep and pruned:
        log.warning(f"the merge filled {metrics['zeros_filled']} zeros of the base's adapted layers "
                  f"(sparsity {metrics['sparsity_before']:.1%} -> {metrics['sparsity_after']:.1%}); "
                  "use --keep-sparsity or a sparsified adapter to keep them")
    return {"output": str(out), **metrics}


def _plan(arts, weights, base_art, opts: RunOptions):
    """Each adapted linear's (weight, factors) list, and the one adapter's Extras (DoRA magnitudes,
    modules_to_save copies, embedding LoRA, trainable tokens, lora_bias): peft merges such an adapter
    on its own, so it merges alone and at weight 1 here too."""
    from calora_cli.adapters import lora_files
    from calora_cli.adapters.lora import Extras, check_config, extras, linear_factors

    plan: dict[str, list] = {}
    found = Extras()
    for art, w in zip(arts, weights):
        check_fits(art, base_art, opts)
        config, state = lora_files(art)
        check_config(config)
        x = extras(state, config)
        if x and (len(arts) > 1 or w != 1.0):
            raise CaloraError(f"adapter {art.path} holds more than LoRA factors (DoRA, modules_to_save, embedding LoRA, "
                              "trained tokens or biases), which merge as peft merges them: one adapter at weight 1; "
                              "merge it alone, then the others into the result")
        found = x or found
        for module, f in linear_factors(state, config).items():
            plan.setdefault(module, []).append((w, f))
    return plan, found


def _added_tensors(extras, names: dict, config: dict, quantized: bool) -> dict:
    """{shard: [(name, tensor or the base tensor's name)]} of what the merge writes that the base has
    no tensor for, in the embedding's shard: a tied head's own copy (modules_to_save on lm_head), or
    the tied head's original table when the embedding's LoRA changes the embedding (peft's forward
    adds it to the lookup only); anything else refused."""
    have = {n for ns in names.values() for n in ns}
    emb, head = "model.embed_tokens.weight", "lm_head.weight"
    tied = head not in have and config.get("tie_word_embeddings", True)
    heads = []
    if tied and "model.embed_tokens" in extras.embedding and head not in extras.replaces:
        heads.append((head, extras.replaces.get(emb, emb)))
    for target in sorted(extras.targets() - have):
        if quantized and target.removesuffix(".weight") + ".qweight" in have:
            raise CaloraError(f"the adapter replaces {target}, a GPTQ layer of the base: merge into a dense model "
                              "(--dense)")
        if target == head and tied and target in extras.replaces:
            heads.append((head, extras.replaces[head]))
            continue
        what = "lora_bias adds to a bias" if target.endswith(".bias") else "the adapter changes it"
        raise CaloraError(f"the base has no tensor {target} ({what}); peft could not merge it either")
    return {next(s for s, ns in names.items() if emb in ns): heads} if heads else {}


def _merge_gguf(base_art, config: dict, arts, plan: dict, keep: bool, weights, out: Path, opts: RunOptions,
                extras=None) -> dict:
    """A GGUF base merged into a dense safetensors model: each tensor dequantized as llama.cpp holds
    it (gguf/reader.py), the adapters' deltas added, written in config.json's dtype one at a time."""
    import torch

    from calora_cli.gguf.reader import GGUFTensors

    source = GGUFTensors(base_art.weights[0], config)
    missing = sorted(set(plan) - {n.removesuffix(".weight") for n in source.where})
    if missing:
        raise CaloraError(f"the base has no weight {missing[0]} that the adapter adapts ({len(missing)} missing)")
    dtype = _dense_dtype(config)
    names = sorted(source.where)
    entries = [(n, dtype_code(dtype), source.shape(n)) for n in names]
    folder = _Folder(plan, keep, lambda: None, extras)
    missing = sorted(folder.targets - set(names))
    if missing:
        raise CaloraError(f"the base has no tensor {missing[0]} that the adapter changes")
    with atomic_output(out, opts.force) as tmp, progress("merge", len(names), opts.show_progress) as advance:
        for f in companion_files(base_art.path):
            shutil.copy2(f, tmp / f.name)

        def produce(name: str) -> "torch.Tensor":
            t = source.get_tensor(name)
            module = name.removesuffix(".weight")
            if name.endswith(".weight") and module in plan:
                t = folder.dense(module, t)
            elif name in folder.targets:
                t = folder.edit(name, t)
            advance(1)
            return t.to(dtype).contiguous()

        digest = write_tensors(tmp / "model.safetensors", entries, produce, {"format": "pt"}, hashed=True)
        stats = folder.stats
        n = max(1, stats["elements"])
        metrics = {"merged_modules": stats["merged_modules"], "sparsity_before": stats["zeros_before"] / n,
                   "sparsity_after": stats["zeros_after"] / n}
        inputs = {"base": base_art.input_record(), **{f"adapter{i}": a.input_record() for i, a in enumerate(arts)}}
        params = {"weights": weights, "keep_sparsity": keep, "adapters": len(arts), "quantized": "dense (from GGUF)"}
        write_manifest(tmp, kind="model", stage="merge", params=params, inputs=inputs, metrics=metrics,
                       lineage=base_art.lineage, known_hashes={"model.safetensors": digest})
    source.close()
    return {"output": str(out), **metrics}
