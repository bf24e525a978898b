"""A LoRA as llama.cpp's LoRA GGUF (`general.type=adapter`, `adapter.type=lora`).

llama.cpp adds `scale * lora_b @ lora_a` beside each base matmul, scale being the user's scale
times alpha / rank when `adapter.lora.alpha` is not zero, the user's scale alone when it is. Its own
converter writes peft's lora_alpha and so ignores rsLoRA, rank_pattern and alpha_pattern. calora
folds each module's own peft scaling into lora_b and writes alpha 0: llama.cpp then applies exactly
peft's delta, whatever the variant, and ranks may differ module by module (a compensated adapter's
do). lora_b of a Llama-family q/k projection takes the base's row permutation (names.py).
"""

from __future__ import annotations

from pathlib import Path

from calora_cli.errors import CaloraError
from calora_cli.gguf.names import NameMap


def exportable_factors(art) -> dict:
    """The LoRA factors of an adapter artifact that llama.cpp can apply as they are (a NOLA adapter
    expanded from its seed); refuses, in one line naming the way out, what it cannot."""
    import json

    from calora_cli import adapters

    extras = adapters.extras_of(art)
    if "recovery" in extras:
        raise CaloraError(f"adapter {art.path} carries CA-LoRA recovery modules (a GELU between their factors), which "
                          "llama.cpp cannot run and no merge can fold; export the inherited LoRA without them, or "
                          "serve this adapter with calora eval / transformers")
    if "masked" in extras:
        raise CaloraError(f"adapter {art.path} is masked to a sparse base (LoSA), and llama.cpp would add its delta "
                          "unmasked; merge it first (calora merge BASE --adapter A --keep-sparsity) and export the "
                          "merged model")
    config = json.loads((art.path / "adapter_config.json").read_text())
    if config.get("use_dora"):
        raise CaloraError(f"adapter {art.path} is DoRA, which llama.cpp cannot apply (a per-row renormalisation, "
                          "not a low-rank delta): merge it into the base (calora merge BASE --adapter A --dense) and export the merged model")
    return adapters.factors(art, "llama.cpp's LoRA format", "merge it into the base (calora merge BASE --adapter A "
                            "--dense) and export the merged model")


def write_lora(out: Path, factors: dict, config: dict, name: str) -> dict:
    """Write `factors` ({module path: LoraFactors}) for a base of `config`; returns a summary."""
    import gguf
    import numpy as np

    names = NameMap(config)
    w = gguf.GGUFWriter(out, names.arch)
    w.add_type(gguf.GGUFType.ADAPTER)
    w.add_string(gguf.Keys.Adapter.TYPE, "lora")
    w.add_float32(gguf.Keys.Adapter.LORA_ALPHA, 0.0)
    w.add_name(name)
    ranks = {}
    for module in sorted(factors):
        f = factors[module]
        target = names.gguf_name(module + ".weight", strict=False)
        if target is None:
            where = "the output projection, which this model ties to its embedding" if module == "lm_head" else module
            raise CaloraError(f"llama.cpp has no place for a LoRA on {where}; merge it instead (calora merge)")
        A = f.A.float().contiguous()
        B = names.lora_b_to_gguf(module, (f.B.float() * f.scale)).contiguous()
        w.add_tensor(f"{target}.lora_a", A.numpy().astype(np.float32))
        w.add_tensor(f"{target}.lora_b", B.numpy().astype(np.float32))
        ranks[target] = A.shape[0]
    w.write_header_to_file(out)
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return {"modules": len(ranks), "ranks": sorted(set(ranks.values()))}


def check_lora_file(path: Path, config: dict) -> None:
    """A llama.cpp LoRA GGUF for a base of `config`: its type and architecture, in one line if not."""
    from calora_cli.gguf.names import arch_of
    from calora_cli.gguf.reader import field, open_gguf

    reader = open_gguf(path)
    kind, arch = field(reader, "general.type"), field(reader, "general.architecture")
    if kind != "adapter" or field(reader, "adapter.type") != "lora":
        raise CaloraError(f"{path} is not a llama.cpp LoRA GGUF (general.type {kind!r})")
    if arch != arch_of(config):
        raise CaloraError(f"LoRA {path} is for llama.cpp's {arch} architecture, the model is {arch_of(config)}")
