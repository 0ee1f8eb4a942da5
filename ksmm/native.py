"""A fused CPU kernel for a stack of 2x2 butterfly levels (``_butterfly.c``), built on first use.

In eager PyTorch a butterfly level on a narrow input costs a handful of tiny kernels whose
dispatch overhead, not arithmetic, sets the time: eleven levels cost more than the whole
rank-8 low-rank pair they sit next to. The C kernel runs every level, forward or backward, in
one call, on PyTorch's own OpenMP threads (``torch.get_num_threads()``). It is compiled with the system C compiler into a per-user cache the first time it is
needed (about a second); with no compiler, on other devices and dtypes, or with
``KSMM_NATIVE=0``, chains run the pure PyTorch path, which computes the same thing.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
import warnings
import weakref
from pathlib import Path

import torch
from torch import Tensor

_SOURCE = Path(__file__).with_name("_butterfly.c")
_DTYPES = {torch.float32: "f32", torch.float64: "f64"}
_lib = None  # the loaded library, False when it cannot be built


def _cache_dir() -> Path:
    root = os.environ.get("KSMM_CACHE") or os.environ.get("XDG_CACHE_HOME")
    return Path(root or Path.home() / ".cache") / "ksmm"


_FLAGS = ["-O3", "-fPIC", "-shared", "-fopenmp-simd", "-fno-math-errno"]  # + variants below


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
    global _lib
    if _lib is None:
        _lib = False
        if os.environ.get("KSMM_NATIVE", "1") == "0":
            return None
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
                stacklevel=3,
            )
            return None
        ptr, long, int_ = ctypes.c_void_p, ctypes.c_long, ctypes.c_int
        for s in _DTYPES.values():
            # attribute access: lib[name] would make a new, unconfigured function object
            fwd = getattr(lib, f"ks_butterfly_forward_{s}")
            bwd = getattr(lib, f"ks_butterfly_backward_{s}")
            fwd.argtypes = [ptr, long, long, int_, ptr, ptr, ptr, ptr, int_]
            bwd.argtypes = [ptr, ptr, ptr, long, long, int_, ptr, ptr, ptr, ptr, ptr, int_]
            fwd.restype = bwd.restype = None
        _lib = lib
    return _lib or None


def _kernel(direction: str, dtype: torch.dtype):
    return getattr(_load(), f"ks_butterfly_{direction}_{_DTYPES[dtype]}")


def available(x: Tensor) -> bool:
    """Whether the fused kernel can run a butterfly on tensors like ``x``."""
    return x.device.type == "cpu" and x.dtype in _DTYPES and _load() is not None


def _ptr(t: Tensor) -> ctypes.c_void_p:
    return ctypes.c_void_p(t.data_ptr())


def _arrays(levels, weights, trans):
    n = len(levels)
    return (
        (ctypes.c_long * n)(*(a for a, _ in levels)),
        (ctypes.c_long * n)(*(d for _, d in levels)),
        (ctypes.c_void_p * n)(*(w.data_ptr() for w in weights)),
        (ctypes.c_int * n)(*([int(trans)] * n)),
    )


class _Lease:
    """Held by a forward pass that saved a workspace, until its backward pass has run."""


_workspaces: dict = {}  # (device, dtype, shape) -> (workspace, weakref to its lease)


def _workspace(shape, like: Tensor, ctx) -> Tensor:
    """A buffer for the saved activations, reused from step to step: a fresh multi-MB tensor
    every step costs more in page faults than the whole kernel. Taken again only once the
    backward pass that needed it has run (or its graph is gone); otherwise a new one."""
    key = (like.device, like.dtype, tuple(shape))
    entry = _workspaces.get(key)
    free = entry is not None and entry[1]() is None
    buf = entry[0] if free else like.new_empty(shape)
    ctx.lease = _Lease()
    _workspaces[key] = (buf, weakref.ref(ctx.lease))
    return buf


class _Butterfly(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, levels, trans, *weights):
        n, p = x.shape
        weights = [w.contiguous() for w in weights]
        # L + 1 activation slabs, and one scratch slab for the backward pass
        work = _workspace((len(levels) + 2, p, n), x, ctx)
        acts = work[:-1]
        # copy_ transposes the rows into the kernel's feature-major layout, and bumps the
        # buffer's version: a graph still holding an older forward's activations fails loudly
        # on a second backward instead of reading these
        acts[0].copy_(x.t())
        arrays = _arrays(levels, weights, trans)
        _kernel("forward", x.dtype)(_ptr(acts), p, n, len(levels), *arrays, torch.get_num_threads())
        ctx.save_for_backward(work, *weights)
        ctx.levels, ctx.trans = levels, trans
        return acts[-1].t().contiguous()  # rows again, in memory of its own

    @staticmethod
    def backward(ctx, g):
        work, *weights = ctx.saved_tensors
        levels = ctx.levels
        _, p, n = work.shape
        # the kernel overwrites its g: hand it the scratch slab (.data: scratch is no saved
        # state, so this copy must not count as a change to the saved activations)
        acts, g = work[:-1], work.data[-1].copy_(g.t())
        gx = torch.empty_like(g)  # feature-major; handed back as rows through .t()
        gws = [torch.empty_like(w) for w in weights]
        arrays = _arrays(levels, weights, ctx.trans)
        _kernel("backward", g.dtype)(
            _ptr(acts),
            _ptr(g),
            _ptr(gx),
            p,
            n,
            len(levels),
            *arrays,
            (ctypes.c_void_p * len(gws))(*(w.data_ptr() for w in gws)),
            torch.get_num_threads(),
        )
        ctx.lease = None  # the workspace may serve the next forward
        return (gx.t(), None, None, *gws)


def butterfly_rows(x: Tensor, levels, weights, trans: bool = False) -> Tensor:
    """Each row of x (n, P) through 2x2 butterfly levels in order: level t has KS pattern
    (a_t, 2, 2, d_t) (``levels[t] = (a_t, d_t)``) and weight ``weights[t]`` stored as KSLinear
    stores it, (a*d, 2, 2); ``trans`` applies every block transposed. Check ``available`` first."""
    return _Butterfly.apply(x, tuple(levels), bool(trans), *weights)
