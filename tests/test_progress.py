"""Progress bars in a batch log: lines, not a carriage-return stream."""

from __future__ import annotations

import io
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SCRIPT = """
import time
from experiments.progress import progress
for _ in progress(range(5), desc="work", mininterval=0.05, leave=False):
    time.sleep(0.06)
"""


def test_a_batch_log_gets_whole_lines(tmp_path):
    log = tmp_path / "slurm-1.out"
    with open(log, "w") as out:  # as sbatch's output file: not a terminal
        subprocess.run([sys.executable, "-c", SCRIPT], cwd=REPO, stderr=out, check=True)
    text = log.read_text()
    assert "\r" not in text
    lines = text.splitlines()
    assert len(lines) >= 3 and all(line.startswith("work:") for line in lines)
    assert any("5/5" in line or "4/5" in line for line in lines)


def test_a_terminal_keeps_tqdms_redraws():
    from experiments.progress import progress

    class Terminal(io.StringIO):
        def isatty(self) -> bool:
            return True

    screen = Terminal()
    for _ in progress(range(3), file=screen, mininterval=0):
        pass
    assert "\r" in screen.getvalue()
