"""One decoder layer at a time: read it from the checkpoint, run the activations through it, hand it
over, write it, free it.

A model larger than memory is never loaded whole. `LayerSource` builds the model's skeleton with
its weights on the meta device (buffers such as rotary tables are real), materializes the input
embedding so block 0's inputs can be captured, then materializes one decoder layer at a time from
the safetensors files, in the compute dtype, and frees it again. A bf16 checkpoint stays bf16 on
disk; only the layer being worked on is upcast. `LayerWriter` writes each finished layer at once into
the output, sharded as the input is, in the checkpoint's dtype, and copies every other tensor
byte for byte.

`Activations` holds what flows between layers: in memory up to a bound, spilled beyond it to a
folder inside the stage's temporary output directory (so a killed run leaves nothing behind).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import TYPE_CHECKING, Iterator

from calora_cli.arch import LAYERS_PREFIX, check_supported, decoder_layers
from calora_cli.errors import CaloraError
from calora_cli.tensor_io import ShardReader, TensorFileWriter

if TYPE_CHECKING:
    import torch

_LIBC = None


def return_freed_memory() -> None:
    """Give the memory of freed layers back to the system (glibc).

    glibc serves large allocations with mmap and returns them on free, but it raises that
    threshold each time such a block is freed (up to 32 MB), after which layer-sized tensors come
    from the heap and stay resident once freed: streaming one layer at a time then grew the
    resident set with the model's size (measured slope 0.6-0.7 GB per GB). Fixing the threshold
    low (mallopt) kept it flat but made every activation an mmap and its first touch a page fault:
    streamed Wanda on SmolLM2 took 1.45x as long. `malloc_trim` once per layer, after the layer is
    freed, returns the free heap pages instead, at the cost of one heap walk per layer."""
    import ctypes
    import ctypes.util

    global _LIBC
    if _LIBC is None:
        name = ctypes.util.find_library("c")
        try:
            _LIBC = ctypes.CDLL(name) if name else False
            _LIBC.malloc_trim  # noqa: B018  (not glibc: no trimming)
        except (OSError, AttributeError):
            _LIBC = False
    if _LIBC:
        _LIBC.malloc_trim(0)


class LayerSource:
    """A checkpoint's skeleton and tensors, read one module at a time."""

    def __init__(self, path: Path, weights: list[Path], compute_dtype: "torch.dtype", device: "torch.device"):
        from accelerate import init_empty_weights
        from transformers import AutoConfig, AutoModelForCausalLM

        from calora_cli.runtime import import_stack, library_chatter_hidden

        import_stack()
        self.path, self.compute_dtype, self.device = Path(path), compute_dtype, device
        config_dict = json.loads((self.path / "config.json").read_text())
        check_supported(config_dict, self.path)
        try:
            self.config = AutoConfig.from_pretrained(self.path, trust_remote_code=False, local_files_only=True)
        except (OSError, ValueError, KeyError) as e:
            raise CaloraError(f"cannot load model {path}: {str(e).strip().splitlines()[0]}") from e
        if len(weights) == 1 and Path(weights[0]).suffix == ".gguf":  # llama.cpp's file, dequantized tensor by tensor
            from calora_cli.gguf.reader import GGUFTensors

            self.readers = [GGUFTensors(weights[0], config_dict)]
            self.quantized = None
        else:
            from calora_cli.formats import layout_of

            self.readers = [ShardReader(w) for w in weights]
            self.quantized = layout_of(config_dict, path)  # GPTQ, AWQ, compressed-tensors: dequantized as read
        self.where = {n: r for r in self.readers for n in r.names()}
        with library_chatter_hidden(), init_empty_weights():
            self.model = AutoModelForCausalLM.from_config(self.config, dtype=compute_dtype)
        self.model.eval()
        for module in self.model.modules():  # the buffers (rotary tables) to the device; weights stay on meta
            for name, b in module._buffers.items():
                if b is not None and not b.is_meta:
                    module._buffers[name] = b.to(device)
        self.layers = decoder_layers(self.model)
        first = next((n for n in self.where if n.startswith(LAYERS_PREFIX) and n.endswith(".weight")), None)
        if first is None:
            raise CaloraError(f"cannot load model {path}: its weights hold no {LAYERS_PREFIX}* tensors")
        self.storage_dtype = self.read(first).dtype

    def close(self) -> None:
        for r in self.readers:
            r.file.close()

    def read(self, name: str) -> "torch.Tensor":
        import torch

        reader = self.where.get(name)
        if reader is None:
            raise CaloraError(f"cannot load model {self.path}: its weights have no tensor {name}")
        t = reader.get_tensor(name)
        if t.is_floating_point() and t.itemsize > 1 and not bool(torch.isfinite(t).all()):  # FP8 codes: checked dequantized
            raise CaloraError(f"model {self.path} has NaN or Inf values in {name}")
        return t

    def load(self, module, prefix: str) -> None:
        """Fill `module`'s meta parameters from the tensors named `prefix` + their name. A quantized
        checkpoint's linear weight (GPTQ, AWQ, compressed-tensors) is dequantized (in float32) into
        the dense skeleton's weight, so the layer computes what the codes stand for."""
        from accelerate.utils import set_module_tensor_to_device

        for name, p in list(module.named_parameters()):
            t = self.dequantized(prefix + name)
            if t is None:
                t = self.read(prefix + name)
            if tuple(t.shape) != tuple(p.shape):
                raise CaloraError(f"cannot load model {self.path}: {prefix + name} has shape {list(t.shape)}, "
                                  f"its config needs {list(p.shape)}")
            set_module_tensor_to_device(module, name, self.device, value=t, dtype=self.compute_dtype)

    def dequantized(self, name: str) -> "torch.Tensor | None":
        """The float32 weight `name` (module.weight) of a quantized linear, from its stored parts;
        None where `name` is stored plain."""
        import torch

        stem = name.removesuffix(".weight")
        if self.quantized is None or stem == name:
            return None
        parts = self.quantized.parts(stem, self.where)
        if parts is None:
            return None
        w = self.quantized.dequantize(stem, {p: self.read(p) for p in parts})
        if not bool(torch.isfinite(w).all()):
            raise CaloraError(f"model {self.path} has NaN or Inf values in {name} (dequantized)")
        return w

    @staticmethod
    def free(module) -> None:
        """Back to the skeleton: the parameters (read again from the checkpoint on the next pass)
        go to meta as module.to("meta") would move them. Buffers stay: non-persistent ones
        (Gemma2's embedding scale) are not in the checkpoint to be read back, and a second pass
        over the model (perplexity, then a task) needs them."""
        import torch

        for m in module.modules():
            for key, p in m._parameters.items():
                if p is not None:
                    m._parameters[key] = torch.nn.Parameter(p.to("meta"), requires_grad=p.requires_grad)
        return_freed_memory()

    def embed(self) -> None:
        """Materialize what runs before block 0 (the input embedding), so its inputs can be captured."""
        self.load(self.model.get_input_embeddings(), self._name_of(self.model.get_input_embeddings()))

    def release_embedding(self) -> None:
        self.free(self.model.get_input_embeddings())

    def head(self) -> None:
        """Materialize what runs after the layers: the final norm and the output projection (read
        from the input embedding's tensor when the checkpoint ties them)."""
        self.load(self.model.model.norm, "model.norm.")
        head = self.model.get_output_embeddings()
        if "lm_head.weight" in self.where:
            self.load(head, "lm_head.")
        else:
            self.load(head, self._name_of(self.model.get_input_embeddings()))

    def _name_of(self, module) -> str:
        for name, m in self.model.named_modules():
            if m is module:
                return name + "."
        raise AssertionError("module not in the model")

    def layer_names(self, i: int) -> list[str]:
        prefix = f"{LAYERS_PREFIX}{i}."
        return sorted(n for n in self.where if n.startswith(prefix))

    def blocks(self, writer: "LayerWriter | None" = None) -> Iterator:
        """Each decoder layer in turn, materialized; once the consumer asks for the next one, the
        finished layer is written (when a writer is given) and freed."""
        for i, block in enumerate(self.layers):
            self.load(block, f"{LAYERS_PREFIX}{i}.")
            yield block
            if writer is not None:
                writer.write_layer(i, block)
            self.free(block)

    def blocks_after_embedding(self, writer: "LayerWriter | None" = None) -> Iterator:
        """`blocks`, the input embedding freed once block 0 is asked for (the calibration engine asks
        only after capturing block 0's inputs): for a 32k x 4096 vocabulary that is 0.5 GB of float32."""
        for i, block in enumerate(self.blocks(writer)):
            if i == 0:
                self.release_embedding()
            yield block


class LayerWriter:
    """The output checkpoint, sharded like the input (same files, same tensor in each file), written
    as the layers finish.

    Each output file's header is planned up front, with its tensors ordered by decoder layer: those
    before the layers (embeddings) first, written at once, byte for byte; each layer's as soon as it
    is done; those after (final norm, head) last. Layers finish in ascending order, so every file is
    written front to back and no layer waits. Pruning keeps every name, shape and dtype and copies
    the input's index; `plan` maps a source tensor (name, dtype, shape) to the entries that replace
    it (GPTQ: one weight -> its packed tensors), whose tensors come through `replace`, and then the
    index is written anew."""

    def __init__(self, out: Path, source: LayerSource, plan=None):
        self.out, self.source, self.plan = Path(out), source, plan
        self.files: dict[Path, TensorFileWriter] = {}
        self.replaced: dict[int, dict[str, "torch.Tensor"]] = {}
        n = len(source.layers)
        for reader in source.readers:
            entries = []
            for name in reader.names():
                entry = (name, reader.header[name]["dtype"], reader.header[name]["shape"])
                entries += plan(*entry) if plan is not None else [entry]
            entries.sort(key=lambda e: (_layer_of(e[0], n), e[0]))
            meta = reader.header.get("__metadata__") or {"format": "pt"}
            writer = TensorFileWriter(self.out / reader.path.name, entries, meta)
            self.files[reader.path] = writer
            self._copy_until(writer, 0, n)

    def replace(self, i: int, tensors: dict[str, "torch.Tensor"]) -> None:
        """Tensors (full names) written for layer i in place of what its parameters hold."""
        self.replaced[i] = tensors

    def _copy_until(self, writer: "TensorFileWriter", layer: int, n: int) -> None:
        """Copy the file's next tensors, byte for byte, while they belong before `layer`'s (or after all)."""
        while not writer.done and _layer_of(writer.expects(), n) < layer:
            name = writer.expects()
            writer.write(name, self.source.where[name].raw(name))

    def write_layer(self, i: int, block) -> None:
        n = len(self.source.layers)
        prefix = f"{LAYERS_PREFIX}{i}."
        params = {prefix + name: p.detach() for name, p in block.named_parameters()}
        params.update(self.replaced.pop(i, {}))
        for writer in self.files.values():
            if not writer.done and _layer_of(writer.expects(), n) < i:
                raise AssertionError(f"{writer.expects()} was skipped: layers must be written in order")
            while not writer.done and _layer_of(writer.expects(), n) == i:
                name = writer.expects()
                t = params.get(name)
                if t is None:  # stored but not a parameter (none in supported families): unchanged
                    writer.write(name, self.source.where[name].raw(name))
                else:
                    writer.write(name, t.to(dtype=_dtype(writer.header[name]["dtype"])).cpu().contiguous())

    def finish(self) -> None:
        """The tensors after the layers, the index, and the input's other files (config, tokenizer)."""
        from calora_cli.artifacts import companion_files

        n = len(self.source.layers)
        for writer in self.files.values():
            self._copy_until(writer, n + 1, n)
            if not writer.done:
                raise AssertionError(f"{writer.expects()} was never written")
        index = self.plan is not None
        for f in companion_files(self.source.path, with_index=not index):
            shutil.copy2(f, self.out / f.name)
        if index and len(self.files) > 1:
            self._write_index()

    def _write_index(self) -> None:
        weight_map = {name: path.name for path, w in self.files.items() for name in w.header if name != "__metadata__"}
        total = sum(info["data_offsets"][1] - info["data_offsets"][0] for w in self.files.values()
                    for name, info in w.header.items() if name != "__metadata__")
        body = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
        (self.out / "model.safetensors.index.json").write_text(json.dumps(body, indent=2) + "\n")

    def close(self) -> None:
        for writer in self.files.values():
            writer.close()


def _layer_of(name: str, n: int) -> int:
    """The decoder layer a tensor belongs to; -1 before the layers, n after them."""
    if name.startswith(LAYERS_PREFIX):
        return int(name[len(LAYERS_PREFIX):].split(".", 1)[0])
    return -1 if "embed" in name else n


def _dtype(code: str) -> "torch.dtype":
    from calora_cli.tensor_io import _torch_dtypes

    return _torch_dtypes()[code]


class Spill:
    """Makes `Activations` stores that share one spill folder: `keep` for compress/sequential.py.

    At most three generations are alive at once (a block's inputs, its dense outputs, its
    compressed outputs), so activations take at most 3 x `bound` bytes of memory."""

    def __init__(self, bound: int, folder: Path | None):
        self.bound, self.folder = bound, folder
        self.made = 0
        self.spilled = 0  # entries written to the folder, over the run

    def __call__(self, pairs) -> "Activations":
        self.made += 1
        store = Activations(self, self.made)
        for hs, kw in pairs:
            store.add(hs, kw)
        return store

    def remove(self) -> None:
        if self.folder is not None:
            shutil.rmtree(self.folder, ignore_errors=True)


class Activations:
    """Hidden states (and keyword arguments) entering a block, one entry per micro-batch: in memory
    up to the bound, the rest in the spill folder, read back one entry at a time."""

    def __init__(self, spill: Spill, generation: int):
        self.spill, self.generation = spill, generation
        self.entries: list = []  # (tensor, kwargs) or (spilled file, kwargs, device)
        self.held = 0

    def add(self, hs: "torch.Tensor", kw: dict) -> None:
        size = hs.numel() * hs.element_size()
        if self.spill.folder is None or self.held + size <= self.spill.bound:
            self.entries.append((hs, kw))
            self.held += size
            return
        from safetensors.torch import save_file

        self.spill.folder.mkdir(parents=True, exist_ok=True)
        path = self.spill.folder / f"g{self.generation}-{len(self.entries)}.safetensors"
        save_file({"hs": hs.contiguous().cpu()}, path)
        self.entries.append((path, kw, hs.device))
        self.spill.spilled += 1

    def __len__(self) -> int:
        return len(self.entries)

    def __iter__(self):
        from safetensors.torch import load_file

        for entry in self.entries:
            if len(entry) == 2:
                yield entry
            else:
                path, kw, device = entry
                yield load_file(path)["hs"].to(device), kw

    def __getitem__(self, k: int):
        entry = self.entries[k]
        if len(entry) == 2:
            return entry
        from safetensors.torch import load_file

        return load_file(entry[0])["hs"].to(entry[2]), entry[1]

    def drop(self) -> None:
        for entry in self.entries:
            if len(entry) == 3:
                entry[0].unlink(missing_ok=True)
        self.entries = []
        self.held = 0
