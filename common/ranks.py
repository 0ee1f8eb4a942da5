"""Rank measures of layer representations and the rank-decay dynamics across layers.

All four measures come from one set of
singular values of the (B, D) feature matrix (not centred), computed in float64:

- effective_rank: exp(-sum p_i log p_i), p_i = sigma_i / sum(sigma) (Roy & Vetterli 2007);
- approximate_rank: smallest k with sum_{i<=k} sigma_i^2 / sum sigma^2 >= prop (0.99);
- l1_distribution_rank: smallest k with sum_{i<=k} sigma_i / sum sigma >= prop;
- numerical_rank: #{i : sigma_i > eps * sigma_max} (eps = 0.01).

Degenerate input (NaN/Inf, all zeros, an SVD that does not converge) gives NaN, never 0: a
0 would draw a fake rank collapse. Ranks never exceed min(B, D). Imports no Hydra and no W&B.
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping, Sequence

import numpy as np
import torch

RANK_MEASURES = ("effective_rank", "approximate_rank", "l1_distribution_rank", "numerical_rank")
DYNAMICS_METRICS = ("rank_drop_gini", "rank_decay_centroid", "normalized_aurc")
MODES = ("difference", "ratio")


def singular_values(features: torch.Tensor | np.ndarray) -> torch.Tensor:
    """Singular values (descending, float64) of (..., B, D) features; NaN rows where degenerate.

    ``features`` of shape (B, ...) is flattened to (B, D); a leading stack axis is kept when
    the input is already 3-D and called through :func:`rank_measures_batched`.
    """
    # Always the SVD, never the cheaper Gram-matrix eigenvalues: squaring the spectrum loses
    # the small sigmas (effective_rank off by up to 3e-4 on a 1..1e-7 spectrum at 512x2048).
    x = torch.as_tensor(features).detach().to("cpu", torch.float64)
    if x.shape[-1] > x.shape[-2]:
        # same singular values; LAPACK is ~3x faster on the tall (D x B) orientation here
        x = x.transpose(-1, -2)
    try:
        return torch.linalg.svdvals(x)
    except RuntimeError:  # did not converge: retry one matrix at a time, NaN where it fails
        flat = x.reshape(-1, *x.shape[-2:])
        out = []
        for m in flat:
            try:
                out.append(torch.linalg.svdvals(m))
            except RuntimeError:
                out.append(torch.full((min(m.shape),), float("nan"), dtype=torch.float64))
        return torch.stack(out).reshape(*x.shape[:-2], -1)


def measures_from_singular_values(
    s: torch.Tensor, prop: float = 0.99, eps: float = 0.01
) -> dict[str, torch.Tensor]:
    """The four measures over the last axis of ``s`` (descending singular values)."""
    s = s.to(torch.float64)
    n = s.shape[-1]
    total = s.sum(-1, keepdim=True)
    bad = ~torch.isfinite(s).all(-1) | (total[..., 0] <= 0)
    p = s / total
    entropy = -(torch.where(p > 0, p * torch.log(p), torch.zeros_like(p))).sum(-1)
    effective = torch.exp(entropy)

    def smallest_k(values: torch.Tensor) -> torch.Tensor:
        cum = values.cumsum(-1) / values.sum(-1, keepdim=True)
        # tolerance: a cumulative share that should be 1.0 can land at 1 - 1e-16
        reached = cum >= prop - 1e-12
        k = torch.argmax(reached.to(torch.int8), dim=-1) + 1
        return torch.where(reached.any(-1), k, torch.full_like(k, n)).to(torch.float64)

    approximate = smallest_k(s**2)
    l1 = smallest_k(s)
    numerical = (s > eps * s[..., :1]).sum(-1).to(torch.float64)
    nan = torch.tensor(float("nan"), dtype=torch.float64)
    return {
        "effective_rank": torch.where(bad, nan, effective),
        "approximate_rank": torch.where(bad, nan, approximate),
        "l1_distribution_rank": torch.where(bad, nan, l1),
        "numerical_rank": torch.where(bad, nan, numerical),
    }


def _degenerate_reason(x: torch.Tensor) -> str | None:
    if not torch.isfinite(x).all():
        return "features hold NaN/Inf"
    if not x.any():
        return "features are all zero"
    return None


def rank_measures(
    features: torch.Tensor | np.ndarray, prop: float = 0.99, eps: float = 0.01
) -> dict[str, float]:
    """The four rank measures of one (B, ...) feature tensor, from one SVD."""
    x = torch.as_tensor(features).detach()
    x = x.reshape(x.shape[0], -1) if x.dim() != 2 else x
    reason = _degenerate_reason(x)
    if reason is not None:
        warnings.warn(f"rank measures are NaN: {reason}", RuntimeWarning, stacklevel=2)
        return dict.fromkeys(RANK_MEASURES, float("nan"))
    values = measures_from_singular_values(singular_values(x), prop, eps)
    return {k: float(v) for k, v in values.items()}


def rank_measures_batched(
    features: Mapping[str, torch.Tensor] | Sequence[torch.Tensor],
    prop: float = 0.99,
    eps: float = 0.01,
) -> dict[str, np.ndarray]:
    """Measures of several layers at once: {measure: array (layers,)} in the given order.

    Layers whose flattened (B, D) shapes match share one batched SVD call.
    """
    items = list(features.values() if isinstance(features, Mapping) else features)
    flat = [torch.as_tensor(f).detach().reshape(len(f), -1) for f in items]
    out = {k: np.full(len(flat), np.nan) for k in RANK_MEASURES}
    by_shape: dict[tuple[int, int], list[int]] = {}
    for i, x in enumerate(flat):
        reason = _degenerate_reason(x)
        if reason is not None:
            warnings.warn(
                f"rank measures of layer {i} are NaN: {reason}", RuntimeWarning, stacklevel=2
            )
            continue
        by_shape.setdefault(tuple(x.shape), []).append(i)
    for indices in by_shape.values():
        s = singular_values(torch.stack([flat[i] for i in indices]))
        values = measures_from_singular_values(s, prop, eps)
        for k, v in values.items():
            out[k][indices] = v.numpy()
    return out


_BLOCK_ROWS = 32_768


def _dynamics_block(r: np.ndarray, mode: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(gini, centroid, aurc) of a (rows, m + 1) block of ranks, vectorised over rows."""
    m = r.shape[1] - 1
    prev, nxt = r[:, :-1], r[:, 1:]
    if mode == "difference":
        drops = prev - nxt
    else:
        with np.errstate(divide="ignore", invalid="ignore"):
            drops = np.where(prev > 0, 1.0 - nxt / prev, 0.0)
    pos = np.maximum(drops, 0.0, out=drops)  # NaN stays NaN
    k = np.arange(1, m + 1, dtype=np.float64)
    total = pos @ np.ones(m)
    with np.errstate(divide="ignore", invalid="ignore"):
        # sums as matrix-vector products: one pass each instead of a temporary per product
        centroid = (pos @ k) / total
        pos.sort(axis=1)  # in place (pos is our own array): no second block-sized array
        gini = (pos @ (2 * k - m - 1)) / (m * total)
        # trapezoid sum_{i<m} (R_i + R_{i+1}) / R_0 = (2 sum R - R_0 - R_m) / R_0
        aurc = (2 * (r @ np.ones(m + 1)) - r[:, 0] - r[:, -1]) / (2 * m * r[:, 0])
    no_drop = ~(total > 0)
    gini[no_drop] = np.nan
    centroid[no_drop] = np.nan
    aurc[~(r[:, 0] > 0)] = np.nan
    return gini, centroid, aurc


def compute_rank_decay_dynamics(
    ranks: Sequence[float] | np.ndarray,
    mode: str = "difference",
    input_rank: float | np.ndarray | None = None,
) -> dict[str, float] | dict[str, np.ndarray]:
    """How rank decays from layer to layer: {rank_drop_gini, rank_decay_centroid,
    normalized_aurc}.

    ``ranks``: one step's ranks in layer order (returns floats), or a (steps, layers) array
    (returns arrays, vectorised over steps). ``input_rank`` (scalar or per step) is prepended as
    R_0 when given (an explicit choice: it changes all three numbers). Undefined values
    (no drop at all, R_0 <= 0, fewer than two ranks) are NaN.
    """
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    r = np.asarray(ranks, dtype=np.float64)
    single = r.ndim == 1
    r = np.atleast_2d(r)
    if input_rank is not None:
        r0 = np.broadcast_to(np.asarray(input_rank, dtype=np.float64), (r.shape[0],))
        r = np.concatenate([r0[:, None], r], axis=1)
    m = r.shape[1] - 1  # transitions
    if m < 1:
        nan = np.full(r.shape[0], np.nan)
        result = {"rank_drop_gini": nan, "rank_decay_centroid": nan, "normalized_aurc": nan}
        return {k: float(v[0]) for k, v in result.items()} if single else result
    # Blocks of rows: the same arithmetic, but temporaries of a few MB that the allocator
    # reuses instead of fresh (steps x layers) arrays (page faults were half the time at 1M rows).
    names = ("rank_drop_gini", "rank_decay_centroid", "normalized_aurc")
    if r.shape[0] <= _BLOCK_ROWS:
        result = dict(zip(names, _dynamics_block(r, mode), strict=True))
    else:
        result = {name: np.empty(r.shape[0]) for name in names}
        for lo in range(0, r.shape[0], _BLOCK_ROWS):
            block = _dynamics_block(r[lo : lo + _BLOCK_ROWS], mode)
            for name, values in zip(names, block, strict=True):
                result[name][lo : lo + _BLOCK_ROWS] = values
    return {key: float(v[0]) for key, v in result.items()} if single else result


def dynamics_metric_names(measures: Sequence[str] = RANK_MEASURES) -> list[str]:
    """The 12 W&B names: ``{measure}_{metric}`` per measure and dynamics metric."""
    return [f"{m}_{d}" for m in measures for d in DYNAMICS_METRICS]
