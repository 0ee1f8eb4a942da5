"""Hydra callbacks: thin callers of plain functions that also run by hand.

Hydra 1.3 turns exceptions inside callbacks into warnings and passes no job results, so all
the work lives in :mod:`analysis.rank_sweep_report`, which reads the sweep folder.
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback
from omegaconf import DictConfig

from experiments.runstore import RUN_FILE, read_json

log = logging.getLogger(__name__)


class SweepOutcome(Callback):
    """At the end of any multirun, say which jobs did not finish (from their run records, so it
    works with every launcher).

    ``incomplete`` tells the entry point, once the sweep is over, whether any job did not finish
    (or a report could not be written), so that it can exit non-zero."""

    incomplete = False

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        check_sweep(config.hydra.sweep.dir)


def check_sweep(sweep_dir: str) -> None:
    """Print the jobs of a finished sweep that did not finish; mark the sweep incomplete."""
    unfinished = unfinished_jobs(Path(sweep_dir))
    if unfinished:
        SweepOutcome.incomplete = True
        jobs = ", ".join(f"{name} ({state})" for name, state in unfinished.items())
        total = len(_job_dirs(Path(sweep_dir)))
        print(f"{len(unfinished)} of {total} jobs did not finish: {jobs}")


def _job_dirs(sweep_dir: Path) -> list[Path]:
    """The sweep's job folders: those Hydra started (``.hydra``) or the logger recorded."""
    if not sweep_dir.is_dir():
        return []
    return sorted(
        p for p in sweep_dir.iterdir() if (p / ".hydra").is_dir() or (p / RUN_FILE).is_file()
    )


def unfinished_jobs(sweep_dir: Path) -> dict[str, str]:
    """Job folder name -> state, for each job whose run record does not say finished: failed,
    interrupted, still "running" (killed hard), or no readable record at all."""
    out = {}
    for job in _job_dirs(sweep_dir):
        try:
            state = str(read_json(job / RUN_FILE).get("state", "no state"))
        except FileNotFoundError:
            state = "no run record"
        except (OSError, ValueError, AttributeError):
            state = "unreadable run record"
        if state != "finished":
            out[job.name] = state
    return out


def exit_if_incomplete() -> None:
    """After ``main()``: exit 1 when the sweep just run had jobs that did not finish (each
    sweep's report, written above, says which)."""
    if SweepOutcome.incomplete:
        sys.exit(1)


class RankSweepReport(Callback):
    """At the end of a rank-sweep multirun, write the summary table and the plots, then say
    which jobs did not finish."""

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        from analysis.rank_sweep_report import collect_summary, format_summary_table, write_report

        sweep_dir = config.hydra.sweep.dir
        prefix, log_scale = config.report.save_prefix, config.report.log_scale
        if collect_summary(sweep_dir).empty:  # every job skipped (max_rank): nothing failed
            print(f"no job ran (every rank above max_rank?): nothing to report in {sweep_dir}")
            return
        try:
            paths = write_report(sweep_dir, prefix=prefix, log_scale=log_scale)
        except Exception as exc:  # a report failure must not hide the jobs' own results
            SweepOutcome.incomplete = True
            log.error(
                "rank-sweep report failed: %s (re-run: python analysis/"
                "plot_rank_results.py --results_dir %s)",
                exc,
                sweep_dir,
            )
            return
        print(format_summary_table(collect_summary(sweep_dir)))
        for name, path in paths.items():
            print(f"{name}: {path}")
        check_sweep(sweep_dir)


class ScalingResults(Callback):
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
