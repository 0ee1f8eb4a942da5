"""Best approximations reachable by each chain structure and the loss floors they imply.

For x ~ N(0, s^2 I) and loss = mean over outputs of (y_hat - W x)^2, MSE(W_hat) = (s^2 / M) *
||W - W_hat||_F^2, so every floor is a Frobenius distance. SVDs run in float64.
"""

import torch
from torch import Tensor

STRUCTURES = ("butterfly", "monarch", "lowrank")


def dense_parameters(out_features: int, in_features: int) -> int:
    return out_features * in_features


def monarch_nblocks(out_features: int, in_features: int, rank: int = 1) -> int:
    """Auto block count: the largest k dividing M and N with k*k <= min(M, N) whose blocks
    (M/k x N/k) still hold the rank (rank <= min(M, N) / k); at least 1."""
    m, n = out_features, in_features
    best = 1
    for k in range(1, min(m, n) + 1):
        if k * k > min(m, n):
            break
        if m % k == 0 and n % k == 0 and rank * k <= min(m, n):
            best = k
    return best


def check_structure(out_features, in_features, rank, structure="butterfly", nblocks=None):
    """Validate a request; returns the resolved nblocks for monarch (None otherwise)."""
    m, n = out_features, in_features
    if structure not in STRUCTURES:
        raise ValueError(f"unknown structure {structure!r}; expected one of {STRUCTURES}.")
    if m < 1 or n < 1:
        raise ValueError(f"in_features and out_features must be >= 1, got {n} and {m}.")
    if int(rank) != rank or rank <= 0 or rank > min(m, n):
        raise ValueError(
            f"rank must be an integer in 1 <= rank <= min(in_features, out_features) = {min(m, n)}"
            f", got {rank}."
        )
    if structure != "monarch":
        return None
    k = monarch_nblocks(m, n, rank) if nblocks is None else nblocks
    if int(k) != k or k < 1 or m % k or n % k:
        raise ValueError(
            f"nblocks={k} must be a positive integer dividing both in_features={n} and "
            f"out_features={m}."
        )
    if rank > min(m // k, n // k):
        raise ValueError(
            f"monarch rank {rank} exceeds the block size min(out/nblocks, in/nblocks) = "
            f"{min(m // k, n // k)} for nblocks={k}; allowed range is 1 <= rank <= "
            f"{min(m // k, n // k)}."
        )
    return k


def _svd64(w: Tensor):
    return torch.linalg.svd(w.detach().to(torch.float64), full_matrices=False)


def lowrank_factors(W: Tensor, rank: int):
    """Truncated SVD W ~ (U S) Vt: returns (U S) of shape (M, r) and Vt of shape (r, N)."""
    u, s, vh = _svd64(W)
    return u[:, :rank] * s[:rank], vh[:rank]


def _monarch_blocks(W: Tensor, k: int) -> Tensor:
    # Block (l, i) holds rows m with m % k == l and the i-th slice of N/k columns: this is the
    # grid the two-factor chain produces (see KSLinearChain, structure "monarch").
    m, n = W.shape
    return W.reshape(m // k, k, k, n // k).permute(1, 2, 0, 3)  # (l, i, j, c)


def _unblock(blocks: Tensor) -> Tensor:
    k, _, mb, nb = blocks.shape
    return blocks.permute(2, 0, 1, 3).reshape(mb * k, k * nb)


def monarch_factors(W: Tensor, rank: int, nblocks: int):
    """Blockwise truncated SVD: (U S) of shape (k, k, M/k, r) and Vt of shape (k, k, r, N/k)."""
    u, s, vh = _svd64(_monarch_blocks(W, nblocks))
    return u[..., :rank] * s[..., None, :rank], vh[..., :rank, :]


def projection(W: Tensor, rank: int, structure: str = "butterfly", nblocks=None) -> Tensor:
    """Best float64 dense matrix of the structure (butterfly/lowrank: Eckart-Young truncation,
    since the butterfly adds no expressivity beyond its rank-r bottleneck; for a pure butterfly,
    rank == P == M == N, this returns W: a lower bound, not a reachable point)."""
    m, n = W.shape
    k = check_structure(m, n, rank, structure, nblocks)
    if structure == "monarch":
        us, vh = monarch_factors(W, rank, k)
        return _unblock(us @ vh)
    us, vh = lowrank_factors(W, rank)
    return us @ vh


def _tail(s: Tensor, rank: int) -> float:
    return float((s[..., rank:] ** 2).sum())


def loss_floor(W: Tensor, rank: int, structure="butterfly", nblocks=None, input_std=1.0) -> float:
    """min over the structure of (s^2 / M) ||W - W_hat||_F^2 (singular value tails)."""
    m, n = W.shape
    k = check_structure(m, n, rank, structure, nblocks)
    w = _monarch_blocks(W, k) if structure == "monarch" else W
    s = torch.linalg.svdvals(w.detach().to(torch.float64))
    return input_std**2 / m * _tail(s, rank)


def zero_predictor_loss(W: Tensor, input_std: float = 1.0) -> float:
    return input_std**2 / W.shape[0] * float(W.detach().to(torch.float64).pow(2).sum())


def expected_mse(W: Tensor, W_hat: Tensor, input_std: float = 1.0) -> Tensor:
    """(s^2 / M) ||W - W_hat||_F^2 as a 0-dim tensor, differentiable in W_hat (the exact loss)."""
    diff = W.to(W_hat.dtype) - W_hat
    return input_std**2 / W.shape[0] * diff.pow(2).sum()
