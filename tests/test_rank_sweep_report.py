"""analysis.rank_sweep_report and the plot_rank_results CLI, over a synthetic sweep folder."""

from __future__ import annotations

import json
import math
import subprocess
import sys
import warnings
from pathlib import Path

import pandas as pd
import pytest
import yaml

from analysis import plot_rank_results
from analysis.rank_sweep_report import (
    SUMMARY_COLUMNS,
    collect_summary,
    find_job_dirs,
    format_summary_table,
    load_curves,
    write_report,
)
from common.cli import UserError, run_cli
from experiments.rank_sweep_records import CURVE_COLUMNS
from tests.test_analysis_inputs import lock_held, write_killed_record

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
    assert exit_info.value.code == 1  # the failed job: the report is written, but incomplete
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


# ---------------------------------------------------------------------------------------------
# Jobs as they are now (killed, running), unreadable files


def test_a_killed_job_reads_killed_with_its_reason_and_the_cli_exits_1(tmp_path: Path) -> None:
    """Today a job whose process died with its record open is reported as "running"."""
    sweep = make_sweep(tmp_path)
    _job(sweep, "4", 32, "running", epochs=3)
    record = json.loads((sweep / "4" / "run.json").read_text())
    write_killed_record(sweep / "4", **{k: v for k, v in record.items() if k != "state"})
    summary = collect_summary(sweep)
    row = summary[summary["rank"] == 32].iloc[0]
    assert row["status"] == "killed"
    assert "ended without closing its run record" in row["reason"]
    result = _cli("--results_dir", str(sweep))
    assert result.returncode == 1, result.stderr
    assert "killed: the process (pid" in result.stdout
    assert "2 of 5 job(s) did not finish" in result.stdout
    table = pd.read_csv(sweep / "rank_sweep_summary.csv")
    assert table["status"].tolist() == ["finished"] * 3 + ["failed", "killed"]
    with lock_held(sweep / "4"):  # its process alive: running, as the record says
        assert collect_summary(sweep)["status"].tolist()[-1] == "running"


def test_an_unreadable_run_json_is_not_taken_for_an_old_finished_folder(tmp_path: Path) -> None:
    """Today a corrupt run.json reads "unknown", which counts as finished."""
    sweep = make_sweep(tmp_path)
    (sweep / "2" / "run.json").write_text('{"state": "fini')
    with pytest.warns(UserWarning, match="unreadable JSON"):
        summary = collect_summary(sweep)
    row = summary[summary["rank"] == 8].iloc[0]
    assert row["status"] == "unreadable" and str(sweep / "2" / "run.json") in row["reason"]


def _legend(summary: pd.DataFrame) -> list[str]:
    from analysis.rank_sweep_report import loss_curves_figure

    fig = loss_curves_figure(summary)
    return [text.get_text() for text in fig.legends[0].get_texts()]


@pytest.mark.parametrize(
    "content", [b"", b"epoch,train_loss,val_loss\n1,0.5,abc\n", b"\x00\xff\xfe"]
)
def test_an_unreadable_curve_file_is_named_and_no_curve_is_claimed(
    tmp_path: Path, content: bytes
) -> None:
    """Today an empty or corrupt loss_curves.csv silently drops the curve, the legend still
    listing the rank as if drawn."""
    sweep = make_sweep(tmp_path)
    (sweep / "1" / "loss_curves.csv").write_bytes(content)
    (sweep / "1" / "loss_curves.json").unlink()
    bad = sweep / "1" / "loss_curves.csv"
    with pytest.warns(UserWarning, match=f"unreadable loss curves: {bad}") as caught:
        summary = collect_summary(sweep)
    assert len({str(w.message) for w in caught}) == 1
    row = summary[summary["rank"] == 4].iloc[0]
    assert row["status"] == "finished" and row["reason"].startswith("unreadable loss_curves.csv")
    assert "finished: unreadable loss_curves.csv" in format_summary_table(summary)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # said once, by collect_summary
        legend = _legend(summary)
    assert "rank 4 - no curve (unreadable loss_curves.csv)" in legend
    assert "rank 2" in legend and "rank 8" in legend  # the readable ones, drawn


def test_a_corrupt_curve_csv_falls_back_to_the_json_beside_it(tmp_path: Path) -> None:
    sweep = make_sweep(tmp_path)
    (sweep / "1" / "loss_curves.csv").write_text("epoch,train_loss,val_loss\n1,x,y\n")
    with pytest.warns(UserWarning, match="unreadable loss curves"):
        curves = load_curves(sweep / "1")
    assert len(curves) == EPOCHS and "problem" not in curves.attrs


def test_a_last_row_cut_by_a_kill_is_dropped_without_a_word(tmp_path: Path) -> None:
    sweep = make_sweep(tmp_path)
    path = sweep / "1" / "loss_curves.csv"
    path.write_text(path.read_text() + "7,0.1")  # the kill came mid-append
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        curves = load_curves(sweep / "1")
    assert curves["epoch"].tolist() == list(range(1, EPOCHS + 1))
