"""One Kronecker-sparse (KS) factor: support I_a (x) 1_{b x c} (x) I_d, shape (a*b*d, a*c*d)."""

import math
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn


class KSPattern(NamedTuple):
    a: int
    b: int
    c: int
    d: int

    @property
    def in_features(self) -> int:
        return self.a * self.c * self.d

    @property
    def out_features(self) -> int:
        return self.a * self.b * self.d

    @property
    def nnz(self) -> int:
        return self.a * self.b * self.c * self.d


def ks_dense(w_abcd: Tensor) -> Tensor:
    """Dense (a*b*d, a*c*d) matrix with K[i*b*d + j*d + l, i*c*d + k*d + l] = w[i, j, k, l]."""
    a, b, c, d = w_abcd.shape
    eye_a = torch.eye(a, dtype=w_abcd.dtype, device=w_abcd.device)
    eye_d = torch.eye(d, dtype=w_abcd.dtype, device=w_abcd.device)
    # K[(i, j, l), (i', k, l')] = delta_ii' w[i, j, k, l] delta_ll'; differentiable in w.
    k = torch.einsum("ijkl,im,ln->ijlmkn", w_abcd, eye_a, eye_d)
    return k.reshape(a * b * d, a * c * d)


def ks_einsum(x: Tensor, w_abcd: Tensor) -> Tensor:
    """Reference y = x K^T, the simplest correct formula (slow; for tests and benchmarks)."""
    a, b, c, d = w_abcd.shape
    y = torch.einsum("...acd,abcd->...abd", x.reshape(*x.shape[:-1], a, c, d), w_abcd)
    return y.reshape(*x.shape[:-1], a * b * d)


def ks_apply_fm(xt: Tensor, w_abcd: Tensor) -> Tensor:
    """Feature-major apply: xt (a*c*d, B) -> K xt (a*b*d, B). Used inside chains, where keeping
    activations feature-major makes d=1 factors permutation-free and the batch the inner dim."""
    a, b, c, d = w_abcd.shape
    n = xt.shape[1]
    # Weights are small: make them contiguous so bmm hits BLAS instead of per-matrix copies.
    if a == 1 and d == 1:
        return w_abcd.reshape(b, c) @ xt
    if d == 1:
        w = w_abcd.reshape(a, b, c).contiguous()
        return torch.bmm(w, xt.reshape(a, c, n)).reshape(a * b, n)
    w = w_abcd.permute(0, 3, 1, 2).reshape(a * d, b, c).contiguous()
    x = xt.reshape(a, c, d, n).transpose(1, 2).reshape(a * d, c, n).contiguous()
    return torch.bmm(w, x).reshape(a, d, b, n).transpose(1, 2).reshape(a * b * d, n)


class KSLinear(nn.Module):
    """y = x K^T for one KS factor. `weight` is stored as (a*d, c, b) with
    weight[i*d + l, k, j] = w[i, j, k, l], the layout the batch-first bmm consumes directly."""

    def __init__(self, pattern, bias: bool = False, device=None, dtype=None):
        super().__init__()
        self.pattern = KSPattern(*pattern)
        a, b, c, d = self.pattern
        if min(self.pattern) < 1:
            raise ValueError(f"KS pattern entries must be >= 1, got {tuple(self.pattern)}.")
        self.in_features = self.pattern.in_features
        self.out_features = self.pattern.out_features
        self.weight = nn.Parameter(torch.empty(a * d, c, b, device=device, dtype=dtype))
        if bias:
            self.bias = nn.Parameter(torch.empty(self.out_features, device=device, dtype=dtype))
        else:
            self.register_parameter("bias", None)
        self.reset_parameters()

    def reset_parameters(self, scale: float = 1.0) -> None:
        # Variance preserving from the pattern: each output sums c inputs, so Var(w) = scale^2 / c
        # (torch's fan_in of the (a*d, c, b) tensor would be c*b and shrink every factor).
        bound = scale * math.sqrt(3.0 / self.pattern.c)
        nn.init.uniform_(self.weight, -bound, bound)
        if self.bias is not None:
            nn.init.zeros_(self.bias)

    def weight_abcd(self) -> Tensor:
        a, b, c, d = self.pattern
        return self.weight.view(a, d, c, b).permute(0, 3, 2, 1)

    @torch.no_grad()
    def set_weight_abcd(self, w: Tensor) -> None:
        a, b, c, d = self.pattern
        w = torch.as_tensor(w).to(self.weight)
        if tuple(w.shape) != (a, b, c, d):
            raise ValueError(f"Expected a weight of shape {(a, b, c, d)}, got {tuple(w.shape)}.")
        self.weight.copy_(w.permute(0, 3, 2, 1).reshape(a * d, c, b))

    def to_dense(self) -> Tensor:
        return ks_dense(self.weight_abcd())

    def forward(self, x: Tensor) -> Tensor:
        a, b, c, d = self.pattern
        lead = x.shape[:-1]
        x = x.reshape(-1, self.in_features)
        n = x.shape[0]
        if a == 1 and d == 1:
            y = F.linear(x, self.weight.view(c, b).t())
        elif d == 1:
            # Block diagonal: the a blocks are contiguous slices of the features, no permutation.
            y = torch.bmm(x.reshape(n, a, c).transpose(0, 1), self.weight)
            y = y.transpose(0, 1).reshape(n, a * b)
        else:
            x = x.reshape(n, a, c, d).transpose(-1, -2).reshape(n, a * d, c).transpose(0, 1)
            y = torch.bmm(x, self.weight)  # (a*d, n, b)
            y = y.transpose(0, 1).reshape(n, a, d, b).transpose(-1, -2).reshape(n, a * b * d)
        if self.bias is not None:
            y = y + self.bias
        return y.reshape(*lead, self.out_features)

    def extra_repr(self) -> str:
        return f"pattern={tuple(self.pattern)}, bias={self.bias is not None}"
