"""The shared logger: local run record, W&B offline, failures, signals, secrets."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from common import runstore
from experiments.logger import ExperimentLogger

REPO = Path(__file__).resolve().parents[1]


def read_lines(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_local_record_in_disabled_mode(tmp_path):
    with ExperimentLogger(
        tmp_path / "run", {"lr": 0.1, "model": {"rank": 4}}, mode="disabled"
    ) as lg:
        assert lg.log({"loss": 1.0}) == 0
        lg.log({"loss": 0.5, "acc": 0.7}, step=5)
        lg.log({"loss": 0.25})  # default: the next step
        lg.log_summary(best=0.25, note="ok")
        # flushed line by line: readable before the run ends
        assert len(read_lines(tmp_path / "run")) == 3
    run = tmp_path / "run"
    lines = read_lines(run)
    assert [r["_step"] for r in lines] == [0, 5, 6]
    assert lines[1] == {"_step": 5, "loss": 0.5, "acc": 0.7}
    record = json.loads((run / "run.json").read_text())
    assert record["state"] == "finished" and record["ended_at"] and record["mode"] == "disabled"
    assert record["run_id"] and record["started_at"]
    assert json.loads((run / "summary.json").read_text()) == {"best": 0.25, "note": "ok"}
    assert "rank: 4" in (run / "config.yaml").read_text()
    frame = runstore.read_metrics(run)
    assert list(frame.columns[:1]) == ["_step"] and len(frame) == 3


@pytest.mark.parametrize(
    ("exc", "state"), [(RuntimeError("boom"), "failed"), (KeyboardInterrupt(), "interrupted")]
)
def test_context_manager_records_state(tmp_path, exc, state):
    with pytest.raises(type(exc)), ExperimentLogger(tmp_path, {}, mode="disabled") as lg:
        lg.log({"x": 1})
        raise exc
    record = json.loads((tmp_path / "run.json").read_text())
    assert record["state"] == state
    if state == "failed":
        assert record["reason"] == "RuntimeError: boom"


def test_images_tables_and_scopes(tmp_path):
    with ExperimentLogger(tmp_path, {}, mode="disabled") as lg:
        png = lg.log_image("samples/recon", torch.rand(3, 8, 10), step=2)
        lg.log_image("gray", np.zeros((4, 4), dtype=np.uint8), step=3)
        table = lg.log_table("captions", ["ref", "gen"], [["a cat", "a cat"], ["x", "y"]], step=3)
        cell = lg.scoped("B8_LR0.000030")
        cell.log({"train_loss": 1.5, "step": 1})
        cell.log_summary(final_val_loss=0.2)
    assert png.exists() and png.suffix == ".png"
    from PIL import Image

    assert Image.open(png).size == (10, 8)
    assert json.loads(table.read_text())["data"][0] == ["a cat", "a cat"]
    lines = read_lines(tmp_path)
    assert lines[0]["samples/recon"]["_type"] == "image"
    assert lines[-1] == {"_step": 4, "B8_LR0.000030/train_loss": 1.5, "B8_LR0.000030/step": 1}
    assert json.loads((tmp_path / "summary.json").read_text()) == {
        "B8_LR0.000030/final_val_loss": 0.2
    }


def test_nan_values_and_numpy_scalars_are_plain_json(tmp_path):
    with ExperimentLogger(tmp_path, {}, mode="disabled") as lg:
        lg.log({"a": float("nan"), "b": np.float32(1.5), "c": torch.tensor(2.0)})
    assert read_lines(tmp_path)[0] == {"_step": 0, "a": None, "b": 1.5, "c": 2.0}


def test_secrets_never_written(tmp_path):
    secret = "0123456789abcdef0123456789abcdef01234567"
    cfg = {"wandb": {"api_key": secret}, "hf_token": secret, "lr": 1}
    with ExperimentLogger(tmp_path, cfg, mode="disabled") as lg:
        lg.log({"x": 1})
    for path in tmp_path.rglob("*"):
        if path.is_file():
            assert secret not in path.read_text(errors="ignore"), path
    assert "***" in (tmp_path / "config.yaml").read_text()


def test_wandb_init_failure_degrades_to_local(tmp_path, monkeypatch):
    import wandb

    def broken_init(**kwargs):
        raise RuntimeError("network unreachable\nlong traceback text")

    monkeypatch.setattr(wandb, "init", broken_init)
    with pytest.warns(RuntimeWarning, match="W&B init failed \\(network unreachable\\)"):
        lg = ExperimentLogger(tmp_path, {}, mode="online")
    with lg:
        lg.log({"loss": 1.0})
    record = json.loads((tmp_path / "run.json").read_text())
    assert record["state"] == "finished" and "local only" in record["mode"]
    assert read_lines(tmp_path) == [{"_step": 0, "loss": 1.0}]


def test_wandb_log_failure_warns_once_and_keeps_logging(tmp_path, monkeypatch):
    import wandb

    class FlakyRun:
        entity, project, dir = None, "p", str(tmp_path)
        summary: dict = {}

        def log(self, *args, **kwargs):
            raise OSError("disk full")

        def finish(self, **kwargs):
            pass

    monkeypatch.setattr(wandb, "init", lambda **kwargs: FlakyRun())
    lg = ExperimentLogger(tmp_path, {}, mode="offline")
    with pytest.warns(RuntimeWarning, match="W&B log failed") as caught, lg:
        for i in range(3):
            lg.log({"loss": float(i)})
    assert len([w for w in caught if "W&B" in str(w.message)]) == 1
    assert len(read_lines(tmp_path)) == 3
    assert json.loads((tmp_path / "run.json").read_text())["state"] == "finished"


def test_wandb_offline_run(tmp_path, monkeypatch):
    monkeypatch.delenv("WANDB_MODE", raising=False)
    with ExperimentLogger(tmp_path, {"lr": 0.1}, mode="offline", project="p") as lg:
        lg.log({"loss": 1.0})
        lg.log_image("img", np.ones((4, 4)))
        lg.define_metric("val/*", step_metric="epoch")
        lg.log_summary(best=1.0)
        assert os.environ["WANDB_MODE"] == "offline"
    record = json.loads((tmp_path / "run.json").read_text())
    assert record["state"] == "finished"
    assert record["wandb_path"].endswith(record["run_id"])
    assert list((tmp_path / "wandb").glob(f"offline-run-*-{record['run_id']}"))
    assert record["defined_metrics"]["val/*"]["step_metric"] == "epoch"


def test_resume_continues_steps_and_summary(tmp_path):
    with ExperimentLogger(tmp_path, {}, mode="disabled") as lg:
        lg.log({"loss": 1.0}, step=10)
        lg.log_summary(best=1.0)
        run_id = lg.run_id
    with ExperimentLogger(tmp_path, {}, mode="disabled", run_id=run_id) as lg:
        assert lg.log({"loss": 0.5}) == 11
        assert lg.summary == {"best": 1.0}
    assert [r["_step"] for r in read_lines(tmp_path)] == [10, 11]


def test_sigterm_marks_interrupted(tmp_path):
    script = textwrap.dedent(
        f"""
        import sys, time
        sys.path.insert(0, {str(REPO)!r})
        from experiments.logger import ExperimentLogger
        try:
            with ExperimentLogger({str(tmp_path)!r}, {{}}, mode="disabled") as lg:
                for i in range(10_000):
                    lg.log({{"i": i}})
                    time.sleep(0.01)
        except KeyboardInterrupt:
            sys.exit(143)
        """
    )
    proc = subprocess.Popen([sys.executable, "-c", script])
    deadline = time.time() + 30
    while time.time() < deadline and not (tmp_path / "metrics.jsonl").exists():
        time.sleep(0.1)
    time.sleep(0.5)
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=30) == 143
    record = json.loads((tmp_path / "run.json").read_text())
    assert record["state"] == "interrupted" and record["ended_at"]
    assert len(read_lines(tmp_path)) > 0  # every line complete JSON


def test_corrupt_metrics_line_is_skipped_with_warning(tmp_path):
    (tmp_path / "metrics.jsonl").write_text('{"_step": 0, "a": 1}\n{"_step": 1, "a"\n')
    with pytest.warns(UserWarning, match="metrics.jsonl:2: corrupt line"):
        records = list(runstore.iter_metrics(tmp_path))
    assert records == [{"_step": 0, "a": 1}]


# -- what W&B itself receives (the real client, offline, read back with wandb leet) -----------


def test_a_wandb_failure_closes_the_wandb_run_as_failed(tmp_path, monkeypatch):
    """W&B rejects a value mid-run: the run goes on locally, and W&B's own run is closed at
    once with exit code 1 (it was left open, then closed as finished by the process exit)."""
    from wandb_records import exit_codes, history, transaction_log

    monkeypatch.delenv("WANDB_MODE", raising=False)
    lg = ExperimentLogger(tmp_path, {}, mode="offline", project="p")
    with lg:
        lg.log({"loss": 1.0})
        with pytest.warns(RuntimeWarning, match="W&B log failed"):
            lg.log({"loss": 0.5, "unserialisable": object()})
        lg.log({"loss": 0.25})
    records = transaction_log(tmp_path)
    assert exit_codes(records) == [1]
    assert [row["loss"] for row in history(records)] == [1.0]
    assert [r["loss"] for r in read_lines(tmp_path)] == [1.0, 0.5, 0.25]
    assert "local only" in json.loads((tmp_path / "run.json").read_text())["mode"]


def test_secrets_are_masked_in_the_config_and_the_command_line(tmp_path, monkeypatch):
    from wandb_records import config, transaction_log

    monkeypatch.delenv("WANDB_MODE", raising=False)
    password, key = "hunter2pw", "AKIAxyz123"
    monkeypatch.setattr(sys, "argv", ["prog", f"data.url=postgres://me:{password}@db/x",
                                      f"+aws_secret_access_key={key}"])  # fmt: skip
    cfg = {"data": {"url": f"postgres://me:{password}@db/x"}, "aws_secret_access_key": key,
           "private_key": key, "credentials": key, "prefix_tokens": 4}  # fmt: skip
    with ExperimentLogger(tmp_path, cfg, mode="offline", project="p") as lg:
        lg.log({"loss": 1.0})
    logged = config(transaction_log(tmp_path))
    assert logged["data"]["url"] == "postgres://me:***@db/x" and logged["prefix_tokens"] == 4
    assert logged["aws_secret_access_key"] == logged["private_key"] == "***"
    for path in tmp_path.rglob("*"):  # config.yaml, run.json, W&B's files and metadata
        if path.is_file():
            data = path.read_bytes()
            assert password.encode() not in data and key.encode() not in data, path


def test_the_rank_probe_cost_reaches_both_summaries_and_logging_after_finish_is_refused(
    tmp_path, monkeypatch
):
    from wandb_records import final_summary, transaction_log

    from experiments.logger import RunClosed
    from experiments.rank_probe import ProbeSchedule, RankProbe, hooked_features, input_rank

    monkeypatch.delenv("WANDB_MODE", raising=False)
    net, batch = torch.nn.Sequential(torch.nn.Linear(6, 4)), torch.randn(16, 6)
    probe = RankProbe(hooked_features(net, ["0"], batch), every=1, input_rank=input_rank(batch))
    with ExperimentLogger(tmp_path, {}, mode="offline", project="p") as lg:
        lg.attach_rank_probe(probe)
        ProbeSchedule(probe).log(lg, {"loss": 1.0}, step=1)
    local = json.loads((tmp_path / "summary.json").read_text())
    assert final_summary(transaction_log(tmp_path))["rank_probe_seconds"] == pytest.approx(
        local["rank_probe_seconds"]
    )
    with pytest.raises(RunClosed, match="is closed"):
        lg.log({"loss": 0.5})


def test_an_interrupted_run_resumed_gives_wandb_each_step_once(tmp_path, monkeypatch):
    """Stopped by a signal after step 8, resumed from a checkpoint at step 5: W&B's run (one
    offline folder per launch, the same id) holds steps 1-10 once; the interrupt is W&B's
    exit code 255, as its own Ctrl-C hook records it."""
    from wandb_records import exit_codes, history, transaction_log

    monkeypatch.delenv("WANDB_MODE", raising=False)
    with pytest.raises(KeyboardInterrupt), ExperimentLogger(tmp_path, {}, mode="offline") as lg:
        for step in range(1, 9):
            lg.log({"loss": 1.0 / step}, step=step)
        raise KeyboardInterrupt
    assert json.loads((tmp_path / "run.json").read_text())["state"] == "interrupted"
    with ExperimentLogger(tmp_path, {}, mode="offline", run_id=lg.run_id) as again:
        again.rewind(5)
        for step in range(6, 11):
            again.log({"loss": 1.0 / step}, step=step)
    records = transaction_log(tmp_path)
    assert [row["_step"] for row in history(records)] == list(range(1, 11))
    assert exit_codes(records) == [255, 0]
    assert [r["_step"] for r in read_lines(tmp_path)] == list(range(1, 11))


def test_a_dotted_step_metric_keeps_its_values_in_wandb(tmp_path, monkeypatch):
    """The scaling sweep's per-cell axes (B32_LR0.001000/step): W&B reads an unescaped dot in
    a defined name as nesting, and its history then said step 0 for every row."""
    from wandb_records import history, of_type, transaction_log

    monkeypatch.delenv("WANDB_MODE", raising=False)
    with ExperimentLogger(tmp_path, {}, mode="offline") as lg:
        lg.define_metric("B32_LR0.001000/*", step_metric="B32_LR0.001000/step")
        for i in range(1, 4):
            lg.log({"B32_LR0.001000/step": 256 * i, "B32_LR0.001000/loss": 1.0 / i})
    records = transaction_log(tmp_path)
    assert [row["B32_LR0.001000/step"] for row in history(records)] == [256, 512, 768]
    (metric,) = of_type(records, "metric")
    assert metric["step_metric"] == "B32_LR0\\.001000/step"
    assert metric["glob_name"] == "B32_LR0\\.001000/*"
    local = json.loads((tmp_path / "run.json").read_text())["defined_metrics"]
    assert local == {"B32_LR0.001000/*": {"step_metric": "B32_LR0.001000/step", "summary": None}}


def test_a_logged_table_is_staged_inside_the_run_folder(tmp_path, monkeypatch):
    """W&B refers to a table's staged file from the run's log: it must travel with the run
    folder (it was under ~/.local/share/wandb, lost when the folder is synced elsewhere)."""
    from wandb_records import of_type, transaction_log

    monkeypatch.delenv("WANDB_MODE", raising=False)
    with ExperimentLogger(tmp_path, {}, mode="offline") as lg:
        lg.log_table("captions", ["reference", "generated"], [["a b", "a c"]], step=1)
    (artifact,) = of_type(transaction_log(tmp_path), "artifact")
    staged = [Path(c["local_path"]) for c in artifact["manifest"]["contents"]]
    assert staged and all(tmp_path.resolve() in p.resolve().parents for p in staged)
    assert all(p.is_file() for p in staged)


def test_the_slurm_job_is_in_the_record_and_the_wandb_config(tmp_path, monkeypatch):
    from wandb_records import config, transaction_log

    monkeypatch.delenv("WANDB_MODE", raising=False)
    for var, value in {"SLURM_JOB_ID": "4242", "SLURM_ARRAY_JOB_ID": "4240",
                       "SLURM_ARRAY_TASK_ID": "2", "SLURMD_NODENAME": "node7"}.items():  # fmt: skip
        monkeypatch.setenv(var, value)
    with ExperimentLogger(tmp_path, {"lr": 0.1}, mode="offline") as lg:
        lg.log({"loss": 1.0})
    ids = {"job_id": "4242", "array_job_id": "4240", "array_task_id": "2", "node": "node7"}
    assert json.loads((tmp_path / "run.json").read_text())["slurm"] == ids
    assert config(transaction_log(tmp_path))["slurm"] == ids


def test_a_stop_request_closes_the_record_with_its_reason_even_when_swallowed(tmp_path):
    """request_stop (the SLURM launcher's time-limit warning) raises Interrupted; a library call
    that swallows it (wandb.init catches broadly) cannot lose it: the next log raises again."""
    reason = "SLURM's SIGUSR2: its time limit is near; requeued"
    with pytest.raises(KeyboardInterrupt), ExperimentLogger(tmp_path, {}, mode="disabled") as lg:
        assert ExperimentLogger.active is lg
        lg.log({"x": 1}, step=1)
        with contextlib.suppress(KeyboardInterrupt):  # swallowed on its way up
            lg.request_stop(reason)
        lg.log({"x": 2}, step=2)
    record = json.loads((tmp_path / "run.json").read_text())
    assert record["state"] == "interrupted" and record["reason"] == reason
    assert [r["_step"] for r in read_lines(tmp_path)] == [1]  # step 2 was never recorded
    assert ExperimentLogger.active is None and ExperimentLogger.closed_in_process
    lg.request_stop(reason)  # a closed run: nothing to stop, no exception


def test_a_resumed_run_keeps_its_first_start_and_lists_each_resume(tmp_path):
    with ExperimentLogger(tmp_path, {}, mode="disabled") as lg:
        lg.log({"x": 1}, step=1)
        run_id = lg.run_id
    first = json.loads((tmp_path / "run.json").read_text())["started_at"]
    for _ in range(2):
        with ExperimentLogger(tmp_path, {}, mode="disabled", run_id=run_id) as lg:
            lg.log({"x": 2}, step=2)
    record = json.loads((tmp_path / "run.json").read_text())
    assert record["started_at"] == first and len(record["resumed_at"]) == 2
