import concurrent.futures
import math
import platform
import shutil
import threading
import time
from pathlib import Path

import pytest
import torch

from ksmm import (
    KSLinear,
    KSLinearChain,
    KSPattern,
    expected_mse,
    ks_dense,
    ks_einsum,
    loss_floor,
    native,
    projection,
    zero_predictor_loss,
)

F64 = torch.float64
PATTERNS = [(1, 3, 5, 1), (4, 3, 2, 1), (1, 2, 3, 4), (2, 3, 4, 5), (4, 2, 2, 8), (8, 2, 2, 1)]
SHAPES = [(64, 64), (32, 64), (64, 16), (96, 160), (300, 500), (1, 1), (7, 3)]


def sylvester_hadamard(n: int) -> torch.Tensor:
    h = torch.ones(1, 1, dtype=F64)
    while h.shape[0] < n:
        h = torch.cat([torch.cat([h, h], 1), torch.cat([h, -h], 1)], 0)
    return h


def test_pattern_sizes():
    p = KSPattern(2, 3, 4, 5)
    assert (p.in_features, p.out_features, p.nnz) == (40, 30, 120)


def test_ks_dense_index_formula():
    a, b, c, d = 2, 3, 4, 5
    w = torch.randn(a, b, c, d, dtype=F64)
    k = ks_dense(w)
    assert k.shape == (a * b * d, a * c * d)
    ref = torch.zeros_like(k)
    for i in range(a):
        for j in range(b):
            for kk in range(c):
                for l in range(d):  # noqa: E741
                    ref[i * b * d + j * d + l, i * c * d + kk * d + l] = w[i, j, kk, l]
    assert torch.equal(k, ref)


@pytest.mark.parametrize("pattern", PATTERNS)
@pytest.mark.parametrize("bias", [False, True])
def test_factor_forward_and_grad(pattern, bias):
    torch.manual_seed(0)
    f = KSLinear(pattern, bias=bias, dtype=F64)
    w = f.weight_abcd()
    assert w.shape == tuple(pattern)
    assert torch.allclose(f.to_dense(), ks_dense(w))
    # set/get round trip
    w2 = torch.randn(*pattern, dtype=F64)
    f.set_weight_abcd(w2)
    assert torch.equal(f.weight_abcd(), w2)
    dense = f.to_dense()
    for lead in [(7,), (2, 3), ()]:
        x = torch.randn(*lead, f.in_features, dtype=F64, requires_grad=True)
        y = f(x)
        ref = x @ dense.T + (f.bias if bias else 0)
        assert y.shape == (*lead, f.out_features)
        assert torch.allclose(y, ref, atol=1e-12)
        assert torch.allclose(y, ks_einsum(x, w2) + (f.bias if bias else 0), atol=1e-12)
    # gradients vs autograd through the dense reference
    x = torch.randn(5, f.in_features, dtype=F64, requires_grad=True)
    g = torch.randn(5, f.out_features, dtype=F64)
    gx, gw = torch.autograd.grad((f(x) * g).sum(), [x, f.weight])
    wr = f.weight_abcd().detach().clone().requires_grad_()
    x2 = x.detach().clone().requires_grad_()
    gx2, gwr = torch.autograd.grad(((x2 @ ks_dense(wr).T) * g).sum(), [x2, wr])
    assert torch.allclose(gx, gx2, atol=1e-12)
    f.weight.grad = gw
    a, b, c, d = pattern
    assert torch.allclose(gw.view(a, d, c, b).permute(0, 3, 2, 1), gwr, atol=1e-12)


def test_factor_init_variance():
    torch.manual_seed(0)
    f = KSLinear((4, 16, 64, 2))
    assert f.weight.var().item() == pytest.approx(1 / 64, rel=0.1)
    f.reset_parameters(scale=3.0)
    assert f.weight.var().item() == pytest.approx(9 / 64, rel=0.1)


def _dense_product(chain):
    d = None
    for f in chain.factors:
        k = f.to_dense()
        d = k if d is None else k @ d
    return d


@pytest.mark.parametrize("structure", ["butterfly", "monarch", "lowrank"])
@pytest.mark.parametrize("shape", SHAPES)
def test_chain_dense_forward_rank(structure, shape):
    torch.manual_seed(0)
    m, n = shape
    for r in sorted({1, max(1, min(m, n) // 4), min(m, n)}):
        chain = KSLinearChain(n, m, r, structure, dtype=F64)
        pats = chain.patterns
        assert pats[0].in_features == n and pats[-1].out_features == m
        for p, q in zip(pats[:-1], pats[1:], strict=True):
            assert q.in_features == p.out_features
        dense = chain.to_dense()
        assert dense.shape == (m, n)
        assert torch.allclose(dense, _dense_product(chain), atol=1e-10)
        x = torch.randn(3, 5, n, dtype=F64)
        assert torch.allclose(chain(x), x @ dense.T, atol=1e-10)
        if structure == "monarch":
            k = chain.nblocks
            blocks = dense.reshape(m // k, k, k, n // k).permute(1, 2, 0, 3)
            assert (torch.linalg.matrix_rank(blocks) <= r).all()
        else:
            assert torch.linalg.matrix_rank(dense).item() <= r
        assert chain.num_parameters == sum(p.nnz for p in pats)
        assert chain.compression_ratio == pytest.approx(m * n / chain.num_parameters)


def test_chain_merge_equals_unmerged():
    torch.manual_seed(0)
    chain = KSLinearChain(256, 256, 256, dtype=F64)
    x = torch.randn(4, 256, dtype=F64)
    y = chain(x)
    chain.merge_max = 1
    assert torch.allclose(y, chain(x), atol=1e-12)


def test_butterfly_rank_acts_on_square_power_of_two():
    torch.manual_seed(0)
    for r in [1, 8, 63]:
        chain = KSLinearChain(64, 64, r, dtype=F64)
        assert torch.linalg.matrix_rank(chain.to_dense()).item() == r
    pure = KSLinearChain(64, 64, 64)
    assert pure.patterns == [(2 ** (i - 1), 2, 2, 2 ** (6 - i)) for i in range(1, 7)]
    assert KSLinearChain(64, 128, 8).patterns[:2] == [(1, 8, 64, 1), (1, 128, 8, 1)]


def test_butterfly_patterns_layout():
    chain = KSLinearChain(160, 96, 8)  # N=160, M=96, P=256
    assert chain.patterns[:2] == [(1, 8, 160, 1), (1, 256, 8, 1)]
    assert chain.patterns[-2:] == [(1, 8, 256, 1), (1, 96, 8, 1)]
    assert len(chain.patterns) == 4 + 8


def test_monarch_blocks_have_rank_r():
    torch.manual_seed(0)
    m, n, k, r = 48, 32, 4, 2
    chain = KSLinearChain(n, m, r, "monarch", nblocks=k, dtype=F64)
    assert chain.patterns == [(k, r * k, n // k, 1), (1, m // k, r * k, k)]
    d = chain.to_dense()
    for l in range(k):  # noqa: E741
        for i in range(k):
            block = d[l::k, i * (n // k) : (i + 1) * (n // k)]
            assert torch.linalg.matrix_rank(block).item() == r
    assert torch.linalg.matrix_rank(d).item() > r  # genuinely structured, not low rank
    assert KSLinearChain(64, 64, 2, "monarch").nblocks == 8


@pytest.mark.parametrize("structure", ["butterfly", "monarch", "lowrank"])
@pytest.mark.parametrize("shape", [(64, 64), (32, 64), (96, 160), (48, 20)])
def test_load_projection_reaches_floor(structure, shape):
    torch.manual_seed(0)
    m, n = shape
    w = torch.randn(m, n, dtype=F64)
    floors = []
    ranks = [1, 2, 4] if structure == "monarch" else [1, 4, min(m, n) // 2, min(m, n)]
    for r in ranks:
        if structure == "butterfly" and r == m == n:
            continue  # pure butterfly: no closed-form projection
        chain = KSLinearChain(n, m, r, structure, dtype=F64)
        chain.load_projection(w)
        proj = projection(w, r, structure)
        assert torch.allclose(chain.to_dense(), proj, atol=1e-9)
        floor = loss_floor(w, r, structure, input_std=2.0)
        mse = float(expected_mse(w, chain.to_dense().detach(), 2.0))
        assert mse == pytest.approx(floor, rel=1e-7, abs=1e-9)
        floors.append(floor)
    assert all(f1 > f2 for f1, f2 in zip(floors[:-1], floors[1:], strict=True))
    if structure != "monarch":
        assert loss_floor(w, min(m, n), structure) == pytest.approx(0, abs=1e-18)
    assert zero_predictor_loss(w, 2.0) == pytest.approx(4 * float((w**2).sum()) / m)


def test_floor_eckart_young_values():
    w = torch.diag(torch.tensor([3.0, 2.0, 1.0], dtype=F64))
    assert loss_floor(w, 1, "lowrank") == pytest.approx((4 + 1) / 3)
    assert loss_floor(w, 2, input_std=0.5) == pytest.approx(0.25 / 3)


def test_load_projection_float32_and_pure_butterfly_error():
    torch.manual_seed(0)
    w = torch.randn(48, 80)
    chain = KSLinearChain(80, 48, 6)
    chain.load_projection(w)
    assert torch.allclose(chain.to_dense().double(), projection(w, 6), atol=1e-4)
    with pytest.raises(ValueError, match="pure butterfly"):
        KSLinearChain(64, 64, 64).load_projection(torch.randn(64, 64))


def test_init_preserves_variance_long_chain():
    torch.manual_seed(0)
    x = torch.randn(512, 1024)
    with torch.no_grad():
        chain = KSLinearChain(1024, 1024, 1024)
        assert len(chain.factors) == 10
        ratio = chain(x).var().item() / x.var().item()
        assert 0.5 < ratio < 2
        chain = KSLinearChain(1024, 1024, 1024, output_scale=3.0)
        assert 0.5 < chain(x).var().item() / (9 * x.var().item()) < 2
        for structure in ["butterfly", "monarch", "lowrank"]:
            chain = KSLinearChain(1024, 700, 64, structure, output_scale=0.5)
            y = chain(x)
            assert y.shape == (512, 700)
            assert 0.5 < y.var().item() / (0.25 * x.var().item()) < 2


def test_errors():
    with pytest.raises(ValueError, match="rank must be"):
        KSLinearChain(64, 32, 0)
    with pytest.raises(ValueError, match=r"rank must be .*min\(in_features, out_features\) = 32"):
        KSLinearChain(64, 32, 33)
    with pytest.raises(ValueError, match="nblocks=3 must .* divid"):
        KSLinearChain(64, 32, 2, "monarch", nblocks=3)
    with pytest.raises(ValueError, match="monarch rank 5 exceeds the block size"):
        KSLinearChain(64, 32, 5, "monarch", nblocks=8)
    with pytest.raises(ValueError, match="unknown structure 'kron'"):
        KSLinearChain(64, 32, 2, "kron")
    with pytest.raises(ValueError, match="not chainable: factor 1"):
        KSLinearChain.from_patterns([(1, 8, 16, 1), (1, 4, 6, 1)])
    with pytest.raises(ValueError, match="not chainable: the first factor"):
        KSLinearChain.from_patterns([(1, 8, 16, 1)], in_features=12)
    with pytest.raises(ValueError, match="rank must be"):
        loss_floor(torch.randn(4, 6), 5)


@pytest.mark.parametrize(
    "pats",
    [
        [(1, 2, 2, 4), (2, 2, 2, 2), (1, 3, 8, 1)],
        [(1, 2, 2, 4), (2, 2, 2, 2)],  # ends on a general factor
        [(1, 2, 2, 4), (1, 4, 4, 2), (2, 3, 2, 2)],  # general factors that do not merge
        [(2, 3, 2, 2), (6, 2, 2, 1), (3, 2, 2, 2), (1, 5, 12, 1)],
    ],
)
@pytest.mark.parametrize("merge_max", [1, 16])
def test_from_patterns(pats, merge_max):
    torch.manual_seed(0)
    chain = KSLinearChain.from_patterns(pats, dtype=F64)
    chain.merge_max = merge_max
    n, m = pats[0][0] * pats[0][2] * pats[0][3], pats[-1][0] * pats[-1][1] * pats[-1][3]
    assert (chain.in_features, chain.out_features) == (n, m)
    x = torch.randn(2, 3, n, dtype=F64)
    assert torch.allclose(chain(x), x @ _dense_product(chain).T, atol=1e-12)
    assert torch.allclose(chain.to_dense(), _dense_product(chain), atol=1e-12)


def test_hadamard_positive_control():
    torch.manual_seed(0)
    n = 64
    w = sylvester_hadamard(n).float()
    chain = KSLinearChain(n, n, n, output_scale=w.norm().item() / math.sqrt(n))
    assert len(chain.factors) == 6  # pure butterfly
    opt = torch.optim.Adam(chain.parameters(), lr=0.02)
    t0 = time.perf_counter()
    for _ in range(3000):
        loss = (w - chain.to_dense()).pow(2).sum() / n
        opt.zero_grad()
        loss.backward()
        opt.step()
        rel = ((w - chain.to_dense()).pow(2).sum() / w.pow(2).sum()).item()
        if rel < 1e-3:
            break
    assert rel < 1e-3, rel
    assert time.perf_counter() - t0 < 20


@pytest.mark.parametrize("fused", [True, False], ids=["fused-kernel", "pytorch-ops"])
# output-side bottleneck, square, both sides, input side only (the butterfly is last); at rank
# 1 the small ones' two bottleneck factors (16 wide at most: merge_max) are mergeable
@pytest.mark.parametrize(
    "shape", [(48, 64), (64, 64), (100, 40), (300, 500), (64, 40), (16, 16), (12, 16)]
)
@pytest.mark.parametrize("rank", [8, 1])
def test_butterfly_fold_matches_running_on_the_batch(shape, rank, fused, monkeypatch):
    """Folding B into the bottleneck (rows > rank) and running B on the batch agree, grads too,
    with the fused CPU kernel and with the pure PyTorch path."""
    if fused and not native.available(torch.zeros(1)):
        pytest.skip("no C compiler: the fused kernel is unavailable")
    if not fused:
        monkeypatch.setattr(native, "_lib", False)
    m, n = shape
    chain = KSLinearChain(n, m, rank, output_scale=1.7).double()
    dense = ks_chain_reference(chain)
    for rows in (3, 64) if rank > 3 else (64,):  # 3 < rank: B on the batch; 64 > rank: folded
        x = torch.randn(rows, n, dtype=torch.float64, requires_grad=True)
        y = chain(x)
        torch.testing.assert_close(y, x @ dense.T)
        grads = torch.autograd.grad(y.square().sum(), [x, *chain.parameters()])
        ref_chain_grads = torch.autograd.grad(
            (x @ ks_chain_reference(chain).T).square().sum(), [x, *chain.parameters()]
        )
        for g, ref in zip(grads, ref_chain_grads, strict=True):
            torch.testing.assert_close(g, ref)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("rows", [16, 100], ids=["on-the-batch", "folded"])
@pytest.mark.parametrize("input_grad", [False, True])
def test_fused_paths_in_both_dtypes(dtype, rows, input_grad):
    """The butterfly on the batch (16 rows < rank 64) and folded into the output bottleneck
    (100 rows), float64 and float32 (vector loops), for training data (no input gradient: the
    kernel skips it) and for an input that needs its gradient."""
    torch.manual_seed(0)
    chain = KSLinearChain(256, 96, 64, output_scale=1.3).to(dtype)
    x = torch.randn(rows, 256, dtype=dtype, requires_grad=input_grad)
    chain(x).square().sum().backward()
    got = [p.grad for p in chain.parameters()]
    chain.zero_grad()
    x_ref = x.detach().double().requires_grad_(input_grad)
    (x_ref @ ks_chain_reference(chain.double()).T).square().sum().backward()
    tol = {} if dtype == torch.float64 else dict(rtol=2e-4, atol=2e-3)
    for g, p in zip(got, chain.parameters(), strict=True):
        torch.testing.assert_close(g.double(), p.grad, **tol)
    if input_grad:
        torch.testing.assert_close(x.grad.double(), x_ref.grad, **tol)


def test_folded_chains_on_the_same_data_keep_their_own_gradients():
    """Two folded chains of one shape on training data (no input gradient) share the reused
    scratch for V B and its gradient: each one's gradients still match its own reference."""
    torch.manual_seed(0)
    chains = [KSLinearChain(256, 96, 8, output_scale=s) for s in (1.0, 0.5)]
    x = torch.randn(100, 256)
    (chains[0](x) * chains[1](x)).sum().backward()
    got = [[p.grad for p in c.parameters()] for c in chains]
    ref = [ks_chain_reference(c.double()) for c in chains]  # the chains' own weights, in f64
    for c in chains:
        c.zero_grad()
    ((x.double() @ ref[0].T) * (x.double() @ ref[1].T)).sum().backward()
    for c, grads in zip(chains, got, strict=True):
        for g, p in zip(grads, c.parameters(), strict=True):
            torch.testing.assert_close(g.double(), p.grad, rtol=2e-4, atol=2e-3)


def ks_chain_reference(chain):
    """The chain's dense matrix from ks_dense of each factor (no fast path involved)."""
    dense = torch.eye(chain.in_features, dtype=torch.float64)
    for f in chain.factors:
        dense = ks_dense(f.weight_abcd()) @ dense
    return chain.output_scale * dense


def test_factor_outputs_end_at_the_chain_output():
    chain = KSLinearChain(96, 40, 8, output_scale=2.0).double()
    x = torch.randn(5, 96, dtype=torch.float64)
    outs = chain.factor_outputs(x)
    assert len(outs) == len(chain.patterns)
    assert [o.shape[1] for o in outs] == [p.out_features for p in chain.patterns]
    torch.testing.assert_close(outs[-1], chain(x))


@pytest.mark.parametrize("transpose", [False, True])
def test_fused_butterfly_gradcheck(transpose):
    if not native.available(torch.zeros(1, dtype=torch.float64)):
        pytest.skip("no C compiler: the fused kernel is unavailable")
    torch.manual_seed(0)
    levels = [(1, 8), (2, 4), (4, 2), (8, 1)]  # P = 16
    if transpose:
        levels = levels[::-1]
    ws = [torch.randn(a * d, 2, 2, dtype=F64, requires_grad=True) for a, d in levels]
    x = torch.randn(3, 16, dtype=F64, requires_grad=True)
    ref = x
    for (a, d), w in zip(levels, ws, strict=True):
        w_abcd = w.view(a, d, 2, 2).permute(0, 3, 2, 1)
        ref = ks_einsum(ref, w_abcd.transpose(1, 2) if transpose else w_abcd)
    torch.testing.assert_close(native.butterfly_rows(x, levels, ws, transpose), ref)
    assert torch.autograd.gradcheck(
        lambda x, *w: native.butterfly_rows(x, levels, w, transpose), (x, *ws)
    )
    assert torch.autograd.gradcheck(  # a non-contiguous input, as the chain passes
        lambda x, *w: native.butterfly_rows(x.t(), levels, w, transpose),
        (x.detach().t().contiguous().requires_grad_(), *ws),
    )
    ds, scale = [d for _, d in levels], torch.tensor(-1.5, dtype=F64)
    assert torch.autograd.gradcheck(  # the registered op (what compiled graphs call)
        lambda x, *w: native.butterfly_levels(x, list(w), ds, transpose, scale), (x, *ws)
    )


@pytest.mark.parametrize("transpose", [False, True])
@pytest.mark.parametrize(
    "levels",
    [
        [(1, 32), (2, 16), (4, 8), (8, 4), (16, 2), (32, 1)],  # P = 64: vector loops, shuffles
        [(1, 24), (3, 8), (4, 6), (12, 2), (24, 1)],  # P = 48: vector and scalar levels
        [(4, 8), (2, 16), (1, 32), (8, 4), (32, 1)],  # two-level passes small+big, big+small
        [(2, 16), (2, 16), (1, 32), (32, 1), (32, 1)],  # the same distance twice in a row
        [(1, 48), (3, 16), (6, 8)],  # P = 96: a distance of 48, not a power of two
        [(1, 1)],  # P = 2: one level, scalar
    ],
    ids=["P64", "P48", "P64-mixed", "P64-repeated", "P96", "P2"],
)
@pytest.mark.parametrize("layout", ["rows", "columns"])
@pytest.mark.parametrize("isa", ["auto", "avx2"])
def test_fused_butterfly_float32_matches_float64_reference(
    levels, transpose, layout, isa, monkeypatch
):
    """The float32 kernel (vector loops where a level allows them: 16 wide on AVX-512, 8 wide
    in the AVX2 build) against the float64 einsum reference; "columns": x and the gradient are
    strided, as a rank-r factor's rows are the columns of its stored weight, and the input
    gradient comes back in x's layout."""
    if isa != "auto":  # its own build (cached on disk after the first case)
        monkeypatch.setattr(native, "_lib", None)
        monkeypatch.setenv("KSMM_ISA", isa)
    if not native.available(torch.zeros(1)):
        pytest.skip("no C compiler: the fused kernel is unavailable")
    torch.manual_seed(0)
    p = 2 * levels[0][0] * levels[0][1]
    if transpose:
        levels = levels[::-1]
    ws = [torch.randn(a * d, 2, 2, requires_grad=True) for a, d in levels]
    x = torch.randn(p, 37).t() if layout == "columns" else torch.randn(37, p)
    x.requires_grad_()
    g = torch.randn(p, 37).t()  # a strided output gradient in both layouts
    y = native.butterfly_rows(x, levels, ws, transpose, scale=-0.7)
    y.backward(g)
    ref_x = x.detach().double().requires_grad_()
    ref_ws = [w.detach().double().requires_grad_() for w in ws]
    ref = ref_x
    for (a, d), w in zip(levels, ref_ws, strict=True):
        w_abcd = w.view(a, d, 2, 2).permute(0, 3, 2, 1)
        ref = ks_einsum(ref, w_abcd.transpose(1, 2) if transpose else w_abcd)
    ref = -0.7 * ref
    ref.backward(g.double())
    tol = dict(rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(y, ref.float(), **tol)
    torch.testing.assert_close(x.grad, ref_x.grad.float(), **tol)
    assert x.grad.stride() == x.stride()
    for w, r in zip(ws, ref_ws, strict=True):
        torch.testing.assert_close(w.grad, r.grad.float(), **tol)


def test_fused_butterfly_checks_its_inputs_and_takes_an_empty_batch():
    if not native.available(torch.zeros(1)):
        pytest.skip("no C compiler: the fused kernel is unavailable")
    levels, x = [(1, 2), (2, 1)], torch.randn(3, 4)
    with pytest.raises(TypeError, match=r"weights\[0\] is torch.float64 but x is torch.float32"):
        native.butterfly_rows(x, levels, [torch.randn(2, 2, 2, dtype=F64) for _ in levels])
    with pytest.raises(ValueError, match=r"needs a\*2\*d = 4"):
        native.butterfly_rows(x, [(1, 4)], [torch.randn(4, 2, 2)])
    chain = KSLinearChain(64, 48, 8)
    x = torch.zeros(0, 64, requires_grad=True)
    y = chain(x)  # an empty batch (it crashed the kernel)
    y.sum().backward()
    assert y.shape == (0, 48) and x.grad.shape == (0, 64)


def test_fused_kernel_loads_once_when_threads_race_for_it(tmp_path, monkeypatch):
    """Threads that call in while the library is being built wait for it (one of them used to
    get None back)."""
    monkeypatch.setattr(native, "_lib", None)
    monkeypatch.setenv("KSMM_CACHE", str(tmp_path))
    build = native._build_and_configure

    def slow_build():  # every thread arrives while the first one is still building
        time.sleep(0.5)
        return build()

    monkeypatch.setattr(native, "_build_and_configure", slow_build)
    barrier = threading.Barrier(4)

    def load(_):
        barrier.wait()
        return native._load()

    with concurrent.futures.ThreadPoolExecutor(4) as pool:
        libs = list(pool.map(load, range(4)))
    if libs[0] is None:
        pytest.skip("no C compiler: the fused kernel is unavailable")
    assert all(lib is libs[0] for lib in libs)


def test_fused_butterfly_refuses_double_backward():
    """Its gradients come from C: a second derivative must fail loudly, not come out as 0, on
    the eager path and through the registered op (what a compiled graph runs)."""
    if not native.available(torch.zeros(1)):
        pytest.skip("no C compiler: the fused kernel is unavailable")
    levels = [(1, 2), (2, 1)]
    ws = [torch.randn(2, 2, 2, requires_grad=True) for _ in levels]
    x = torch.randn(3, 4, requires_grad=True)
    paths = {
        "once_differentiable": lambda: native.butterfly_rows(x, levels, ws),
        "no autograd formula": lambda: native.butterfly_levels(
            x, ws, [2, 1], False, torch.tensor(1.0)
        ),
    }
    for match, run in paths.items():
        (gx,) = torch.autograd.grad(run().square().sum(), [x], create_graph=True)
        with pytest.raises(RuntimeError, match=match):
            gx.sum().backward()


def test_fused_kernel_without_a_compiler_falls_back_with_one_warning(tmp_path, monkeypatch):
    monkeypatch.setattr(native, "_lib", None)
    monkeypatch.delenv("KSMM_NATIVE", raising=False)
    monkeypatch.setenv("KSMM_CACHE", str(tmp_path))
    monkeypatch.setenv("CC", str(tmp_path / "no-such-cc"))
    with pytest.warns(UserWarning, match="fused butterfly kernel is unavailable"):
        assert not native.available(torch.zeros(1))
    chain = KSLinearChain(64, 48, 8).double()
    x = torch.randn(32, 64, dtype=F64)
    torch.testing.assert_close(chain(x), x @ ks_chain_reference(chain).T)
    assert not list(tmp_path.rglob("*.so"))


def test_fused_two_forwards_before_one_backward():
    """Gradient accumulation: each backward pass uses its own forward pass's input."""
    torch.manual_seed(0)
    chain = KSLinearChain(64, 48, 8).double()
    dense = ks_chain_reference(chain)
    x1, x2 = (torch.randn(32, 64, dtype=F64) for _ in range(2))
    (chain(x1).square().sum() + chain(x2).square().sum()).backward()
    got = [p.grad.clone() for p in chain.parameters()]
    chain.zero_grad()
    ref = ks_chain_reference(chain)
    ((x1 @ ref.T).square().sum() + (x2 @ ref.T).square().sum()).backward()
    for g, p in zip(got, chain.parameters(), strict=True):
        torch.testing.assert_close(g, p.grad)
    assert torch.allclose(dense, ref)


def _needs_kernel():
    if not native.available(torch.zeros(1)):
        pytest.skip("no C compiler: the fused kernel is unavailable")


def _chain_grads(model, chain, x):
    y = model(x)
    grads = torch.autograd.grad(y.square().sum(), [x, *chain.parameters()])
    return y, grads


@pytest.mark.parametrize("backend", ["aot_eager", "inductor"])
def test_chain_under_torch_compile_matches_eager(backend):
    """torch.compile traces the chain through the registered op in one graph (fullgraph: no
    break at the ctypes call), forward and backward, folded (rows > rank) and on the batch;
    a changed output_scale reaches the compiled graph (it is an input, not a constant)."""
    _needs_kernel()
    torch._dynamo.reset()
    torch.manual_seed(0)
    ops = []

    def spy(gm, inputs):  # the ops dynamo put in the graph, then the backend under test
        ops.extend(str(n.target) for n in gm.graph.nodes if n.op == "call_function")
        return torch._dynamo.lookup_backend(backend)(gm, inputs)

    rows_cases = (32,) if backend == "inductor" else (32, 4)  # inductor: one case, ~3 s
    for rows in rows_cases:
        chain = KSLinearChain(64, 48, 8, output_scale=1.5)
        compiled = torch.compile(chain, backend=spy, fullgraph=True)
        x = torch.randn(rows, 64, requires_grad=True)
        y, grads = _chain_grads(compiled, chain, x)
        y_ref, ref = _chain_grads(chain, chain, x)
        torch.testing.assert_close(y, y_ref)
        for g, r in zip(grads, ref, strict=True):
            torch.testing.assert_close(g, r)
        chain.output_scale.fill_(-2.0)
        torch.testing.assert_close(compiled(x), chain(x))
    assert "ksmm.butterfly_levels.default" in ops


def test_chain_exports_with_the_op():
    _needs_kernel()
    chain = KSLinearChain(64, 48, 8, output_scale=1.5)
    x = torch.randn(32, 64)
    exported = torch.export.export(chain, (x,))
    targets = [str(n.target) for n in exported.graph.nodes]
    assert "ksmm.butterfly_levels.default" in targets
    torch.testing.assert_close(exported.module()(x), chain(x))


def test_op_checks_its_arguments_before_the_kernel():
    """Wrong dtypes, shapes and devices are errors naming the argument, not a read past a
    buffer; meta tensors stand in for another device on a CUDA-less machine."""
    _needs_kernel()
    op, one = native.butterfly_levels, torch.tensor(1.0)
    x, ws, ds = torch.randn(3, 4), [torch.randn(2, 2, 2), torch.randn(2, 2, 2)], [2, 1]
    torch.testing.assert_close(
        op(x, ws, ds, False, one), native.butterfly_rows(x, [(1, 2), (2, 1)], ws)
    )
    cases = [
        ((x.half(), [w.half() for w in ws], ds), TypeError, "x is torch.float16"),
        ((x, [ws[0], ws[1].double()], ds), TypeError, r"weights\[1\] is torch.float64"),
        ((x, [ws[0], torch.randn(4, 2, 2)], ds), ValueError, r"weights\[1\] has shape \(4, 2, 2\)"),
        ((x, ws, [2, 3]), ValueError, r"ds\[1\] = 3 does not divide"),
        ((x, ws, [2]), ValueError, "2 weights for 1 levels"),
        ((x[0], ws, ds), ValueError, "x must be a 2-D"),
        ((torch.randn(3, 5), ws, ds), ValueError, "an even P"),
        (
            (x, [ws[0].to("meta"), ws[1]], ds),
            ValueError,
            r"weights\[0\] is on meta but x is on cpu",
        ),
        ((x.to("meta"), ws, ds), ValueError, r"weights\[0\] is on cpu but x is on meta"),
    ]
    for (xx, wws, dds), exc, match in cases:
        with pytest.raises(exc, match=match):
            op(xx, wws, dds, False, one)
    with pytest.raises(TypeError, match="scale must be a one-element float tensor"):
        op(x, ws, ds, False, torch.ones(2))
    # all on meta: the fake kernel gives the output's shape and runs no C
    y = op(x.to("meta"), [w.to("meta") for w in ws], ds, False, one.to("meta"))
    assert y.device.type == "meta" and y.shape == x.shape
    bwd = native.butterfly_levels_backward
    with pytest.raises(ValueError, match=r"grad has shape \(3, 2\)"):
        bwd(x, torch.randn(3, 2), ws, ds, False, one, True)
    with pytest.raises(TypeError, match="grad is torch.float64"):
        bwd(x, x.double(), ws, ds, False, one, True)
    with pytest.raises(ValueError, match="scale must not require grad"):
        op(x, ws, ds, False, torch.tensor(1.0, requires_grad=True))


def test_fold_output_checks_its_arguments():
    _needs_kernel()
    levels = [(1, 2), (2, 1)]
    ws = [torch.randn(2, 2, 2) for _ in levels]
    x, v, u = torch.randn(5, 4), torch.randn(3, 4), torch.randn(3, 6)
    y = native.fold_output(x, v, u, levels, ws, 2.0)
    vb = 2.0 * ks_einsum(ks_einsum(v, ws[0].view(1, 2, 2, 2).permute(0, 3, 2, 1).transpose(1, 2)),
                         ws[1].view(2, 1, 2, 2).permute(0, 3, 2, 1).transpose(1, 2))  # fmt: skip
    torch.testing.assert_close(y, x @ vb.t() @ u)
    with pytest.raises(ValueError, match="do not chain"):
        native.fold_output(torch.randn(5, 8), v, u, levels, ws, 1.0)
    with pytest.raises(ValueError, match=r"u_t \(2, 6\) must be \(r, m\) with r = 3"):
        native.fold_output(x, v, torch.randn(2, 6), levels, ws, 1.0)
    with pytest.raises(TypeError, match="u_t is torch.float64 but v_rows is torch.float32"):
        native.fold_output(x, v, u.double(), levels, ws, 1.0)
    with pytest.raises(ValueError, match="x is on meta but v_rows is on cpu"):
        native.fold_output(x.to("meta"), v, u, levels, ws, 1.0)


def test_every_c_function_has_a_declared_signature():
    """A call with a missing argument fails in ctypes instead of reading a stray register."""
    _needs_kernel()
    lib = native._load()
    for name, (restype, argtypes) in native._SIGNATURES.items():
        fn = getattr(lib, name)
        assert fn.argtypes == argtypes and fn.restype == restype, name
    with pytest.raises(TypeError, match="takes at least 4 arguments"):
        lib.ks_scratch_size(1, 16, 4)
    assert lib.ks_build_info() & 1, "the default build has OpenMP"


def _fresh_build(monkeypatch, tmp_path, **env):
    monkeypatch.setattr(native, "_lib", None)
    monkeypatch.delenv("KSMM_NATIVE", raising=False)
    monkeypatch.setenv("KSMM_CACHE", str(tmp_path))
    for k, v in env.items():
        monkeypatch.setenv(k, v)


# shell tests that make a wrapped compiler fail: one rejecting -fopenmp, one rejecting any
# build that keeps the x86 vector code (that is, without -DKS_ISA_GENERIC)
_REJECTS = {
    "openmp": 'for a; do [ "$a" = -fopenmp ] && exit 1; done',
    "vector code": 'case " $* " in *" -DKS_ISA_GENERIC "*) ;; *) exit 1;; esac',
}


@pytest.mark.parametrize("lost", list(_REJECTS))
def test_a_degraded_build_warns_once(lost, tmp_path, monkeypatch):
    """A compiler that rejects -fopenmp (or the AVX code): the fallback build works (one
    thread, or generic code), says so once, and is keyed on the compiler."""
    cc = shutil.which("cc") or shutil.which("gcc")
    if cc is None:
        pytest.skip("no C compiler")
    if lost == "vector code" and platform.machine() != "x86_64":
        pytest.skip("the x86 vector variants exist on x86 only")
    _needs_kernel()
    default_build = Path(native._load()._name).name
    wrapper = tmp_path / "cc-wrapper"
    wrapper.write_text(f'#!/bin/sh\n{_REJECTS[lost]}\nexec {cc} "$@"\n')
    wrapper.chmod(0o755)
    _fresh_build(monkeypatch, tmp_path / "cache", CC=str(wrapper))
    match = "built without OpenMP" if lost == "openmp" else "without the AVX-512/AVX2 vector code"
    with pytest.warns(UserWarning, match=match) as record:
        assert native.available(torch.zeros(1))
    assert len([w for w in record if "ksmm" in str(w.message)]) == 1
    info = native.kernel_info()
    assert (info["openmp"], info["x86_variants"]) == (
        (False, True) if lost == "openmp" else (True, False)
    )
    chain = KSLinearChain(64, 48, 8).double()
    x = torch.randn(32, 64, dtype=F64)
    torch.testing.assert_close(chain(x), x @ ks_chain_reference(chain).T)
    # the compiler is in the cache key: this build's file is not the default compiler's
    assert Path(native._load()._name).name != default_build
    assert len(list((tmp_path / "cache").rglob("*.so"))) == 1


def test_avx2_build_runs_avx2_and_agrees(tmp_path, monkeypatch):
    """KSMM_ISA=avx2 (an AVX2-only CPU's code on this one) is its own cached build, runs the
    x86-64-v3 code where the CPU has it, and computes what the default build does."""
    _needs_kernel()
    torch.manual_seed(0)
    chain = KSLinearChain(256, 96, 64, output_scale=1.3)
    x = torch.randn(100, 256, requires_grad=True)
    y, grads = _chain_grads(chain, chain, x)
    _fresh_build(monkeypatch, tmp_path, KSMM_ISA="avx2")
    info = native.kernel_info()
    assert info["requested"] == "avx2" and "avx512" not in info["isa"]
    if platform.machine() == "x86_64" and "avx2" in Path("/proc/cpuinfo").read_text():
        assert info["isa"].startswith("avx2")
    y2, grads2 = _chain_grads(chain, chain, x)
    torch.testing.assert_close(y2, y, rtol=1e-5, atol=1e-5)
    for g, r in zip(grads2, grads, strict=True):
        torch.testing.assert_close(g, r, rtol=1e-4, atol=1e-4)
    _fresh_build(monkeypatch, tmp_path, KSMM_ISA="avx3000")
    with pytest.warns(UserWarning, match="KSMM_ISA='avx3000'"):
        assert not native.available(torch.zeros(1))
