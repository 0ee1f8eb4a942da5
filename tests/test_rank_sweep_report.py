"""analysis.rank_sweep_report and the plot_rank_results CLI, over a synthetic sweep folder."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import yaml

from analysis import plot_rank_results
from analysis.cli import UserError, run_cli
from analysis.rank_sweep_report import (
    CURVE_COLUMNS,
    SUMMARY_COLUMNS,
    collect_summary,
    find_job_dirs,
    format_summary_table,
    load_curves,
    write_report,
)

REPO = Path(__file__).resolve().parents[1]
EPOCHS = 6
ZERO_LOSS = 1.0


def _job(
    sweep: Path, name: str, rank: int, state: str, reason: str | None = None, epochs: int = EPOCHS
) -> Path:
    job = sweep / name
    (job / ".hydra").mkdir(parents=True)
    run = {"run_id": f"id{rank}", "name": name, "state": state, "reason": reason,
           "started_at": "2024-01-01T00:00:00", "ended_at": None, "mode": "offline"}  # fmt: skip
    (job / "run.json").write_text(json.dumps(run))
    config = {"rank": rank, "model": {"structure": "ks", "rank": rank}, "seed": 0}
    (job / "config.yaml").write_text(yaml.safe_dump(config))
    (job / ".hydra" / "config.yaml").write_text(yaml.safe_dump(config))
    if not epochs:
        return job
    floor = 0.5 / rank
    rows = [
        {
            "epoch": e,
            "train_loss": floor + 0.6 / e,
            "val_loss": floor + 0.7 / e,
            "rank": rank,
            "floor": floor,
            "loss_over_floor": (floor + 0.7 / e) / floor,
        }  # fmt: skip
        for e in range(1, epochs + 1)
    ]
    pd.DataFrame(rows).to_csv(job / "loss_curves.csv", index=False)
    (job / "loss_curves.json").write_text(
        json.dumps({"rank": rank, "floor": floor, "curves": rows})
    )
    if state == "finished":
        last = rows[-1]
        summary = {
            "rank": rank, "structure": "ks", "parameters": 1000 * rank, "compression": 64 / rank,
            "floor": floor, "zero_predictor_loss": ZERO_LOSS,
            "final_train_loss": last["train_loss"], "final_val_loss": last["val_loss"],
            "min_train_loss": last["train_loss"], "min_val_loss": last["val_loss"],
            "loss_over_floor": last["loss_over_floor"], "wall_time_s": 1.5 * rank,
            "epochs_completed": epochs,
        }  # fmt: skip
        (job / "summary.json").write_text(json.dumps(summary))
    return job


def make_sweep(root: Path) -> Path:
    """3 finished ranks with curves and 1 failed job with only run.json and config.yaml."""
    sweep = root / "sweep"
    sweep.mkdir()
    (sweep / "multirun.yaml").write_text("hydra: {}\n")
    _job(sweep, "2", 8, "finished")
    _job(sweep, "0", 2, "finished")
    _job(sweep, "1", 4, "finished")
    _job(sweep, "3", 16, "failed", reason="CUDA out of memory", epochs=0)
    return sweep


def _cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "analysis/plot_rank_results.py", *args],
        cwd=REPO, capture_output=True, text=True, timeout=120,
    )  # fmt: skip


def test_find_job_dirs_sorted_by_rank(tmp_path: Path) -> None:
    sweep = make_sweep(tmp_path)
    assert [p.name for p in find_job_dirs(sweep)] == ["0", "1", "2", "3"]


def test_collect_summary_keeps_failed_job(tmp_path: Path) -> None:
    summary = collect_summary(make_sweep(tmp_path))
    assert list(summary.columns) == SUMMARY_COLUMNS
    assert summary["rank"].tolist() == [2, 4, 8, 16]
    assert summary["status"].tolist() == ["finished"] * 3 + ["failed"]
    failed = summary.iloc[-1]
    assert failed["reason"] == "CUDA out of memory"
    assert failed["structure"] == "ks"
    assert math.isnan(failed["final_val_loss"])
    assert summary.loc[0, "epochs_completed"] == EPOCHS
    assert summary.loc[0, "final_val_loss"] == pytest.approx(0.25 + 0.7 / EPOCHS)


def test_load_curves(tmp_path: Path) -> None:
    sweep = make_sweep(tmp_path)
    curves = load_curves(sweep / "0")
    assert list(curves.columns[: len(CURVE_COLUMNS)]) == CURVE_COLUMNS
    assert len(curves) == EPOCHS
    missing = load_curves(sweep / "3")
    assert missing.empty and list(missing.columns) == CURVE_COLUMNS


def test_write_report(tmp_path: Path) -> None:
    sweep = make_sweep(tmp_path)
    paths = write_report(sweep, prefix="study", log_scale=True)
    names = {p.name for p in paths.values()}
    assert names == {
        "study_loss_curves.png", "study_final_losses.png", "study_summary.csv", "study_summary.json"
    }  # fmt: skip
    for path in paths.values():
        assert path.parent == sweep and path.stat().st_size > 0
    assert paths["loss_curves"].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    table = pd.read_csv(paths["summary_csv"], dtype={"job_dir": str})
    assert list(table.columns) == SUMMARY_COLUMNS
    assert table["job_dir"].tolist() == ["0", "1", "2", "3"]
    records = json.loads(paths["summary_json"].read_text())
    assert len(records) == 4
    assert records[-1]["status"] == "failed" and records[-1]["final_val_loss"] is None
    assert not list(sweep.glob(".*.tmp"))  # no temp files left behind


def test_format_summary_table(tmp_path: Path) -> None:
    text = format_summary_table(collect_summary(make_sweep(tmp_path)))
    lines = text.splitlines()
    assert lines[0].split()[:2] == ["rank", "params"]
    assert len(lines) == 2 + 4
    assert "failed: CUDA out of memory" in lines[-1]


def test_write_report_errors(tmp_path: Path) -> None:
    with pytest.raises(UserError, match="does not exist"):
        write_report(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="no job folders"):
        write_report(tmp_path / "empty")
    job = next(p for p in make_sweep(tmp_path).iterdir() if (p / "run.json").exists())
    with pytest.raises(UserError, match="is one job's folder: pass the folder above it"):
        write_report(job)


def test_cli_prints_table(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    sweep = make_sweep(tmp_path)
    with pytest.raises(SystemExit) as exit_info:
        run_cli(plot_rank_results.main, ["--results_dir", str(sweep), "--save_prefix", "p"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    assert "loss/floor" in out and "failed: CUDA out of memory" in out
    assert "best rank by final val loss: 8" in out
    assert (sweep / "p_final_losses.png").is_file()


@pytest.mark.parametrize("folder", ["missing", "empty"])
def test_cli_bad_folder(tmp_path: Path, capsys: pytest.CaptureFixture[str], folder: str) -> None:
    (tmp_path / "empty").mkdir()
    with pytest.raises(SystemExit) as exit_info:
        run_cli(plot_rank_results.main, ["--results_dir", str(tmp_path / folder)])
    assert exit_info.value.code == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:"), lines


def test_cli_bad_folder_subprocess(tmp_path: Path) -> None:
    result = _cli("--results_dir", str(tmp_path / "missing"))
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: results folder"), result.stderr
