"""The assembly of a scaling sweep's ``results.csv`` from a multirun folder (its file names,
columns and writer belong to the jobs that write them: ``experiments/scaling_records.py``).

    python analysis/scaling_results.py multirun/laplace_scaling/<time>

Each job of a multirun writes ``cell.json`` (one row) into its folder, or with ``runner=grid``
its own ``results.csv`` (its grid's rows); this gathers them into ``results.csv`` in the sweep
folder, in grid order. A job that failed before writing its rows still gets one (from its
``config.yaml``), with its status (``failed``; ``killed`` when its process died with the run
record open) and its reason; so does a job whose ``cell.json`` or ``results.csv`` cannot be
read (``failed``, "unreadable cell.json: <path>", one warning). Exits 1 when a job did not
finish (a diverged cell is a result, not a failure).
"""

from __future__ import annotations

import csv
import json
import os
import sys
import warnings
from pathlib import Path

if __package__ in (None, ""):  # run as a plain script: make the repo importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import pandas as pd
import yaml

from common.cli import ArgumentParser, UserError, run_cli
from common.runstore import (
    CONFIG_FILE,
    KILLED,
    RUN_FILE,
    killed_reason,
    run_state,
)
from experiments.scaling_records import CELL_FILE, RESULTS_FILE, write_results

LINE = "_line"  # a row's line in the file it was read from, for messages
FIELDS = "_fields"  # how many fields the row had (a short one: a file cut mid-row)


def read_csv_text(path: str | os.PathLike[str]) -> pd.DataFrame:
    """Every record of a CSV file as text, with its line number (``_line``) and its field
    count (``_fields``: fewer than the header's is a row cut short, whose missing fields are
    None, which pandas would read as NaN without a word). Blank lines are skipped. Raises
    UserError for an empty file, one that is not UTF-8 text or CSV, or a header naming a
    column twice; OSError as it comes."""
    path = Path(path)
    records, lines = [], []
    try:
        with open(path, newline="", encoding="utf-8-sig") as f:
            reader = csv.reader(f)
            header = [h.strip() for h in next(reader, [])]
            for fields in reader:
                if fields:
                    records.append(fields)
                    lines.append(reader.line_num)
    except UnicodeDecodeError:
        raise UserError(f"{path} is not a readable CSV (not UTF-8 text)") from None
    except csv.Error as exc:
        raise UserError(f"{path} is not a readable CSV ({exc})") from None
    if not any(header):
        raise UserError(f"{path} is empty")
    repeated = sorted({h for h in header if header.count(h) > 1})
    if repeated:
        raise UserError(f"{path}: the header names {', '.join(repeated)} more than once")
    width = len(header)
    frame = pd.DataFrame([(r + [None] * width)[:width] for r in records], columns=header,
                         dtype=object)  # fmt: skip
    frame[LINE] = lines
    frame[FIELDS] = [len(r) for r in records]
    return frame


# A diverged cell is a result; any other status (failed, killed, ...) did not finish.
DONE_STATUSES = ("finished", "diverged")


def _read_config(job: Path) -> tuple[dict, str | None]:
    """(config, None), or ({}, why) when config.yaml is missing or unreadable."""
    path = job / CONFIG_FILE
    try:
        cfg = yaml.safe_load(path.read_text())
    except FileNotFoundError:
        return {}, None
    except (OSError, yaml.YAMLError, UnicodeDecodeError):
        cfg = None
    return (cfg, None) if isinstance(cfg, dict) else ({}, f"unreadable {CONFIG_FILE}: {path}")


def _job_status(job: Path) -> tuple[str, str]:
    """(status, reason) of a job that left no rows, from its run record as it is now: a record
    left "running" by a process that is gone reads "killed" (``runstore.run_state``)."""
    path = job / RUN_FILE
    if not path.exists():
        return "failed", "the job wrote no result (and no run record)"
    try:
        record = json.loads(path.read_text())
        state = run_state(job, record)
    except (OSError, ValueError, AttributeError):
        return "failed", f"unreadable {RUN_FILE}: {path}"
    if state == KILLED:
        return state, killed_reason(record)
    if state == "running":
        return state, "still running: no result yet"
    if state == "finished":  # finished, yet no cell.json
        return "failed", "the job wrote no result"
    return state, record.get("reason") or "the job wrote no result"


def _failed_row(job: Path, problem: str | None = None) -> dict:
    """The row of a job without a result: its cell from config.yaml, with status and reason
    from its run record, or "failed" and ``problem`` (an unreadable result file)."""
    cfg, cfg_problem = _read_config(job)
    status, why = ("failed", problem) if problem else _job_status(job)
    batch, lr = cfg.get("batch_size"), cfg.get("lr")
    numbers = isinstance(batch, int) and isinstance(lr, (int, float))
    return {
        "cell": f"B{batch}_LR{lr:.6f}" if numbers else job.name,  # the sweep's cell names
        "batch_size": cfg.get("batch_size"),
        "lr": cfg.get("lr"),
        "seed": cfg.get("seed"),
        "noise": (cfg.get("task") or {}).get("noise"),
        "optimizer": (cfg.get("optim") or {}).get("name"),
        "model": (cfg.get("model") or {}).get("kind"),
        "protocol": (cfg.get("train") or {}).get("protocol"),
        "converged": False,
        "diverged": False,
        "status": status,
        "reason": "; ".join(r for r in (why, cfg_problem) if r),
    }


def _cell_row(path: Path) -> dict:
    """A cell job's one row; UserError naming the file when it is not a JSON object."""
    try:
        row = json.loads(path.read_text())
    except (ValueError, UnicodeDecodeError):
        row = None
    if not isinstance(row, dict):
        raise UserError(f"unreadable {CELL_FILE}: {path}")
    return row


def _grid_rows(path: Path) -> list[dict]:
    """A runner=grid job's rows; UserError naming the file when it is cut short or not CSV."""
    text = read_csv_text(path)
    width = len(text.columns) - 2
    if len(text) == 0:
        raise UserError(f"{path} holds no rows")
    if (text[FIELDS] != width).any():
        raise UserError(f"unreadable {RESULTS_FILE}: {path} (a row cut short)")
    return pd.read_csv(path).to_dict("records")


def _job_rows(job: Path) -> list[dict]:
    """A job folder's rows: its cell.json, a grid job's results.csv, or a failed row (also when
    that file is unreadable: one warning naming it, and the assembly goes on)."""
    try:
        if (job / CELL_FILE).exists():
            return [_cell_row(job / CELL_FILE)]
        if (job / RESULTS_FILE).exists():  # a runner=grid job: its whole grid
            return _grid_rows(job / RESULTS_FILE)
    except UserError as exc:
        warnings.warn(f"{exc}: the job counts as failed", stacklevel=2)
        return [_failed_row(job, problem=str(exc))]
    except OSError as exc:
        reason = f"unreadable result: {exc.filename or job}: {exc.strerror or exc}"
        warnings.warn(f"{reason}: the job counts as failed", stacklevel=2)
        return [_failed_row(job, problem=reason)]
    return [_failed_row(job)] if (job / CONFIG_FILE).exists() else []


def assemble_results(sweep_dir: str | Path) -> Path:
    """Gather every job's ``cell.json`` (or a grid job's ``results.csv``) under ``sweep_dir`` into
    ``sweep_dir/results.csv``; a job without readable rows is a failed row with its reason."""
    sweep_dir = Path(sweep_dir)
    if not sweep_dir.exists():
        raise UserError(f"sweep folder {sweep_dir} does not exist")
    if not sweep_dir.is_dir():
        raise UserError(f"sweep folder {sweep_dir} is a file, not a folder")
    rows = [row for job in sorted(p for p in sweep_dir.iterdir() if p.is_dir())
            for row in _job_rows(job)]  # fmt: skip
    if not rows:
        raise UserError(f"no scaling-sweep jobs (folders with {CELL_FILE}) in {sweep_dir}")
    return write_results(pd.DataFrame(rows), sweep_dir / RESULTS_FILE)


def main(argv: list[str] | None = None) -> int:
    parser = ArgumentParser(description="Assemble results.csv from a scaling-sweep multirun.")
    parser.add_argument("sweep_dir", type=Path, help="the multirun folder (hydra.sweep.dir)")
    args = parser.parse_args(argv)
    path = assemble_results(args.sweep_dir)
    frame = pd.read_csv(path)
    undone = frame[~frame["status"].isin(DONE_STATUSES)]
    print(f"wrote {path}: {len(frame)} rows, {len(undone)} not finished")
    for _, row in undone.iterrows():
        print(
            f"  {row['cell'] if pd.notna(row['cell']) else 'a job'}: {row['status']} ({row['reason']})"
        )
    return 1 if len(undone) else 0  # results.csv is written; the exit code says it is incomplete


if __name__ == "__main__":
    run_cli(main)
