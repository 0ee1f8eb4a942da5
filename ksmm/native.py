"""A fused CPU kernel for a stack of 2x2 butterfly levels (``_butterfly.c``), built on first use.

In eager PyTorch a butterfly level on a narrow input costs a handful of tiny kernels whose
dispatch overhead, not arithmetic, sets the time: eleven levels cost more than the whole
rank-8 low-rank pair they sit next to. The C kernel runs every level, forward or backward, in
one call on rows with any strides, on PyTorch's own OpenMP threads (``torch.get_num_threads()``);
how it keeps memory traffic down is described at the top of the C file. It is compiled with the
system C compiler into a per-user cache the first time it is needed (a few seconds); with no
compiler, on other devices and dtypes, or with ``KSMM_NATIVE=0``, chains run the pure PyTorch
path, which computes the same thing.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
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


def _cache_dir() -> Path:
    root = os.environ.get("KSMM_CACHE") or os.environ.get("XDG_CACHE_HOME")
    return Path(root or Path.home() / ".cache") / "ksmm"


_FLAGS = [
    "-O3",
    "-fPIC",
    "-shared",
    "-fopenmp-simd",
    "-fno-math-errno",
    "-Wno-psabi",
]  # + variants below


def _compile(out: Path) -> None:
    cc = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
    if not cc:
        raise RuntimeError("no C compiler (cc or gcc) on PATH")
    base = [cc, *_FLAGS]
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=out.parent) as tmp:
        so = Path(tmp) / out.name
        errors = [""]
        # target_clones (x86 + gcc) picks AVX-512 / AVX2 at load time; -fopenmp links
        # libgomp.so.1, which resolves to the copy torch has loaded: the kernel's threads are
        # torch's own pool (a second pool would fight torch's spinning workers for the cores)
        for extra in (["-fopenmp"], ["-fopenmp", "-DKS_CLONES="], [], ["-DKS_CLONES="]):
            proc = subprocess.run(
                [*base, *extra, str(_SOURCE), "-o", str(so)], capture_output=True, text=True
            )
            if proc.returncode == 0:
                os.replace(so, out)  # atomic: concurrent jobs never load a half-written file
                return
            errors = proc.stderr.strip().splitlines()[-1:] or [""]
        raise RuntimeError(f"{cc} failed: {errors[0]}")


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
    stamp = _SOURCE.read_bytes() + " ".join([sys.platform, *_FLAGS]).encode()
    key = hashlib.sha256(stamp).hexdigest()[:16]
    path = _cache_dir() / f"butterfly-{key}.so"
    try:
        if not path.exists():
            _compile(path)
        lib = ctypes.CDLL(str(path))
    except (OSError, RuntimeError) as exc:
        warnings.warn(
            f"ksmm: the fused butterfly kernel is unavailable ({exc}); using the pure "
            "PyTorch path (same results, slower on CPU).",
            stacklevel=4,
        )
        return False
    ptr, long, int_ = ctypes.c_void_p, ctypes.c_long, ctypes.c_int
    for s, real in [("f32", ctypes.c_float), ("f64", ctypes.c_double)]:
        # attribute access: lib[name] would make a new, unconfigured function object
        fwd = getattr(lib, f"ks_butterfly_forward_{s}")
        bwd = getattr(lib, f"ks_butterfly_backward_{s}")
        fwd.argtypes = [ptr, ptr, ptr, ptr, long, long, int_, ptr, ptr, int_, real, ptr, int_]
        bwd.argtypes = [ptr, ptr, ptr, ptr, ptr, ptr, long, long, int_, ptr, ptr, int_, real]
        bwd.argtypes += [ptr, ptr, int_]
        fwd.restype = bwd.restype = None
    lib.ks_scratch_size.argtypes = [int_, long, int_, int_]
    lib.ks_scratch_size.restype = long
    return lib


_local = threading.local()


def _scratch(numel: int, dtype: torch.dtype) -> Tensor:
    """This thread's scratch buffer, reused between calls: a fresh multi-MB buffer each step
    costs more in page faults (~2 us per 4 KB page on a VM) than the kernel itself."""
    bufs = _local.__dict__.setdefault("scratch", {})
    buf = bufs.get(dtype)
    if buf is None or buf.numel() < numel:
        buf = bufs[dtype] = torch.empty(numel, dtype=dtype)
    return buf


def _kernel(direction: str, dtype: torch.dtype, p: int, levels: int):
    """The kernel for this dtype and this thread's scratch for it (a pointer), and the thread
    count both are made for."""
    lib, threads = _load(), torch.get_num_threads()
    size = lib.ks_scratch_size(direction == "backward", p, levels, threads)
    kernel = getattr(lib, f"ks_butterfly_{direction}_{_DTYPES[dtype]}")
    return kernel, _ptr(_scratch(size, dtype)), threads


def _fly_forward(x: Tensor, levels, weights, trans: bool, scale: float):
    """The rows of x (any strides) through the levels: (y, the contiguous weights, the kernel's
    argument arrays, kept for the backward pass)."""
    weights = [w.contiguous() for w in weights]
    arrays = _arrays(levels, weights, trans, scale)
    (n, p), y = x.shape, x.new_empty(x.shape)
    kernel, scratch, threads = _kernel("forward", x.dtype, p, len(levels))
    kernel(_ptr(x), _strides(x), _ptr(y), _strides(y), n, p, len(levels), *arrays, scratch, threads)
    return y, weights, arrays


def _fly_backward(x: Tensor, g: Tensor, weights, arrays, input_grad: bool):
    """(gradient of x or None, gradients of the weights) from the output's gradient g. The
    level inputs are recomputed from x; x's gradient has x's layout (for a weight's rows, the
    parameter's own)."""
    gx = torch.empty_like(x) if input_grad else None
    gws = [torch.empty_like(w) for w in weights]
    gw_ptrs = (ctypes.c_void_p * len(gws))(*(w.data_ptr() for w in gws))
    (n, p), levels = x.shape, len(weights)
    kernel, scratch, threads = _kernel("backward", x.dtype, p, levels)
    gx_ptr = None if gx is None else _ptr(gx)  # NULL: not wanted
    kernel(_ptr(x), _strides(x), _ptr(g), _strides(g), gx_ptr, _strides(x if gx is None else gx),
           n, p, levels, *arrays, gw_ptrs, scratch, threads)  # fmt: skip
    return gx, gws


def available(x: Tensor) -> bool:
    """Whether the fused kernel can run a butterfly on tensors like ``x``."""
    return x.device.type == "cpu" and x.dtype in _DTYPES and _load() is not None


def _ptr(t: Tensor) -> ctypes.c_void_p:
    return ctypes.c_void_p(t.data_ptr())


def _arrays(levels, weights, trans, scale):
    """Each level's d, its weight, the orientation and the scale, as the kernel takes them."""
    n = len(levels)
    return (
        (ctypes.c_long * n)(*(d for _, d in levels)),
        (ctypes.c_void_p * n)(*(w.data_ptr() for w in weights)),
        int(trans),
        scale,
    )


def _strides(t: Tensor):
    return (ctypes.c_long * 2)(*t.stride())


class _Butterfly(torch.autograd.Function):
    # Any strides in and out: a rank-r factor's rows are the columns of its stored weight, and
    # a gradient in the parameter's own layout needs no copy before it is accumulated.
    @staticmethod
    def forward(ctx, x, levels, trans, scale, *weights):
        y, weights, ctx.arrays = _fly_forward(x, levels, weights, trans, scale)
        ctx.save_for_backward(x, *weights)  # the arrays point at these very weights
        return y

    @staticmethod
    @once_differentiable  # the kernel's gradients are not themselves differentiable
    def backward(ctx, g):
        x, *weights = ctx.saved_tensors
        gx, gws = _fly_backward(x, g, weights, ctx.arrays, ctx.needs_input_grad[0])
        return (gx, None, None, None, *gws)


class _FoldedOutput(torch.autograd.Function):
    """x -> V B -> U in one autograd node (the butterfly folded into the output bottleneck):
    two matmuls and the kernel, without the dozen view, matmul and butterfly nodes that cost
    more Python than arithmetic at small ranks."""

    @staticmethod
    def forward(ctx, x, v_rows, u_t, levels, scale, *weights):
        vb, weights, ctx.arrays = _fly_forward(v_rows, levels, weights, True, scale)
        h = x @ vb.t()
        ctx.save_for_backward(x, v_rows, u_t, vb, h, *weights)
        return h @ u_t

    @staticmethod
    @once_differentiable
    def backward(ctx, gy):
        x, v_rows, u_t, vb, h, *weights = ctx.saved_tensors
        gy = gy.contiguous()  # once, not in both products (a sum's gradient is an expand)
        gh = gy @ u_t.t()
        gx = gh @ vb if ctx.needs_input_grad[0] else None
        gv, gws = _fly_backward(v_rows, gh.t() @ x, weights, ctx.arrays, True)
        return (gx, gv, h.t() @ gy, None, None, *gws)


def fold_output(x: Tensor, v_rows: Tensor, u_t: Tensor, levels, weights, scale: float) -> Tensor:
    """``x @ vb.T @ u_t`` with ``vb = butterfly_rows(v_rows, levels, weights, True, scale)``,
    the (r, P) factor V with the butterfly folded in, and ``u_t`` (r, m), in one autograd node.
    Check ``available`` first."""
    return _FoldedOutput.apply(x, v_rows, u_t, tuple(levels), float(scale), *weights)


def butterfly_rows(x: Tensor, levels, weights, trans: bool = False, scale: float = 1.0) -> Tensor:
    """Each row of x (n, P) through 2x2 butterfly levels in order, times ``scale``: level t has
    KS pattern (a_t, 2, 2, d_t) (``levels[t] = (a_t, d_t)``) and weight ``weights[t]`` stored as
    KSLinear stores it, (a*d, 2, 2); ``trans`` applies every block transposed. Check
    ``available`` first."""
    p = x.shape[-1]
    for (a, d), w in zip(levels, weights, strict=True):
        if a * 2 * d != p or tuple(w.shape) != (a * d, 2, 2):
            raise ValueError(
                f"butterfly level (a={a}, d={d}) with a {tuple(w.shape)} weight does not fit "
                f"rows of {p} values (it needs a*2*d = {p} and a weight of shape (a*d, 2, 2))"
            )
        if w.dtype != x.dtype:
            raise ValueError(f"butterfly weights are {w.dtype} but the rows are {x.dtype}")
    if not levels or x.shape[0] == 0:  # nothing for the kernel to do
        return x * scale
    return _Butterfly.apply(x, tuple(levels), bool(trans), float(scale), *weights)
