"""The scaling sweep: noise families, stacked training, both runners, results.csv."""

from __future__ import annotations

import json
import math
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest
import torch
from entrypoint import run_script

from experiments.scaling_training import make_task, noise_from_uniform, train_group
from experiments.schemas import (
    ScalingModelConfig,
    ScalingOptimConfig,
    ScalingTaskConfig,
    ScalingTrainConfig,
)

MLP = ScalingModelConfig(kind="mlp", hidden=8)
SMALL_TASK = ScalingTaskConfig(n_features=8, n_train=256, n_val=64)

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "experiments" / "laplace_scaling.py"
SMALL = [
    "task.n_features=8",
    "task.n_train=256",
    "task.n_val=128",
    "train.epochs=2",
    "grid.batch_sizes=[8,64]",
    "grid.lrs=[1.0e-3,1.0e-2]",
    "grid.seeds=[0,1]",
    "logger=disabled",
]


def run(args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    return run_script(SCRIPT, args, cwd)


@pytest.mark.parametrize("noise", ["gaussian", "laplace", "student_t"])
def test_noise_families_are_variance_matched(noise):
    u = torch.rand(400_000, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    z = noise_from_uniform(u, noise, std=2.0, df=5.0)
    assert z.mean().abs() < 0.02
    assert z.var().item() == pytest.approx(4.0, rel=0.03)


def test_noise_draws_are_paired():
    """One uniform draw per sample: every family's noise is a monotone map of it."""
    u = torch.rand(1000, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    g, lap = noise_from_uniform(u, "gaussian", 1.0), noise_from_uniform(u, "laplace", 1.0)
    order = torch.argsort(u)
    assert (g[order].diff() >= 0).all() and (lap[order].diff() >= 0).all()
    a, b = (
        make_task(ScalingTaskConfig(n_features=4, n_train=64, n_val=16), 3),
        make_task(ScalingTaskConfig(n_features=4, n_train=64, n_val=16), 3, "laplace"),
    )
    assert torch.equal(a.x_train, b.x_train) and not torch.equal(a.y_train, b.y_train)


def test_stacked_learning_rates_equal_single_cells():
    task = make_task(SMALL_TASK, 0)
    lrs = [1e-3, 3e-3, 1e-2]
    stacked = train_group(task, 16, lrs, 0, MLP, train=ScalingTrainConfig(epochs=2))
    for lr, cell in zip(lrs, stacked, strict=True):
        (single,) = train_group(task, 16, [lr], 0, MLP, train=ScalingTrainConfig(epochs=2))
        assert single.final_val_loss == pytest.approx(cell.final_val_loss, rel=1e-5)
        assert single.steps == cell.steps == 32


def test_divergence_freezes_one_slice_and_the_rest_go_on():
    task = make_task(SMALL_TASK, 0)
    slow, wild = train_group(
        task,
        16,
        [1e-2, 50.0],
        0,
        optim=ScalingOptimConfig(name="sgd"),
        train=ScalingTrainConfig(epochs=3),
    )
    assert wild.diverged and not slow.diverged
    assert wild.reason and wild.steps < slow.steps == 48
    assert slow.final_val_loss < slow.initial_val_loss


def test_grid_runner_results_and_old_names(tmp_path):
    out = tmp_path / "grid"
    proc = run(["runner=grid", *SMALL, f"hydra.run.dir={out}"], tmp_path)
    assert proc.returncode == 0, proc.stderr
    results = pd.read_csv(out / "results.csv")
    assert len(results) == 8
    for column in ("batch_size", "lr", "seed", "noise", "optimizer", "final_train_loss",
                   "final_val_loss", "min_val_loss", "converged", "diverged", "steps",
                   "wall_time_s"):  # fmt: skip
        assert column in results.columns
    keys = set()
    for line in (out / "metrics.jsonl").read_text().splitlines():
        keys |= set(json.loads(line))
    assert {"B8_LR0.001000/train_loss", "B8_LR0.001000/val_loss", "B8_LR0.001000/learning_rate",
            "B8_LR0.001000/step", "train_loss", "val_loss", "batch_size", "lr", "step",
            "summary/B8_LR0.001000_final_val_loss", "summary/B8_LR0.001000_converged",
            "summary/final_val_loss", "config/batch_size", "config/experiment_num",
            "B64_LR0.010000_seed1/val_loss"} <= keys  # fmt: skip

    # same seed, same results.csv (wall time aside), bit for bit
    again = tmp_path / "again"
    assert run(["runner=grid", *SMALL, f"hydra.run.dir={again}"], tmp_path).returncode == 0
    a, b = ((p / "results.csv").read_text().splitlines() for p in (out, again))
    wall = a[0].split(",").index("wall_time_s")

    def without_wall_time(lines):
        return [[x for i, x in enumerate(line.split(",")) if i != wall] for line in lines]

    assert without_wall_time(a) == without_wall_time(b)

    # the multirun way writes the same rows
    sweep = tmp_path / "sweep"
    proc = run(["-m", "batch_size=8,64", "lr=1.0e-3,1.0e-2", "seed=0,1", *SMALL,
                f"hydra.sweep.dir={sweep}"], tmp_path)  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    multi = pd.read_csv(sweep / "results.csv")
    cols = ["batch_size", "lr", "seed", "final_val_loss", "min_val_loss", "steps", "diverged"]
    pd.testing.assert_frame_equal(multi[cols], results[cols], rtol=1e-5)


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("task.noise=cauchy", "task.noise must be one of gaussian, laplace, student_t"),
        ("batch_size=0", "batch sizes (batch_size) must be in"),
        ("lr=-1", "learning rates (lr) must be positive"),
        ("task.noise=student_t task.student_t_df=2", "student_t_df must be > 2"),
        ("optim.name=lion", "optim.name must be one of"),
        # jobs that never trained ended "finished" with steps 0
        ("task.n_val=0", "task.n_val=0 leaves the validation set empty"),
        ("task.noise_std=inf", "task.noise_std must be a finite number, got inf"),
        ("task.noise_std=-1", "task.noise_std must be positive, got -1"),
        ("runner=grid grid.lrs=[]", "grid.lrs is empty"),  # was a ZeroDivisionError
        ("runner=grid grid.lrs=[] grid.batch_sizes=[512,1024]", "grid.lrs is empty"),
    ],
)
def test_bad_input(tmp_path, override, message):
    out = tmp_path / "job"
    proc = run([*SMALL, *override.split(), f"hydra.run.dir={out}"], tmp_path)
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and message in lines[0], lines
    assert not out.exists()


def test_a_cell_that_cannot_start_is_diverged_not_finished():
    """Non-finite initial val loss (labels that overflowed): the cell never trained, so it is
    a divergence at step 0 with its reason, never 'finished' with a train loss of 0."""
    task = make_task(SMALL_TASK, 0)
    task.y_val[3] = float("inf")
    (cell,) = train_group(task, 16, [1e-2], 0, train=ScalingTrainConfig(epochs=2))
    assert cell.diverged and cell.steps == 0 and "initial val loss is inf" in cell.reason
    assert math.isnan(cell.final_train_loss) and math.isnan(cell.final_val_loss)
    with pytest.raises(ValueError, match="at least one learning rate"):
        train_group(task, 16, [], 0)


def test_assembly_by_hand_lists_failed_jobs(tmp_path):
    sweep = tmp_path / "sweep"
    ok = sweep / "0_ok"
    ok.mkdir(parents=True)
    (ok / "cell.json").write_text(json.dumps({"batch_size": 8, "lr": 1e-3, "seed": 0,
        "noise": "gaussian", "final_val_loss": 1.1, "diverged": False, "status": "finished"}))  # fmt: skip
    bad = sweep / "1_failed"
    bad.mkdir()
    (bad / "config.yaml").write_text("batch_size: 16\nlr: 0.01\nseed: 0\ntask: {noise: gaussian}\n")
    (bad / "run.json").write_text(json.dumps({"state": "failed", "reason": "OOM"}))
    proc = subprocess.run(
        [sys.executable, str(REPO / "analysis" / "scaling_results.py"), str(sweep)],
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 1, proc.stderr  # written, and the exit code says a job failed
    frame = pd.read_csv(sweep / "results.csv")
    assert frame["status"].tolist() == ["finished", "failed"] and frame["reason"][1] == "OOM"
    empty = subprocess.run(
        [sys.executable, str(REPO / "analysis" / "scaling_results.py"), str(tmp_path / "nope")],
        capture_output=True,
        text=True,
    )
    assert empty.returncode == 2 and empty.stderr.startswith("error:")


def test_a_sweep_with_a_failed_job_exits_non_zero(tmp_path):
    """A job that fails is a failed row of results.csv; the sweep names it and exits 1."""
    sweep = tmp_path / "sweep"
    proc = run(["-m", "batch_size=8,0", "lr=1.0e-3", "seed=0", *SMALL,
                f"hydra.sweep.dir={sweep}"], tmp_path)  # fmt: skip
    assert proc.returncode == 1, proc.stderr
    assert "1 of 2 jobs did not finish" in proc.stdout and "(failed)" in proc.stdout
    frame = pd.read_csv(sweep / "results.csv")
    assert sorted(frame["status"]) == ["failed", "finished"]


def test_a_sweep_of_grid_jobs_gathers_their_rows(tmp_path):
    """-m runner=grid over noise families: each job's grid lands in the sweep's results.csv."""
    sweep = tmp_path / "sweep"
    proc = run(["-m", "runner=grid", "grid.noises=[gaussian],[laplace]", *SMALL,
                "grid.seeds=[0]", f"hydra.sweep.dir={sweep}"], tmp_path)  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    frame = pd.read_csv(sweep / "results.csv")
    assert len(frame) == 8 and set(frame["status"]) == {"finished"}
    assert frame.groupby("noise").size().to_dict() == {"gaussian": 4, "laplace": 4}


def test_fixed_steps_protocol_and_mlp_student():
    task = make_task(SMALL_TASK, 0, "laplace")
    steps = ScalingTrainConfig(protocol="fixed_steps", steps=50, evals=5)
    (cell,) = train_group(task, 32, [3e-3], 0, ScalingModelConfig(kind="mlp"), train=steps)
    assert cell.steps == 50 and len(cell.val_curve) == 5 and not cell.diverged
    assert cell.final_val_loss < cell.initial_val_loss


def test_mlp_hidden_layers_are_rank_probed_per_cell(tmp_path):
    out = tmp_path / "grid"
    args = ["runner=grid", *SMALL, "grid.seeds=[0]", "model.kind=mlp", "model.hidden=16",
            "rank_probe.every=1", f"hydra.run.dir={out}"]  # fmt: skip
    proc = run(args, tmp_path)
    assert proc.returncode == 0, proc.stderr
    keys = set()
    for line in (out / "metrics.jsonl").read_text().splitlines():
        keys |= set(json.loads(line))
    assert "B8_LR0.001000/ranks/hidden_1/effective_rank" in keys
    assert "B64_LR0.010000/effective_rank_normalized_aurc" in keys


def test_multirun_through_submitit_local(tmp_path):
    """Jobs that run in another process get the entry point's globals pickled by value (the
    config rules were copies there, and an identity check on them failed in every job)."""
    sweep = tmp_path / "sweep"
    proc = run(["-m", "hydra/launcher=local", "batch_size=8,64", "lr=1.0e-3", "seed=0", *SMALL,
                f"hydra.sweep.dir={sweep}"], tmp_path)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert len(pd.read_csv(sweep / "results.csv")) == 2


@pytest.mark.parametrize("signum", [signal.SIGKILL, signal.SIGTERM])
def test_a_stopped_grid_run_goes_on_from_its_finished_groups(tmp_path, signum):
    """resume=true (what a SLURM requeue sets) keeps the finished groups of cells and trains
    the rest: the same results.csv as an uninterrupted run, each step recorded once."""
    args = ["runner=grid", *SMALL, "train.epochs=40"]
    whole, cut = tmp_path / "whole", tmp_path / "cut"
    assert run([*args, f"hydra.run.dir={whole}"], tmp_path).returncode == 0
    proc = subprocess.Popen([sys.executable, str(SCRIPT), *args, f"hydra.run.dir={cut}"],
                            cwd=tmp_path, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)  # fmt: skip
    progress = cut / "grid_progress.json"
    deadline = time.monotonic() + 300
    while not (progress.exists() and json.loads(progress.read_text())["groups_done"] >= 1):
        assert proc.poll() is None, "the grid ended before it was stopped"
        assert time.monotonic() < deadline
        time.sleep(0.005)
    proc.send_signal(signum)
    proc.communicate(timeout=60)
    assert json.loads(progress.read_text())["groups_done"] < 4, "stopped too late"
    resumed = run([*args, f"hydra.run.dir={cut}", "resume=true"], tmp_path)
    assert resumed.returncode == 0, resumed.stderr
    assert "resuming the grid after" in resumed.stdout + resumed.stderr

    def results(run_dir: Path) -> pd.DataFrame:
        return pd.read_csv(run_dir / "results.csv").drop(columns="wall_time_s")

    pd.testing.assert_frame_equal(results(cut), results(whole))
    steps = [json.loads(line)["_step"] for line in (cut / "metrics.jsonl").read_text().splitlines()]
    whole_steps = [
        json.loads(line)["_step"] for line in (whole / "metrics.jsonl").read_text().splitlines()
    ]
    assert steps == whole_steps
