"""SparseGPT (Frantar & Alistarh 2023): OBS pruning with weight updates from the inverse Hessian.

Written in plain torch because LoSA needs the masks and per-layer rates, and the maintained
implementation (llm-compressor) pins an older transformers.
"""

from __future__ import annotations

from calora_cli.compress.masks import lowest

NEEDS = "hessian"
COMPENSATES = True  # its OBS updates already moved the removed weights' error onto the kept ones
BLOCK = 128
DAMP = 0.01


def prune(weight, stats, rate: float, nm: tuple[int, int] | None, blocksize: int = BLOCK, damp: float = DAMP):
    import torch

    W = weight.detach().float().clone()
    rows, cols = W.shape
    H = stats.hessian.clone()
    dead = torch.diag(H) == 0
    H[dead, dead] = 1
    W[:, dead] = 0
    H += damp * torch.mean(torch.diag(H)) * torch.eye(cols, dtype=H.dtype)
    # upper Cholesky factor of H^-1: row i holds the OBS update direction for column i
    Hinv = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(H)), upper=True)
    if nm:
        blocksize -= blocksize % nm[1]
    for i1 in range(0, cols, blocksize):
        i2 = min(i1 + blocksize, cols)
        W1 = W[:, i1:i2].clone()
        Err = torch.zeros_like(W1)
        Hinv1 = Hinv[i1:i2, i1:i2]
        d = torch.diag(Hinv1)
        if nm is None:
            # one exact count per column block, compared across all rows (as the reference does)
            score = W1**2 / d[None, :] ** 2
            pruned = lowest(score.reshape(1, -1), round(score.numel() * rate), dim=1).view_as(W1)
        else:
            pruned = torch.zeros_like(W1, dtype=torch.bool)
        for i in range(i2 - i1):
            w = W1[:, i]
            if nm is not None and i % nm[1] == 0:
                n, m = nm
                score = W1[:, i : i + m] ** 2 / d[None, i : i + m] ** 2
                pruned[:, i : i + m] = lowest(score, m - n, dim=1)
            q = w.clone()
            q[pruned[:, i]] = 0
            err = (w - q) / d[i]
            W1[:, i:] -= err[:, None] * Hinv1[i, i:][None, :]
            W1[:, i] = q
            Err[:, i] = err
        W[:, i1:i2] = W1
        W[:, i2:] -= Err @ Hinv[i1:i2, i2:]
    return W.to(weight.dtype)
