"""A chain of KS factors y = x (K_L ... K_1)^T; patterns[0] (K_1) is applied first."""

from functools import partial

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from . import native
from .factor import KSLinear, KSPattern, ks_apply_fm
from .projections import lowrank_factors, monarch_factors
from .structures import check_structure


def _next_pow2(n: int) -> int:
    return 1 << (n - 1).bit_length()


def butterfly_patterns(out_features: int, in_features: int, rank: int) -> list[KSPattern]:
    """Square butterfly on P = next power of two >= max(M, N) with a rank-r bottleneck on each
    side that differs from P (and on the output side for M == N == P > r, so rank always acts)."""
    m, n, r = out_features, in_features, rank
    p = _next_pow2(max(m, n))
    nlev = p.bit_length() - 1
    pats = [KSPattern(2 ** (i - 1), 2, 2, 2 ** (nlev - i)) for i in range(1, nlev + 1)]
    if n != p:
        pats = [KSPattern(1, r, n, 1), KSPattern(1, p, r, 1)] + pats
    if m != p or (n == p and r < p):
        pats = pats + [KSPattern(1, r, p, 1), KSPattern(1, m, r, 1)]
    return pats or [KSPattern(1, 1, 1, 1)]  # M = N = 1


def chain_patterns(out_features, in_features, rank, structure="butterfly", nblocks=None):
    m, n, r = out_features, in_features, rank
    k = check_structure(m, n, r, structure, nblocks)
    if structure == "butterfly":
        return butterfly_patterns(m, n, r)
    if structure == "monarch":
        # Intermediate n' in [0, k*r*k): factor 1's block i = n' // (r*k), factor 2 reads it as
        # (n' // k, n' % k); so output rows with m % k == l and input block i meet through the r
        # values n' with n' // (r*k) == i and n' % k == l: a rank-r block per (l, i).
        return [KSPattern(k, r * k, n // k, 1), KSPattern(1, m // k, r * k, k)]
    return [KSPattern(1, r, n, 1), KSPattern(1, m, r, 1)]


def _mergeable(p1: KSPattern, p2: KSPattern) -> bool:
    return p2.a == p1.a * p1.b and p1.d % p2.c == 0 and p1.d // p2.c == p2.d


def merge_abcd(p1: KSPattern, w1: Tensor, p2: KSPattern, w2: Tensor):
    """K2 K1 as one KS factor when a2 = a1*b1 and d1 = c2*d2 (e.g. adjacent butterfly factors):
    pattern (a1, b1*b2, c1*c2, d2), W[i, (j, j2), (k, m), l] = w2[i*b1 + j, j2, m, l] *
    w1[i, j, k, m*d2 + l]. Each path through the pair is unique, so it is a product, no sum."""
    a, b1, c1, _ = p1
    _, b2, c2, d2 = p2
    w1v = w1.reshape(a, b1, 1, c1, c2, d2)
    w2v = w2.reshape(a, b1, b2, 1, c2, d2)
    return KSPattern(a, b1 * b2, c1 * c2, d2), (w2v * w1v).reshape(a, b1 * b2, c1 * c2, d2)


def _apply_ops(ops, x: Tensor) -> Tensor:
    """Run KS ops on a batch-major x (rows, in) and return (rows, out).

    Activations are kept feature-major (features, batch) inside: d=1 factors need no
    permutation and the batch is the contiguous inner dimension. A general factor's bmm output
    (a*d, b, batch) is left un-permuted ("pending") so its output permutation and the next
    factor's input permutation become one copy (as in fly's blockdiag_butterfly_multiply).
    """
    if all(callable(op) or op[0].a == op[0].d == 1 for op in ops):
        # Dense factors and blocks on rows (the fused butterfly, the output scale): a
        # bottlenecked butterfly chain. Batch-major matmuls, as nn.Linear does: feature-major
        # here makes the weight gradient a (features x 8) product over the batch, which BLAS
        # runs ~4x slower than its (8 x features) transpose.
        for op in ops:
            x = op(x) if callable(op) else F.linear(x, op[1].reshape(op[0].b, op[0].c))
        return x
    h = x.t()
    n = h.shape[1]
    pend = None  # (pattern, bmm output) awaiting its output permutation
    for i, (p, w) in enumerate(ops):
        last = i == len(ops) - 1
        tiny = p.c == 2 and p.b <= 2 and p.d > 1  # 2x2 butterfly blocks
        if pend is not None:
            q, y = pend
            pend = None
            if _mergeable(q, p) and (p.a > 1 or p.d > 1) and not tiny:
                # feature (i, j, (k2, l2)) of q's output is input (i*b + j, k2, l2) of p
                xp = y.view(q.a, p.c, p.d, q.b, n).permute(0, 3, 2, 1, 4)
                xp = xp.reshape(p.a * p.d, p.c, n)
                wb = w.permute(0, 3, 1, 2).reshape(p.a * p.d, p.b, p.c).contiguous()
                y = torch.bmm(wb, xp)
                if p.d > 1:
                    pend = (p, y)
                else:
                    h = y.reshape(p.out_features, n)
                continue
            h = y.view(q.a, q.d, q.b, n).transpose(1, 2).reshape(q.out_features, n)
        if last and p.a == 1 and p.d == 1:
            return h.t() @ w.reshape(p.b, p.c).t()
        if tiny:
            # Broadcast multiply-add, no permutation: cheaper than a bmm of 2x2 matrices.
            xv = h.reshape(p.a, 1, p.c, p.d, n)
            h = (w.contiguous().unsqueeze(-1) * xv).sum(2).reshape(p.out_features, n)
        elif p.d > 1:
            wb = w.permute(0, 3, 1, 2).reshape(p.a * p.d, p.b, p.c).contiguous()
            xp = h.reshape(p.a, p.c, p.d, n).transpose(1, 2).reshape(p.a * p.d, p.c, n)
            pend = (p, torch.bmm(wb, xp.contiguous()))
        else:
            h = ks_apply_fm(h, w)
    if pend is not None:
        q, y = pend
        y = y.view(q.a, q.d, q.b, n).permute(3, 0, 2, 1)  # (batch, a, b, d): one copy
    else:
        y = h.t()
    return y.reshape(n, -1).contiguous()


class KSLinearChain(nn.Module):
    # Adjacent mergeable factors are multiplied into one larger KS factor (block side up to this)
    # in forward: fewer, larger bmm calls beat many tiny ones. 1 disables merging.
    merge_max = 16
    fold_merge_max = 1

    def __init__(
        self,
        in_features: int,
        out_features: int,
        rank: int,
        structure: str = "butterfly",
        nblocks=None,
        output_scale: float = 1.0,
        device=None,
        dtype=None,
        *,
        patterns=None,
    ):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.structure, self.rank = structure, rank
        if patterns is None:
            nblocks = check_structure(out_features, in_features, rank, structure, nblocks)
            patterns = chain_patterns(out_features, in_features, rank, structure, nblocks)
        self.nblocks = nblocks if structure == "monarch" else None
        self.patterns = [KSPattern(*p) for p in patterns]
        self.factors = nn.ModuleList(KSLinear(p, device=device, dtype=dtype) for p in patterns)
        # A fixed multiplier on the output rather than a large last factor: Adam's steps are
        # ~lr in absolute size, so factors of equal scale keep one lr right for all of them.
        self.register_buffer("output_scale", torch.tensor(float(output_scale), device=device))
        self.reset_parameters()

    @classmethod
    def from_patterns(
        cls,
        patterns,
        in_features=None,
        out_features=None,
        output_scale=1.0,
        device=None,
        dtype=None,
    ):
        pats = [KSPattern(*p) for p in patterns]
        if not pats:
            raise ValueError("patterns are empty; a chain needs at least one KS pattern.")
        n = pats[0].in_features if in_features is None else in_features
        m = pats[-1].out_features if out_features is None else out_features
        if pats[0].in_features != n:
            raise ValueError(
                f"patterns are not chainable: the first factor takes {pats[0].in_features} "
                f"features but in_features={n}."
            )
        for i in range(1, len(pats)):
            if pats[i].in_features != pats[i - 1].out_features:
                raise ValueError(
                    f"patterns are not chainable: factor {i} takes {pats[i].in_features} "
                    f"features but factor {i - 1} outputs {pats[i - 1].out_features}."
                )
        if pats[-1].out_features != m:
            raise ValueError(
                f"patterns are not chainable: the last factor outputs {pats[-1].out_features} "
                f"features but out_features={m}."
            )
        # The chain's rank is at most its narrowest intermediate width.
        rank = min([n, m] + [p.out_features for p in pats[:-1]])
        return cls(n, m, rank, "custom", None, output_scale, device, dtype, patterns=pats)

    def reset_parameters(self, output_scale: float | None = None) -> None:
        # Every factor preserves variance (Var(w) = 1/c from its pattern), so the output RMS is
        # output_scale * RMS(x) at init.
        if output_scale is not None:
            self.output_scale.fill_(float(output_scale))
        for f in self.factors:
            f.reset_parameters()

    @property
    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())

    @property
    def compression_ratio(self) -> float:
        return self.out_features * self.in_features / self.num_parameters

    def _merged(self, start: int = 0, stop: int | None = None, merge_max: int | None = None):
        """(pattern, w_abcd) per op for factors[start:stop], adjacent butterfly-like factors
        merged up to merge_max."""
        merge_max = merge_max or self.merge_max
        ops = []
        # list(...)[a:b], not ModuleList[a:b]: slicing a ModuleList builds a new module (~40 us)
        for p, f in zip(self.patterns[start:stop], list(self.factors)[start:stop], strict=True):
            w = f.weight_abcd()
            if ops and _mergeable(ops[-1][0], p):
                q = ops[-1][0]
                if max(q.b * p.b, q.c * p.c) <= merge_max:
                    ops[-1] = merge_abcd(q, ops[-1][1], p, w)
                    continue
            ops.append((p, w))
        return ops

    def _ops(self, rows: int):
        """The ops to run on a batch of ``rows`` inputs, output scale included.

        A butterfly chain with a rank-r bottleneck is U V B (or B E V, or both): when r < rows
        it is cheaper to multiply the P-wide butterfly B into the r-wide factor next to it
        (r rows of work) than to run it over the batch (rows rows). Same product, same
        parameters and gradients, only the association order changes.
        """
        nfly = self._butterfly_span()
        fused = nfly is not None and native.available(self.factors[0].weight)
        # the chain is linear: the fused kernel applies the output scale for free (the buffer
        # itself, not its float: torch.compile then keeps it an input of the graph)
        scale = self.output_scale if fused else None
        if nfly is None:
            ops = self._merged()
        elif self.rank >= rows:  # the butterfly runs on the batch
            if fused:
                i0, i1 = nfly
                fly = partial(
                    self._butterfly, i0, i1, transpose=False, merge_max=self.merge_max, scale=scale
                )
                ops = self._merged(0, i0) + [fly] + self._merged(i1)
            else:
                ops = self._merged()
        else:
            i0, i1 = nfly
            if fused and i0 == 0 and len(self.factors) - i1 == 2:
                # output side (U V after B), all of it as one autograd node
                return [self._fold_output(i0, i1, scale)]
            pre, post = self._merged(0, i0), self._merged(i1)
            # The neighbour is dense (a = d = 1; at rank 1 two narrow bottleneck factors merge).
            if pre:  # input side: x -> V (r x N) -> E (P x r) -> B ...: fold B E
                pat, e = pre[-1]
                be_t = self._butterfly(i0, i1, e.reshape(pat.b, pat.c).t(), False, scale=scale)
                pre[-1] = (pat, be_t.t().contiguous().reshape(pat))  # row-major: fast grads
            else:  # output side: B -> V (r x P) -> U: fold V B = (B^T V^T)^T
                pat, v = post[0]
                vb = self._butterfly(i0, i1, v.reshape(pat.b, pat.c), True, scale=scale)
                post[0] = (pat, vb.reshape(pat))
            ops = pre + post
        if scale is None:
            pat, w = ops[-1]  # no fused butterfly, so the last op is a factor
            ops[-1] = (pat, w * self.output_scale.to(w.dtype))
        return ops

    def _butterfly(self, start, stop, x: Tensor, transpose: bool, merge_max=None, scale=None):
        """Each row of x (n, P) through the butterfly factors[start:stop] (through B^T with
        ``transpose``), times ``scale`` if given: the fused kernel on CPU, else the PyTorch ops
        (levels merged up to ``merge_max``; unmerged by default, which suits a narrow x)."""
        levels, weights = self._levels(start, stop, transpose)
        if native.available(x) and all(w.dtype == x.dtype for w in weights):
            return native.butterfly_rows(
                x, levels, weights, transpose, 1.0 if scale is None else scale
            )
        ops = self._merged(start, stop, merge_max or self.fold_merge_max)
        if transpose:
            ops = [(KSPattern(q.a, q.c, q.b, q.d), w.transpose(1, 2)) for q, w in ops[::-1]]
        y = _apply_ops(ops, x)
        return y if scale is None else y * scale

    def _levels(self, start: int, stop: int, transpose: bool):
        """(a, d) and weight of each butterfly level in factors[start:stop], in the order the
        kernel applies them (reversed for B^T)."""
        levels = [(p.a, p.d) for p in self.patterns[start:stop]]
        weights = [f.weight for f in list(self.factors)[start:stop]]
        return (levels[::-1], weights[::-1]) if transpose else (levels, weights)

    def _fold_output(self, i0: int, i1: int, scale: Tensor):
        """x -> U (V B)^T... as one op: native.fold_output on the parameters' own storage (V is
        stored (1, P, r), so its rows are strided; U is stored (1, r, m), i.e. U^T)."""
        levels, weights = self._levels(i0, i1, transpose=True)
        v, u = self.factors[i1].weight, self.factors[i1 + 1].weight
        return partial(
            native.fold_output,
            v_rows=v.view(v.shape[1], v.shape[2]).t(),
            u_t=u.view(u.shape[1], u.shape[2]),
            levels=levels,
            weights=weights,
            scale=scale,
        )

    def _butterfly_span(self):
        """(first, stop) factor indices of the square butterfly inside a bottlenecked chain."""
        if self.structure != "butterfly":
            return None
        p = _next_pow2(max(self.in_features, self.out_features))
        nlev = p.bit_length() - 1
        i0 = 2 if self.in_features != p else 0
        if nlev == 0 or len(self.patterns) == nlev:  # no bottleneck: nothing to fold into
            return None
        return i0, i0 + nlev

    def forward(self, x: Tensor) -> Tensor:
        lead = x.shape[:-1]
        h = x.reshape(-1, self.in_features)
        return _apply_ops(self._ops(h.shape[0]), h).reshape(*lead, self.out_features)

    @torch.no_grad()
    def factor_outputs(self, x: Tensor) -> list[Tensor]:
        """Each factor's output, in application order, one factor at a time (no merging or
        folding): what a rank probe measures. The last one includes the output scale."""
        outs, h = [], x
        for i, f in enumerate(self.factors):
            h = f(h)
            outs.append(h * self.output_scale if i == len(self.factors) - 1 else h)
        return outs

    def to_dense(self) -> Tensor:
        """The (out, in) matrix K_L ... K_1, computed as the chain applied to the identity."""
        w = self.factors[0].weight
        return self.forward(torch.eye(self.in_features, device=w.device, dtype=w.dtype)).t()

    @torch.no_grad()
    def load_projection(self, W: Tensor) -> None:
        """Oracle warm start: set the factors so the chain equals projection(W, rank, structure),
        the best approximation of W this structure reaches."""
        self._load_projection(W)
        self.factors[-1].weight.div_(self.output_scale)

    def _load_projection(self, W: Tensor) -> None:
        m, n, r = self.out_features, self.in_features, self.rank
        if tuple(W.shape) != (m, n):
            raise ValueError(f"W must have shape (out, in) = {(m, n)}, got {tuple(W.shape)}.")
        f = self.factors
        if self.structure == "monarch":
            k = self.patterns[0].a
            us, vh = monarch_factors(W, r, k)  # (l, i, j, t), (l, i, t, c)
            f[0].set_weight_abcd(vh.permute(1, 2, 0, 3).reshape(k, r * k, n // k, 1))
            f[1].set_weight_abcd(us.permute(2, 1, 3, 0).reshape(1, m // k, k * r, k))
            return
        if self.structure == "lowrank":
            us, vh = lowrank_factors(W, r)
            f[0].set_weight_abcd(vh.reshape(1, r, n, 1))
            f[1].set_weight_abcd(us.reshape(1, m, r, 1))
            return
        if self.structure != "butterfly":
            raise ValueError(
                f"load_projection supports the built-in structures, not {self.structure!r}."
            )
        p = _next_pow2(max(m, n))
        nlev = p.bit_length() - 1
        in_bn, out_bn = n != p, m != p or (n == p and r < p)
        if p == 1:
            f[0].set_weight_abcd(W.reshape(1, 1, 1, 1))
            return
        if not (in_bn or out_bn):
            raise ValueError(
                "load_projection needs a rank bottleneck: a pure butterfly (rank == in == out, a "
                "power of two) has no closed-form projection of an arbitrary W."
            )
        us, vh = lowrank_factors(W, r)
        # The r-dim code passes through the P-dim butterfly (set to identity) in the first r
        # coordinates: (1, P, r, 1) embeds it, (1, r, P, 1) reads it back.
        sel = torch.eye(p, r, dtype=us.dtype, device=us.device)
        start = 2 if in_bn else 0
        for fac in f[start : start + nlev]:
            eye2 = torch.eye(2, dtype=us.dtype, device=us.device).reshape(1, 2, 2, 1)
            fac.set_weight_abcd(eye2.expand(*fac.pattern))
        if in_bn:
            f[0].set_weight_abcd(vh.reshape(1, r, n, 1))
            f[1].set_weight_abcd((us if not out_bn else sel).reshape(1, p, r, 1))
        if out_bn:
            f[-2].set_weight_abcd((sel.t() if in_bn else vh).reshape(1, r, p, 1))
            f[-1].set_weight_abcd(us.reshape(1, m, r, 1))

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, rank={self.rank}, "
            f"structure={self.structure!r}, nfactors={len(self.factors)}"
        )
