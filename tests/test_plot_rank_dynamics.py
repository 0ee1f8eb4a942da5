"""plot_rank_dynamics on a local run folder (both key styles, layer order, bad input) and on a W&B
run, read by the real wandb client from a local W&B server (tests/wandb_server.py)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import yaml

from analysis import upload_rank_dynamics as up
from analysis.plot_rank_dynamics import cell_steps, main, scope_tables
from common.cli import UserError
from tests.wandb_server import serving

REPO = Path(__file__).resolve().parents[1]


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
    history = pd.DataFrame(
        [{"_step": 0, "layer_10_numerical_rank": 3.0, "layer_2_numerical_rank": 5.0,
          "numerical_rank_rank_drop_gini": 0.1}]
    )  # fmt: skip
    (table,) = scope_tables(history, "numerical_rank").values()
    assert list(table.columns) == ["layer_2", "layer_10"]
    assert table.iloc[0].tolist() == [5.0, 3.0]


def test_unknown_order_is_an_error_and_layer_order_fixes_it(tmp_path):
    records = [{"_step": s, "ranks/conv/effective_rank": 9.0, "ranks/fc/effective_rank": 4.0}
               for s in range(3)]  # fmt: skip
    write_run(tmp_path / "run", records)
    with pytest.raises(UserError, match="layer order unknown for conv, fc: pass --layer-order"):
        main(["--run-dir", str(tmp_path / "run")])
    assert main(["--run-dir", str(tmp_path / "run"), "--layer-order", "conv,fc"]) == 0


def test_scopes_share_the_panels(tmp_path, capsys):
    records = [
        {"_step": 2 * s + j, **{f"B{b}_LR0.1/ranks/hidden_{i}/effective_rank": 9.0 - i - s / 5
                                for i in range(3)}}
        for s in range(4) for j, b in enumerate((16, 32))
    ]  # fmt: skip
    write_run(tmp_path / "run", records)
    assert main(["--run-dir", str(tmp_path / "run")]) == 0
    assert "2 scopes; pass --scope" in capsys.readouterr().out
    assert main(["--run-dir", str(tmp_path / "run"), "--scope", "B32_LR0.1"]) == 0
    assert (tmp_path / "run" / "rank_heatmap_effective_rank.png").exists()
    history = pd.DataFrame(
        [{"_step": 7, "B8/ranks/h_0/effective_rank": 3.0, "B8/ranks/h_1/effective_rank": 2.0,
          "B8/step": 300}]
    )  # fmt: skip
    table = scope_tables(history, "effective_rank")["B8"]
    assert cell_steps(history, "B8", table).tolist() == [300]  # the cell's own step, not _step
    with pytest.raises(UserError, match="no scope 'B64'"):
        main(["--run-dir", str(tmp_path / "run"), "--scope", "B64"])


def test_one_layer_and_an_out_file_are_clear_errors(tmp_path):
    records = [{"_step": s, "ranks/l0/effective_rank": 5.0 - s} for s in range(3)]
    write_run(tmp_path / "run", records)
    with pytest.raises(UserError, match="fewer than two layers"):
        main(["--run-dir", str(tmp_path / "run")])
    write_run(tmp_path / "two", [{**r, "ranks/l1/effective_rank": 2.0} for r in records])
    (tmp_path / "file").write_text("")
    with pytest.raises(UserError, match="is a file, not a folder"):
        main(["--run-dir", str(tmp_path / "two"), "--out", str(tmp_path / "file")])


def test_no_rank_metrics_is_a_clear_error(tmp_path):
    write_run(tmp_path / "run", [{"_step": 0, "loss": 1.0}])
    with pytest.raises(UserError, match="no rank metrics for effective_rank"):
        main(["--run-dir", str(tmp_path / "run")])


@pytest.mark.parametrize(
    ("order", "words"),
    [
        ("conv,fc,head", ["not layers of the run: 'head'"]),
        ("conv", ["the run's layers left out: 'fc'"]),
        ("conv1,fc", ["not layers of the run: 'conv1'", "left out: 'conv'"]),
        ("conv,fc,conv", ["given twice: 'conv'"]),
    ],
)
def test_a_layer_order_that_does_not_match_the_run_is_one_error_line(tmp_path, order, words):
    """Today names that are not the run's layers are ignored without a word."""
    records = [{"_step": s, "ranks/conv/effective_rank": 9.0, "ranks/fc/effective_rank": 4.0}
               for s in range(3)]  # fmt: skip
    write_run(tmp_path / "run", records)
    proc = subprocess.run(
        [sys.executable, "analysis/plot_rank_dynamics.py", "--run-dir", str(tmp_path / "run"),
         "--layer-order", order], cwd=REPO, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: --layer-order does not match"), lines
    for word in words:
        assert word in lines[0], lines[0]
    assert "its layers: conv, fc" in lines[0]
    assert not list((tmp_path / "run").glob("*.png"))


def test_an_empty_layer_order_is_not_taken_for_none(tmp_path):
    records = [{"_step": s, "ranks/l0/effective_rank": 5.0, "ranks/l1/effective_rank": 2.0}
               for s in range(3)]  # fmt: skip
    write_run(tmp_path / "run", records)
    with pytest.raises(UserError, match="not layers of the run: ''.*left out: 'l0', 'l1'"):
        main(["--run-dir", str(tmp_path / "run"), "--layer-order", ""])


# -- a W&B run: --run ENTITY/PROJECT/RUN_ID ---------------------------------------------------


@pytest.fixture
def server(monkeypatch, tmp_path):
    with serving(monkeypatch, tmp_path) as served:
        yield served


# the multimodal encoder's probed layers: their names carry no order
ENCODER_LAYERS = ["net.2", "net.5", "net.8", "proj"]


def encoder_rows(steps: int, backwards: bool = False) -> list[dict]:
    """Log calls of a probed multimodal run (every other step), its layers' keys in forward
    order or backwards."""
    rows = []
    for s in range(steps):
        ranks = {f"ranks/{layer}/effective_rank": 12.0 - 2 * i - s / 20
                 for i, layer in enumerate(ENCODER_LAYERS)}  # fmt: skip
        ranks = dict(reversed(ranks.items())) if backwards else ranks
        rows.append({"loss": 1.0, **ranks} if s % 2 == 0 else {"loss": 0.5})
    return rows


def test_plots_a_wandb_run(server, tmp_path, capsys, monkeypatch):
    """Every row read page by page (a 503 on the way is retried), the layer order taken from
    the run's config, where the logger recorded the probe's (the multimodal encoder's layers
    carry none in their names, and these rows list them backwards)."""
    monkeypatch.setattr(up, "sleep", lambda seconds: None)
    monkeypatch.setattr(up, "HISTORY_PAGE", 7)
    server.add("r1", encoder_rows(60, backwards=True), name="mm-encoder",
               config={"rank_probe_layers": ENCODER_LAYERS})  # fmt: skip
    server.fail("HistoryPage", 503, 503)
    out = tmp_path / "plots"
    assert main(["--run", "team/proj/r1", "--out", str(out)]) == 0
    assert "30 steps x 4 layers (net.2, net.5, net.8, proj)" in capsys.readouterr().out
    assert (out / "rank_dynamics_effective_rank_difference.png").stat().st_size > 10_000
    assert (out / "rank_heatmap_effective_rank.png").stat().st_size > 10_000
    assert server.count("HistoryPage") == 2 + -(-60 // 7)


def test_layer_order_from_run_json_and_for_an_older_record_the_logged_order(tmp_path, capsys):
    # a new local run: run.json's rank_probe.layers, whatever order the keys were written in
    write_run(tmp_path / "new", [{"_step": s, **r} for s, r in enumerate(encoder_rows(8, True))])
    record = {"run_id": "new", "rank_probe": {"every": 2, "layers": ENCODER_LAYERS}}
    (tmp_path / "new" / "run.json").write_text(json.dumps(record))
    assert main(["--run-dir", str(tmp_path / "new")]) == 0
    assert "4 steps x 4 layers (net.2, net.5, net.8, proj)" in capsys.readouterr().out
    # recorded before run.json kept the layers: the suite's probe (a rank_probe group in its
    # config) logged them in forward order; the model is not rebuilt
    write_run(tmp_path / "old", [{"_step": s, **r} for s, r in enumerate(encoder_rows(8))])
    (tmp_path / "old" / "run.json").write_text(json.dumps({"rank_probe": {"every": 2}}))
    (tmp_path / "old" / "config.yaml").write_text(yaml.safe_dump({"rank_probe": {"every": 2}}))
    assert main(["--run-dir", str(tmp_path / "old")]) == 0
    assert "4 steps x 4 layers (net.2, net.5, net.8, proj)" in capsys.readouterr().out
    (tmp_path / "old" / "config.yaml").write_text(yaml.safe_dump({"model": {}}))  # not the suite's
    with pytest.raises(UserError, match="layer order unknown for net.2, net.5, net.8, proj"):
        main(["--run-dir", str(tmp_path / "old")])


def test_a_wandb_run_that_is_not_there_is_one_error_line(server):
    with pytest.raises(UserError, match="cannot read W&B run team/proj/nope: "):
        main(["--run", "team/proj/nope"])
    server.add("empty", [])
    with pytest.raises(UserError, match="run team/proj/empty has no history"):
        main(["--run", "team/proj/empty"])
