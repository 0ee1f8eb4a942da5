"""The scaling sweep's result files, which its jobs write: each cell job's ``cell.json`` (one
row), a ``runner=grid`` job's ``results.csv`` (its grid's rows), their columns and the writer of
``results.csv`` (sorted in grid order, written atomically).

The sweep's assembly and the fit (``analysis/scaling_results.py``, ``analysis/scaling_fit.py``)
read these files and import the names from here, so the format has one owner.
"""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from common.runstore import atomic_path

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


def _sort_key(column: pd.Series) -> pd.Series:
    # numbers as numbers (a stray text value must not make sorting raise), noise as text
    return column.astype(str) if column.name == "noise" else pd.to_numeric(column, errors="coerce")


def sort_results(frame: pd.DataFrame) -> pd.DataFrame:
    frame = frame.reindex(columns=RESULT_COLUMNS)
    return frame.sort_values(SORT_KEYS, kind="stable", key=_sort_key).reset_index(drop=True)


def write_results(frame: pd.DataFrame, path: Path) -> Path:
    try:
        with atomic_path(path) as tmp:
            sort_results(frame).to_csv(tmp, index=False)
    except OSError as exc:  # a failed write() names no file: say which
        raise OSError(exc.errno, exc.strerror or str(exc), str(path)) from exc
    return path
