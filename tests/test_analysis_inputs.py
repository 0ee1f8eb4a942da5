"""Analysis readers over broken or stale inputs: killed runs, unreadable result files.

Helpers here make real run folders the way a dead or a live process leaves them; the other
analysis tests use them too.
"""

from __future__ import annotations

import json
import socket
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pandas as pd
import pytest

from analysis.scaling_results import assemble_results
from common.runstore import KILLED, run_state

REPO = Path(__file__).resolve().parents[1]


def dead_pid() -> int:
    proc = subprocess.Popen(["true"])
    proc.wait()
    return proc.pid


def write_killed_record(folder: Path, **fields) -> Path:
    """A run record left "running" by a process that is gone: its pid is dead, its run.lock
    is there and nobody holds it (what kill -9 or the OOM killer leaves)."""
    folder.mkdir(parents=True, exist_ok=True)
    record = {"run_id": folder.name, "state": "running", "reason": None, "pid": dead_pid(),
              "host": socket.gethostname(), **fields}  # fmt: skip
    (folder / "run.json").write_text(json.dumps(record))
    (folder / "run.lock").write_text("")
    return folder


@contextmanager
def lock_held(folder: Path) -> Iterator[None]:
    """A live child process holding ``folder``'s run lock, as a running job does."""
    code = ("import sys, time; from common.runstore import RunLock; "
            "RunLock(sys.argv[1]).acquire(); print('held', flush=True); time.sleep(120)")  # fmt: skip
    child = subprocess.Popen([sys.executable, "-c", code, str(folder)], cwd=REPO,
                             stdout=subprocess.PIPE, text=True)  # fmt: skip
    try:
        assert child.stdout is not None and child.stdout.readline().strip() == "held"
        yield
    finally:
        child.kill()
        child.wait()


def test_the_helpers_make_a_killed_and_a_running_record(tmp_path):
    run = write_killed_record(tmp_path / "run")
    assert run_state(run) == KILLED
    with lock_held(run):
        assert run_state(run) == "running"


# ---------------------------------------------------------------------------------------------
# scaling_results: assembling a multirun folder


def _cell(job: Path, batch: int, text: str | None = None) -> None:
    job.mkdir(parents=True)
    (job / "config.yaml").write_text(f"batch_size: {batch}\nlr: 0.001\nseed: 0\n"
                                     "task: {noise: gaussian}\n")  # fmt: skip
    row = {"batch_size": batch, "lr": 1e-3, "seed": 0, "noise": "gaussian",
           "final_val_loss": 1.1, "diverged": False, "status": "finished"}  # fmt: skip
    (job / "cell.json").write_text(json.dumps(row) if text is None else text)
    (job / "run.json").write_text(json.dumps({"state": "finished"}))


def _assemble(sweep: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "analysis/scaling_results.py", str(sweep)], cwd=REPO,
                          capture_output=True, text=True, timeout=120)  # fmt: skip


@pytest.mark.parametrize("text", ["", '{"batch_size": 16, "lr"', "[1, 2]"])
def test_an_unreadable_cell_json_is_a_failed_job_and_assembly_goes_on(tmp_path, text):
    """Today an empty or cut cell.json is a JSONDecodeError traceback and no results.csv."""
    sweep = tmp_path / "sweep"
    _cell(sweep / "0", 8)
    _cell(sweep / "1", 16, text=text)
    _cell(sweep / "2", 32)
    proc = _assemble(sweep)
    assert proc.returncode == 1, proc.stderr
    bad = sweep / "1" / "cell.json"
    assert proc.stderr.strip().splitlines() == [
        f"warning: unreadable cell.json: {bad}: the job counts as failed"
    ]
    frame = pd.read_csv(sweep / "results.csv")
    assert frame["batch_size"].tolist() == [8, 16, 32]
    assert frame["status"].tolist() == ["finished", "failed", "finished"]
    assert frame["reason"][1] == f"unreadable cell.json: {bad}"
    assert "3 rows, 1 not finished" in proc.stdout


def test_a_killed_job_is_killed_in_results_and_a_diverged_one_is_a_result(tmp_path):
    """Today a job killed hard reads "running" in results.csv; a diverged cell counted as not
    finished in the closing line."""
    sweep = tmp_path / "sweep"
    _cell(sweep / "0", 8)
    diverged = {"batch_size": 64, "lr": 1e-3, "seed": 0, "noise": "gaussian",
                "final_val_loss": None, "diverged": True, "status": "diverged"}  # fmt: skip
    _cell(sweep / "1", 64, text=json.dumps(diverged))
    killed = sweep / "2"
    killed.mkdir()
    (killed / "config.yaml").write_text("batch_size: 16\nlr: 0.01\nseed: 0\n")
    write_killed_record(killed)
    proc = _assemble(sweep)
    assert proc.returncode == 1, proc.stderr
    frame = pd.read_csv(sweep / "results.csv")
    row = frame[frame["batch_size"] == 16].iloc[0]
    assert row["status"] == "killed" and "ended without closing its run record" in row["reason"]
    assert "3 rows, 1 not finished" in proc.stdout
    with lock_held(killed):  # the same job, its process alive: still running, not killed
        assemble_results(sweep)
        frame = pd.read_csv(sweep / "results.csv")
        assert frame[frame["batch_size"] == 16]["status"].tolist() == ["running"]


def test_a_sweep_folder_that_is_missing_or_a_file_is_one_error_line(tmp_path):
    (tmp_path / "file").write_text("")
    for path, words in ((tmp_path / "nope", "does not exist"), (tmp_path / "file", "a file")):
        proc = _assemble(path)
        assert proc.returncode == 2
        lines = proc.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("error:") and words in lines[0], lines
