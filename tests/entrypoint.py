"""Run an entry point as a user does: a subprocess of this Python, output captured."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path


def run_script(
    script: Path, args: list[str], cwd: Path, timeout: float = 300, **env: str
) -> subprocess.CompletedProcess:
    environ = {**os.environ, "PYTHONUNBUFFERED": "1", "WANDB_SILENT": "true", **env}
    return subprocess.run(
        [sys.executable, str(script), *args],
        cwd=cwd,
        env=environ,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
