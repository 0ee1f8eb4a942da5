"""A real offline run of each experiment, read back with W&B's own reader: the metric names,
steps, axes, config, summary and media W&B receives agree with the local run record, key for
key. The real wandb client runs (offline); nothing here is a double."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from entrypoint import run_script
from wandb_records import config, final_summary, history, of_type, transaction_log

from common import runstore

REPO = Path(__file__).resolve().parents[1]
EXPERIMENTS = {
    # the README's quick look of the multimodal trainer: one step, yet scalars and images
    "multimodal": ["train.epochs=1", "data.num_train=64", "data.num_val=32"],
    "rank_sweep": ["rank=4", "weight.out_features=32", "weight.in_features=64",
                   "train.num_epochs=4", "train.steps_per_epoch=5", "rank_probe.every=2"],
    "laplace_scaling": ["runner=grid", "task.n_features=8", "task.n_train=256",
                        "task.n_val=128", "train.epochs=2", "grid.batch_sizes=[8,64]",
                        "grid.lrs=[1.0e-3,1.0e-2]", "grid.seeds=[0]"],
}  # fmt: skip


def run_offline(name: str, tmp_path: Path) -> Path:
    out = tmp_path / name
    proc = run_script(REPO / "experiments" / f"{name}.py",
                      [*EXPERIMENTS[name], f"hydra.run.dir={out}"], tmp_path,
                      timeout=600, WANDB_MODE="offline", OMP_NUM_THREADS="1")  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out


def has_key(row: dict, key: str) -> bool:
    """W&B's reader joins a logged object's fields with dots (image.path, table.nrows)."""
    return key in row or any(k.startswith(f"{key}.") for k in row)


@pytest.mark.slow  # a real run of each experiment; CI runs it (make test-slow)
@pytest.mark.parametrize("name", list(EXPERIMENTS))
def test_wandb_receives_what_the_local_record_holds(name, tmp_path):
    out = run_offline(name, tmp_path)
    records = transaction_log(out)
    rows = {row["_step"]: row for row in history(records)}
    local: dict[int, dict] = {}
    for record in runstore.iter_metrics(out):
        local.setdefault(record["_step"], {}).update(record)
    assert sorted(rows) == sorted(local), "the same steps"
    for step, values in local.items():
        missing = [k for k in values if k != "_step" and not has_key(rows[step], k)]
        assert not missing, f"step {step}: {missing} are local only"
        for key, value in values.items():
            if (
                isinstance(value, (int, float))
                and not isinstance(value, bool)
                and key in rows[step]
            ):
                assert rows[step][key] == pytest.approx(value, nan_ok=True), (step, key)
    summary = final_summary(records)
    for key, value in runstore.read_json(out / "summary.json").items():
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            assert summary[key] == pytest.approx(value, nan_ok=True), key
    logged_config = config(records)
    for key, value in yaml.safe_load((out / "config.yaml").read_text()).items():
        assert logged_config.get(key) == value, f"config {key}"
    probe = runstore.read_json(out / "run.json").get("rank_probe")
    if probe is not None:  # the probe's layer order reaches W&B too (a W&B run has no run.json)
        assert probe["layers"] and logged_config["rank_probe_layers"] == probe["layers"]
    assert [e.get("exit_code", 0) for e in of_type(records, "exit")] == [0]
    axes = {m.get("glob_name") or m.get("name"): m.get("step_metric")
            for m in of_type(records, "metric")}  # fmt: skip
    defined = runstore.read_json(out / "run.json")["defined_metrics"]
    for metric, spec in defined.items():  # every declared x axis reached W&B, dots escaped
        escape = lambda key: key.replace(".", "\\.")  # noqa: E731
        assert axes[escape(metric)] == escape(spec["step_metric"]), metric
    if name == "multimodal":  # the quick look logs per-batch scalars and images
        assert any("grad_norm" in row and "total_loss" in row for row in rows.values())
        assert any(has_key(row, "reconstruction") for row in rows.values())
        assert any(has_key(row, "sample_captions") for row in rows.values())


@pytest.mark.slow
def test_the_scaling_studys_four_dashboard_views_can_be_built(tmp_path):
    """The phase-2 dashboard views, from what W&B holds: (1) a cell's curves against its own step,
    (2) final loss by batch size coloured by lr, (3) the loss table, (4) all curves by group."""
    records = transaction_log(run_offline("laplace_scaling", tmp_path))
    rows = history(records)
    cells = {"B8_LR0.001000", "B8_LR0.010000", "B64_LR0.001000", "B64_LR0.010000"}
    axes = {m["glob_name"]: m["step_metric"] for m in of_type(records, "metric")}
    for cell in cells:  # (1): each cell's axis, escaped so W&B does not nest on the dot
        escaped = cell.replace(".", "\\.")
        assert axes[f"{escaped}/*"] == f"{escaped}/step"
        steps = [r[f"{cell}/step"] for r in rows if f"{cell}/val_loss" in r]
        assert steps and steps == sorted(steps) and steps[0] > 0
    # (2) and (3): one row per cell with its batch size, lr and final loss
    finals = [r for r in rows if "summary/final_val_loss" in r]
    assert {(r["summary/batch_size"], r["summary/lr"]) for r in finals} == {
        (8, 1e-3), (8, 1e-2), (64, 1e-3), (64, 1e-2)
    }  # fmt: skip
    # (4): every flat val_loss row names its cell's batch size, lr and step
    flat = [r for r in rows if "val_loss" in r]
    assert flat and all({"batch_size", "lr", "step"} <= set(r) for r in flat)
    assert {(r["batch_size"], r["lr"]) for r in flat} == {
        (r["summary/batch_size"], r["summary/lr"]) for r in finals
    }
