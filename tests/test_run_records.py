"""Run records that never lie and runs that never mix, checked with real processes, signals and
files: one writer per run folder, a dead process read as killed, repeated signals, a full disk,
folders that cannot be made, and a resume that records each step once."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest
import yaml
from entrypoint import run_script
from test_multimodal import TINY

from common import runstore
from common.sweep_outcome import unfinished_jobs
from experiments.logger import ExperimentLogger

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "experiments" / "rank_sweep.py"
SMALL = ["weight.out_features=32", "weight.in_features=64", "train.steps_per_epoch=5",
         "train.batch_size=16", "logger=disabled", "rank_probe.enabled=false"]  # fmt: skip
LONG = [*SMALL, "train.num_epochs=100000"]  # runs until it is stopped


def start(args: list[str], cwd: Path) -> subprocess.Popen:
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "WANDB_SILENT": "true"}
    return subprocess.Popen(
        [sys.executable, str(SCRIPT), *args],
        cwd=cwd,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        # pytest's children may inherit SIGINT ignored; a user's shell gives the default
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )


def wait_for_epochs(job: Path, epochs: int, proc: subprocess.Popen, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    path = job / "metrics.jsonl"
    while time.monotonic() < deadline:
        if path.exists() and len(path.read_text().splitlines()) >= epochs:
            return
        if proc.poll() is not None:
            raise AssertionError(f"the run ended early: {proc.communicate()}")
        time.sleep(0.05)
    proc.kill()
    raise AssertionError(f"{job} logged fewer than {epochs} epochs in {timeout} s")


def stop(proc: subprocess.Popen) -> tuple[str, str]:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
    return proc.communicate(timeout=60)


def error_line(stderr: str) -> str:
    """The one error line (progress bars may precede it), and no traceback."""
    assert "Traceback" not in stderr, stderr
    lines = [line for line in stderr.splitlines() if line.startswith("error: ")]
    assert len(lines) == 1, stderr
    return lines[0]


def test_a_second_run_into_a_folder_in_use_is_refused_before_writing(tmp_path):
    job = tmp_path / "job"
    first = start(["rank=4", *LONG, f"hydra.run.dir={job}"], tmp_path)
    try:
        wait_for_epochs(job, 2, first)
        hydra_files = {p.name: p.read_text() for p in (job / ".hydra").iterdir()}
        second = run_script(SCRIPT, ["rank=16", *SMALL, f"hydra.run.dir={job}"], tmp_path)
        assert second.returncode == 2
        line = error_line(second.stderr)
        assert f"{job} is in use by pid {first.pid} on " in line
        # nothing of the second run was written, Hydra's own files included
        assert {p.name: p.read_text() for p in (job / ".hydra").iterdir()} == hydra_files
        assert runstore.run_state(job) == "running"
    finally:
        stop(first)
    assert first.returncode == 130
    assert yaml.safe_load((job / "config.yaml").read_text())["rank"] == 4
    epochs = pd.read_csv(job / "loss_curves.csv")["epoch"].tolist()
    assert epochs == list(range(1, len(epochs) + 1))  # one run's curve, each epoch once
    steps = [json.loads(line)["_step"] for line in (job / "metrics.jsonl").open()]
    assert steps == sorted(set(steps))


def test_a_folder_holding_a_finished_run_is_not_reused(tmp_path):
    job = tmp_path / "job"
    args = [*SMALL, "train.num_epochs=2", f"hydra.run.dir={job}"]
    assert run_script(SCRIPT, ["rank=4", *args], tmp_path).returncode == 0
    before = {p.name: p.read_bytes() for p in job.iterdir() if p.is_file()}
    again = run_script(SCRIPT, ["rank=16", *args], tmp_path)
    assert again.returncode == 2
    run_id = json.loads(before["run.json"])["run_id"]
    assert f"already holds run {run_id} (finished)" in error_line(again.stderr)
    assert {p.name: p.read_bytes() for p in job.iterdir() if p.is_file()} == before


def test_a_killed_run_reads_killed_and_does_not_count_as_finished(tmp_path):
    job = tmp_path / "job"
    proc = start(["rank=4", *LONG, f"hydra.run.dir={job}"], tmp_path)
    try:
        wait_for_epochs(job, 1, proc)
        assert runstore.run_state(job) == "running"  # alive: its lock is held
        assert unfinished_jobs([job]) == {job: "running"}
    finally:
        proc.kill()
        proc.communicate()
    record = json.loads((job / "run.json").read_text())
    assert record["state"] == "running"  # what the dead process left
    assert record["pid"] == proc.pid and record["host"]
    assert runstore.run_state(job) == runstore.KILLED
    assert unfinished_jobs([job]) == {job: "killed"}
    assert str(proc.pid) in runstore.killed_reason(record)


def test_a_record_without_a_lock_file_uses_its_pid(tmp_path):
    """Records written before run.lock existed: a dead pid on this host reads killed."""
    gone = subprocess.Popen(["true"])
    gone.wait()
    import socket

    record = {"state": "running", "pid": gone.pid, "host": socket.gethostname()}
    assert runstore.run_state(tmp_path, record) == runstore.KILLED
    assert runstore.run_state(tmp_path, {**record, "pid": os.getpid()}) == "running"
    assert runstore.run_state(tmp_path, {**record, "host": "elsewhere"}) == "running"


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_a_repeated_signal_still_leaves_a_closed_record(tmp_path, signum):
    """slurmstepd sends SIGTERM twice ~10 ms apart; a user presses Ctrl-C twice."""
    job = tmp_path / "job"
    proc = start(["rank=4", *LONG, f"hydra.run.dir={job}"], tmp_path)
    wait_for_epochs(job, 2, proc)
    for _ in range(3):
        proc.send_signal(signum)
        time.sleep(0.01)
    _, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 130, stderr
    assert "Traceback" not in stderr
    record = json.loads((job / "run.json").read_text())
    assert record["state"] == "interrupted" and record["ended_at"]
    assert runstore.run_state(job) == "interrupted"


def _unwritable_cases(tmp_path: Path) -> list[tuple[list[str], str]]:
    a_file = tmp_path / "a_file"
    a_file.write_text("not a folder")
    return [
        ([f"hydra.run.dir={a_file}/job"], "Not a directory"),
        (["hydra.run.dir=/proc/no_such_run"], "No such file or directory"),
        (["-m", f"hydra.sweep.dir={a_file}/sweep", "rank=2,4"], "Not a directory"),
    ]


def test_a_folder_that_cannot_be_made_is_one_line(tmp_path):
    for args, reason in _unwritable_cases(tmp_path):
        proc = run_script(SCRIPT, [*args, *SMALL, "train.num_epochs=1"], tmp_path)
        assert proc.returncode == 2, (args, proc.stderr)
        line = error_line(proc.stderr)
        assert "as an output folder" in line and reason in line, line
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a_file"]


@pytest.mark.slow
@pytest.mark.skipif(os.geteuid() != 0 or not shutil.which("mount"), reason="mounts a tmpfs")
def test_a_full_disk_is_one_line_naming_the_file_and_a_failed_record(tmp_path):
    disk = tmp_path / "disk"
    disk.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=256k", "tmpfs", str(disk)]).returncode:
        pytest.skip("cannot mount a tmpfs here")
    try:
        job = disk / "job"
        proc = start(["rank=4", *LONG, f"hydra.run.dir={job}"], tmp_path)
        wait_for_epochs(job, 2, proc)
        filler = disk / "filler"
        with open(filler, "wb", buffering=0) as f:  # take what is left, as another job would
            try:
                while True:
                    f.write(b"\0" * 4096)
            except OSError:
                pass
        _, stderr = proc.communicate(timeout=120)
        assert proc.returncode == 1, stderr
        line = error_line(stderr)
        assert "No space left on device" in line and str(job) in line, line
        record = json.loads((job / "run.json").read_text())
        assert record["state"] == "failed" and "No space left on device" in record["reason"]
        assert str(job) in record["reason"]
        assert runstore.run_state(job) == "failed"
    finally:
        subprocess.run(["umount", "-l", str(disk)])


LOGGING_RUN = """
import os, sys
from experiments.logger import ExperimentLogger
lg = ExperimentLogger(sys.argv[1], {}, mode="disabled")
for step in range(1, 9):
    lg.log({"loss": 1.0 / step}, step=step)
    lg.log_table("t", ["a"], [[step]], step=step)
print(lg.run_id, flush=True)
os.kill(os.getpid(), 9)  # dies with the record open, after step 8
"""


def test_a_resume_rewinds_the_record_so_each_step_is_logged_once(tmp_path):
    job = tmp_path / "job"
    proc = subprocess.run([sys.executable, "-c", LOGGING_RUN, str(job)], cwd=REPO,
                          capture_output=True, text=True, timeout=120)  # fmt: skip
    assert proc.returncode == -9, proc.stderr
    run_id = proc.stdout.strip()
    assert runstore.run_state(job) == runstore.KILLED
    # the checkpoint was taken at step 5: steps 6-8 will be trained and logged again
    with ExperimentLogger(job, {}, mode="disabled", run_id=run_id) as lg:
        assert lg.rewind(5) == 6  # three scalars and three tables after step 5
        for step in range(6, 11):
            lg.log({"loss": 1.0 / step}, step=step)
    steps = [r["_step"] for r in runstore.iter_metrics(job) if "loss" in r]
    assert steps == list(range(1, 11))
    tables = sorted(p.name for p in (job / "tables").iterdir())
    assert tables == [f"t_{s:07d}.json" for s in range(1, 6)]
    assert runstore.run_state(job) == "finished"


MULTIMODAL = REPO / "experiments" / "multimodal.py"
MULTIMODAL_TINY = [*TINY, "train.epochs=30", "train.log_frequency=1",
                   "train.checkpoint_frequency=5", "train.image_log_frequency=3",
                   "rank_probe.every=4"]  # fmt: skip


@pytest.mark.slow  # three real multimodal runs a case; CI runs it (make test-slow)
@pytest.mark.parametrize("signum", [signal.SIGKILL, signal.SIGTERM])
def test_a_killed_multimodal_run_resumed_logs_each_step_once(tmp_path, signum):
    """Stopped between two checkpoints, then resumed: every step's record once, and the same
    final numbers as an uninterrupted run with the same seed."""
    whole, cut = tmp_path / "whole", tmp_path / "cut"
    env = {"OMP_NUM_THREADS": "1"}
    done = run_script(MULTIMODAL, [*MULTIMODAL_TINY, f"hydra.run.dir={whole}"], tmp_path, **env)
    assert done.returncode == 0, done.stderr
    proc = subprocess.Popen([sys.executable, str(MULTIMODAL), *MULTIMODAL_TINY,
                             f"hydra.run.dir={cut}"], cwd=tmp_path, env={**os.environ, **env},
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)  # fmt: skip
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and proc.poll() is None:
        steps = [r["_step"] for r in runstore.iter_metrics(cut) if "total_loss" in r]
        if steps and max(steps) >= 7:  # past the checkpoint at step 5
            break
        time.sleep(0.005)
    proc.send_signal(signum)
    proc.communicate(timeout=60)
    assert 7 <= max(r["_step"] for r in runstore.iter_metrics(cut)) < 60, "stopped too late"
    resumed = run_script(MULTIMODAL, [*MULTIMODAL_TINY, "resume=true", f"run_dir={cut}"],
                         tmp_path, **env)  # fmt: skip
    assert resumed.returncode == 0, resumed.stderr

    def records(run: Path) -> list[tuple]:
        return [(r["_step"], tuple(sorted(r))) for r in runstore.iter_metrics(run)]

    assert sorted(records(cut)) == sorted(records(whole))  # the same keys at the same steps
    media = sorted(p.name for p in (cut / "media").iterdir())
    assert media == sorted(p.name for p in (whole / "media").iterdir())
    final = {k: v for k, v in runstore.read_json(whole / "summary.json").items()
             if k.startswith("final_")}  # fmt: skip
    assert final and {k: runstore.read_json(cut / "summary.json")[k] for k in final} == final


def kill_when(proc: subprocess.Popen, ready, signum: int, timeout: float = 120) -> None:
    """Send ``signum`` as soon as ``ready()`` holds; fail if the run ended first."""
    deadline = time.monotonic() + timeout
    while not ready():
        assert proc.poll() is None, f"the run ended before it was stopped: {proc.communicate()}"
        assert time.monotonic() < deadline, "the run never got there"
        time.sleep(0.005)
    proc.send_signal(signum)
    proc.communicate(timeout=60)


@pytest.mark.parametrize("signum", [signal.SIGKILL, signal.SIGTERM])
def test_a_stopped_rank_sweep_run_goes_on_from_its_last_epoch(tmp_path, signum):
    """resume=true (what a SLURM requeue sets) goes on from last.pt: the same loss curves and
    final numbers as an uninterrupted run, each epoch recorded once, last.pt gone at the end."""
    args = [*SMALL, "weight.out_features=64", "weight.in_features=128", "rank=4",
            "train.num_epochs=60", "train.steps_per_epoch=20"]  # fmt: skip
    whole, cut = tmp_path / "whole", tmp_path / "cut"
    assert run_script(SCRIPT, [*args, f"hydra.run.dir={whole}"], tmp_path).returncode == 0
    proc = start([*args, f"hydra.run.dir={cut}"], tmp_path)
    kill_when(
        proc,
        lambda: (cut / "last.pt").exists() and len(list(runstore.iter_metrics(cut))) >= 10,
        signum,
    )
    stopped_at = len(list(runstore.iter_metrics(cut)))
    assert stopped_at < 60, "stopped too late"
    resumed = run_script(SCRIPT, [*args, f"hydra.run.dir={cut}", "resume=true"], tmp_path)
    assert resumed.returncode == 0, resumed.stderr
    assert "after epoch" in resumed.stdout + resumed.stderr  # went on, did not start over
    assert (cut / "loss_curves.csv").read_text() == (whole / "loss_curves.csv").read_text()
    final = {k: v for k, v in runstore.read_json(whole / "summary.json").items()
             if k != "wall_time_s"}  # fmt: skip
    assert {k: runstore.read_json(cut / "summary.json").get(k) for k in final} == final
    assert [r["_step"] for r in runstore.iter_metrics(cut)] == list(range(1, 61))
    assert not (cut / "last.pt").exists() and (cut / "final.pth").exists()
    assert runstore.run_state(cut) == "finished"


def test_atomically_written_files_get_the_usual_permissions(tmp_path):
    plain = tmp_path / "plain.txt"
    plain.write_text("x")
    runstore.write_json_atomic(tmp_path / "a.json", {"a": 1})
    assert (tmp_path / "a.json").stat().st_mode & 0o777 == plain.stat().st_mode & 0o777


def test_sigterm_while_the_input_is_checked_leaves_nothing(tmp_path):
    """Before the run starts (a big weight being made and checked) SIGTERM unwinds like Ctrl-C:
    exit 130 and no job folder left (Python's default would die on the spot and leave it)."""
    job = tmp_path / "job"
    proc = start([f"hydra.run.dir={job}", "logger=disabled", "weight.out_features=6000",
                  "weight.in_features=12000", "weight.init=orthogonal"], tmp_path)  # fmt: skip
    deadline = time.monotonic() + 60
    while not (job / "run.lock").exists() and time.monotonic() < deadline:
        time.sleep(0.05)
    time.sleep(0.5)
    assert not (job / "run.json").exists(), "the check ended before the signal"
    proc.send_signal(signal.SIGTERM)
    _, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 130, stderr
    assert "interrupted before the run started" in stderr
    assert not job.exists()


@pytest.mark.parametrize("bad", ["runtime.num_threads=0", f"seed={2**70}", "max_rank=0"])
def test_bad_threads_seed_or_max_rank_is_one_line_and_nothing_left(tmp_path, bad):
    job = tmp_path / "job"
    proc = run_script(SCRIPT, [bad, *SMALL, "train.num_epochs=1", f"hydra.run.dir={job}"],
                      tmp_path)  # fmt: skip
    assert proc.returncode == 2
    assert bad.split("=")[0] in error_line(proc.stderr)
    assert not job.exists()
