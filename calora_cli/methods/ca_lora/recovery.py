"""CA-LoRA recovery modules: R(x) = (alpha/r) * U GELU(D x), beside every linear of every block.

D (r x d_in) is initialised like nn.Linear (kaiming-uniform), U (d_out x r) = 0, no bias: at
step 0 the model is exactly the compressed model + inherited LoRA. The GELU makes R non-linear, so
it cannot be merged into a weight.
"""

from __future__ import annotations

import torch
from torch import nn

from calora_cli.arch import adapted_linears
from calora_cli.distributed import full
from calora_cli.errors import CaloraError


class Recovery(nn.Module):
    def __init__(self, d_in: int, d_out: int, rank: int, alpha: float):
        super().__init__()
        self.D = nn.Linear(d_in, rank, bias=False)
        self.U = nn.Linear(rank, d_out, bias=False)
        nn.init.zeros_(self.U.weight)
        self.scale = alpha / rank

    def forward(self, x: "torch.Tensor") -> "torch.Tensor":
        return self.scale * self.U(nn.functional.gelu(self.D(x.to(self.D.weight.dtype))))


def attach(model, rank: int, alpha: float, seed: int | None = None) -> nn.ModuleDict:
    """Add a recovery module beside each block linear; its output is added to the linear's.

    Returns the modules (trainable) keyed by module path with '.' replaced by '__'.
    """
    if seed is not None:
        torch.manual_seed(seed)
    modules = nn.ModuleDict()
    for name, layer in adapted_linears(model).items():
        rec = Recovery(layer.in_features, layer.out_features, rank, alpha)
        weight = next((p for p in layer.parameters() if p.is_floating_point()), None)
        if weight is not None:
            rec.to(weight.device)
        modules[name.replace(".", "__")] = rec
        layer.register_forward_hook(lambda mod, args, out, r=rec: out + r(args[0]).to(out.dtype))
    model.calora_recovery = modules
    return modules


def state(modules: nn.ModuleDict) -> dict[str, "torch.Tensor"]:
    return {f"{k.replace('__', '.')}.{p}": full(v).detach().contiguous() for k, m in modules.items() for p, v in
            (("D", m.D.weight), ("U", m.U.weight))}


def load_state(modules: nn.ModuleDict, tensors: dict[str, "torch.Tensor"]) -> None:
    for k, m in modules.items():
        name = k.replace("__", ".")
        for p, lin in (("D", m.D), ("U", m.U)):
            t = tensors.get(f"{name}.{p}")
            if t is None:
                raise CaloraError(f"recovery weights lack {name}.{p}")
            if t.shape != lin.weight.shape:
                raise CaloraError(f"recovery weight {name}.{p} is {tuple(t.shape)}, the model needs {tuple(lin.weight.shape)}")
            lin.weight.data.copy_(t)
