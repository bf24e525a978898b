"""Weight fit of NOLA coefficients to given LoRA factors: alternating least squares on the product.

Find alpha, beta so that B(beta) A(alpha) ~ B_t A_t, with A(alpha) = A0 + sum_i alpha_i U_i and
B(beta) = sum_j beta_j V_j. With A fixed, the best beta solves G beta = h with
G_jj' = <V_j M, V_j'>, M = A A^T and h_j = <V_j, B_t (A_t A^T)>; with B fixed, the best alpha solves
G_ii' = <N U_i, U_i'>, N = B^T B and h_i = <U_i, B^T B_t A_t - N A0>. Everything is r-sized except
the k x k and l x l Gram matrices: the out x in product is never formed. float64 throughout, ridge
1e-8 x mean(diag G).

For a generic LoRA a random k-dimensional subspace holds only about k / (r d) of a factor, so the
fit leaves a relative error near 1 (research/nola.md); it is exact for adapters that were NOLA to
begin with (same seed and bases) and when the bases span the factors' spaces. calora uses it as the
start of distillation and as that exact path.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from calora_cli.errors import CaloraError
from calora_cli.methods.nola.layer import chunks

MAX_BANK_ELEMENTS = 1 << 26  # a materialised bank of bases: 512 MiB in float64


def bank(seed: int, count: int, shape: tuple[int, int]) -> torch.Tensor:
    """All `count` bases of a set, flattened, as a (count, prod(shape)) float64 matrix."""
    if count * math.prod(shape) > MAX_BANK_ELEMENTS:
        raise CaloraError(f"the weight fit would hold {count} bases of {shape[0]}x{shape[1]} in memory; "
                          f"use fewer bases or --init zero")
    out = torch.empty(count, math.prod(shape), dtype=torch.float64)
    for lo, hi, bases in chunks(seed, count, shape):
        out[lo:hi] = bases.reshape(hi - lo, -1).double()
    return out


def _solve(G: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
    ridge = 1e-8 * G.diagonal().mean().clamp(min=1e-300)
    return torch.linalg.solve(G + ridge * torch.eye(G.shape[0], dtype=G.dtype), h)


@dataclass
class Fit:
    alpha: torch.Tensor  # (k,) float32
    beta: torch.Tensor  # (l,) float32
    rel_error: float  # ||B A - B_t A_t||_F / ||B_t A_t||_F
    iterations: int


def rel_error(A: torch.Tensor, B: torch.Tensor, At: torch.Tensor, Bt: torch.Tensor) -> float:
    """||B A - B_t A_t||_F / ||B_t A_t||_F through r x r traces (no out x in product)."""
    own = torch.trace((B.T @ B) @ (A @ A.T))
    cross = torch.trace((B.T @ Bt) @ (At @ A.T))
    target = torch.trace((Bt.T @ Bt) @ (At @ At.T))
    return math.sqrt(max(float(own - 2 * cross + target), 0.0) / max(float(target), 1e-300))


def fit(A_t: torch.Tensor, B_t: torch.Tensor, A0: torch.Tensor, seeds: dict[str, int], k: int, l: int,
        iterations: int = 20, tol: float = 1e-12) -> Fit:
    """Coefficients whose NOLA factors best reproduce B_t @ A_t (same rank; scales folded into B_t)."""
    r, d_in = A_t.shape
    d_out = B_t.shape[0]
    if A0.shape != A_t.shape or B_t.shape[1] != r:
        raise CaloraError(f"weight fit needs factors of the NOLA rank {A0.shape[0]}, got A {tuple(A_t.shape)}, B {tuple(B_t.shape)}")
    U = bank(seeds["A"], k, (r, d_in))
    V = bank(seeds["B"], l, (d_out, r))
    At, Bt, A0 = A_t.double(), B_t.double(), A0.double()
    # start from the factors as stored, projected onto the spans (their gauge is the one to keep)
    alpha = _solve(U @ U.T, U @ (At - A0).reshape(-1))
    beta = _solve(V @ V.T, V @ Bt.reshape(-1))
    A = A0 + (alpha @ U).view(r, d_in)
    B = (beta @ V).view(d_out, r)
    err = rel_error(A, B, At, Bt)
    done = 0
    for done in range(1, iterations + 1):
        if err < tol:
            break
        VM = (V.view(l, d_out, r) @ (A @ A.T)).reshape(l, -1)
        beta = _solve(VM @ V.T, V @ (Bt @ (At @ A.T)).reshape(-1))
        B = (beta @ V).view(d_out, r)
        N = B.T @ B
        NU = (N @ U.view(k, r, d_in)).reshape(k, -1)
        alpha = _solve(NU @ U.T, U @ ((B.T @ Bt) @ At - N @ A0).reshape(-1))
        A = A0 + (alpha @ U).view(r, d_in)
        new = rel_error(A, B, At, Bt)
        if err - new < 1e-4 * max(err, 1e-30):  # the fit has stalled (the usual case for a generic LoRA)
            err = new
            break
        err = new
    return Fit(alpha.float(), beta.float(), err, done)
