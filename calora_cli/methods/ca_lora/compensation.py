"""Training-free compensation of a compression error: low-rank factors B_c A_c ~ W - W_hat.

EoRA (Liu et al. 2024; GPTQModel's gptqmodel/eora/eora.py is the reference we test against)
minimises the error where it matters, on the layer's own inputs: ||(W - W_hat - B_c A_c) X||_F.
With the input covariance C = X^T X = Q diag(lambda) Q^T and S = Q diag(sqrt lambda), that error is
||(dW - B_c A_c) S||_F, so the best rank-R factors come from the truncated SVD of dW S, mapped back
through S^+ (eigenvalues at the numerical noise floor are dropped, not inverted). `space="plain"`
is the ablation: the SVD of dW itself, blind to which input directions occur.

Pure tensor functions: the stage (inherit --compensate) gathers C per layer and reads the weights.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

SPACES = ("eigen", "plain")


@dataclass
class Compensation:
    A: "torch.Tensor"  # (R, in)
    B: "torch.Tensor"  # (out, R)
    removed: float  # share of the activation-weighted error ||dW X||^2 that B A removes


def weighted_error(delta: "torch.Tensor", covariance: "torch.Tensor") -> float:
    """||delta X||_F^2 = tr(delta C delta^T), in float64."""
    d = delta.double()
    return float(((d @ covariance.double()) * d).sum())


def compensate(delta: "torch.Tensor", covariance: "torch.Tensor", rank: int, space: str = "eigen") -> Compensation:
    """Rank-`rank` factors of `delta` (out x in) in the space of the inputs whose covariance
    (X^T X, in x in) is given; the square root of the singular values goes to each factor."""
    import torch

    d = delta.double()
    if space == "eigen":
        lam, Q = torch.linalg.eigh(covariance.double())
        # below the float32 noise floor an eigenvalue is rounding, and 1/sqrt of it would blow up
        keep = lam > lam[-1].clamp_min(0) * min(1.0, lam.numel() * torch.finfo(torch.float32).eps)
        root = torch.where(keep, lam.clamp_min(0).sqrt(), torch.zeros_like(lam))
        inv_root = torch.where(keep, 1 / root.where(keep, torch.ones_like(root)), torch.zeros_like(lam))
        scale, unscale = Q * root, inv_root[:, None] * Q.T  # S and S^+
        U, sigma, Vh = torch.linalg.svd(d @ scale, full_matrices=False)
        Vh = Vh[:rank] @ unscale
    elif space == "plain":
        U, sigma, Vh = torch.linalg.svd(d, full_matrices=False)
        Vh = Vh[:rank]
    else:
        raise ValueError(f"unknown compensation space {space!r}")
    root_sigma = sigma[:rank].sqrt()
    B = U[:, :rank] * root_sigma
    A = root_sigma[:, None] * Vh
    before = weighted_error(d, covariance)
    after = weighted_error(d - B @ A, covariance)
    return Compensation(A.float(), B.float(), 1 - after / before if before > 0 else 0.0)


def channel_scales(W: "torch.Tensor", W_hat: "torch.Tensor", rounds: int = 4) -> tuple["torch.Tensor", "torch.Tensor"]:
    """Per-row and per-column factors (r, c) with W_hat ~ diag(r) W diag(c), by alternating least
    squares. AWQ does not only round: it multiplies each linear's input columns by a scale s and
    divides the op that feeds it (a norm's weight, or the rows of v_proj / up_proj) by s, so the
    compressed model computes in rescaled coordinates. The teacher's weight (and the LoRA's
    factors) must be carried into those coordinates before their difference means anything; only
    for such bases (a pruned column would read as a scale)."""
    import torch

    W, W_hat = W.double(), W_hat.double()
    r = torch.ones(W.shape[0], dtype=torch.float64)
    for _ in range(rounds):
        Wr = W * r[:, None]
        c = (Wr * W_hat).sum(0) / (Wr * Wr).sum(0).clamp_min(1e-30)
        Wc = W * c[None, :]
        r = (Wc * W_hat).sum(1) / (Wc * Wc).sum(1).clamp_min(1e-30)
    return r.float(), c.float()
