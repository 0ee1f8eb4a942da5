"""plot_rank_dynamics on a local run folder: both key styles, layer order, bad input."""

from __future__ import annotations

import json

import pytest

from analysis.cli import UserError
from analysis.plot_rank_dynamics import layer_columns, main


def write_run(path, records):
    path.mkdir(parents=True, exist_ok=True)
    (path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))


def test_plots_from_a_run_folder(tmp_path, capsys):
    records = [
        {
            "_step": s,
            "loss": 1.0,
            **{f"ranks/l{i}/effective_rank": 10.0 - i - s / 10 for i in range(4)},
        }
        for s in range(1, 6)
    ]
    write_run(tmp_path / "run", records)
    assert main(["--run-dir", str(tmp_path / "run"), "--mode", "ratio"]) == 0
    assert (tmp_path / "run" / "rank_dynamics_effective_rank_ratio.png").stat().st_size > 10_000
    assert (tmp_path / "run" / "rank_heatmap_effective_rank.png").exists()
    assert "5 steps x 4 layers (l0, l1, l2, l3)" in capsys.readouterr().out


def test_old_key_style_and_numeric_layer_order():
    cols = [
        "_step",
        "layer_10_numerical_rank",
        "layer_2_numerical_rank",
        "numerical_rank_rank_drop_gini",
    ]
    assert layer_columns(cols, "numerical_rank") == [
        ("layer_2", "layer_2_numerical_rank"),
        ("layer_10", "layer_10_numerical_rank"),
    ]


def test_no_rank_metrics_is_a_clear_error(tmp_path):
    write_run(tmp_path / "run", [{"_step": 0, "loss": 1.0}])
    with pytest.raises(UserError, match="no rank metrics for effective_rank"):
        main(["--run-dir", str(tmp_path / "run")])
