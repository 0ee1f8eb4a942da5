"""The local run store: one plain folder per run, written by the shared logger.

Every run folder holds

- ``run.json``      identity and state (W&B id/path/mode, running|finished|failed|interrupted,
                    start/end time, git commit, failure reason)
- ``config.yaml``   the resolved config
- ``metrics.jsonl`` one JSON object per log call: ``{"_step": s, "key": value, ...}``
- ``summary.json``  the run's summary values
- ``media/``        logged images as PNG, ``tables/`` logged tables as JSON

W&B's offline files are an internal format that changes between releases, so this folder is
what analysis reads back when there is no network. This module imports no Hydra and no W&B.
"""

from __future__ import annotations

import json
import math
import os
import tempfile
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

RUN_FILE = "run.json"
CONFIG_FILE = "config.yaml"
METRICS_FILE = "metrics.jsonl"
SUMMARY_FILE = "summary.json"
MEDIA_DIR = "media"
TABLES_DIR = "tables"

RUN_STATES = ("running", "finished", "failed", "interrupted")


def to_jsonable(value: Any) -> Any:
    """Plain JSON types; NaN/Inf become None (JSON has no NaN), tensors/arrays become lists."""
    if value is None or isinstance(value, (bool, str)):
        return value
    if isinstance(value, int):
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {str(k): to_jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [to_jsonable(v) for v in value]
    if isinstance(value, Path):
        return str(value)
    if hasattr(value, "tolist"):  # numpy / torch scalars and arrays
        return to_jsonable(value.tolist())
    return str(value)


@contextmanager
def atomic_path(path: str | os.PathLike[str]) -> Iterator[Path]:
    """Yield a temp path in ``path``'s folder; on success rename it over ``path``.

    Readers never see half a file, and a failed or interrupted write leaves nothing behind.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        yield Path(tmp)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def save_figure(fig: Any, path: str | os.PathLike[str], dpi: int = 120) -> Path:
    """Save a matplotlib Figure atomically, in the format its suffix names (png by default)."""
    path = Path(path)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format=path.suffix.lstrip(".").lower() or "png", dpi=dpi,
                    bbox_inches="tight")  # fmt: skip
    return path


def write_text_atomic(path: Path, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text)


def write_json_atomic(path: Path, data: Any) -> None:
    write_text_atomic(path, json.dumps(to_jsonable(data), indent=2) + "\n")


class JsonlWriter:
    """Appends one JSON object per line and flushes it, so a killed job loses at most one line."""

    def __init__(self, path: Path):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._file = open(self.path, "a", buffering=1)  # noqa: SIM115 - kept open for the run

    def write(self, record: dict[str, Any]) -> None:
        self._file.write(json.dumps(to_jsonable(record)) + "\n")
        self._file.flush()

    def close(self) -> None:
        if not self._file.closed:
            self._file.flush()
            os.fsync(self._file.fileno())
            self._file.close()


def read_json(path: Path) -> dict[str, Any]:
    with open(path) as f:
        return json.load(f)


def iter_metrics(run_dir: Path) -> Iterator[dict[str, Any]]:
    """The records of ``metrics.jsonl``; a corrupt line is skipped with a warning naming it."""
    path = Path(run_dir) / METRICS_FILE
    if not path.exists():
        return
    with open(path) as f:
        for lineno, line in enumerate(f, 1):
            line = line.strip()
            if not line:
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                warnings.warn(f"{path}:{lineno}: corrupt line skipped", stacklevel=2)
                continue
            if isinstance(record, dict):
                yield record
            else:
                warnings.warn(f"{path}:{lineno}: not a JSON object, skipped", stacklevel=2)


def read_metrics(run_dir: Path, keys: list[str] | None = None):
    """``metrics.jsonl`` as a pandas DataFrame (one row per log call, ``_step`` first).

    pandas' C JSON reader does the work; a file it rejects (a corrupt line from a killed job)
    is read line by line instead, skipping the bad lines with a warning naming each.
    """
    import pandas as pd

    path = Path(run_dir) / METRICS_FILE
    frame = None
    if keys is None and path.exists():
        try:
            frame = pd.read_json(path, lines=True, dtype=False)
        except (ValueError, TypeError):
            frame = None  # corrupt or non-object lines: the careful reader names them
    if frame is None:
        records = list(iter_metrics(run_dir))
        if keys is not None:
            records = [
                {k: r[k] for k in ("_step", *keys) if k in r}
                for r in records
                if any(k in r for k in keys)
            ]
        frame = pd.DataFrame.from_records(records)
    if "_step" in frame.columns:
        frame = frame[["_step", *[c for c in frame.columns if c != "_step"]]]
    return frame


def find_runs(root: Path) -> list[Path]:
    """Every run folder (a folder holding ``run.json``) below ``root``, oldest first."""
    root = Path(root)
    runs = [p.parent for p in root.rglob(RUN_FILE)]
    return sorted(runs, key=lambda p: (p.stat().st_mtime, str(p)))
