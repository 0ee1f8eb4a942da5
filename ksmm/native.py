"""A fused CPU kernel for a stack of 2x2 butterfly levels (``_butterfly.c``), built on first use.

In eager PyTorch a butterfly level on a narrow input costs a handful of tiny kernels whose
dispatch overhead, not arithmetic, sets the time: eleven levels cost more than the whole
rank-8 low-rank pair they sit next to. The C kernel runs every level, forward or backward, in
one call on rows with any strides, on PyTorch's own OpenMP threads (``torch.get_num_threads()``);
how it keeps memory traffic down is described at the top of the C file.

The kernel is reached through registered ``torch.library`` ops, so ``torch.compile`` and
``torch.export`` trace a chain: ``ksmm::butterfly_levels`` (forward, with ``register_autograd``
and ``register_fake``) and ``ksmm::butterfly_levels_backward`` (its gradients). Both check
their arguments (device, dtype, shapes) before any pointer reaches C; the ctypes calls live in
``_c_forward`` and ``_c_backward`` alone, against signatures declared once in ``_SIGNATURES``.

The library is compiled with the system C compiler (``CC``, else ``cc`` or ``gcc``) into a
per-user cache the first time it is needed (a few seconds); the cache key holds the source, the
compiler's path and ``--version``, and the flags. ``KSMM_ISA`` picks the vector code:
``auto`` (default: AVX-512, AVX2 or generic code, chosen at run time for the CPU), ``avx2`` (no
AVX-512 code: what an AVX2-only CPU runs) or ``generic``. With no compiler, on other devices and dtypes, or
with ``KSMM_NATIVE=0``, chains run the pure PyTorch path, which computes the same thing.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import threading
import warnings
from pathlib import Path

import torch
from torch import Tensor
from torch.autograd.function import once_differentiable

_SOURCE = Path(__file__).with_name("_butterfly.c")
_DTYPES = {torch.float32: "f32", torch.float64: "f64"}
_lib = None  # the loaded library, False when it cannot be built
_load_lock = threading.Lock()

_FLAGS = ["-O3", "-fPIC", "-shared", "-fopenmp-simd", "-fno-math-errno", "-Wno-psabi"]
# KSMM_ISA -> the defines that pick the x86 variants _butterfly.c compiles
_ISA_DEFINES = {"auto": [], "avx2": ["-DKS_ISA_AVX2"], "generic": ["-DKS_ISA_GENERIC"]}
# ks_isa() -> the variant the float32 kernel runs on this CPU
ISA_NAMES = {2: "avx512 (x86-64-v4)", 1: "avx2+fma (x86-64-v3)", 0: "generic"}

_ptr, _long, _int = ctypes.c_void_p, ctypes.c_long, ctypes.c_int
_longs = ctypes.POINTER(ctypes.c_long)
_ptrs = ctypes.POINTER(ctypes.c_void_p)


def _signatures():
    """name -> (restype, argtypes) of every C function, declared once: a call with the wrong
    number or kind of arguments raises ctypes.ArgumentError instead of reading garbage."""
    sigs = {
        "ks_scratch_size": (_long, [_int, _long, _int, _int]),  # backward, P, L, nthreads
        "ks_build_info": (_int, []),
        "ks_isa": (_int, []),
    }
    for s, real in [("f32", ctypes.c_float), ("f64", ctypes.c_double)]:
        # x, sx, y, sy, n, P, L, ds, ws, trans, scale, mem, nthreads
        fwd = [_ptr, _longs, _ptr, _longs, _long, _long, _int, _longs, _ptrs, _int, real, _ptr]
        sigs[f"ks_butterfly_forward_{s}"] = (None, [*fwd, _int])
        # x, sx, gy, sgy, gx, sgx, n, P, L, ds, ws, trans, scale, gws, mem, nthreads
        bwd = [_ptr, _longs, _ptr, _longs, _ptr, _longs, _long, _long, _int, _longs, _ptrs]
        sigs[f"ks_butterfly_backward_{s}"] = (None, [*bwd, _int, real, _ptrs, _ptr, _int])
    return sigs


_SIGNATURES = _signatures()


def _cache_dir() -> Path:
    root = os.environ.get("KSMM_CACHE") or os.environ.get("XDG_CACHE_HOME")
    return Path(root or Path.home() / ".cache") / "ksmm"


def _isa_request() -> str:
    isa = os.environ.get("KSMM_ISA", "auto").strip().lower() or "auto"
    if isa not in _ISA_DEFINES:
        raise ValueError(f"KSMM_ISA={isa!r}: expected one of {sorted(_ISA_DEFINES)}")
    return isa


def _compiler() -> tuple[str, str]:
    """(path, ``--version`` output) of the C compiler, or RuntimeError when there is none."""
    cc = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
    if not cc:
        raise RuntimeError("no C compiler (cc or gcc) on PATH")
    try:
        proc = subprocess.run([cc, "--version"], capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.SubprocessError) as exc:
        raise RuntimeError(f"the C compiler {cc} cannot run: {exc}") from exc
    return cc, proc.stdout.strip()


def _compile(cc: str, flags: list[str], out: Path) -> str:
    """Build the library at ``out``; '' for the full build, else why a fallback was taken."""
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=out.parent) as tmp:
        so = Path(tmp) / out.name
        first_error = ""
        # -fopenmp links libgomp.so.1, which resolves to the copy torch has loaded: the
        # kernel's threads are torch's own pool (a second pool would fight torch's spinning
        # workers for the cores). The fallbacks drop the x86 variants, then OpenMP.
        for extra in (["-fopenmp"], ["-fopenmp", "-DKS_ISA_GENERIC"], [], ["-DKS_ISA_GENERIC"]):
            cmd = [cc, *flags, *extra, str(_SOURCE), "-o", str(so)]
            proc = subprocess.run(cmd, capture_output=True, text=True)
            if proc.returncode == 0:
                os.replace(so, out)  # atomic: concurrent jobs never load a half-written file
                return first_error
            first_error = first_error or (proc.stderr.strip().splitlines()[-1:] or ["?"])[0]
        raise RuntimeError(f"{cc} failed: {first_error}")


def _load():
    """The loaded library (built on first use), or None when it cannot be had."""
    global _lib
    if _lib is None:
        with _load_lock:  # one thread builds and configures it; the others wait for it
            if _lib is None:
                _lib = _build_and_configure()
    return _lib or None


def _build_and_configure():
    """The configured library, or False (with one warning) when it cannot be built or loaded."""
    if os.environ.get("KSMM_NATIVE", "1") == "0":
        return False
    try:
        isa = _isa_request()
        cc, version = _compiler()
        flags = [*_FLAGS, *_ISA_DEFINES[isa]]
        stamp = "\0".join([sys.platform, platform.machine(), cc, version, *flags])
        key = hashlib.sha256(_SOURCE.read_bytes() + stamp.encode()).hexdigest()[:16]
        path = _cache_dir() / f"butterfly-{key}.so"
        reason = "" if path.exists() else _compile(cc, flags, path)
        lib = ctypes.CDLL(str(path))
        for name, (restype, argtypes) in _SIGNATURES.items():
            # attribute access: lib[name] would make a new, unconfigured function object
            fn = getattr(lib, name)
            fn.restype, fn.argtypes = restype, argtypes
    except (OSError, RuntimeError, ValueError) as exc:
        warnings.warn(
            f"ksmm: the fused butterfly kernel is unavailable ({exc}); using the pure "
            "PyTorch path (same results, slower on CPU).",
            stacklevel=4,
        )
        return False
    _warn_if_degraded(lib, isa, reason)
    return lib


def _warn_if_degraded(lib, isa: str, reason: str) -> None:
    """One warning when the build runs without OpenMP or without the x86 vector code it was
    meant to have: it works, several times slower, and nothing else would say so."""
    info, lost = lib.ks_build_info(), []
    if not info & 1:
        lost.append("OpenMP (it runs on one thread)")
    if isa != "generic" and platform.machine().lower() in ("x86_64", "amd64") and not info & 2:
        lost.append("the AVX-512/AVX2 vector code (it runs generic code)")
    if lost:
        why = f" (the full build failed: {reason})" if reason else ""
        warnings.warn(
            f"ksmm: the fused butterfly kernel was built without {' and '.join(lost)}{why}; "
            "results are the same, the speed is not.",
            stacklevel=5,
        )


def kernel_info() -> dict | None:
    """What the loaded kernel runs with (``isa``, ``openmp``, ``x86_variants``, ``requested``), or
    None when it is unavailable: the benchmark prints it next to its timings."""
    lib = _load()
    if lib is None:
        return None
    info = lib.ks_build_info()
    return {
        "isa": ISA_NAMES[lib.ks_isa()],
        "requested": _isa_request(),
        "openmp": bool(info & 1),
        "x86_variants": bool(info & 2),
    }


@torch.compiler.assume_constant_result
def _native_loaded() -> bool:
    # a constant to torch.compile: the dynamo trace takes the branch eager takes
    return _load() is not None


def available(x: Tensor) -> bool:
    """Whether the fused kernel can run a butterfly on tensors like ``x``."""
    return x.device.type == "cpu" and x.dtype in _DTYPES and _native_loaded()


# ---- the ctypes calls: the only place pointers are made ---------------------------------

_local = threading.local()


def _scratch(numel: int, dtype: torch.dtype, use: str = "kernel") -> Tensor:
    """This thread's scratch buffer for ``use``, reused between calls: a fresh multi-MB buffer
    each step costs more in page faults (~2 us per 4 KB page on a VM) than the kernel itself.
    Only for values no autograd node keeps: the next call overwrites it."""
    bufs = _local.__dict__.setdefault("scratch", {})
    buf = bufs.get((use, dtype))
    if buf is None or buf.numel() < numel:
        buf = bufs[use, dtype] = torch.empty(numel, dtype=dtype)
    return buf[:numel]


def _longs_of(values) -> ctypes.Array:
    return (ctypes.c_long * len(values))(*values)


def _ptrs_of(tensors) -> ctypes.Array:
    return (ctypes.c_void_p * len(tensors))(*(t.data_ptr() for t in tensors))


def _c_forward(x: Tensor, y: Tensor, ds, weights, trans: bool, scale: float) -> None:
    """y = the rows of x through the levels; arguments already checked by _check_levels."""
    lib, threads = _load(), torch.get_num_threads()
    (n, p), levels, s = x.shape, len(ds), _DTYPES[x.dtype]
    mem = _scratch(lib.ks_scratch_size(0, p, levels, threads), x.dtype)
    getattr(lib, f"ks_butterfly_forward_{s}")(
        x.data_ptr(), _longs_of(x.stride()), y.data_ptr(), _longs_of(y.stride()), n, p, levels,
        _longs_of(ds), _ptrs_of(weights), int(trans), scale, mem.data_ptr(), threads,
    )  # fmt: skip


def _c_backward(x: Tensor, g: Tensor, gx, ds, weights, gws, trans: bool, scale: float) -> None:
    """gx (None: not wanted) and gws from the output's gradient g; the level inputs are
    recomputed from x."""
    lib, threads = _load(), torch.get_num_threads()
    (n, p), levels, s = x.shape, len(ds), _DTYPES[x.dtype]
    mem = _scratch(lib.ks_scratch_size(1, p, levels, threads), x.dtype)
    getattr(lib, f"ks_butterfly_backward_{s}")(
        x.data_ptr(), _longs_of(x.stride()), g.data_ptr(), _longs_of(g.stride()),
        None if gx is None else gx.data_ptr(), _longs_of((x if gx is None else gx).stride()),
        n, p, levels, _longs_of(ds), _ptrs_of(weights), int(trans), scale, _ptrs_of(gws),
        mem.data_ptr(), threads,
    )  # fmt: skip


# ---- the ops ----------------------------------------------------------------------------


def _check_levels(op: str, x: Tensor, weights, ds, scale, grad: Tensor | None = None) -> None:
    """Everything the kernel assumes about its arguments, as ValueError/TypeError naming the
    argument: a wrong shape or dtype would otherwise read or write past a buffer."""
    if not isinstance(x, Tensor) or x.dim() != 2:
        raise ValueError(f"{op}: x must be a 2-D (rows, P) tensor, got {_describe(x)}")
    if x.dtype not in _DTYPES:
        raise TypeError(f"{op}: x is {x.dtype}; the kernel takes torch.float32 or float64")
    p = x.shape[1]
    if len(weights) != len(ds) or not ds:
        raise ValueError(f"{op}: {len(weights)} weights for {len(ds)} levels (ds); need >= 1")
    if p < 2 or p % 2:
        raise ValueError(f"{op}: rows of {p} values; a butterfly level needs an even P >= 2")
    shape, dtype, device = (p // 2, 2, 2), x.dtype, x.device
    for t, (d, w) in enumerate(zip(ds, weights, strict=True)):
        if d < 1 or p % (2 * d):
            raise ValueError(f"{op}: ds[{t}] = {d} does not divide rows of P = {p} into 2d pairs")
        if w.shape != shape:
            raise ValueError(
                f"{op}: weights[{t}] has shape {tuple(w.shape)}; rows of P = {p} need "
                f"(P/2, 2, 2) = {shape}"
            )
        if w.dtype != dtype or w.device != device:  # the message only when it is needed
            _same(op, f"weights[{t}]", w, x)
    if not isinstance(scale, Tensor) or scale.numel() != 1 or not scale.is_floating_point():
        raise TypeError(f"{op}: scale must be a one-element float tensor, got {_describe(scale)}")
    if grad is not None:
        if tuple(grad.shape) != tuple(x.shape):
            raise ValueError(f"{op}: grad has shape {tuple(grad.shape)}, x {tuple(x.shape)}")
        _same(op, "grad", grad, x)


def _same(op: str, name: str, t: Tensor, x: Tensor, ref: str = "x") -> None:
    if t.dtype != x.dtype:
        raise TypeError(f"{op}: {name} is {t.dtype} but {ref} is {x.dtype}")
    if t.device != x.device:
        raise ValueError(f"{op}: {name} is on {t.device} but {ref} is on {x.device}")


def _describe(x) -> str:
    return f"shape {tuple(x.shape)}" if isinstance(x, Tensor) else type(x).__name__


def _check_native(op: str, x: Tensor, scale: Tensor) -> None:
    """What only the real (not the fake) kernel needs: CPU tensors and a built library."""
    if x.device.type != "cpu":
        raise ValueError(f"{op}: x is on {x.device}; the native kernel runs on CPU tensors only")
    if scale.device.type != "cpu":
        raise ValueError(f"{op}: scale is on {scale.device}; the native kernel reads it on CPU")
    if _load() is None:
        raise RuntimeError(f"{op}: the native kernel is unavailable (see the earlier warning)")


def _levels_forward(op, x: Tensor, weights, ds, trans: bool, scale: Tensor, y=None) -> Tensor:
    """The real forward kernel, checked: what the op runs on CPU and the eager path calls;
    into ``y`` (contiguous, x's shape) if given."""
    _check_levels(op, x, weights, ds, scale)
    _check_native(op, x, scale)
    y = torch.empty(x.shape, dtype=x.dtype) if y is None else y
    if x.shape[0]:
        _c_forward(x, y, ds, [w.contiguous() for w in weights], trans, float(scale))
    return y


def _levels_grads(op, x, grad, weights, ds, trans, scale, input_grad: bool) -> list[Tensor]:
    """The real backward kernel, checked: [x's gradient (if input_grad), *the weights']."""
    _check_levels(op, x, weights, ds, scale, grad)
    _check_native(op, x, scale)
    gx = torch.empty_like(x) if input_grad else None
    gws = [torch.empty(w.shape, dtype=w.dtype) for w in weights]
    if x.shape[0]:
        _c_backward(x, grad, gx, ds, [w.contiguous() for w in weights], gws, trans, float(scale))
    else:
        for w in gws:
            w.zero_()
    return [gx, *gws] if input_grad else gws


@torch.library.custom_op("ksmm::butterfly_levels", mutates_args=())
def butterfly_levels(
    x: Tensor, weights: list[Tensor], ds: list[int], trans: bool, scale: Tensor
) -> Tensor:
    """Each row of x (n, P), any strides, through 2x2 butterfly levels in order, times scale:
    level t pairs positions p and p + ds[t] (KS pattern (P/(2d), 2, 2, d)) with weight
    ``weights[t]`` stored as KSLinear stores it, (P/2, 2, 2); ``trans`` applies every block
    transposed; ``scale`` is a one-element tensor (a chain's output_scale buffer: a tensor, so
    that torch.compile does not bake its value into the graph). Returns a new contiguous
    (n, P) tensor."""
    return _levels_forward("ksmm::butterfly_levels", x, weights, ds, trans, scale)


@butterfly_levels.register_fake
def _(x, weights, ds, trans, scale):
    _check_levels("ksmm::butterfly_levels", x, weights, ds, scale)
    return x.new_empty(x.shape)  # contiguous, as the real op returns


@torch.library.custom_op("ksmm::butterfly_levels_backward", mutates_args=())
def butterfly_levels_backward(
    x: Tensor,
    grad: Tensor,
    weights: list[Tensor],
    ds: list[int],
    trans: bool,
    scale: Tensor,
    input_grad: bool,
) -> list[Tensor]:
    """The gradients of ``butterfly_levels(x, weights, ds, trans, scale)`` from its output's
    gradient ``grad``: [x's (in x's layout), *the weights'] with ``input_grad``, else only the
    weights' (the kernel then skips x's). Not itself differentiable."""
    op = "ksmm::butterfly_levels_backward"
    return _levels_grads(op, x, grad, weights, ds, trans, scale, input_grad)


@butterfly_levels_backward.register_fake
def _(x, grad, weights, ds, trans, scale, input_grad):
    _check_levels("ksmm::butterfly_levels_backward", x, weights, ds, scale, grad)
    gws = [w.new_empty(w.shape) for w in weights]
    return [torch.empty_like(x), *gws] if input_grad else gws


def _check_scale_is_buffer(scale: Tensor) -> None:
    if scale.requires_grad:  # its gradient is not computed: refuse rather than drop it
        raise ValueError("ksmm::butterfly_levels: scale must not require grad (a buffer)")


def _levels_setup(ctx, inputs, output):
    x, weights, ctx.ds, ctx.trans, scale = inputs
    _check_scale_is_buffer(scale)
    ctx.save_for_backward(x, scale, *weights)


def _levels_backward(ctx, grad):
    x, scale, *weights = ctx.saved_tensors
    input_grad = ctx.needs_input_grad[0]
    grads = butterfly_levels_backward(x, grad, weights, ctx.ds, ctx.trans, scale, input_grad)
    gx, gws = (grads[0], grads[1:]) if input_grad else (None, grads)
    return gx, list(gws), None, None, None


torch.library.register_autograd(
    "ksmm::butterfly_levels", _levels_backward, setup_context=_levels_setup
)


# Eager calls skip the dispatcher: a custom op's Python dispatch and autograd wrapper (pytree
# flattening of the weight list) cost about 0.2 ms a training step, as much as a whole rank-8
# step at 512 wide. These Functions run the same checked kernels; graph capture (compile,
# export, dispatch modes, tensor subclasses) goes through the registered op.
def _use_op(x: Tensor) -> bool:
    return (
        torch.compiler.is_compiling()
        or torch._C._len_torch_dispatch_stack() > 0
        or type(x) not in (Tensor, torch.nn.Parameter)
    )


class _EagerLevels(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, ds, trans, scale, *weights):
        _check_scale_is_buffer(scale)
        ctx.ds, ctx.trans = ds, trans
        ctx.save_for_backward(x, scale, *weights)
        return _levels_forward("ksmm::butterfly_levels", x, weights, ds, trans, scale)

    @staticmethod
    @once_differentiable  # the kernel's gradients are not themselves differentiable
    def backward(ctx, g):
        x, scale, *weights = ctx.saved_tensors
        need_x = ctx.needs_input_grad[0]
        op = "ksmm::butterfly_levels_backward"
        grads = _levels_grads(op, x, g, weights, ctx.ds, ctx.trans, scale, need_x)
        gx, gws = (grads[0], grads[1:]) if need_x else (None, grads)
        return (gx, None, None, None, *gws)


class _EagerFold(torch.autograd.Function):
    """x -> V B -> U in one autograd node: two matmuls and the kernel, without the matmul and
    transpose nodes that cost more Python than arithmetic at small ranks."""

    # Without x's gradient (x is data) vb is not kept, and it and V B's gradient live in
    # reused scratch: two (r, P) buffers fewer to allocate, and page-fault, each step.
    @staticmethod
    def forward(ctx, x, v_rows, u_t, ds, scale, *weights):
        _check_scale_is_buffer(scale)
        need_x = ctx.needs_input_grad[0]
        out = None if need_x else _scratch(v_rows.numel(), v_rows.dtype, "vb").view(v_rows.shape)
        vb = _levels_forward("ksmm::butterfly_levels", v_rows, weights, ds, True, scale, out)
        h = x @ vb.t()
        ctx.ds = ds
        ctx.save_for_backward(x, v_rows, u_t, vb if need_x else None, h, scale, *weights)
        return h @ u_t

    @staticmethod
    @once_differentiable
    def backward(ctx, gy):
        x, v_rows, u_t, vb, h, scale, *weights = ctx.saved_tensors
        gy = gy.contiguous()  # once, not in both products (a sum's gradient is an expand)
        gh = gy @ u_t.t()
        gx = gh @ vb if ctx.needs_input_grad[0] else None
        gvb = torch.mm(gh.t(), x, out=_scratch(v_rows.numel(), x.dtype, "gvb").view(v_rows.shape))
        op = "ksmm::butterfly_levels_backward"
        gv, *gws = _levels_grads(op, v_rows, gvb, weights, ctx.ds, True, scale, True)
        return (gx, gv, h.t() @ gy, None, None, *gws)


def _as_scale(scale) -> Tensor:
    return scale if isinstance(scale, Tensor) else torch.tensor(float(scale), dtype=torch.float64)


def _check_patterns(x: Tensor, levels, weights) -> None:
    """The levels as KS patterns (a, d) against rows of x: a*2*d = P (the op checks the rest:
    weights of shape (a*d, 2, 2) = (P/2, 2, 2) in x's dtype, on x's device)."""
    p = x.shape[-1]
    for (a, d), w in zip(levels, weights, strict=True):
        if a * 2 * d != p:
            raise ValueError(
                f"butterfly level (a={a}, d={d}) with a {tuple(w.shape)} weight does not fit "
                f"rows of {p} values (it needs a*2*d = {p} and a weight of shape (a*d, 2, 2))"
            )


def butterfly_rows(x: Tensor, levels, weights, trans: bool = False, scale=1.0) -> Tensor:
    """Each row of x (n, P) through 2x2 butterfly levels in order, times ``scale`` (a float or
    a one-element tensor): level t has
    KS pattern (a_t, 2, 2, d_t) (``levels[t] = (a_t, d_t)``) and weight ``weights[t]`` stored as
    KSLinear stores it, (a*d, 2, 2); ``trans`` applies every block transposed. Check
    ``available`` first."""
    _check_patterns(x, levels, weights)
    if not levels:  # nothing for the kernel to do
        return x * scale
    ds, scale = [d for _, d in levels], _as_scale(scale)
    if _use_op(x):
        return butterfly_levels(x, list(weights), ds, bool(trans), scale)
    return _EagerLevels.apply(x, ds, bool(trans), scale, *weights)


def fold_output(x: Tensor, v_rows: Tensor, u_t: Tensor, levels, weights, scale=1.0) -> Tensor:
    """``x @ vb.T @ u_t`` with ``vb = butterfly_rows(v_rows, levels, weights, True, scale)``,
    the (r, P) factor V with the butterfly folded in, and ``u_t`` (r, m). Check ``available``
    first."""
    r, p = v_rows.shape if v_rows.dim() == 2 else (None, None)
    if p is None or x.shape[-1] != p:
        raise ValueError(
            f"fold_output: x {tuple(x.shape)} and v_rows {tuple(v_rows.shape)} do not chain: "
            "v_rows must be (r, P) with P = x's last dimension"
        )
    if u_t.dim() != 2 or u_t.shape[0] != r:
        raise ValueError(f"fold_output: u_t {tuple(u_t.shape)} must be (r, m) with r = {r}")
    for name, t in [("x", x), ("u_t", u_t)]:
        _same("fold_output", name, t, v_rows, "v_rows")
    if _use_op(x):  # the op and two matmuls: autograd (or the graph) does the rest
        vb = butterfly_rows(v_rows, levels, weights, True, scale)
        return (x @ vb.t()) @ u_t
    _check_patterns(v_rows, levels, weights)
    ds = [d for _, d in levels]
    return _EagerFold.apply(x, v_rows, u_t, ds, _as_scale(scale), *weights)
