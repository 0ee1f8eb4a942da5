"""Seeding, threads, and one W&B run per job under a multirun."""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
from pathlib import Path

import numpy as np
import torch

from experiments.runtime import configure_threads, seed_everything

REPO = Path(__file__).resolve().parents[1]


def draw() -> tuple:
    return random.random(), float(np.random.rand()), float(torch.rand(1))


def test_seed_zero_is_a_seed_and_reproducible():
    seed_everything(0)
    first = draw()
    seed_everything(0)
    assert draw() == first
    seed_everything(1)
    assert draw() != first


def test_explicit_threads():
    before = torch.get_num_threads()
    try:
        assert configure_threads(1) == 1 and torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(before)


def test_every_multirun_job_finishes_its_own_offline_wandb_run(tmp_path):
    sweep = tmp_path / "sweep"
    args = [
        "-m",
        "rank=2,4",
        "weight.out_features=16",
        "weight.in_features=32",
        "train.num_epochs=2",
        "train.steps_per_epoch=5",
        f"hydra.sweep.dir={sweep}",
    ]
    env = {k: v for k, v in os.environ.items() if k != "WANDB_MODE"}
    proc = subprocess.run(
        [sys.executable, str(REPO / "experiments" / "rank_sweep.py"), *args],
        cwd=tmp_path,
        env={**env, "WANDB_SILENT": "true"},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr
    records = [json.loads(p.read_text()) for p in sorted(sweep.glob("*/run.json"))]
    assert len(records) == 2
    assert {r["state"] for r in records} == {"finished"}
    assert len({r["run_id"] for r in records}) == 2
    assert {r["group"] for r in records} == {sweep.name}  # one launch, one W&B group
    for r, job in zip(records, sorted(sweep.glob("*/run.json")), strict=True):
        assert list(job.parent.glob(f"wandb/offline-run-*-{r['run_id']}"))
