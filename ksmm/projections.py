"""The best dense matrix each chain structure can reach for a target W, by truncated SVDs in
float64: the SVD warm start of a chain (``model.init=svd``) and the point its loss floor measures
(ksmm/floors.py)."""

import torch
from torch import Tensor

from .structures import check_structure


def _svd64(w: Tensor):
    return torch.linalg.svd(w.detach().to(torch.float64), full_matrices=False)


def lowrank_factors(W: Tensor, rank: int):
    """Truncated SVD W ~ (U S) Vt: returns (U S) of shape (M, r) and Vt of shape (r, N)."""
    u, s, vh = _svd64(W)
    return u[:, :rank] * s[:rank], vh[:rank]


def monarch_blocks(W: Tensor, k: int) -> Tensor:
    # Block (l, i) holds rows m with m % k == l and the i-th slice of N/k columns: this is the
    # grid the two-factor chain produces (see KSLinearChain, structure "monarch").
    m, n = W.shape
    return W.reshape(m // k, k, k, n // k).permute(1, 2, 0, 3)  # (l, i, j, c)


def _unblock(blocks: Tensor) -> Tensor:
    k, _, mb, nb = blocks.shape
    return blocks.permute(2, 0, 1, 3).reshape(mb * k, k * nb)


def monarch_factors(W: Tensor, rank: int, nblocks: int):
    """Blockwise truncated SVD: (U S) of shape (k, k, M/k, r) and Vt of shape (k, k, r, N/k)."""
    u, s, vh = _svd64(monarch_blocks(W, nblocks))
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
