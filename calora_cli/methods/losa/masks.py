"""LoSA: LoRA deltas masked to a sparse base's non-zeros, so W + s*(B@A)*M keeps every zero.

The mask M = (W != 0) comes from the stored base weight, bit for bit. In training the forward
computes x W^T + s * x ((B@A) * M)^T, so gradients flow exactly through the mask (no straight-
through estimate), and the weights of the masked-out positions get none.
"""

from __future__ import annotations

import types
from typing import TYPE_CHECKING

from calora_cli.arch import PEFT_PREFIX
from calora_cli.errors import CaloraError

if TYPE_CHECKING:
    import torch


def removed_energy(delta: "torch.Tensor", mask: "torch.Tensor") -> float:
    """Share of ||delta||^2 that falls on the base's zeros (what masking takes away)."""
    total = (delta.double() ** 2).sum().item()
    return ((delta.double() * ~mask) ** 2).sum().item() / total if total else 0.0


def pack(mask: "torch.Tensor") -> "torch.Tensor":
    """Bool mask -> uint8 bits (8x smaller on disk)."""
    import numpy as np
    import torch

    return torch.from_numpy(np.packbits(mask.flatten().numpy().astype(np.uint8)))


def unpack(bits: "torch.Tensor", shape: tuple[int, ...]) -> "torch.Tensor":
    import numpy as np
    import torch

    n = 1
    for s in shape:
        n *= s
    return torch.from_numpy(np.unpackbits(bits.numpy(), count=n).astype(bool)).view(shape)


def _masked_forward(self, x, *args, **kwargs):
    import torch.nn.functional as F

    result = self.base_layer(x, *args, **kwargs)
    for name in self.active_adapters:
        if name not in self.lora_A:
            continue
        A, B = self.lora_A[name].weight, self.lora_B[name].weight
        # no stored mask: the base is sharded (FSDP), and its weight is whole only inside this forward
        mask = self.calora_mask if self.calora_mask is not None else self.base_layer.weight != 0
        delta = (B @ A) * mask
        result = result + self.scaling[name] * F.linear(self.lora_dropout[name](x).to(A.dtype), delta).to(result.dtype)
    return result


def lora_layers(peft_model) -> dict[str, "torch.nn.Module"]:
    """peft LoRA layers by the module name of the base they wrap (model.layers.0.self_attn.q_proj)."""
    return {
        name.removeprefix(PEFT_PREFIX): m
        for name, m in peft_model.named_modules()
        if hasattr(m, "lora_A") and hasattr(m, "base_layer") and len(m.lora_A)
    }


def apply_masks(peft_model, stored: dict[str, "torch.Tensor"] | None = None) -> dict[str, "torch.Tensor"]:
    """Mask every LoRA layer's delta with its base weight's non-zeros (forward and merge alike).

    `stored` masks (from a sparsified adapter) must equal the base's zeros: a base that changed
    since the adapter was made is refused. Returns the masks applied.
    """
    from calora_cli.sharded_load import pending

    masks = {}
    if pending(peft_model):
        # a skeleton for FSDP: the weights are read once sharded, and no process holds them whole
        # outside a layer's forward, so each forward takes the mask from the gathered weight
        for layer in lora_layers(peft_model).values():
            layer.calora_mask = None
            layer.forward = types.MethodType(_masked_forward, layer)
        return masks
    for module, layer in lora_layers(peft_model).items():
        weight = layer.base_layer.weight
        if not weight.is_floating_point():
            raise CaloraError(f"{module}: masks need an unquantized (pruned) base, found {weight.dtype} weights")
        mask = weight.detach() != 0
        if stored is not None:
            if module not in stored:
                raise CaloraError(f"adapter has no stored mask for {module}")
            if not bool((stored[module].to(mask.device) == mask).all()):
                raise CaloraError(f"{module}: the adapter's stored mask does not match the base's zeros (was the base pruned again?)")
        layer.calora_mask = mask
        layer.forward = types.MethodType(_masked_forward, layer)
        original = layer.get_delta_weight
        layer.get_delta_weight = lambda adapter, _orig=original, _m=mask: _orig(adapter) * _m
        masks[module] = mask
    return masks
