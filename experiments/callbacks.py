"""Hydra callbacks: thin callers of plain functions that also run by hand.

Hydra 1.3 turns exceptions inside callbacks into warnings and passes no job results, so the work
lives in plain functions that read the sweep folder (:mod:`common.sweep_outcome`). The sweeps'
report callbacks, which call the analysis, are in :mod:`analysis.sweep_reports` (named by their
``_target_`` in conf/, so no experiment imports the analysis).
"""

from __future__ import annotations

import logging
import sys
import time
from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback
from omegaconf import DictConfig

from common import runstore
from common.sweep_outcome import job_records, unfinished_jobs

log = logging.getLogger(__name__)


class ClaimOutputFolder(Callback):
    """Before Hydra writes anything: a single run takes its run folder (refused while another
    process writes it, or when it holds another run and this is no resume), a multirun its
    sweep folder (two launches into one sweep folder would share job folders). A folder that
    cannot be made is one line too. Listed first among the callbacks."""

    def on_run_start(self, config: DictConfig, **kwargs: Any) -> None:
        run_dir = Path(str(config.hydra.run.dir))
        _claim(lambda: runstore.claim_run_folder(run_dir, bool(config.get("resume"))), run_dir)

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        sweep_dir = Path(str(config.hydra.sweep.dir))
        _claim(lambda: runstore.RunLock(sweep_dir).acquire(), sweep_dir)

    def on_run_end(self, config: DictConfig, **kwargs: Any) -> None:
        runstore.release_all_locks()

    on_multirun_end = on_run_end


def _claim(claim, folder: Path) -> None:
    try:
        claim()
    except runstore.RunFolderInUse as exc:
        _refuse(str(exc))
    except OSError as exc:
        _refuse(f"cannot use {folder} as an output folder: {exc.strerror} ({exc.filename})")


def _refuse(message: str) -> None:
    print(f"error: {message}", file=sys.stderr)
    sys.exit(2)


class SweepOutcome(Callback):
    """At the end of any multirun, say which of its jobs did not finish (from their run records,
    so it works with every launcher).

    ``incomplete`` tells the entry point, once the sweep is over, whether any job did not finish
    (or a report could not be written), so that it can exit non-zero."""

    incomplete = False
    # the job folders already in the sweep folder at the start (a reused hydra.sweep.dir), with
    # their run records' times: those left as they were belong to earlier launches
    before: dict[Path, float | None] = {}
    started = 0.0
    # job folder -> (the cluster's word for how it ended the job, the job's log), filled by a
    # launcher whose jobs the cluster can end (hydra_plugins/ks_slurm_launcher/slurm_launcher.py)
    ended_by_cluster: dict[Path, tuple[str, Path]] = {}

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        SweepOutcome.before = job_records(Path(config.hydra.sweep.dir))
        SweepOutcome.started = time.time()
        SweepOutcome.ended_by_cluster = {}

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        check_sweep(config.hydra.sweep.dir)


def check_sweep(sweep_dir: str) -> None:
    """Print this launch's jobs that did not finish; mark the sweep incomplete if any."""
    jobs, refused = [], {}
    for job, stamp in job_records(Path(sweep_dir)).items():
        if SweepOutcome.before.get(job, "new") != stamp:
            jobs.append(job)
        elif _hydra_started(job, SweepOutcome.started):  # but its folder held an earlier run
            refused[job] = "not run: its folder holds an earlier launch's run"
    unfinished = {**unfinished_jobs(jobs), **refused}
    jobs += list(refused)
    for job, (slurm_state, job_log) in SweepOutcome.ended_by_cluster.items():
        if job not in jobs:  # ended before Hydra made its folder
            jobs.append(job)
            unfinished[job] = f"no run record, SLURM: {slurm_state}"
        if job in unfinished:  # (a job may finish its record and be ended on its way out)
            unfinished[job] += f"; log {job_log}"
    if unfinished:
        SweepOutcome.incomplete = True
        root = Path(sweep_dir)
        names = ", ".join(f"{job.relative_to(root)} ({state})" for job, state in unfinished.items())
        print(f"{len(unfinished)} of {len(jobs)} jobs did not finish: {names}")


def _hydra_started(job: Path, since: float) -> bool:
    """Whether Hydra wrote this job's own files during this launch."""
    try:
        return (job / ".hydra" / "overrides.yaml").stat().st_mtime >= since
    except OSError:
        return False


def exit_if_incomplete() -> None:
    """After ``main()``: exit 1 when the sweep just run had jobs that did not finish (each
    sweep's report, written above, says which)."""
    if SweepOutcome.incomplete:
        sys.exit(1)
