"""NOLA: LoRA factors as linear combinations of random bases regenerated from a seed.

    A = A0 + sum_i alpha_i A_i   (k bases, r x d_in)      B = sum_j beta_j B_j   (l bases, d_out x r)
    delta W = (lora_alpha / r) * B @ A

Only alpha, beta (k + l numbers per module) and the seeds are stored. Bases are U(-1, 1) / sqrt(k)
as in the reference code; A0 is a frozen LoRA-style offset (U(+-1/sqrt(d_in)), like kaiming-uniform
with a = sqrt(5)) and beta starts at 0, so an adapter starts at delta W = 0 and its alpha still get
gradients.

Determinism: every matrix comes from torch's CPU generator seeded with a 63-bit seed derived from
(master seed, basis-set name, shape, count, GENERATOR_VERSION) by SHA-256. torch's CPU `rand`
stream does not depend on how it is chunked or on the thread count, so generating in chunks gives
the same matrices; a test pins its values. CUDA generators differ (even between GPU models), so
bases are always generated on the CPU and moved.
"""

from __future__ import annotations

import hashlib
import math

import torch
from torch import nn

from calora_cli.distributed import full
from calora_cli.errors import CaloraError

GENERATOR_VERSION = 1
CHUNK = 64  # bases generated at a time: bounds memory to CHUNK matrices


def derive_seed(master: int, name: str, shape: tuple[int, ...], count: int) -> int:
    key = f"calora-nola/v{GENERATOR_VERSION}/{master}/{name}/{'x'.join(map(str, shape))}/{count}"
    return int.from_bytes(hashlib.sha256(key.encode()).digest()[:8], "little") >> 1


def generate(seed: int, count: int, shape: tuple[int, ...], start: int = 0, stop: int | None = None) -> torch.Tensor:
    """Bases start..stop of a set of `count`, as a (stop-start, *shape) tensor: U(-1, 1) / sqrt(count)."""
    stop = count if stop is None else stop
    g = torch.Generator(device="cpu").manual_seed(seed)
    per = math.prod(shape)
    if start:
        torch.rand(start * per, generator=g)  # advance the stream (same values as one long draw)
    return (torch.rand((stop - start, *shape), generator=g) * 2 - 1) / math.sqrt(count)


def chunks(seed: int, count: int, shape: tuple[int, ...]):
    """(lo, hi, bases lo..hi) over a whole set, CHUNK at a time, from one generator: the same
    values as `generate` (one stream), without re-drawing the skipped part for every chunk."""
    g = torch.Generator(device="cpu").manual_seed(seed)
    for lo in range(0, count, CHUNK):
        hi = min(lo + CHUNK, count)
        yield lo, hi, (torch.rand((hi - lo, *shape), generator=g) * 2 - 1) / math.sqrt(count)


def offset(seed: int, shape: tuple[int, int]) -> torch.Tensor:
    """The frozen A0: U(+-1/sqrt(d_in)), what nn.Linear's kaiming-uniform(a=sqrt(5)) draws."""
    g = torch.Generator(device="cpu").manual_seed(seed)
    bound = 1 / math.sqrt(shape[1])
    return (torch.rand(shape, generator=g) * 2 - 1) * bound


def fingerprint(seed: int, count: int, shape: tuple[int, ...]) -> str:
    """A short identity of a basis set: hash of its first basis (checked at load)."""
    first = generate(seed, count, shape, 0, 1).contiguous()
    return hashlib.sha256(first.numpy().tobytes()).hexdigest()[:16]


class _Combine(torch.autograd.Function):
    """sum_i c_i * basis_i, with the bases regenerated chunk by chunk in forward and backward,
    so neither pass holds more than CHUNK bases (the reference does the same on the GPU)."""

    @staticmethod
    def forward(ctx, coeffs, seed, shape):
        ctx.seed, ctx.shape = seed, shape
        ctx.save_for_backward(coeffs)
        k = coeffs.shape[0]
        out = torch.zeros(shape, dtype=torch.float32)
        for lo, hi, bases in chunks(seed, k, shape):
            out += torch.tensordot(coeffs[lo:hi].detach().float().cpu(), bases, dims=1)
        return out.to(coeffs.device)

    @staticmethod
    def backward(ctx, grad):
        (coeffs,) = ctx.saved_tensors
        k = coeffs.shape[0]
        g = grad.detach().float().cpu().reshape(-1)
        out = torch.empty(k, dtype=torch.float32)
        for lo, hi, bases in chunks(ctx.seed, k, ctx.shape):
            out[lo:hi] = bases.reshape(hi - lo, -1) @ g
        return out.to(coeffs.device, coeffs.dtype), None, None


def combine(coeffs: torch.Tensor, seed: int, shape: tuple[int, ...]) -> torch.Tensor:
    return _Combine.apply(coeffs, seed, tuple(shape))


class NolaLinear(nn.Module):
    """A frozen linear plus a NOLA delta: y = base(x) + s * (x @ A^T) @ B^T."""

    def __init__(self, base: nn.Module, rank: int, k: int, l: int, alpha: float, seeds: dict[str, int]):
        super().__init__()
        if k < 1 or l < 1 or rank < 1:
            raise CaloraError(f"NOLA needs k, l and rank >= 1, got k={k}, l={l}, rank={rank}")
        self.base = base
        self.in_features, self.out_features = base.in_features, base.out_features
        self.rank, self.k, self.l, self.scale = rank, k, l, alpha / rank
        self.seeds = dict(seeds)  # "A", "B", "A0"
        self.alpha_coef = nn.Parameter(torch.zeros(k))
        self.beta_coef = nn.Parameter(torch.zeros(l))
        self.register_buffer("A0", offset(seeds["A0"], (rank, self.in_features)), persistent=False)

    def factors(self) -> tuple[torch.Tensor, torch.Tensor]:
        """A and B. Without gradients (evaluation) they are kept until a coefficient changes, so
        the bases are not drawn again for every batch; in training they are rebuilt every step."""
        if torch.is_grad_enabled():
            self._cached = None
            return self._combine()
        # keyed on the coefficients' values (k + l numbers): writes through .data bump no version counter
        cached = getattr(self, "_cached", None)
        if cached is None or not (torch.equal(cached[0], self.alpha_coef) and torch.equal(cached[1], self.beta_coef)):
            cached = self._cached = (self.alpha_coef.detach().clone(), self.beta_coef.detach().clone(), self._combine())
        return cached[2]

    def _combine(self) -> tuple[torch.Tensor, torch.Tensor]:
        A = self.A0 + combine(self.alpha_coef, self.seeds["A"], (self.rank, self.in_features))
        B = combine(self.beta_coef, self.seeds["B"], (self.out_features, self.rank))
        return A, B

    def delta(self) -> torch.Tensor:
        A, B = self.factors()
        return self.scale * B @ A

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        A, B = self.factors()
        h = x.to(A.dtype) @ A.T
        return self.base(x) + (self.scale * h @ B.T).to(x.dtype)


def module_type(path: str) -> str:
    return path.rsplit(".", 1)[-1]


def seeds_for(master: int, path: str, rank: int, d_in: int, d_out: int, k: int, l: int, shared: bool) -> dict[str, int]:
    """The three seeds of one module. Shared sets (the default) are keyed by module type, so every
    layer's q_proj uses the same bases (as the reference GPT-2 code ends up doing); per-module sets
    are keyed by the full path."""
    name = module_type(path) if shared else path
    return {
        "A": derive_seed(master, f"{name}/A", (rank, d_in), k),
        "B": derive_seed(master, f"{name}/B", (d_out, rank), l),
        "A0": derive_seed(master, f"{name}/A0", (rank, d_in), 1),
    }


def attach(model: nn.Module, targets: list[str], rank: int, k: int, l: int, alpha: float, master: int,
           shared: bool = True) -> dict[str, NolaLinear]:
    """Wrap every targeted linear of the decoder blocks in a NolaLinear (in place); freeze the rest."""
    model.requires_grad_(False)
    layers = {}
    for path, mod in list(model.named_modules()):
        if ".layers." not in path or module_type(path) not in targets or not hasattr(mod, "in_features"):
            continue
        parent, _, child = path.rpartition(".")
        seeds = seeds_for(master, path, rank, mod.in_features, mod.out_features, k, l, shared)
        wrapped = NolaLinear(mod, rank, k, l, alpha, seeds)
        setattr(model.get_submodule(parent), child, wrapped)
        layers[path] = wrapped
    if not layers:
        raise CaloraError(f"no module named {', '.join(targets)} in the decoder blocks")
    return layers


def coefficients(layers: dict[str, NolaLinear], bits: int = 32) -> dict[str, torch.Tensor]:
    """The tensors of nola.safetensors: each coefficient vector in its stored form (+ its scale)."""
    out = {}
    for path, layer in layers.items():
        for name, p in (("nola_alpha", layer.alpha_coef), ("nola_beta", layer.beta_coef)):
            q, scale = quantize_coefficients(full(p).detach(), bits)
            out[f"{path}.{name}"] = q
            if scale is not None:
                out[f"{path}.{name}.scale"] = scale
    return out


def read_coefficients(tensors: dict[str, torch.Tensor], sizes: dict[str, int], bits: int) -> dict[str, torch.Tensor]:
    """float32 coefficient vectors from their stored form; `sizes` gives each vector's length."""
    out = {}
    for name, n in sizes.items():
        if name not in tensors:
            raise CaloraError(f"NOLA coefficients {name} are missing")
        out[name] = dequantize_coefficients(tensors[name], tensors.get(f"{name}.scale"), bits, n)
    return out


def round_coefficients(layers: dict[str, NolaLinear], bits: int) -> None:
    """Give the layers the coefficients they will have once stored with `bits` (so what is
    reported is what is saved)."""
    for layer in layers.values():
        for p in (layer.alpha_coef, layer.beta_coef):
            q, scale = quantize_coefficients(p.detach(), bits)
            p.data.copy_(dequantize_coefficients(q, scale, bits, p.numel()))


def load_coefficients(layers: dict[str, NolaLinear], tensors: dict[str, torch.Tensor]) -> None:
    for path, layer in layers.items():
        for name, p in (("nola_alpha", layer.alpha_coef), ("nola_beta", layer.beta_coef)):
            t = tensors.get(f"{path}.{name}")
            if t is None or t.shape != p.shape:
                raise CaloraError(f"NOLA coefficients for {path}.{name} are missing or of the wrong size")
            if not bool(torch.isfinite(t).all()):
                raise CaloraError(f"NOLA coefficients {path}.{name} hold NaN or Inf values")
            p.data.copy_(t)


def expand(alpha_coef: torch.Tensor, beta_coef: torch.Tensor, seeds: dict[str, int], rank: int, d_in: int,
           d_out: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The plain LoRA factors (A: r x d_in, B: d_out x r) a NOLA module stands for."""
    return expand_all({"m": (alpha_coef, beta_coef, seeds, rank, d_in, d_out)})["m"]


def combine_many(coeffs: torch.Tensor, seed: int, shape: tuple[int, ...]) -> torch.Tensor:
    """sum_i c[m, i] basis_i for every row m at once: each chunk of bases is generated once."""
    k = coeffs.shape[1]
    out = torch.zeros((coeffs.shape[0], *shape), dtype=torch.float32)
    for lo, hi, bases in chunks(seed, k, shape):
        out += torch.tensordot(coeffs[:, lo:hi].float(), bases, dims=1)
    return out


def expand_all(modules: dict[str, tuple]) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Expand many modules: (alpha, beta, seeds, rank, d_in, d_out) each -> (A, B).

    Modules that share a basis set (the default: one per module type) are combined in one pass
    over its bases, so a set is generated once, not once per layer.
    """
    groups: dict[tuple, list[str]] = {}
    for name, (a, b, seeds, rank, d_in, d_out) in modules.items():
        groups.setdefault(("A", seeds["A"], rank, d_in), []).append(name)
        groups.setdefault(("B", seeds["B"], d_out, rank), []).append(name)
    factors: dict[str, dict[str, torch.Tensor]] = {name: {} for name in modules}
    with torch.no_grad():
        for (which, seed, *shape), names in groups.items():
            coeffs = torch.stack([modules[n][0 if which == "A" else 1].float() for n in names])
            for n, t in zip(names, combine_many(coeffs, seed, tuple(shape))):
                factors[n][which] = t
    out = {}
    for name, (_, _, seeds, rank, d_in, _) in modules.items():
        out[name] = (offset(seeds["A0"], (rank, d_in)) + factors[name]["A"], factors[name]["B"])
    return out


COEF_BITS = (32, 16, 8, 4)


def quantize_coefficients(c: torch.Tensor, bits: int) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Stored form of a coefficient vector: float32/16 as is; 8 and 4 bits symmetric absmax per
    vector (one float32 scale each), 4-bit codes packed two per byte."""
    if bits not in COEF_BITS:
        raise CaloraError(f"--coef-bits must be one of {', '.join(map(str, COEF_BITS))}, got {bits}")
    if bits == 32:
        return c.float(), None
    if bits == 16:
        return c.half(), None
    qmax = 2 ** (bits - 1) - 1
    scale = c.abs().max().float().clamp(min=1e-30) / qmax
    q = torch.round(c.float() / scale).clamp(-qmax, qmax).to(torch.int8)
    if bits == 4:
        u = (q + 8).to(torch.uint8)
        if u.numel() % 2:
            u = torch.cat([u, torch.full((1,), 8, dtype=torch.uint8)])
        q = u[0::2] | (u[1::2] << 4)
    return q.contiguous(), scale.reshape(1)


def dequantize_coefficients(q: torch.Tensor, scale: torch.Tensor | None, bits: int, n: int) -> torch.Tensor:
    if bits in (32, 16):
        return q.float()
    if scale is None:
        raise CaloraError(f"{bits}-bit NOLA coefficients without their scale")
    if bits == 4:
        codes = torch.stack([q & 15, q >> 4], dim=1).reshape(-1)[:n].to(torch.int16) - 8
    else:
        codes = q
    if codes.numel() != n:
        raise CaloraError(f"NOLA coefficients hold {codes.numel()} values, the adapter needs {n}")
    return codes.float() * scale.float()
