"""make analyze: rank dynamics of the newest local runs and one index page linking every plot."""

from __future__ import annotations

import pytest

from analysis.analyze_newest import main
from analysis.cli import UserError
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
