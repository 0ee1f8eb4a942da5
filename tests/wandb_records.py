"""What W&B itself received: a run's transaction log read back with W&B's own reader
(``wandb leet inspect --json``), so tests check the real client, not a double."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

WANDB_CLI = str(Path(sys.executable).with_name("wandb"))


def transaction_log(run_dir: Path) -> list[dict]:
    """Every record of every offline W&B run folder under ``run_dir`` (a resumed run has one
    folder per launch), in the order written."""
    files = sorted(Path(run_dir).glob("wandb/offline-run-*/run-*.wandb"))
    assert files, f"no W&B offline run under {run_dir}"
    records: list[dict] = []
    for path in files:
        out = subprocess.run([WANDB_CLI, "leet", "inspect", "--json", str(path)],
                             capture_output=True, text=True, timeout=120, check=True)  # fmt: skip
        records += [json.loads(line) for line in out.stdout.splitlines() if line.startswith("{")]
    return records


def of_type(records: list[dict], kind: str) -> list[dict]:
    return [r[kind] for r in records if r.get("type") == kind]


def history(records: list[dict]) -> list[dict]:
    """The history rows, each with its ``_step``."""
    return [h["item"] for h in of_type(records, "history")]


def final_summary(records: list[dict]) -> dict:
    summary: dict = {}
    for update in of_type(records, "summary"):
        summary.update(update.get("update", {}))
    return summary


def config(records: list[dict]) -> dict:
    merged: dict = {}
    for run in of_type(records, "run"):
        merged.update(run.get("config", {}).get("update", {}))
    for cfg in of_type(records, "config"):
        merged.update(cfg.get("update", {}))
    return merged


def exit_codes(records: list[dict]) -> list[int]:
    return [e.get("exit_code", 0) for e in of_type(records, "exit")]
