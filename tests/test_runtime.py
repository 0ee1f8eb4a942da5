"""Seeding, threads, and one W&B run per job under a multirun."""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from common.sweep_outcome import unfinished_jobs
from experiments.runtime import check_override_keys, configure_threads, seed_everything
from experiments.schemas import RankSweepConfig

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


@pytest.mark.parametrize(
    "argv",
    [
        ["-m", "rank=2,4"],
        ["--multi", "rank=2,4"],  # argparse's abbreviation of --multirun
        ["hydra.mode=MULTIRUN", "rank=2,4"],
        ["-cd", "/tmp/a=b", "rank=2"],  # a flag's value is no override
        ["logger.tags=[a,b]", "weight.path=null", "train.lr=1e-3", "++train.lr=2e-3"],
        ["~rank_probe", "hydra/launcher=joblib", "--cfg", "job"],
    ],
)
def test_override_check_lets_hydra_syntax_through(argv):
    check_override_keys(RankSweepConfig, argv, "conf/rank_sweep.yaml")  # no SystemExit


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["rank=2,4"], "sweeps over several values: add -m"),
        (["experiment=demo", "rank=2,4"], "sweeps over several values: add -m"),
        (["+train.lrr=1"], "unknown config key 'train.lrr'"),
        (["weight.path=~/w.pth"], "cannot parse 'weight.path=~/w.pth'"),
    ],
)
def test_override_check_one_line(argv, message, capsys):
    with pytest.raises(SystemExit) as exit_info:
        check_override_keys(RankSweepConfig, argv, "conf/rank_sweep.yaml")
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0]


def test_unfinished_jobs_reads_each_jobs_run_record(tmp_path):
    states = {"0_ok": "finished", "1_bad": "failed", "2_stop": "interrupted", "3_kill": "running"}
    for name, state in states.items():
        (tmp_path / name).mkdir()
        (tmp_path / name / "run.json").write_text(json.dumps({"state": state}))
    (tmp_path / "4_early" / ".hydra").mkdir(parents=True)  # died before its logger started
    (tmp_path / "5_torn").mkdir()
    (tmp_path / "5_torn" / "run.json").write_text('{"state": "fin')
    (tmp_path / "plots").mkdir()  # not a job
    jobs = sorted(p for p in tmp_path.iterdir() if p.name != "plots")
    assert {job.name: state for job, state in unfinished_jobs(jobs).items()} == {
        "1_bad": "failed",
        "2_stop": "interrupted",
        "3_kill": "running",
        "4_early": "no run record",
        "5_torn": "unreadable run record",
    }
