"""``results.csv`` of a scaling sweep: its columns, and its assembly from a multirun folder.

    python analysis/scaling_results.py multirun/laplace_scaling/<time>

Each job of a multirun writes ``cell.json`` (one row) into its folder, or with ``runner=grid``
its own ``results.csv`` (its grid's rows); this gathers them into ``results.csv`` in the sweep
folder, in grid order. A job that failed before writing its rows still gets one (from its
``config.yaml``), with status ``failed`` and its reason.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

if __package__ in (None, ""):  # run as a plain script: make the repo importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import pandas as pd
import yaml

from analysis.cli import ArgumentParser, UserError, run_cli
from experiments.runstore import CONFIG_FILE, RUN_FILE, atomic_path

CELL_FILE = "cell.json"
RESULTS_FILE = "results.csv"
RESULT_COLUMNS = [
    "cell",
    "experiment_num",
    "batch_size",
    "lr",
    "seed",
    "noise",
    "optimizer",
    "model",
    "protocol",
    "final_train_loss",
    "final_val_loss",
    "min_val_loss",
    "initial_val_loss",
    "converged",
    "diverged",
    "steps",
    "epochs",
    "wall_time_s",
    "status",
    "reason",
]
SORT_KEYS = ["noise", "seed", "batch_size", "lr"]


def sort_results(frame: pd.DataFrame) -> pd.DataFrame:
    frame = frame.reindex(columns=RESULT_COLUMNS)
    return frame.sort_values(SORT_KEYS, kind="stable").reset_index(drop=True)


def write_results(frame: pd.DataFrame, path: Path) -> Path:
    with atomic_path(path) as tmp:
        sort_results(frame).to_csv(tmp, index=False)
    return path


def _failed_row(job: Path) -> dict:
    cfg = yaml.safe_load((job / CONFIG_FILE).read_text()) or {}
    run = json.loads((job / RUN_FILE).read_text()) if (job / RUN_FILE).exists() else {}
    return {
        "batch_size": cfg.get("batch_size"),
        "lr": cfg.get("lr"),
        "seed": cfg.get("seed"),
        "noise": (cfg.get("task") or {}).get("noise"),
        "optimizer": (cfg.get("optim") or {}).get("name"),
        "model": (cfg.get("model") or {}).get("kind"),
        "protocol": (cfg.get("train") or {}).get("protocol"),
        "converged": False,
        "diverged": False,
        "status": run.get("state", "failed") if run.get("state") != "finished" else "failed",
        "reason": run.get("reason") or "the job wrote no result",
    }


def assemble_results(sweep_dir: str | Path) -> Path:
    """Gather every job's ``cell.json`` (or a grid job's ``results.csv``) under ``sweep_dir`` into
    ``sweep_dir/results.csv``."""
    sweep_dir = Path(sweep_dir)
    if not sweep_dir.is_dir():
        raise UserError(f"sweep folder {sweep_dir} does not exist")
    rows = []
    for job in sorted(p for p in sweep_dir.iterdir() if p.is_dir()):
        if (job / CELL_FILE).exists():
            rows.append(json.loads((job / CELL_FILE).read_text()))
        elif (job / RESULTS_FILE).exists():  # a runner=grid job: its whole grid
            rows.extend(pd.read_csv(job / RESULTS_FILE).to_dict("records"))
        elif (job / CONFIG_FILE).exists():
            rows.append(_failed_row(job))
    if not rows:
        raise UserError(f"no scaling-sweep jobs (folders with {CELL_FILE}) in {sweep_dir}")
    return write_results(pd.DataFrame(rows), sweep_dir / RESULTS_FILE)


def main(argv: list[str] | None = None) -> int:
    parser = ArgumentParser(description="Assemble results.csv from a scaling-sweep multirun.")
    parser.add_argument("sweep_dir", type=Path, help="the multirun folder (hydra.sweep.dir)")
    args = parser.parse_args(argv)
    path = assemble_results(args.sweep_dir)
    frame = pd.read_csv(path)
    failed = int((frame["status"] != "finished").sum())
    print(f"wrote {path}: {len(frame)} rows, {failed} not finished")
    return 0


if __name__ == "__main__":
    run_cli(main)
