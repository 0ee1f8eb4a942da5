"""make analyze: rank dynamics of the newest local runs and one index page linking every plot."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from analysis.analyze_newest import main
from common.cli import UserError
from tests.test_analysis_inputs import lock_held, write_killed_record
from tests.test_rank_sweep_report import make_sweep
from tests.test_scaling_analysis import surface
from tests.test_upload_rank_dynamics import history, write_local_run


def test_rank_dynamics_of_newest_runs_and_the_index(tmp_path, capsys):
    old = write_local_run(tmp_path / "outputs" / "multimodal" / "2026-01-01_00-00-00", history(30))
    newest = tmp_path / "multirun" / "multimodal" / "2026-02-01_00-00-00"
    for job in ("0", "1"):
        write_local_run(newest / job, history(40))
    write_local_run(newest / "2", [{"loss": 1.0}])  # a job without ranks is noted, not fatal
    assert main(["--root", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "2: no rank dynamics plot (no rank metrics" in out
    for job in ("0", "1"):
        assert (newest / job / "rank_dynamics.csv").exists()
        assert (newest / job / "rank_dynamics_effective_rank_difference.png").exists()
    assert not (old / "rank_dynamics.csv").exists()  # only the newest output is analysed
    page = (tmp_path / "outputs" / "index.html").read_text()
    assert page.count("<img") == 4  # two runs x (panels + heat map)
    assert "../multirun/multimodal/2026-02-01_00-00-00/0/rank_heatmap_effective_rank.png" in page
    assert "rank_dynamics.csv" in page


def test_nothing_to_analyse_is_one_clear_error(tmp_path):
    with pytest.raises(UserError, match="no outputs to analyse"):
        main(["--root", str(tmp_path)])


def _runs_with_ranks(root: Path) -> Path:
    newest = root / "multirun" / "multimodal" / "2026-02-01_00-00-00"
    for job in ("0", "1"):
        write_local_run(newest / job, history(40))
    return newest


def test_one_broken_report_does_not_stop_the_others(tmp_path, capsys):
    """Today a scaling analysis that refuses its CSV aborts make analyze: no rank dynamics, no
    index.html."""
    runs = _runs_with_ranks(tmp_path)
    results = tmp_path / "multirun" / "laplace_scaling" / "2026-02-02_00-00-00" / "results.csv"
    results.parent.mkdir(parents=True)
    df = surface().astype({"final_val_loss": object})
    df.loc[20, "final_val_loss"] = "0.3x"
    df.to_csv(results, index=False)
    assert main(["--root", str(tmp_path)]) == 1
    out, err = capsys.readouterr()
    for job in ("0", "1"):
        assert (runs / job / "rank_dynamics_effective_rank_difference.png").exists()
    page = (tmp_path / "outputs" / "index.html").read_text()
    assert page.count("<img") == 4 and "line 22" in page
    failed = err.strip().splitlines()
    assert failed[0] == "1 thing(s) did not complete:"
    assert failed[1].startswith("  scaling analysis multirun/laplace_scaling/2026-02-02_00-00-00/")
    assert "error:" in failed[1] and "line 22: final_val_loss is '0.3x'" in failed[1]
    assert not (results.parent / "scaling_fit.json").exists()


def test_a_killed_run_or_job_makes_analyze_exit_1(tmp_path, capsys):
    """Today a run whose process died reads "running" and make analyze exits 0."""
    runs = _runs_with_ranks(tmp_path)
    killed = runs / "1"
    record = json.loads((killed / "run.json").read_text())
    write_killed_record(killed, **{k: v for k, v in record.items() if k != "state"})
    (tmp_path / "multirun" / "rank_sweep").mkdir(parents=True)
    sweep = make_sweep(tmp_path / "multirun" / "rank_sweep")
    assert main(["--root", str(tmp_path)]) == 1
    err = capsys.readouterr().err
    assert "  multirun/multimodal/2026-02-01_00-00-00/1: killed (the process (pid" in err
    assert f"  rank sweep report {sweep.relative_to(tmp_path)}: exit 1" in err
    assert "multirun/rank_sweep/sweep/3: failed (CUDA out of memory)" in err
    assert (tmp_path / "outputs" / "index.html").exists()
    with lock_held(killed):  # a live run is not finished either, but it is not called killed
        assert main(["--root", str(tmp_path)]) == 1
        assert "1: running" in capsys.readouterr().err
