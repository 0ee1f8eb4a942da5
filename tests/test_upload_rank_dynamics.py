"""upload_rank_dynamics: the W&B path with the real wandb client against a local W&B server
(tests/wandb_server.py), the local run store, bad input."""

from __future__ import annotations

import io
import json
import math
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import psutil
import pytest
import yaml

from analysis import upload_rank_dynamics as up
from analysis.rank_history import indexed_order, parse_rank_column, resolve_layer_order
from common import runstore
from common.cli import UserError
from common.ranks import RANK_MEASURES, compute_rank_decay_dynamics
from tests.entrypoint import run_script
from tests.wandb_server import FILE_STREAM, ServedRun, WandbServer, serving

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "analysis" / "upload_rank_dynamics.py"
LAYERS = ["factor_0", "factor_1", "factor_2"]


def ranks_at(step: int, layers=LAYERS) -> list[float]:
    """Ranks that decay layer to layer and change with the step (so rows differ)."""
    return [30.0 - 4 * i - (step % 7) * (i + 1) * 0.5 for i in range(len(layers))]


def rank_row(step: int, layers=LAYERS, style: str = "suite", scope: str = "") -> dict:
    row = {"loss": 1.0 / (step + 1)}
    for layer, r in zip(layers, ranks_at(step, layers), strict=True):
        for k, measure in enumerate(RANK_MEASURES):
            key = f"ranks/{layer}/{measure}" if style == "suite" else f"{layer}_{measure}"
            row[f"{scope}/{key}" if scope else key] = r + k
    return row


def history(steps, **kwargs) -> list[dict]:
    """A run's log calls: ranks every 10 steps, a loss in between."""
    return [rank_row(s, **kwargs) if s % 10 == 0 else {"loss": 1.0} for s in range(steps)]


def expected(step: int, measure_index: int = 0, layers=LAYERS) -> dict[str, float]:
    ranks = np.array(ranks_at(step, layers)) + measure_index
    return compute_rank_decay_dynamics(ranks)


@pytest.fixture
def server(monkeypatch, tmp_path):
    """A W&B server on 127.0.0.1 that the real client (wandb.Api, wandb.init) talks to."""
    with serving(monkeypatch, tmp_path) as served:
        yield served


@pytest.fixture(autouse=True)
def no_sleep(monkeypatch):
    """The uploader's own waits between retries, recorded instead of slept (wandb-core's own
    short waits are real)."""
    waits: list[float] = []
    monkeypatch.setattr(up, "sleep", waits.append)
    return waits


def upload(server: WandbServer, *flags: str) -> int:
    return up.main(["--entity", server.entity, "--project", server.project, "--yes", *flags])


def uploaded_rows(run: ServedRun) -> list[dict]:
    return [r for r in run.rows if up.STEP_AXIS in r]


def test_finished_running_and_crashed_runs(server, capsys):
    finished = server.add("fin", history(100), config={"lr": 0.1})
    crashed = server.add("cra", history(60), state="crashed")
    running = server.add("run", history(50), state="running", group="g1")
    own_rows = len(running.rows)

    assert upload(server) == 0
    out = capsys.readouterr().out
    assert "Total runs: 3" in out and "Processed: 3" in out and "Errors: 0" in out
    assert "New steps added: 21" in out  # 10 + 6 + 5 rank steps

    # in place, tied to the original step on the rank_dynamics/step axis
    rows = uploaded_rows(finished)
    assert [r[up.STEP_AXIS] for r in rows] == list(range(0, 100, 10))
    assert [r["_step"] for r in rows] == list(range(100, 110))  # after the run's own history
    assert finished.step_metrics()["effective_rank_rank_drop_gini"] == up.STEP_AXIS
    for row in rows:
        for k, measure in enumerate(RANK_MEASURES):
            want = expected(row[up.STEP_AXIS], k)
            for metric, value in want.items():
                assert row[f"{measure}_{metric}"] == pytest.approx(value, nan_ok=True)
    marker = finished.summary[up.MARKER_KEY]
    assert marker["last_step"] == 90 and marker["mode"] == "difference" and marker["complete"]
    assert finished.summary["loss"] == pytest.approx(1.0)  # the run's own summary kept
    assert finished.config == {"lr": 0.1}
    assert finished.state == "finished" and finished.exit_codes == [0]
    assert crashed.exit_codes == [1]  # a crashed run stays marked as not finished cleanly
    assert len(uploaded_rows(crashed)) == 6
    # the uploader's own machine is not written into the runs it resumes
    assert not {"wandb-metadata.json", "requirements.txt"} & set(finished.files)
    assert not any(r.variables.get("commit") for r in server.requests if r.op == "UpsertBucket")

    # the running run is never written: a companion in the same group holds its steps
    assert len(running.rows) == own_rows and running.state == "running"
    companion = server.runs[up.companion_id("run")]
    assert companion.job_type == "rank_dynamics" and companion.group == "g1"
    assert companion.config["rank_dynamics_source"] == "run"
    assert [r[up.STEP_AXIS] for r in companion.rows] == [0, 10, 20, 30, 40]

    # a second pass adds nothing and opens no run
    upserts = server.count("UpsertBucket")
    assert upload(server) == 0
    assert "New steps added: 0" in capsys.readouterr().out
    assert server.count("UpsertBucket") == upserts


def test_running_run_then_finished_gets_each_step_once(server, capsys):
    run = server.add("r", history(50), state="running")
    assert upload(server) == 0
    for s in range(50, 120):  # training goes on and ends
        run.append(rank_row(s) if s % 10 == 0 else {"loss": 1.0})
    assert upload(server) == 0  # still running: only the new steps, to the companion
    companion = server.runs[up.companion_id("r")]
    assert [r[up.STEP_AXIS] for r in companion.rows] == list(range(0, 120, 10))
    run.state = "finished"
    for s in range(120, 141):
        run.append(rank_row(s) if s % 10 == 0 else {"loss": 1.0})
    assert upload(server) == 0
    assert [r[up.STEP_AXIS] for r in uploaded_rows(run)] == [120, 130, 140]
    assert upload(server) == 0
    assert "New steps added: 0" in capsys.readouterr().out.split("Processing complete")[-1]


def test_a_pass_cut_short_ends_with_every_step_once(server, capsys):
    run = server.add("a", history(200))
    assert upload(server) == 0
    # what the server holds when an uploader dies after streaming 7 of its 20 rows: those
    # rows, no marker (the summary is written last)
    run.rows = run.rows[: 200 + 7]
    del run.summary[up.MARKER_KEY]
    capsys.readouterr()
    assert upload(server) == 0
    assert "New steps added: 13" in capsys.readouterr().out
    steps = [r[up.STEP_AXIS] for r in uploaded_rows(run)]
    assert sorted(steps) == list(range(0, 200, 10))  # exactly once each


def test_listing_and_history_are_read_page_by_page(server, capsys, monkeypatch):
    monkeypatch.setattr(up, "LIST_PAGE", 2)
    monkeypatch.setattr(up, "HISTORY_PAGE", 16)
    for name in "abcde":
        server.add(name, history(100))
    assert upload(server, "--dry-run") == 0
    out = capsys.readouterr().out
    assert "Found 5 runs" in out and out.count("10 new steps -> in place") == 5
    assert server.count("Runs") == 3 + 1  # 5 runs, 2 a page; the companions' listing
    assert server.count("HistoryPage", run="a") == math.ceil(100 / 16)
    assert server.count("UpsertBucket") == 0


def test_dry_run_writes_nothing_and_prints_the_plan(server, capsys):
    server.add("a", history(30))
    server.add("b", [{"loss": 1.0}])
    assert upload(server, "--dry-run") == 0
    out = capsys.readouterr().out
    assert "process team/proj/a (a, finished): 3 new steps -> in place" in out
    assert "skip    team/proj/b (b, finished): no rank metrics" in out
    assert "nothing was written" in out.lower()
    assert server.count("UpsertBucket") == 0 and server.count(FILE_STREAM) == 0


def test_rate_limit_then_success(server, no_sleep, capsys):
    """wandb-core tries each request twice (the uploader's setting); a 429 that outlasts that
    reaches the uploader, which waits and reads again."""
    run = server.add("a", history(30))
    server.fail("HistoryPage", 429, 429, 429)
    assert upload(server) == 0
    err = capsys.readouterr().err
    assert "reading a: HTTP 429, retrying in 1 s" in err
    assert no_sleep == [1.0]
    assert server.count("HistoryPage") == 4
    assert len(uploaded_rows(run)) == 3


def test_server_errors_back_off_and_errors_that_do_not_end_fail_one_run_only(
    server, no_sleep, capsys, monkeypatch
):
    monkeypatch.setattr(up, "RETRIES", 3)
    flaky = server.add("flaky", history(30))
    bad = server.add("bad", history(30))
    good = server.add("good", history(30))
    server.fail("HistoryPage", 502, 503, 500, 500, run="flaky")  # the third try reads it
    server.fail("HistoryPage", *[503] * 6, run="bad")  # 3 tries of 2 requests
    assert upload(server) == 1
    captured = capsys.readouterr()
    assert "reading flaky: HTTP 503, retrying in 1 s" in captured.err
    assert "reading flaky: HTTP 500, retrying in 2 s" in captured.err
    assert "error: team/proj/bad (bad, finished): reading bad: HTTP 503 after 3 attempts" in (
        captured.err
    )
    assert "Processed: 2" in captured.out and "Errors: 1" in captured.out
    assert len(uploaded_rows(flaky)) == 3 and len(uploaded_rows(good)) == 3
    assert not uploaded_rows(bad)


def test_a_hung_request_times_out_is_retried_then_fails_its_run_only(
    server, no_sleep, capsys, monkeypatch
):
    """WANDB_HTTP_TIMEOUT is 1 s here; the server holds a hung request for 3 s."""
    monkeypatch.setattr(up, "RETRIES", 2)
    slow = server.add("slow", history(30))
    stuck = server.add("stuck", history(30))
    good = server.add("good", history(30))
    server.fail("HistoryPage", "hang", "hang", run="slow")  # wandb-core gives up once
    server.fail("HistoryPage", *["hang"] * 4, run="stuck")  # and twice: the run fails
    started = time.monotonic()
    assert upload(server) == 1
    assert time.monotonic() - started < 30
    captured = capsys.readouterr()
    assert "reading slow: timed out, retrying in 1 s" in captured.err
    errors = [line for line in captured.err.splitlines() if line.startswith("error:")]
    assert errors == ["error: team/proj/stuck (stuck, finished): reading stuck: timed out "
                      "after 2 attempts (no answer within 1 s)"]  # fmt: skip
    assert "Processed: 2" in captured.out and "Errors: 1" in captured.out
    assert len(uploaded_rows(slow)) == 3 and len(uploaded_rows(good)) == 3
    assert not uploaded_rows(stuck)


@pytest.mark.parametrize(
    ("faults", "status", "why"),
    [((429, 429), 429, "HTTP 429"), ((502, 503), 503, "HTTP 503"), ((404,), 404, None),
     (("hang", "hang"), None, "timed out"), ("closed", None, "no connection")],
)  # fmt: skip
def test_what_the_real_client_raises_is_understood(server, faults, status, why):
    """The errors wandb 0.31 raises: WandbApiFailedError, its status in ``response.
    http_status`` (not retried by wandb-core) or only in its message (retried, given up)."""
    server.add("a", history(5))
    api = up.public_api()
    run = api.run("team/proj/a")
    if faults == "closed":
        server.close()
    else:
        server.fail("HistoryPage", *faults)
    with pytest.raises(Exception) as caught:
        list(run.scan_history())
    assert up.http_status(caught.value) == status
    assert up.transient(caught.value) == why


def test_summary_and_config_loads_are_retried(server, capsys):
    """A listed run loads its summary and config with a request of its own (lazy runs)."""
    run = server.add("a", history(30), config={"lr": 0.1})
    server.fail("Run", 503, 503)
    assert upload(server) == 0
    captured = capsys.readouterr()
    assert "HTTP 503, retrying" in captured.err
    assert "Processed: 1" in captured.out and len(uploaded_rows(run)) == 3


def test_listing_is_retried_and_a_missing_project_is_one_line(server, capsys):
    server.add("a", history(30))
    server.fail("Runs", 500, 500)
    assert upload(server, "--dry-run") == 0
    assert "listing team/proj: HTTP 500, retrying" in capsys.readouterr().err
    with pytest.raises(UserError, match="cannot list the runs of team/nope: .*nope"):
        up.main(["--entity", "team", "--project", "nope", "--dry-run"])


@pytest.mark.parametrize("mode", ["offline", "disabled"])
def test_offline_or_disabled_wandb_is_refused_unless_writing_the_local_store(
    server, tmp_path, mode
):
    """With WANDB_MODE=offline a W&B write would land in a local folder, not in the runs."""
    run = server.add("a", history(30))
    args = ["--entity", "team", "--project", "proj", "--yes"]
    proc = run_script(SCRIPT, args, cwd=tmp_path, WANDB_MODE=mode)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"error: W&B is in {mode} mode here"), lines
    assert f"(WANDB_MODE={mode})" in lines[0] and "--runs-dir" in lines[0]
    assert server.count("UpsertBucket") == 0 and server.count(FILE_STREAM) == 0
    assert not uploaded_rows(run)
    if mode == "offline":  # a dry run only reads
        dry = run_script(SCRIPT, [*args, "--dry-run"], cwd=tmp_path, WANDB_MODE=mode)
        assert dry.returncode == 0 and "3 new steps -> in place" in dry.stdout, dry.stderr
    else:  # the local store is not W&B
        write_local_run(tmp_path / "store" / "r1", history(30))
        store = run_script(SCRIPT, ["--runs-dir", str(tmp_path / "store"), "--yes"],
                           cwd=tmp_path, WANDB_MODE=mode)  # fmt: skip
        assert store.returncode == 0 and "Processed: 1" in store.stdout, store.stderr


def test_missing_keys_and_no_rank_metrics(server, capsys):
    server.add("plain", [{"loss": 1.0}] * 5)
    gappy = history(40)
    del gappy[20]["ranks/factor_1/effective_rank"]  # one layer missing at one step
    run = server.add("gappy", gappy)
    assert upload(server, "--rank-types", "effective_rank") == 0
    out = capsys.readouterr().out
    assert "plain" in out and "no rank metrics" in out
    assert [r[up.STEP_AXIS] for r in uploaded_rows(run)] == [0, 10, 30]


def test_layer_names_without_known_order(server, capsys):
    layers = ["conv", "fc", "head"]
    run = server.add("sem", history(30, layers=layers, style="old"))
    assert upload(server) == 0
    out = capsys.readouterr().out
    assert "layer order unknown for conv, fc, head: pass --layer-order" in out
    assert not uploaded_rows(run)
    assert upload(server, "--layer-order", "conv,fc,head") == 0
    rows = uploaded_rows(run)
    assert len(rows) == 3
    want = compute_rank_decay_dynamics(np.array(ranks_at(10, layers)))
    assert rows[1]["effective_rank_rank_decay_centroid"] == pytest.approx(
        want["rank_decay_centroid"]
    )


def test_max_runs_and_run_ids_and_filters(server, capsys):
    for name in "abc":
        server.add(name, history(20), config={"lr": 0.1 if name != "c" else 0.2})
    assert upload(server, "--run-ids", "b", "--dry-run") == 0
    assert "Found 1 runs" in capsys.readouterr().out
    assert upload(server, "--max-runs", "2", "--dry-run") == 0
    assert "Found 2 runs" in capsys.readouterr().out
    assert upload(server, "--filters", '{"config.lr": 0.2}', "--dry-run") == 0
    out = capsys.readouterr().out
    assert "Found 1 runs" in out and "team/proj/c" in out
    with pytest.raises(UserError, match="--run-ids matched no run for: nosuchrun"):
        upload(server, "--run-ids", "b", "nosuchrun", "--dry-run")


def test_live_probe_dynamics_count_as_written(server, capsys):
    rows = history(30)
    for row in rows:
        if "ranks/factor_0/effective_rank" in row:
            row["effective_rank_normalized_aurc"] = 0.5
    config = {"rank_probe": {"enabled": True, "mode": "difference", "prepend_input_rank": False}}
    run = server.add("live", rows, config=config)
    assert upload(server, "--rank-types", "effective_rank") == 0
    assert "up to date" in capsys.readouterr().out and not uploaded_rows(run)
    assert upload(server, "--rank-types", "effective_rank", "--analysis-mode", "ratio") == 0
    assert "its probe logged difference-mode dynamics" in capsys.readouterr().out


def test_trial_plans_three_runs_and_writes_one(server, capsys, monkeypatch):
    for name in "abcd":
        server.add(name, history(20))
    monkeypatch.setattr("sys.stdin.isatty", lambda: True)
    monkeypatch.setattr("builtins.input", lambda _: "n")
    assert up.main(["--project", "proj", "--entity", "team", "--trial"]) == 0
    out = capsys.readouterr().out
    assert "Found 3 runs" in out and out.count("process team/proj/") == 3
    assert server.count("UpsertBucket") == 0  # declined: nothing written
    monkeypatch.setattr("builtins.input", lambda _: "y")
    assert up.main(["--project", "proj", "--entity", "team", "--trial"]) == 0
    assert "Processed: 1" in capsys.readouterr().out
    assert [r.variables["name"] for r in server.requests if r.op == "RunResumeStatus"] == ["a"]


# -- the local run store ---------------------------------------------------------------------


def write_local_run(folder: Path, records, config=None, record=None) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    run = {"run_id": folder.name, "state": "finished", **(record or {})}
    (folder / "run.json").write_text(json.dumps(run))
    (folder / "config.yaml").write_text(yaml.safe_dump(config or {}))
    with open(folder / "metrics.jsonl", "w") as f:
        for step, rec in enumerate(records):
            f.write(json.dumps({"_step": step, **rec}) + "\n")
    return folder


def local(tmp_path: Path, *flags: str) -> int:
    return up.main(["--runs-dir", str(tmp_path), "--yes", *flags])


def test_local_store_writes_csv_and_marker_once(tmp_path, capsys):
    run = write_local_run(tmp_path / "r1", history(50))
    assert local(tmp_path) == 0
    assert "New steps added: 5" in capsys.readouterr().out
    table = pd.read_csv(run / up.CSV_FILE, keep_default_na=False, na_values=[""])
    assert len(table) == 5 * 4 and set(table["rank_type"]) == set(RANK_MEASURES)
    row = table[(table["rank_type"] == "effective_rank") & (table["step"] == 20)].iloc[0]
    assert row["rank_drop_gini"] == pytest.approx(expected(20)["rank_drop_gini"])
    marker = json.loads((run / up.MARKER_FILE).read_text())
    assert marker["last_step"] == 40 and marker["layers"] == [{"scope": "", "layers": LAYERS}]
    assert marker["order_source"] == "indexed names"

    assert local(tmp_path) == 0  # second pass: the marker says metrics.jsonl did not change
    out = capsys.readouterr().out
    assert "New steps added: 0" in out and "up to date (marker at step 40)" in out

    with open(run / "metrics.jsonl", "a") as f:  # the run went on
        f.write(json.dumps({"_step": 60, **rank_row(60)}) + "\n")
    assert local(tmp_path) == 0
    assert "New steps added: 1" in capsys.readouterr().out
    table = pd.read_csv(run / up.CSV_FILE)
    assert sorted(table["step"].unique()) == [0, 10, 20, 30, 40, 60]
    assert len(table) == 6 * 4  # nothing twice

    (run / up.CSV_FILE).unlink()  # the marker stays: the CSV is rebuilt, not "up to date"
    assert local(tmp_path) == 0
    assert "New steps added: 6" in capsys.readouterr().out
    assert len(pd.read_csv(run / up.CSV_FILE)) == 6 * 4


def test_local_dry_run_writes_nothing(tmp_path, capsys):
    run = write_local_run(tmp_path / "r1", history(30))
    assert local(tmp_path, "--dry-run") == 0
    assert "3 new steps -> local run folder" in capsys.readouterr().out
    assert not (run / up.CSV_FILE).exists() and not (run / up.MARKER_FILE).exists()


def test_layer_order_from_the_run_record(tmp_path):
    # a run of this suite: run.json holds the probe's forward order. Its metrics list the layers
    # backwards and the names carry no order, so only the record can give it
    layers = ["net.2", "net.5", "net.8", "proj"]
    backwards = [dict(reversed(row.items())) for row in history(30, layers=layers)]
    record = {"rank_probe": {"every": 10, "mode": "difference", "layers": layers}}
    run = write_local_run(tmp_path / "mm", backwards, record=record)
    assert local(tmp_path, "--rank-types", "effective_rank") == 0
    marker = json.loads((run / up.MARKER_FILE).read_text())
    assert marker["layers"] == [{"scope": "", "layers": layers}]
    assert marker["order_source"] == "run record"
    table = pd.read_csv(run / up.CSV_FILE)
    want = compute_rank_decay_dynamics(np.array(ranks_at(10, layers)))
    got = table[table["step"] == 10].iloc[0]
    assert got["rank_decay_centroid"] == pytest.approx(want["rank_decay_centroid"])


def test_an_older_record_of_the_suite_probe_takes_the_logged_order(tmp_path, capsys):
    # recorded before run.json kept the layers: the suite's probe (its rank_probe config group)
    # logged them in forward order, which needs no model; without that group it stays unknown
    layers = ["net.2", "net.5", "net.8", "proj"]
    probe = {"rank_probe": {"every": 10, "mode": "difference", "prepend_input_rank": False}}
    run = write_local_run(tmp_path / "old" / "mm", history(30, layers=layers), config=probe)
    assert local(tmp_path / "old", "--rank-types", "effective_rank") == 0
    marker = json.loads((run / up.MARKER_FILE).read_text())
    assert marker["layers"] == [{"scope": "", "layers": layers}]
    assert marker["order_source"] == "logged order"
    write_local_run(tmp_path / "foreign" / "mm", history(30, layers=layers))
    capsys.readouterr()
    local(tmp_path / "foreign", "--rank-types", "effective_rank")
    assert "layer order unknown for net.2, net.5, net.8, proj: pass --layer-order" in (
        capsys.readouterr().out
    )


def test_scoped_cells_get_their_own_dynamics(tmp_path):
    records = []
    for s in range(0, 30, 10):
        for cell in ("B16_LR0.010000", "B32_LR0.010000"):
            records.append({**rank_row(s, layers=["hidden_0", "hidden_1"], scope=cell)})
    run = write_local_run(tmp_path / "grid", records)
    assert local(tmp_path, "--rank-types", "numerical_rank") == 0
    table = pd.read_csv(run / up.CSV_FILE)
    assert sorted(set(table["scope"])) == ["B16_LR0.010000", "B32_LR0.010000"]
    assert len(table) == 6


def test_corrupt_line_and_unreadable_folder(tmp_path, capsys):
    good = write_local_run(tmp_path / "good", history(30))
    with open(good / "metrics.jsonl", "a") as f:
        f.write('{"_step": 31, "ranks/fac\n')
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "run.json").write_text("{not json")
    assert local(tmp_path) == 1  # one run failed: non-zero exit, the other processed
    captured = capsys.readouterr()
    assert "metrics.jsonl:31: corrupt line skipped" in captured.err
    assert f"error: {bad}: unreadable run folder {bad}: run.json" in captured.err
    assert "Processed: 1" in captured.out and "Errors: 1" in captured.out
    assert (good / up.CSV_FILE).exists()


def test_confirmation_needed_for_many_runs(tmp_path, monkeypatch):
    for i in range(up.CONFIRM_ABOVE + 1):
        write_local_run(tmp_path / f"r{i}", history(20))
    monkeypatch.setattr("sys.stdin.isatty", lambda: False)
    with pytest.raises(UserError, match="there is no terminal to confirm: pass --yes"):
        up.main(["--runs-dir", str(tmp_path)])
    assert not list(tmp_path.rglob(up.CSV_FILE))
    monkeypatch.setattr("sys.stdin.isatty", lambda: True)
    monkeypatch.setattr("builtins.input", lambda _: "n")
    with pytest.raises(UserError, match="cancelled"):
        up.main(["--runs-dir", str(tmp_path)])
    monkeypatch.setattr("builtins.input", lambda _: "y")
    assert up.main(["--runs-dir", str(tmp_path)]) == 0
    assert len(list(tmp_path.rglob(up.CSV_FILE))) == up.CONFIRM_ABOVE + 1


def test_other_mode_than_the_marker_is_skipped(tmp_path, capsys):
    write_local_run(tmp_path / "r", history(30))
    assert local(tmp_path) == 0
    assert local(tmp_path, "--analysis-mode", "ratio") == 0
    assert "processed earlier in difference mode" in capsys.readouterr().out
    assert local(tmp_path, "--prepend-input-rank") == 0
    assert "processed earlier without --prepend-input-rank" in capsys.readouterr().out


def test_an_empty_runs_dir_is_an_error(tmp_path):
    with pytest.raises(UserError, match="no runs in"):
        local(tmp_path)


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--rank-types", "effective_rank,bogus_rank"], "unknown rank type bogus_rank"),
        (["--analysis-mode", "log"], "unknown analysis mode 'log'"),
        (["--max-runs", "0"], "--max-runs must be a positive integer, got 0"),
        (["--filters", "{oops"], "--filters is not valid JSON"),
        (["--filters", '{"state": {"$ne": "x"}}'], "plain equality only"),
        (["--layer-order", "a,b,a"], "names a layer twice"),
    ],
)
def test_bad_flags(tmp_path, flags, message):
    with pytest.raises(UserError, match=message.replace("(", r"\(").replace("$", r"\$")):
        local(tmp_path, *flags)


def test_bad_input_from_the_command_line(tmp_path):
    missing = run_script(SCRIPT, ["--runs-dir", str(tmp_path / "nope")], cwd=tmp_path)
    assert missing.returncode == 2
    assert missing.stderr.strip() == f"error: --runs-dir {tmp_path / 'nope'} is not a folder"
    nowhere = run_script(SCRIPT, ["--dry-run"], cwd=tmp_path)
    assert nowhere.returncode == 2 and "Traceback" not in nowhere.stderr
    assert "--project (and --entity) for W&B, or --runs-dir" in nowhere.stderr


def test_key_parsing_and_order_helpers():
    m = RANK_MEASURES
    assert parse_rank_column("ranks/net.2/effective_rank", m) == ("", "net.2", "effective_rank")
    assert parse_rank_column("B16_LR0.1/ranks/hidden_0/numerical_rank", m) == (
        "B16_LR0.1", "hidden_0", "numerical_rank")  # fmt: skip
    assert parse_rank_column("layer_3_l1_distribution_rank", m) == (
        "", "layer_3", "l1_distribution_rank")  # fmt: skip
    assert parse_rank_column("ranks/input_rank", m) is None
    assert parse_rank_column("effective_rank_rank_drop_gini", m) is None
    assert parse_rank_column("effective_rank", m) is None
    assert indexed_order(["layer_10", "layer_2", "layer_1"]) == ["layer_1", "layer_2", "layer_10"]
    assert indexed_order(["conv1", "fc1"]) is None  # two stems: no order
    order, source = resolve_layer_order(["b", "a"], given_order=["a", "b", "c"])
    assert (order, source) == (["a", "b"], "--layer-order")
    order, reason = resolve_layer_order(["fc", "conv"])
    assert order is None and reason == "layer order unknown for conv, fc: pass --layer-order"


def test_nan_ranks_are_not_steps():
    # a degenerate probe (NaN ranks) has no dynamics to write; it is not a "0" either
    rows = [{"_step": 0, **rank_row(0)}, {"_step": 10, **rank_row(10)}]
    rows[1]["ranks/factor_1/effective_rank"] = math.nan
    frame = pd.DataFrame(rows)
    from analysis.rank_history import dynamics_rows

    cols = [f"ranks/{layer}/effective_rank" for layer in LAYERS]
    out = dynamics_rows(frame, "", "effective_rank", cols)
    assert list(out["step"]) == [0]


def test_many_runs_in_worker_processes(tmp_path, capsys):
    for i in range(16):  # enough runs for forked workers where there are several cores
        write_local_run(tmp_path / f"r{i:02d}", history(20))
    bad = write_local_run(tmp_path / "zz_bad", history(20))
    (bad / "run.json").write_text("[]")
    assert local(tmp_path) == 1
    out = capsys.readouterr().out
    assert "Processed: 16" in out and "Errors: 1" in out and "New steps added: 32" in out
    assert len(list(tmp_path.rglob(up.CSV_FILE))) == 16


# -- stopping: kill -9, Ctrl-C, SIGTERM (real processes, real signals) -----------------------

BUSY_RUNS = 32


def build_busy_store(root: Path) -> Path:
    """Runs that logged ranks at every step: an upload of a few seconds, in two workers."""
    for r in range(BUSY_RUNS):
        write_local_run(root / f"run_{r:03d}", [rank_row(s) for s in range(2000)])
    return root


@pytest.fixture(scope="module")
def busy_store_once(tmp_path_factory) -> Path:
    return build_busy_store(tmp_path_factory.mktemp("busy"))


@pytest.fixture
def busy_store(busy_store_once) -> Path:
    for path in busy_store_once.rglob("*rank_dynamics*"):  # a fresh store: nothing written
        path.unlink()
    return busy_store_once


def written_runs(store: Path) -> int:
    return len(list(store.rglob(up.CSV_FILE)))


@pytest.fixture
def start_upload(tmp_path):
    """Start the CLI in its own session (a Ctrl-C can go to its whole process group), output to
    files (a pipe held open by a stray worker would block the test); whatever it left running
    is killed at teardown."""
    started: list[psutil.Process] = []

    def start(store: Path) -> subprocess.Popen:
        env = {**os.environ, "PYTHONUNBUFFERED": "1", "WANDB_SILENT": "true"}
        with open(tmp_path / "out.txt", "w") as out, open(tmp_path / "err.txt", "w") as err:
            proc = subprocess.Popen(
                [sys.executable, str(SCRIPT), "--runs-dir", str(store), "--yes"],
                stdout=out, stderr=err, text=True, env=env, start_new_session=True,
            )  # fmt: skip
        proc.out, proc.err = tmp_path / "out.txt", tmp_path / "err.txt"
        proc.started = started  # its workers join it once seen
        started.append(psutil.Process(proc.pid))
        return proc

    yield start
    for p in still_alive(started):
        p.kill()


def wait_until_written(proc: subprocess.Popen, store: Path, runs: int) -> list:
    """Wait until ``runs`` runs are written; returns the uploader's child processes."""
    uploader = psutil.Process(proc.pid)
    deadline = time.monotonic() + 120
    while written_runs(store) < runs:
        assert proc.poll() is None, proc.err.read_text()
        assert time.monotonic() < deadline, "the upload never started writing"
        time.sleep(0.005)
    children = uploader.children(recursive=True)
    proc.started.extend(children)
    return children


def still_alive(procs: list) -> list:
    """The processes still running (a zombie waiting for its reaper has ended)."""
    alive = []
    for p in procs:
        try:
            if p.status() != psutil.STATUS_ZOMBIE:
                alive.append(p)
        except psutil.NoSuchProcess:
            pass
    return alive


def assert_gone_and_nothing_written_after(children: list, store: Path, seconds: float = 5):
    deadline = time.monotonic() + seconds
    while still_alive(children) and time.monotonic() < deadline:
        time.sleep(0.05)
    left = still_alive(children)
    assert not left, f"workers outlived the uploader: {[p.pid for p in left]}"
    written = written_runs(store)
    time.sleep(1.0)
    assert written_runs(store) == written < BUSY_RUNS  # nothing written after, and it was cut
    assert not [p.name for p in store.rglob("*.tmp")]  # no half-written file left
    return written


needs_workers = pytest.mark.skipif(
    sys.platform != "linux" or len(os.sched_getaffinity(0)) < 2,
    reason="the uploader forks workers on Linux with two cores or more",
)


@needs_workers
def test_workers_die_with_a_killed_uploader(busy_store, start_upload):
    proc = start_upload(busy_store)
    children = wait_until_written(proc, busy_store, 2)
    assert len(children) >= 2  # the workers
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait(timeout=10)
    assert_gone_and_nothing_written_after(children, busy_store)


@needs_workers
@pytest.mark.parametrize("how", ["ctrl-c", "sigterm"])
def test_ctrl_c_or_sigterm_stops_the_workers_and_prints_the_summary(busy_store, start_upload, how):
    proc = start_upload(busy_store)
    children = wait_until_written(proc, busy_store, 2)
    if how == "ctrl-c":  # a terminal sends SIGINT to the whole foreground group
        os.killpg(proc.pid, signal.SIGINT)
    else:  # kill PID, a scheduler: the uploader alone
        os.kill(proc.pid, signal.SIGTERM)
    proc.wait(timeout=30)
    out, err = proc.out.read_text(), proc.err.read_text()
    assert proc.returncode == 130, err
    assert "Traceback" not in err
    written = assert_gone_and_nothing_written_after(children, busy_store)
    assert "Interrupted: run it again to finish" in out
    assert f"Total runs: {BUSY_RUNS}" in out and "Errors: 0" in out
    assert f"Processed: {written}\n" in out  # the summary counts what is on disk
    assert f"New steps added: {written * 2000:,}" in out

    # a rerun ends with every step present once
    rerun = run_script(SCRIPT, ["--runs-dir", str(busy_store), "--yes"], cwd=busy_store)
    assert rerun.returncode == 0, rerun.stderr
    assert f"Processed: {BUSY_RUNS - written}\n" in rerun.stdout
    for csv in busy_store.rglob(up.CSV_FILE):
        table = pd.read_csv(csv)
        assert len(table) == 2000 * 4 and not table.duplicated(["step", "rank_type"]).any()


# -- a torn rank_dynamics.csv ---------------------------------------------------------------


def cut_in_last_row(text: str) -> str:
    return text[: len(text) - 1 - 3]  # "490,,numerical_rank,0.1,0.2,0.3": inside the last value


def cut_in_rank_type(text: str) -> str:
    last = text.splitlines()[-1]
    return text[: len(text) - 1 - len(last) + len("490,,numer")]


def cut_in_header(text: str) -> str:
    return text[: len("step,sc")]


@pytest.mark.parametrize(
    ("cut", "recomputed"),
    [(cut_in_last_row, 1), (cut_in_rank_type, 1), (cut_in_header, 50)],
)
def test_a_torn_csv_row_is_dropped_and_its_step_recomputed(tmp_path, capsys, cut, recomputed):
    run = write_local_run(tmp_path / "r", history(500))  # 50 steps x 4 rank types: 200 rows
    assert local(tmp_path) == 0
    csv = run / up.CSV_FILE
    whole = csv.read_text()
    assert whole.splitlines()[-1].startswith("490,,numerical_rank,")
    csv.write_text(cut(whole))  # a writer killed mid-row
    capsys.readouterr()

    assert local(tmp_path) == 0
    captured = capsys.readouterr()
    warnings = [line for line in captured.err.splitlines() if line.startswith("warning:")]
    assert len(warnings) == 1 and str(csv) in warnings[0] and "torn" in warnings[0]
    assert f"New steps added: {recomputed}\n" in captured.out
    table = pd.read_csv(csv)
    assert len(table) == 200 and not table.duplicated(["step", "rank_type"]).any()
    pd.testing.assert_frame_equal(table, pd.read_csv(io.StringIO(whole)))  # no fragment left
    assert csv.read_text().endswith("\n")

    assert local(tmp_path) == 0  # and then it is up to date, without a warning
    captured = capsys.readouterr()
    assert "New steps added: 0" in captured.out and "warning" not in captured.err


# -- the local store's run state: running, or killed when its process is gone ----------------


def test_a_run_whose_process_died_is_ended_killed(tmp_path, capsys):
    exited = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                            capture_output=True, text=True, check=True)  # fmt: skip
    run = write_local_run(tmp_path / "dead", history(30), record={
        "state": "running", "pid": int(exited.stdout), "host": socket.gethostname()})  # fmt: skip
    (run / runstore.LOCK_FILE).write_text("")  # its lock file, held by nobody
    assert local(tmp_path, "--dry-run") == 0
    assert "3 new steps -> local run folder (killed)" in capsys.readouterr().out
    assert local(tmp_path, "--filters", '{"state": "running"}', "--dry-run") == 0
    assert "Found 0 runs" in capsys.readouterr().out
    assert local(tmp_path, "--filters", '{"state": "killed"}') == 0
    out = capsys.readouterr().out
    assert "Found 1 runs" in out and "Processed: 1" in out
    marker = json.loads((run / up.MARKER_FILE).read_text())
    assert marker["run_state"] == "killed" and marker["complete"] is True
    assert json.loads((run / "run.json").read_text())["state"] == "running"  # not ours to edit


def test_a_run_still_running_is_written_beside_it(tmp_path, capsys):
    run = write_local_run(tmp_path / "live", history(30),
                          record={"state": "running", "host": socket.gethostname()})  # fmt: skip
    code = ("import sys, time\nfrom common import runstore\n"
            "runstore.RunLock(sys.argv[1]).acquire()\nprint('held', flush=True)\ntime.sleep(120)")  # fmt: skip
    holder = subprocess.Popen([sys.executable, "-c", code, str(run)], cwd=ROOT,
                              stdout=subprocess.PIPE, text=True)  # fmt: skip
    try:
        assert holder.stdout.readline().strip() == "held"
        record = json.loads((run / "run.json").read_text())
        (run / "run.json").write_text(json.dumps({**record, "pid": holder.pid}))
        assert local(tmp_path, "--dry-run") == 0
        assert "3 new steps -> local run folder (running)" in capsys.readouterr().out
        assert local(tmp_path, "--filters", '{"state": "running"}') == 0
        out = capsys.readouterr().out
        assert "Found 1 runs" in out and "Processed: 1" in out
        assert len(pd.read_csv(run / up.CSV_FILE)) == 3 * 4  # written beside the live run
        marker = json.loads((run / up.MARKER_FILE).read_text())
        assert marker["run_state"] == "running" and marker["complete"] is False
    finally:
        holder.kill()
        holder.wait()
