"""The outcome of a sweep, read from its job folders: which jobs there are, and which of them
did not finish. Plain functions over the run store (no Hydra), used by the sweep callbacks
(``experiments/callbacks.py``) at the end of a multirun.
"""

from __future__ import annotations

from pathlib import Path

from common import runstore
from common.runstore import RUN_FILE


def job_records(sweep_dir: Path) -> dict[Path, float | None]:
    """The job folders at any depth below ``sweep_dir`` (those Hydra started, with ``.hydra``,
    or the logger recorded), each with its run record's modification time (None: none)."""
    if not sweep_dir.is_dir():
        return {}
    found = {p.parent for p in sweep_dir.rglob(".hydra") if p.is_dir()}
    found |= {p.parent for p in sweep_dir.rglob(RUN_FILE) if p.is_file()}
    records = {}
    for job in sorted(found - {sweep_dir}):
        try:
            records[job] = (job / RUN_FILE).stat().st_mtime
        except OSError:
            records[job] = None
    return records


def unfinished_jobs(jobs: list[Path]) -> dict[Path, str]:
    """Job folder -> state, for each job whose run record does not say finished: failed,
    interrupted, killed (its process died with the record open), or no readable record."""
    out = {}
    for job in jobs:
        try:
            state = runstore.run_state(job)
        except FileNotFoundError:
            state = "no run record"
        except (OSError, ValueError, AttributeError):
            state = "unreadable run record"
        if state != "finished":
            out[job] = state
    return out
