"""The loss floor of each chain structure: for x ~ N(0, s^2 I) and loss = mean over outputs of
(y_hat - W x)^2, MSE(W_hat) = (s^2 / M) ||W - W_hat||_F^2, so every floor is a Frobenius distance
to the structure's best approximation (ksmm/projections.py): the tail of singular values. SVDs
run in float64.
"""

import torch
from torch import Tensor

from .projections import monarch_blocks
from .structures import check_structure


def _tail(s: Tensor, rank: int) -> float:
    return float((s[..., rank:] ** 2).sum())


def loss_floor(W: Tensor, rank: int, structure="butterfly", nblocks=None, input_std=1.0) -> float:
    """min over the structure of (s^2 / M) ||W - W_hat||_F^2 (singular value tails)."""
    m, n = W.shape
    k = check_structure(m, n, rank, structure, nblocks)
    w = monarch_blocks(W, k) if structure == "monarch" else W
    s = torch.linalg.svdvals(w.detach().to(torch.float64))
    return input_std**2 / m * _tail(s, rank)


def zero_predictor_loss(W: Tensor, input_std: float = 1.0) -> float:
    return input_std**2 / W.shape[0] * float(W.detach().to(torch.float64).pow(2).sum())


def expected_mse(W: Tensor, W_hat: Tensor, input_std: float = 1.0) -> Tensor:
    """(s^2 / M) ||W - W_hat||_F^2 as a 0-dim tensor, differentiable in W_hat (the exact loss)."""
    diff = W.to(W_hat.dtype) - W_hat
    return input_std**2 / W.shape[0] * diff.pow(2).sum()
