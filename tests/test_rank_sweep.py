"""The rank-sweep entry point end to end, run as a user runs it (a subprocess)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest
import torch
from entrypoint import run_script

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "experiments" / "rank_sweep.py"
# A tiny but real problem: 32x64 Gaussian weight, a few short epochs.
SMALL = [
    "weight.out_features=32",
    "weight.in_features=64",
    "train.num_epochs=3",
    "train.steps_per_epoch=20",
    "train.batch_size=32",
    "logger=disabled",
]


def run(args: list[str], tmp_path: Path, timeout: float = 240) -> subprocess.CompletedProcess:
    return run_script(SCRIPT, args, tmp_path, timeout)


def test_single_run_writes_curves_checkpoint_and_record(tmp_path):
    out = tmp_path / "job"
    proc = run(["rank=4", *SMALL, "rank_probe.every=2", f"hydra.run.dir={out}"], tmp_path)
    assert proc.returncode == 0, proc.stderr
    curves = pd.read_csv(out / "loss_curves.csv")
    assert list(curves.columns) == [
        "epoch", "train_loss", "val_loss", "rank", "floor", "loss_over_floor"
    ]  # fmt: skip
    assert curves["epoch"].tolist() == [1, 2, 3] and (curves["rank"] == 4).all()
    assert (curves["val_loss"] >= curves["floor"] * (1 - 1e-6)).all()  # nothing beats the floor
    assert json.loads((out / "loss_curves.json").read_text())["curves"][-1]["epoch"] == 3
    record = json.loads((out / "run.json").read_text())
    assert record["state"] == "finished"
    summary = json.loads((out / "summary.json").read_text())
    for key in ("parameters", "compression", "floor", "final_val_loss", "loss_over_floor"):
        assert key in summary
    checkpoint = torch.load(out / "final.pth", weights_only=False)
    assert checkpoint["rank"] == 4 and checkpoint["patterns"]
    metrics = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert {"train_loss", "val_loss", "lr", "grad_norm", "floor", "loss_over_floor"} <= set(
        metrics[-1]
    )
    # the rank probe: every factor's output at epoch 2, with the 12 dynamics metrics
    probed = metrics[1]
    assert probed["_step"] == 2 and "ranks/factor_0/effective_rank" in probed
    last = len(checkpoint["patterns"]) - 1
    assert f"ranks/factor_{last}/numerical_rank" in probed
    assert (
        "effective_rank_rank_drop_gini" in probed
        and "ranks/factor_0/effective_rank" not in metrics[0]
    )


def test_reaches_the_floor(tmp_path):
    """A Gaussian-random weight: the trained chain ends within 5% of its Eckart-Young floor."""
    out = tmp_path / "job"
    args = [
        "rank=8",
        "weight.out_features=48",
        "weight.in_features=64",
        "train.num_epochs=12",
        "train.steps_per_epoch=100",
        "train.batch_size=64",
        "train.lr=1e-2",
        "logger=disabled",
        f"hydra.run.dir={out}",
    ]
    proc = run(args, tmp_path)
    assert proc.returncode == 0, proc.stderr
    summary = json.loads((out / "summary.json").read_text())
    assert summary["loss_over_floor"] <= 1.05, summary


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("rank=0", "rank must be a positive integer"),
        ("rank=1000", "rank 1000 is above min(shape) = 32"),
        ("train.lr=-0.1", "train.lr must be positive"),
        ("weight.init=bogus", "weight.init must be one of"),
        ("weight.path=/nonexistent/w.pth", "/nonexistent/w.pth"),
        ("model.structure=tree", "model.structure must be one of"),
        ("train.precision=float16", "float16 needs a CUDA device"),
        ("model.structure=monarch model.nblocks=3", "nblocks=3 must be a positive integer"),
        ("+train.lrr=5", "unknown config key 'train.lrr'"),
        ("weight.path=~/w.pth", "cannot parse 'weight.path=~/w.pth' (quote a value"),
        ("weight.path=/tmp/a=b.pth", "cannot parse 'weight.path=/tmp/a=b.pth'"),
        ("rank=[1,2]", "rank=[1,2]: Value '[1, 2]' of type 'list'"),
        ("train.lr=0.1,0.01", "sweeps over several values: add -m (--multirun)"),
        ("train.lr=nan", "train.lr must be a finite number, got nan"),
        ("train.grad_clip=-1", "train.grad_clip must be >= 0, got -1"),
        ("train.steps_per_epoch=-3", "train.steps_per_epoch must be a positive integer, got -3"),
        ("data.input_std=inf", "data.input_std must be a finite number, got inf"),
    ],
)
def test_bad_input_one_line_nonzero_nothing_written(tmp_path, override, message):
    out = tmp_path / "job"
    proc = run([*SMALL, *override.split(), f"hydra.run.dir={out}"], tmp_path)
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], lines
    assert not out.exists()


@pytest.mark.parametrize(
    ("path_content", "message"),
    [
        (lambda p: torch.save(torch.randn(3, 4, 5), p), "2-D"),
        (lambda p: torch.save(torch.full((4, 4), float("nan")), p), "NaN"),
        (lambda p: p.write_text("not a torch file"), "w.pth"),
        # no signal: the floor and the zero predictor's loss would be 0, loss/floor NaN
        (lambda p: torch.save(torch.zeros(16, 32), p), "w.pth is all zeros: there is nothing"),
        (lambda p: torch.save(torch.full((16, 32), 1e18), p), "outside float32's safe range"),
    ],
)
def test_bad_weight_files(tmp_path, path_content, message):
    path = tmp_path / "w.pth"
    path_content(path)
    out = tmp_path / "job"
    proc = run([*SMALL, "rank=4", f"weight.path={path}", f"hydra.run.dir={out}"], tmp_path)
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and message in lines[0], lines
    assert not out.exists()


def test_sigterm_during_the_floor_svd_is_honoured_within_seconds(tmp_path):
    """The loss floor is one long LAPACK call (tens of seconds at 3000x6000 here, minutes at
    larger sizes): SIGTERM in the middle of it ends the job at once, marked interrupted."""
    out = tmp_path / "job"
    args = ["weight.out_features=3000", "weight.in_features=6000", "logger=disabled",
            f"hydra.run.dir={out}"]  # fmt: skip
    proc = subprocess.Popen([sys.executable, str(SCRIPT), *args], cwd=tmp_path,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
    try:
        record = out / "run.json"
        deadline = time.time() + 120
        while time.time() < deadline and not record.exists():
            time.sleep(0.05)
        assert record.exists(), "the job never started"
        time.sleep(1.0)  # inside the floor's SVD: it runs right after the record is written
        assert not (out / "loss_curves.csv").exists(), "the floor was done already"
        proc.send_signal(signal.SIGTERM)
        sent = time.time()
        assert proc.wait(timeout=60) == 130
        assert time.time() - sent < 10
    finally:
        proc.kill()
        proc.wait()
    assert json.loads(record.read_text())["state"] == "interrupted"


def test_mistyped_key(tmp_path):
    proc = run([*SMALL, "trian.lr=0.1", f"hydra.run.dir={tmp_path / 'job'}"], tmp_path)
    assert proc.returncode == 2
    assert proc.stderr.strip() == "error: unknown config key 'trian.lr' (see conf/rank_sweep.yaml)"
    assert not (tmp_path / "job").exists()


def test_weight_file_and_state_dict(tmp_path):
    path = tmp_path / "w.pth"
    torch.save({"layer.weight": torch.randn(16, 24), "layer.bias": torch.randn(16)}, path)
    out = tmp_path / "job"
    proc = run(["rank=4", *SMALL, f"weight.path={path}", f"hydra.run.dir={out}"], tmp_path)
    assert proc.returncode == 0, proc.stderr
    summary = json.loads((out / "summary.json").read_text())
    assert (summary["out_features"], summary["in_features"]) == (16, 24)


def test_divergence_fails_the_job_with_its_reason(tmp_path):
    out = tmp_path / "job"
    args = [
        "rank=4",
        *SMALL,
        "train.lr=1e30",
        "train.grad_clip=null",
        "train.schedule=constant",
        f"hydra.run.dir={out}",
    ]
    proc = run(args, tmp_path)
    assert proc.returncode == 1
    assert "diverged" in proc.stderr.strip().splitlines()[-1]
    record = json.loads((out / "run.json").read_text())
    assert record["state"] == "failed" and "diverged" in record["reason"]


def test_multirun_aggregates_and_records_failures(tmp_path):
    sweep = tmp_path / "sweep"
    small = [a for a in SMALL if not a.startswith("logger=")]  # W&B offline: the default
    args = ["-m", "rank=2,4,1000", *small, f"hydra.sweep.dir={sweep}"]
    proc = run(args, tmp_path)
    assert proc.returncode == 1, proc.stderr  # the sweep went on, then says a job failed
    assert "1 of 3 jobs did not finish" in proc.stdout
    summary = pd.read_csv(sweep / "rank_sweep_summary.csv")
    assert summary["rank"].tolist() == [2, 4, 1000]
    assert summary["status"].tolist() == ["finished", "finished", "failed"]
    assert "above min(shape)" in summary["reason"].iloc[2]
    # the rejected job is a failed run of the sweep's own W&B project and group, like the rest
    records = [json.loads((sweep / f"{i}_rank_{r}" / "run.json").read_text()) for i, r in
               enumerate([2, 4, 1000])]  # fmt: skip
    assert {(r["project"], r["group"], r["mode"]) for r in records} == {
        ("ks-rank-sweep", sweep.name, "offline")
    }
    for name in ("rank_sweep_loss_curves.png", "rank_sweep_final_losses.png"):
        assert (sweep / name).stat().st_size > 10_000
    assert json.loads((sweep / "rank_sweep_summary.json").read_text())[0]["rank"] == 2
    assert "rank_sweep_summary.csv" in proc.stdout


def test_max_rank_filters_a_sweep(tmp_path):
    sweep = tmp_path / "sweep"
    proc = run(["-m", "rank=2,8", "max_rank=4", *SMALL, f"hydra.sweep.dir={sweep}"], tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert pd.read_csv(sweep / "rank_sweep_summary.csv")["rank"].tolist() == [2]
    assert not (sweep / "1_rank_8").exists()  # a skipped job leaves no stub folder


def test_a_sweep_of_skipped_ranks_only_is_no_failure(tmp_path):
    sweep = tmp_path / "sweep"
    proc = run(["-m", "rank=8,16", "max_rank=4", *SMALL, f"hydra.sweep.dir={sweep}"], tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert "no job ran (every rank above max_rank?)" in proc.stdout


def test_multirun_through_submitit_local(tmp_path):
    sweep = tmp_path / "sweep"
    args = ["-m", "hydra/launcher=local", "rank=2,4", *SMALL, f"hydra.sweep.dir={sweep}"]
    proc = run(args, tmp_path)
    assert proc.returncode == 0, proc.stderr
    summary = pd.read_csv(sweep / "rank_sweep_summary.csv")
    assert summary["status"].tolist() == ["finished", "finished"]


def test_joblib_sets_threads_per_job(tmp_path):
    """Two parallel jobs on this machine's cores: each gets cores // 2 torch threads."""
    sweep = tmp_path / "sweep"
    args = ["-m", "hydra/launcher=joblib", "hydra.launcher.n_jobs=2", "rank=2,4", *SMALL]
    proc = run([*args, f"hydra.sweep.dir={sweep}"], tmp_path)
    assert proc.returncode == 0, proc.stderr
    cores = len(os.sched_getaffinity(0))
    for job in sorted(p for p in sweep.iterdir() if (p / "summary.json").exists()):
        assert json.loads((job / "summary.json").read_text())["torch_threads"] == max(1, cores // 2)
    assert len(pd.read_csv(sweep / "rank_sweep_summary.csv")) == 2


def test_ctrl_c_keeps_curves_and_marks_interrupted(tmp_path):
    out = tmp_path / "job"
    args = ["rank=4", *SMALL, "train.num_epochs=100000", f"hydra.run.dir={out}"]
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen(
        [sys.executable, str(SCRIPT), *args],
        cwd=tmp_path,
        env=env,
        stderr=subprocess.DEVNULL,  # a pipe nobody reads could fill up and block the job
        # A shell running us in the background ignores SIGINT, and children inherit that;
        # restore the default so the child gets KeyboardInterrupt as in a terminal.
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )
    curves = out / "loss_curves.csv"
    deadline = time.time() + 120
    while time.time() < deadline and (
        not curves.exists() or len(curves.read_text().splitlines()) < 3
    ):
        time.sleep(0.2)
    proc.send_signal(signal.SIGINT)
    assert proc.wait(timeout=60) == 130
    rows = pd.read_csv(curves)
    assert len(rows) >= 2 and rows["epoch"].tolist() == list(range(1, len(rows) + 1))
    assert json.loads((out / "run.json").read_text())["state"] == "interrupted"
