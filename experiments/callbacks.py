"""Hydra callbacks: thin callers of plain functions that also run by hand.

Hydra 1.3 turns exceptions inside callbacks into warnings and passes no job results, so all
the work lives in :mod:`analysis.rank_sweep_report`, which reads the sweep folder.
"""

from __future__ import annotations

import logging
import sys
import time
from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback
from omegaconf import DictConfig

from experiments import runstore
from experiments.runstore import RUN_FILE

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
        SweepOutcome.before = _job_records(Path(config.hydra.sweep.dir))
        SweepOutcome.started = time.time()
        SweepOutcome.ended_by_cluster = {}

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        check_sweep(config.hydra.sweep.dir)


def check_sweep(sweep_dir: str) -> None:
    """Print this launch's jobs that did not finish; mark the sweep incomplete if any."""
    jobs, refused = [], {}
    for job, stamp in _job_records(Path(sweep_dir)).items():
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


def _job_records(sweep_dir: Path) -> dict[Path, float | None]:
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


def _hydra_started(job: Path, since: float) -> bool:
    """Whether Hydra wrote this job's own files during this launch."""
    try:
        return (job / ".hydra" / "overrides.yaml").stat().st_mtime >= since
    except OSError:
        return False


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


def exit_if_incomplete() -> None:
    """After ``main()``: exit 1 when the sweep just run had jobs that did not finish (each
    sweep's report, written above, says which)."""
    if SweepOutcome.incomplete:
        sys.exit(1)


class RankSweepReport(SweepOutcome):
    """At the end of a rank-sweep multirun, write the summary table and the plots, then say
    which jobs did not finish."""

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        from analysis.rank_sweep_report import collect_summary, format_summary_table, write_report

        sweep_dir = config.hydra.sweep.dir
        prefix, log_scale = config.report.save_prefix, config.report.log_scale
        summary = collect_summary(sweep_dir)
        if summary.empty:  # every job skipped (max_rank): nothing failed
            print(f"no job ran (every rank above max_rank?): nothing to report in {sweep_dir}")
            return
        try:
            paths = write_report(sweep_dir, prefix, log_scale, summary)
        except Exception as exc:  # a report failure must not hide the jobs' own results
            SweepOutcome.incomplete = True
            log.error(
                "rank-sweep report failed: %s (re-run: python analysis/"
                "plot_rank_results.py --results_dir %s)",
                exc,
                sweep_dir,
            )
            return
        print(format_summary_table(summary))
        for name, path in paths.items():
            print(f"{name}: {path}")
        check_sweep(sweep_dir)


class ScalingResults(SweepOutcome):
    """At the end of a scaling multirun, assemble results.csv from the jobs' cell.json, then
    say which jobs did not finish (a diverged cell is a result, not a failure)."""

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        from analysis.scaling_results import assemble_results

        sweep_dir = config.hydra.sweep.dir
        try:
            path = assemble_results(sweep_dir)
        except Exception as exc:
            SweepOutcome.incomplete = True
            log.error(
                "results assembly failed: %s (re-run: python analysis/scaling_results.py %s)",
                exc,
                sweep_dir,
            )
            return
        print(f"results: {path}")
        print(f"analyse: python analysis/scaling_analysis.py --results {path}")
        check_sweep(sweep_dir)
