"""experiments.weights and the generate_test_weight CLI."""

from __future__ import annotations

import resource
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from common.cli import UserError, run_cli
from experiments import generate_test_weight
from experiments.weights import (
    INIT_METHODS,
    load_weight,
    make_weight,
    open_weight,
    save_weight,
    weight_nbytes,
)

REPO = Path(__file__).resolve().parents[1]
RANDOM_INITS = [m for m in INIT_METHODS if m != "hadamard"]


@pytest.mark.parametrize("init", INIT_METHODS)
@pytest.mark.parametrize("dtype", ["float32", "float16", "bfloat16", "float64"])
def test_shape_dtype_and_determinism(init: str, dtype: str) -> None:
    w = make_weight(32, 32, init=init, dtype=dtype, seed=3)
    assert w.shape == (32, 32) and w.dtype == getattr(torch, dtype)
    assert torch.isfinite(w).all()
    assert torch.equal(w, make_weight(32, 32, init=init, dtype=dtype, seed=3))


@pytest.mark.parametrize("init", RANDOM_INITS)
def test_rectangular_and_seed_dependent(init: str) -> None:
    w = make_weight(16, 48, init=init, seed=0)
    assert w.shape == (16, 48)
    assert not torch.equal(w, make_weight(16, 48, init=init, seed=1))


def test_normal_is_standard_gaussian() -> None:
    w = make_weight(256, 256, init="normal")
    assert abs(w.mean().item()) < 0.02 and abs(w.std().item() - 1.0) < 0.02


def test_hadamard_is_orthogonal() -> None:
    h = make_weight(64, 64, init="hadamard", dtype="float64")
    assert torch.allclose(h @ h.T, torch.eye(64, dtype=torch.float64))
    assert set(h.abs().unique().tolist()) == {1 / 8}


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"init": "bogus"}, "unknown init method 'bogus'; choose one of xavier_uniform"),
        ({"dtype": "int8"}, "unknown dtype 'int8'"),
        ({"out_features": 0}, "out_features must be a positive integer"),
        ({"in_features": -1}, "in_features must be a positive integer"),
        ({"init": "hadamard", "out_features": 8, "in_features": 16}, "square"),
        ({"init": "hadamard", "out_features": 12, "in_features": 12}, "power-of-two"),
    ],
)
def test_make_weight_bad_input(kwargs: dict, match: str) -> None:
    args = {"out_features": 8, "in_features": 8} | kwargs
    with pytest.raises(UserError, match=match):
        make_weight(**args)


def test_save_and_load_tensor(tmp_path: Path) -> None:
    w = make_weight(8, 12, dtype="float16")
    path = save_weight(w, tmp_path / "sub" / "w.pth")
    loaded = load_weight(path)
    assert loaded.dtype == torch.float32 and torch.equal(loaded, w.float())
    assert [p.name for p in path.parent.iterdir()] == ["w.pth"]  # no temp file left


def test_load_state_dict(tmp_path: Path) -> None:
    w = torch.randn(4, 6)
    torch.save({"weight": w, "bias": torch.zeros(4)}, tmp_path / "sd.pth")
    assert torch.equal(load_weight(tmp_path / "sd.pth"), w)
    torch.save({"state_dict": {"layer.weight": w}, "epoch": 3}, tmp_path / "ckpt.pt")
    assert torch.equal(load_weight(tmp_path / "ckpt.pt"), w)


def test_open_weight_reads_the_shape_without_the_values(tmp_path: Path) -> None:
    """A 1e6 x 1e6 weight in a small file (one value, expanded): its shape and size are known
    from the memory-mapped file before a byte of the 3.6 TiB is allocated."""
    path = tmp_path / "huge.pth"
    torch.save(torch.ones(1).expand(10**6, 10**6), path)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    weight = open_weight(path)
    assert weight.shape == (10**6, 10**6) and weight_nbytes(weight) == 4 * 10**12
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before < 50_000  # KiB


def test_a_loaded_weight_is_a_copy_of_the_file(tmp_path: Path) -> None:
    """Read through a memory map, but not left on it: the file changed under a running job
    does not change its weight."""
    path = tmp_path / "w.pth"
    w = torch.randn(64, 32)
    torch.save(w, path)
    loaded = load_weight(path)
    torch.save(torch.zeros(64, 32), path)
    assert torch.equal(loaded, w)


def test_old_format_weight_files_still_load(tmp_path: Path) -> None:
    path = tmp_path / "old.pth"
    w = torch.randn(8, 4)
    torch.save(w, path, _use_new_zipfile_serialization=False)  # cannot be memory-mapped
    assert torch.equal(load_weight(path), w)


def _bad_files(tmp_path: Path) -> dict[str, Path]:
    files = {name: tmp_path / f"{name}.pth" for name in ("garbage", "3d", "nan", "two", "empty")}
    files["garbage"].write_text("not a torch file\n")
    torch.save(torch.zeros(2, 3, 4), files["3d"])
    torch.save(torch.tensor([[1.0, float("nan")], [float("inf"), 2.0]]), files["nan"])
    torch.save({"a.weight": torch.zeros(2, 2), "b.weight": torch.zeros(3, 3)}, files["two"])
    torch.save(torch.zeros(0, 4), files["empty"])
    files["missing"] = tmp_path / "missing.pth"
    return files


@pytest.mark.parametrize(
    ("name", "match"),
    [
        ("missing", "does not exist"),
        ("garbage", "cannot read .* as a torch file"),
        ("3d", r"3-D tensor of shape \(2, 3, 4\)"),
        ("nan", "2 NaN/Inf value"),
        ("two", r"2 2-D tensors \(a.weight, b.weight\)"),
        ("empty", "empty tensor"),
    ],
)
def test_load_weight_bad_input(tmp_path: Path, name: str, match: str) -> None:
    with pytest.raises(UserError, match=match):
        load_weight(_bad_files(tmp_path)[name])


def _cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "experiments/generate_test_weight.py", *args],
        cwd=REPO, capture_output=True, text=True, timeout=120,
    )  # fmt: skip


def test_cli_writes_weight(tmp_path: Path) -> None:
    out = tmp_path / "w.pth"
    result = _cli("--output_features", "16", "--input_features", "32", "--output_path", str(out),
                  "--init_method", "orthogonal", "--dtype", "float16")  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert str(out) in result.stdout and "(16, 32)" in result.stdout
    saved = torch.load(out, weights_only=True)
    assert saved.shape == (16, 32) and saved.dtype == torch.float16


def test_cli_bad_input_subprocess(tmp_path: Path) -> None:
    out = tmp_path / "w.pth"
    result = _cli("--output_path", str(out), "--output_features", "0")
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: --output_features"), result.stderr
    assert not list(tmp_path.iterdir())


@pytest.mark.parametrize(
    "args",
    [
        ["--init_method", "bogus"],
        ["--input_features", "-4"],
        ["--init_method", "hadamard"],  # the default 2048 x 4096 is not square
        ["--dtype", "int8"],
        ["--seed", "x"],
    ],
)
def test_cli_bad_input(tmp_path: Path, capsys: pytest.CaptureFixture[str], args: list[str]) -> None:
    # In-process through run_cli (the same path as the script, without a torch import per case).
    with pytest.raises(SystemExit) as exit_info:
        run_cli(generate_test_weight.main, ["--output_path", str(tmp_path / "w.pth"), *args])
    assert exit_info.value.code == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:"), lines
    assert not list(tmp_path.iterdir())
