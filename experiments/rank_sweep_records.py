"""The rank sweep's loss-curve files, which each job writes beside its run record: their names,
their columns and their writer (``LossCurves``, driven by ``experiments/chain_training.py``).

The readers (``analysis/rank_sweep_report.py``) import the names and columns from here, so the
format has one owner. Kept apart from the training loop so that reading them needs no torch,
Hydra or model code.
"""

from __future__ import annotations

import csv
from pathlib import Path
from typing import Any

from common import runstore

CURVES_CSV = "loss_curves.csv"
CURVES_JSON = "loss_curves.json"
CURVE_COLUMNS = ["epoch", "train_loss", "val_loss", "rank", "floor", "loss_over_floor"]


class LossCurves:
    """``loss_curves.csv`` (appended and flushed per epoch) and ``loss_curves.json``."""

    def __init__(self, run_dir: Path, rank: int, floor: float):
        self.csv_path = run_dir / CURVES_CSV
        self.json_path = run_dir / CURVES_JSON
        self.rank, self.floor = rank, floor
        self.restore([])

    def restore(self, rows: list[dict[str, Any]]) -> None:
        """Start the files over holding ``rows`` (a resumed run's epochs up to its checkpoint)."""
        self.rows = list(rows)
        with open(self.csv_path, "w", newline="") as f:
            writer = csv.writer(f)
            writer.writerow(CURVE_COLUMNS)
            writer.writerows([row[c] for c in CURVE_COLUMNS] for row in self.rows)
        if self.rows:
            runstore.write_json_atomic(
                self.json_path, {"rank": self.rank, "floor": self.floor, "curves": self.rows}
            )

    def append(self, row: dict[str, Any]) -> None:
        self.rows.append(row)
        with open(self.csv_path, "a", newline="") as f:
            csv.writer(f).writerow([row[c] for c in CURVE_COLUMNS])
        runstore.write_json_atomic(
            self.json_path, {"rank": self.rank, "floor": self.floor, "curves": self.rows}
        )
