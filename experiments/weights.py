"""Dense weight matrices for the rank sweeps: make, load and save them (pure torch).

Bad input raises ``common.cli.UserError`` with one sentence naming the problem, so the CLIs can
print it as one line.
"""

from __future__ import annotations

import math
import os
import re
from pathlib import Path

import torch

from common.cli import UserError
from common.runstore import atomic_path
from experiments.schemas import WeightDtype, WeightInit

# the config's Enums are the one list (generate_test_weight.py's choices too)
INIT_METHODS = tuple(m.value for m in WeightInit)
DTYPES: dict[str, torch.dtype] = {d.value: getattr(torch, d.value) for d in WeightDtype}

# The methods torch.nn.init implements; they all accept a generator, so results depend on the seed
# alone, not on the global RNG state.
_TORCH_INITS = {
    "xavier_uniform": torch.nn.init.xavier_uniform_,
    "xavier_normal": torch.nn.init.xavier_normal_,
    # torch's defaults (fan_in, leaky_relu with a=0, i.e. gain sqrt(2)): plain He init.
    "kaiming_uniform": torch.nn.init.kaiming_uniform_,
    "kaiming_normal": torch.nn.init.kaiming_normal_,
    "orthogonal": torch.nn.init.orthogonal_,
}


def _check_size(name: str, value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise UserError(f"{name} must be a positive integer, got {value!r}")
    return value


def hadamard(n: int) -> torch.Tensor:
    """The n x n Sylvester Hadamard matrix scaled by 1/sqrt(n), so it is orthogonal."""
    if n <= 0 or n & (n - 1):
        raise UserError(f"hadamard init needs a power-of-two size, got {n}")
    h = torch.ones(1, 1)
    while h.shape[0] < n:
        h = torch.cat([torch.cat([h, h], dim=1), torch.cat([h, -h], dim=1)], dim=0)
    return h / math.sqrt(n)


def make_weight(
    out_features: int,
    in_features: int,
    init: str = "xavier_uniform",
    dtype: str = "float32",
    seed: int = 0,
) -> torch.Tensor:
    """A deterministic ``(out_features, in_features)`` weight.

    ``normal`` is i.i.d. N(0, 1), the standard Gaussian-random test matrix (not variance-scaled).
    ``hadamard`` needs a square power-of-two shape and ignores the seed.
    """
    out_features = _check_size("out_features", out_features)
    in_features = _check_size("in_features", in_features)
    if init not in INIT_METHODS:
        raise UserError(f"unknown init method {init!r}; choose one of {', '.join(INIT_METHODS)}")
    if dtype not in DTYPES:
        raise UserError(f"unknown dtype {dtype!r}; choose one of {', '.join(DTYPES)}")

    if init == "hadamard":
        if out_features != in_features:
            raise UserError(
                f"hadamard init needs a square matrix, got {out_features} x {in_features}"
            )
        weight = hadamard(out_features)
    else:
        # Always draw in float32 and cast after, so a seed gives the same matrix in every dtype.
        generator = torch.Generator().manual_seed(seed)
        weight = torch.empty(out_features, in_features, dtype=torch.float32)
        if init == "normal":
            torch.nn.init.normal_(weight, mean=0.0, std=1.0, generator=generator)
        else:
            _TORCH_INITS[init](weight, generator=generator)
    return weight.to(DTYPES[dtype])


def _load_error(path: Path, exc: Exception) -> UserError:
    # torch's own messages are paragraphs of advice about weights_only; name the problem instead.
    found = re.search(r"Unsupported global: GLOBAL ([\w.]+)", str(exc))
    if found:
        return UserError(
            f"{path} holds a pickled {found.group(1)} object, not a tensor or a state dict; "
            "save the weight tensor or model.state_dict() instead"
        )
    return UserError(f"cannot read {path} as a torch file (corrupt, truncated or another format)")


def _pick_tensor(obj: object, path: Path) -> torch.Tensor:
    if isinstance(obj, torch.Tensor):
        return obj
    if not isinstance(obj, dict):
        raise UserError(f"{path} holds a {type(obj).__name__}, not a tensor or a state dict")
    if isinstance(obj.get("state_dict"), dict):
        obj = obj["state_dict"]
    matrices = {k: v for k, v in obj.items() if isinstance(v, torch.Tensor) and v.dim() == 2}
    if len(matrices) == 1:
        return next(iter(matrices.values()))
    if not matrices:
        keys = ", ".join(map(str, obj)) or "none"
        raise UserError(f"{path} holds a state dict with no 2-D tensor (keys: {keys})")
    raise UserError(
        f"{path} holds a state dict with {len(matrices)} 2-D tensors "
        f"({', '.join(map(str, matrices))}); save the one weight to use on its own"
    )


def _read(path: Path, mmap: bool) -> object:
    return torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)


def open_weight(path: str | os.PathLike[str]) -> torch.Tensor:
    """The weight tensor in a ``.pth``/``.pt`` file (a tensor or a one-matrix state dict, also
    under a ``state_dict`` key), checked for shape and kind but its values not yet read: the
    file is memory-mapped (torch.save's zip format), so a caller can check the memory the
    weight needs (:func:`weight_nbytes`) before :func:`finish_weight` reads it. A file in the
    old non-zip format is read whole, after checking there is memory for its size."""
    path = Path(path)
    if not path.exists():
        raise UserError(f"weight file {path} does not exist")
    if not path.is_file():
        raise UserError(f"weight path {path} is not a file")
    size = path.stat().st_size
    if size == 0:
        raise UserError(f"weight file {path} is empty")
    try:
        try:
            obj = _read(path, mmap=True)
        except RuntimeError as exc:
            if "mmap can only be used" not in str(exc):
                raise
            from experiments.resources import check_memory

            check_memory(2 * size, f"reading {path} (an old torch file format, read whole)",
                         "save it again with torch.save", "cpu")  # fmt: skip
            obj = _read(path, mmap=False)
    except UserError:
        raise
    except Exception as exc:  # torch raises many types for bad files; all mean "unreadable" here
        raise _load_error(path, exc) from exc

    weight = _pick_tensor(obj, path)
    if weight.dim() != 2:
        raise UserError(
            f"{path} holds a {weight.dim()}-D tensor of shape {tuple(weight.shape)}, "
            "not a 2-D weight matrix"
        )
    if weight.numel() == 0:
        raise UserError(f"{path} holds an empty tensor of shape {tuple(weight.shape)}")
    if weight.is_complex() or weight.dtype == torch.bool:
        raise UserError(f"{path} holds a {weight.dtype} tensor, not a real-valued one")
    return weight


def weight_nbytes(weight: torch.Tensor) -> int:
    """Bytes the weight's values take once read densely in its own dtype (a view expanded from
    one value, or a sparse tensor, takes its full shape's size)."""
    return weight.numel() * weight.element_size()


def finish_weight(weight: torch.Tensor, path: str | os.PathLike[str]) -> torch.Tensor:
    """Read an :func:`open_weight` tensor: float32, contiguous, every value finite."""
    path = Path(path)
    if weight.layout != torch.strided:
        weight = weight.to_dense()
    if weight.is_floating_point():
        bad = int((~torch.isfinite(weight)).sum())
        if bad:
            raise UserError(
                f"{path} holds {bad} NaN/Inf value(s) out of {weight.numel()} in its weight"
            )
    # a copy in any case: the file's memory map must not stay the weight (a file changed
    # under a running job would change it)
    weight = weight.detach().to(torch.float32, copy=True).contiguous()
    bad = int((~torch.isfinite(weight)).sum())
    if bad:  # finite in float64 but too large for float32
        raise UserError(f"{path} holds {bad} value(s) too large for float32")
    return weight


def load_weight(path: str | os.PathLike[str]) -> torch.Tensor:
    """A 2-D float32 weight from a ``.pth``/``.pt`` file holding a tensor or a one-matrix state
    dict (also under a ``state_dict`` key)."""
    return finish_weight(open_weight(path), path)


def save_weight(tensor: torch.Tensor, path: str | os.PathLike[str]) -> Path:
    """Save atomically: write a temp file in the same folder, then rename over ``path``."""
    path = Path(path)
    # clone: torch.save writes a view's whole storage, which may be far larger than the view.
    data = tensor.detach().cpu().clone()
    try:
        with atomic_path(path) as tmp:
            torch.save(data, tmp)
    except OSError as exc:
        raise UserError(f"cannot write {path} ({exc.strerror or exc})") from exc
    return path
