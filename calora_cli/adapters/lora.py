"""The plain LoRA kind: factors as peft stores them, the deltas they stand for, its files."""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from calora_cli.arch import PEFT_PREFIX
from calora_cli.errors import CaloraError

if TYPE_CHECKING:
    import torch


@dataclass
class LoraFactors:
    """One adapted module: delta W = scale * B @ A."""

    module: str  # e.g. model.layers.0.self_attn.q_proj
    A: "torch.Tensor"  # (r, in)
    B: "torch.Tensor"  # (out, r)
    scale: float

    def delta(self) -> "torch.Tensor":
        return (self.B.float() @ self.A.float()).mul_(self.scale)

    @property
    def shape(self) -> tuple[int, int]:
        """The delta's (out, in)."""
        return (self.B.shape[0], self.A.shape[1])

    def add_to(self, W: "torch.Tensor", weight: float = 1.0) -> "torch.Tensor":
        """W += weight * delta, in place (W float32, of `shape`): the product accumulates straight
        into W, with the scalars folded into the small B, so no delta-sized temporary is made or scaled."""
        return W.addmm_(self.B.float() * (self.scale * weight), self.A.float())


def _pattern_value(patterns: dict, module: str, default):
    """peft's rank_pattern / alpha_pattern: a key matches a module whose name ends with it as a regex
    (`(.*\.)?(key)$`, peft's get_pattern_key); the first key that matches wins."""
    for key, value in (patterns or {}).items():
        if module == key or re.fullmatch(rf"(.*\.)?({key})", module):
            return value
    return default


# What a peft LoRA file can hold beside the factors of its linears (peft's save_and_load.py names),
# by the suffix of the key after the module path; "replaces" is a whole base tensor saved with the
# adapter: a modules_to_save copy (lm_head, embed_tokens, a classifier), an embedding layer saved
# beside its LoRA, a bias trained with bias="all" / "lora_only"
PASSENGERS = {
    ".lora_magnitude_vector": "DoRA magnitude", ".lora_magnitude_vector.weight": "DoRA magnitude",
    ".lora_B.bias": "lora_bias", ".lora_embedding_A": "embedding LoRA", ".lora_embedding_B": "embedding LoRA",
    ".token_adapter.trainable_tokens_delta": "trainable tokens",
}


@dataclass
class Passenger:
    """A tensor of the adapter that is not a LoRA factor of a linear."""

    key: str  # as stored
    module: str  # the base module it belongs to (model.layers.0.self_attn.q_proj, lm_head)
    what: str  # a PASSENGERS value, or "replaces"
    target: str  # the base tensor it stands beside or replaces (module.weight / module.bias)


def passengers(state: dict) -> list[Passenger]:
    """Every tensor of a peft LoRA state dict that is not lora_A/lora_B of a linear."""
    out = []
    for key in sorted(state):
        name = key.removeprefix(PEFT_PREFIX)
        if name.endswith((".lora_A.weight", ".lora_B.weight")):
            continue
        for suffix, what in PASSENGERS.items():
            if name.endswith(suffix):
                module = name[: -len(suffix)]
                out.append(Passenger(key, module, what, f"{module}.weight"))
                break
        else:
            leaf = name.rsplit(".", 1)[-1]
            module = name.rsplit(".", 1)[0].removesuffix(".base_layer").removesuffix(".modules_to_save")
            out.append(Passenger(key, module, "replaces", f"{module}.{leaf}"))
    return out


def refuse_passengers(state: dict, config: dict, doing: str, instead: str) -> None:
    """One line naming what the adapter holds beyond plain LoRA factors, for a stage that works on
    the delta B·A alone (`doing`), and what to do instead."""
    found = passengers(state)
    kinds = sorted({"modules_to_save copy" if p.what == "replaces" else p.what for p in found})
    if config.get("use_dora") and "DoRA magnitude" not in kinds:
        kinds.insert(0, "DoRA magnitude")
    if kinds:
        example = f" (e.g. {found[0].key})" if found else ""
        raise CaloraError(f"adapter holds {', '.join(kinds)}{example}, which {doing} cannot take: {instead}")


def factors_from_state(state: dict[str, "torch.Tensor"], config: dict, doing: str = "a delta merge",
                       instead: str = "only a plain LoRA's delta B·A is supported here") -> dict[str, LoraFactors]:
    """Group a peft LoRA state dict into per-module factors with their scales.

    Refuses (naming `doing` and `instead`) what a plain delta cannot represent: DoRA, trained
    biases, modules_to_save, embedding LoRAs, trainable tokens (passengers()).
    """
    if config.get("peft_type", "LORA") != "LORA":
        raise CaloraError(f"adapter type {config.get('peft_type')} is not a LoRA")
    check_config(config)
    refuse_passengers(state, config, doing, instead)
    return linear_factors(state, config)


def check_config(config: dict) -> None:
    """Refuse the LoRA variants no stage of calora computes: they need more than the file holds."""
    if config.get("fan_in_fan_out"):
        raise CaloraError("fan_in_fan_out adapters (GPT-2 Conv1D layers) are not supported")
    if config.get("layer_replication"):
        raise CaloraError("adapter uses layer_replication (it duplicates decoder layers of the base), which calora "
                          "does not support: merge it with peft (merge_and_unload) into a model of its own")
    init = config.get("init_lora_weights")
    if isinstance(init, str) and init.lower().startswith(("pissa", "olora", "corda", "eva")) and \
            not config.get("path_initial_model_for_weight_conversion"):
        raise CaloraError(f"adapter was initialized with {init} and saved unconverted: its factors hold only with the "
                          "residual base peft made; save it with peft's path_initial_model_for_weight_conversion "
                          "(a plain LoRA of rank 2r on the original base)")


def linear_factors(state: dict[str, "torch.Tensor"], config: dict) -> dict[str, LoraFactors]:
    """The factors of every adapted linear, whatever else the state holds."""
    out: dict[str, LoraFactors] = {}
    for key, A in state.items():
        if not key.endswith(".lora_A.weight"):
            continue
        module = key.split(".lora_A.")[0].removeprefix(PEFT_PREFIX)
        bkey = key.replace(".lora_A.", ".lora_B.")
        if bkey not in state:
            raise CaloraError(f"adapter has {key} without its lora_B")
        B = state[bkey]
        r = A.shape[0]
        if B.shape[1] != r:
            raise CaloraError(f"adapter rank mismatch in {module}: A has rank {r}, B has {B.shape[1]}")
        for name, t in ((key, A), (bkey, B)):
            if not t.is_floating_point():
                raise CaloraError(f"adapter tensor {name} has dtype {str(t.dtype).removeprefix('torch.')}; LoRA factors are floating point")
            if not t.isfinite().all():
                raise CaloraError(f"adapter tensor {name} holds NaN or Inf values")
        out[module] = LoraFactors(module, A, B, _scale(config, module, r))
    if not out:
        raise CaloraError("adapter holds no LoRA factors")
    return out


@dataclass
class Extras:
    """What a peft LoRA changes beside its linears' B·A, as peft's merge_and_unload applies it."""

    magnitude: dict = field(default_factory=dict)  # module -> (out,): DoRA, W' = m / ||W + sBA||_row · (W + sBA)
    bias: dict = field(default_factory=dict)  # module -> (out,) added to its bias (lora_bias: s · lora_B.bias)
    embedding: dict = field(default_factory=dict)  # module -> LoraFactors of the (vocab, hidden) table, transposed
    tokens: dict = field(default_factory=dict)  # module -> (rows, (n, hidden) values that replace them)
    replaces: dict = field(default_factory=dict)  # base tensor name -> its new value (modules_to_save, biases)

    def __bool__(self) -> bool:
        return any((self.magnitude, self.bias, self.embedding, self.tokens, self.replaces))

    def targets(self) -> set[str]:
        """The base tensors (other than the linears' weights with a LoRA) these change."""
        return ({f"{m}.bias" for m in self.bias} | {f"{m}.weight" for m in self.embedding}
                | {f"{m}.weight" for m in self.tokens} | set(self.replaces))


def extras(state: dict, config: dict) -> Extras:
    """The Extras of a peft LoRA state dict, with the scales peft applies."""
    out = Extras()
    pairs: dict[str, dict] = {}
    for p in passengers(state):
        t = state[p.key]
        if not t.isfinite().all():
            raise CaloraError(f"adapter tensor {p.key} holds NaN or Inf values")
        if p.what == "DoRA magnitude":
            out.magnitude[p.module] = t
        elif p.what == "lora_bias":
            out.bias[p.module] = t.float() * _scale(config, p.module, _rank(state, p.module))
        elif p.what == "embedding LoRA":
            pairs.setdefault(p.module, {})[p.key[-1]] = t
        elif p.what == "trainable tokens":
            out.tokens[p.module] = (token_rows(config, p, t), t)
        else:
            out.replaces[p.target] = t
    for module, ab in pairs.items():
        if set(ab) != {"A", "B"}:
            raise CaloraError(f"adapter's embedding LoRA of {module} lacks its lora_embedding_{'A' if 'B' in ab else 'B'}")
        r = ab["A"].shape[0]
        # the table is (vocab, hidden); peft's delta is (B A)^T: as factors of the transposed table
        out.embedding[module] = LoraFactors(module, ab["B"].T, ab["A"].T, _scale(config, module, r))
    return out


def token_rows(config: dict, p: Passenger, t: "torch.Tensor") -> list[int]:
    """The embedding rows a trainable-tokens passenger `t` replaces: peft's trainable_token_indices,
    a list (the input embedding) or {module name: list}; one index per row of `t`."""
    indices = config.get("trainable_token_indices")
    rows = indices.get(p.module.rsplit(".", 1)[-1], []) if isinstance(indices, dict) else indices
    if not rows or len(rows) != t.shape[0]:
        raise CaloraError(f"adapter's trainable tokens {p.key} hold {t.shape[0]} rows; its config lists "
                          f"{len(rows or [])} token indices")
    return list(rows)


def _rank(state: dict, module: str) -> int:
    a = state.get(f"{PEFT_PREFIX}{module}.lora_A.weight")
    if a is None:
        raise CaloraError(f"adapter's lora_bias of {module} has no lora_A beside it")
    return a.shape[0]


def _scale(config: dict, module: str, r: int) -> float:
    alpha = _pattern_value(config.get("alpha_pattern"), module, config.get("lora_alpha", r))
    return alpha / math.sqrt(r) if config.get("use_rslora") else alpha / r


# --- the kind (adapters registry) ----------------------------------------------------------------


def detect(artifact) -> bool:
    return True  # every adapter that no other kind claims is a peft LoRA


def files(artifact) -> tuple[dict, dict]:
    import json

    from safetensors.torch import load_file

    weights = artifact.path / "adapter_model.safetensors"
    if not weights.exists():
        raise CaloraError(f"adapter {artifact.path} has no adapter_model.safetensors")
    return json.loads((artifact.path / "adapter_config.json").read_text()), load_file(weights)


def factors(artifact, doing: str = "a delta merge", instead: str = "use a plain LoRA") -> dict[str, LoraFactors]:
    config, state = files(artifact)
    return factors_from_state(state, config, doing, instead)


def attach(model, artifact, trainable: bool = False):
    from calora_cli.models import load_adapter

    return load_adapter(model, artifact.path, trainable=trainable)


def write(directory, config: dict, state: dict) -> None:
    """A peft LoRA directory: adapter_model.safetensors and adapter_config.json (sorted keys)."""
    import json

    from safetensors.torch import save_file

    directory.mkdir(parents=True, exist_ok=True)
    save_file(state, directory / "adapter_model.safetensors", metadata={"format": "pt"})
    (directory / "adapter_config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")


def save_trained(peft_model, directory, state_dict=None) -> None:
    """A trained peft model's adapter, as peft writes it, with two changes: no model card (peft's
    template names no base calora can vouch for), and target_modules sorted. peft keeps them in a
    set and writes it in hash order, which changes with PYTHONHASHSEED: the same run in two
    processes would write different bytes."""
    import json

    peft_model.save_pretrained(directory, state_dict=state_dict)
    (directory / "README.md").unlink(missing_ok=True)
    path = directory / "adapter_config.json"
    config = json.loads(path.read_text())
    if isinstance(config.get("target_modules"), list):
        config["target_modules"] = sorted(config["target_modules"])
    path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
