"""Speed of the scaling sweep: the in-process grid runner against sequential single-cell jobs.

    python benchmarks/bench_scaling.py            # the default grid: 7 x 7 cells x 3 seeds
    python benchmarks/bench_scaling.py --quick    # one seed, fewer epochs

Measures (1) the grid runner as a user runs it (`laplace_scaling.py runner=grid`, one process,
the 7 lrs of each (batch size, seed) stacked), (2) the same cells trained one at a time in one
process (K = 1, no start-up cost), and (3) the start-up cost of a real single-cell job (a
subprocess, median of a few); sequential jobs = (2) + cells x (3).
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from experiments.scaling_training import make_task, train_group  # noqa: E402
from experiments.schemas import LaplaceScalingConfig, ScalingTrainConfig  # noqa: E402

SCRIPT = REPO / "experiments" / "laplace_scaling.py"


def timed_command(args: list[str]) -> float:
    with tempfile.TemporaryDirectory() as tmp:
        started = time.perf_counter()
        subprocess.run(
            [sys.executable, str(SCRIPT), *args, "logger=disabled", f"hydra.run.dir={tmp}/run"],
            check=True,
            capture_output=True,
            cwd=tmp,
        )
        return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="one seed, 2 epochs")
    parser.add_argument("--job-samples", type=int, default=3, help="single-cell jobs to time")
    args = parser.parse_args()

    cfg = LaplaceScalingConfig()
    seeds = [0] if args.quick else list(cfg.grid.seeds)
    epochs = 2 if args.quick else cfg.train.epochs
    overrides = [f"grid.seeds=[{','.join(map(str, seeds))}]", f"train.epochs={epochs}"]
    cells = len(seeds) * len(cfg.grid.batch_sizes) * len(cfg.grid.lrs)
    t = cfg.task

    grid_s = timed_command(["runner=grid", *overrides])

    single_s = 0.0
    for seed in seeds:
        task = make_task(t, seed)
        for batch_size in cfg.grid.batch_sizes:
            for lr in cfg.grid.lrs:
                started = time.perf_counter()
                train_group(task, batch_size, [lr], seed, train=ScalingTrainConfig(epochs=epochs))
                single_s += time.perf_counter() - started

    # a job at the largest batch size trains in ~0.1 s: its time is the job's fixed cost
    job_s = statistics.median(
        timed_command(["batch_size=512", "lr=1e-3", f"train.epochs={epochs}"])
        for _ in range(args.job_samples)
    )
    jobs_s = single_s + cells * job_s

    print(f"grid: {len(cfg.grid.batch_sizes)} batch sizes x {len(cfg.grid.lrs)} lrs x "
          f"{len(seeds)} seeds = {cells} cells, {epochs} epochs, task d={t.n_features} "
          f"n_train={t.n_train}")  # fmt: skip
    rows = [
        ("in-process grid runner (runner=grid, measured)", grid_s),
        ("single cells one at a time, in one process (measured)", single_s),
        (f"one single-cell job's start-up (median of {args.job_samples}, measured)", job_s),
        ("sequential single-cell jobs (= the two above: cells x start-up + compute)", jobs_s),
    ]
    width = max(len(name) for name, _ in rows)
    for name, seconds in rows:
        print(f"  {name:<{width}}  {seconds:8.1f} s")
    print(
        f"speed-up of the grid runner: {jobs_s / grid_s:.1f}x over sequential jobs, "
        f"{single_s / grid_s:.1f}x over single cells in one process"
    )
    print(
        f"target: full grid <= 600 s: {'MET' if grid_s <= 600 else 'MISSED'} ({grid_s:.0f} s); "
        f">= 5x over sequential jobs: {'MET' if jobs_s / grid_s >= 5 else 'MISSED'}"
    )


if __name__ == "__main__":
    main()
