"""The one-way package layers (pyproject.toml's [tool.importlinter] contracts), checked in the
default suite so CI enforces them as `make lint` does."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
LINT_IMPORTS = str(Path(sys.executable).with_name("lint-imports"))
PACKAGES = ["ksmm", "common", "experiments", "analysis", "hydra_plugins/ks_slurm_launcher"]


def lint_imports(root: Path) -> subprocess.CompletedProcess:
    return subprocess.run([LINT_IMPORTS, "--no-cache"], cwd=root, capture_output=True,
                          text=True, timeout=120)  # fmt: skip


def test_the_package_graph_runs_one_way():
    proc = lint_imports(REPO)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-2000:]
    assert "0 broken" in proc.stdout


def test_an_upward_import_breaks_the_layers(tmp_path):
    """The same contracts over a copy of the tree in which common imports analysis."""
    for package in PACKAGES:
        shutil.copytree(REPO / package, tmp_path / package,
                        ignore=shutil.ignore_patterns("__pycache__"))  # fmt: skip
    shutil.copy(REPO / "pyproject.toml", tmp_path)
    ranks = tmp_path / "common" / "ranks.py"
    ranks.write_text(ranks.read_text() + "\nfrom analysis import scaling_fit  # noqa\n")
    proc = lint_imports(tmp_path)
    assert proc.returncode == 1, proc.stdout[-3000:]
    assert "common is not allowed to import analysis" in proc.stdout
    assert "common.ranks -> analysis.scaling_fit" in proc.stdout
