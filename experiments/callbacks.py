"""Hydra callbacks: thin callers of plain functions that also run by hand.

Hydra 1.3 turns exceptions inside callbacks into warnings and passes no job results, so all
the work lives in :mod:`analysis.rank_sweep_report`, which reads the sweep folder.
"""

from __future__ import annotations

import logging
from typing import Any

from hydra.experimental.callback import Callback
from omegaconf import DictConfig

log = logging.getLogger(__name__)


class RankSweepReport(Callback):
    """At the end of a rank-sweep multirun, write the summary table and the plots.

    ``incomplete`` tells the entry point, once the sweep is over, whether any job did not finish
    (or the report could not be written), so that it can exit non-zero."""

    incomplete = False

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
            RankSweepReport.incomplete = True
            log.error(
                "rank-sweep report failed: %s (re-run: python analysis/"
                "plot_rank_results.py --results_dir %s)",
                exc,
                sweep_dir,
            )
            return
        summary = collect_summary(sweep_dir)
        failed = summary[summary["status"] != "finished"]
        print(format_summary_table(summary))
        for name, path in paths.items():
            print(f"{name}: {path}")
        if len(failed):
            RankSweepReport.incomplete = True
            print(f"{len(failed)} of {len(summary)} jobs did not finish: see the status column")


class ScalingResults(Callback):
    """At the end of a scaling multirun, assemble results.csv from the jobs' cell.json."""

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        from analysis.scaling_results import assemble_results

        sweep_dir = config.hydra.sweep.dir
        try:
            path = assemble_results(sweep_dir)
        except Exception as exc:
            log.error(
                "results assembly failed: %s (re-run: python analysis/scaling_results.py %s)",
                exc,
                sweep_dir,
            )
            return
        print(f"results: {path}")
        print(f"analyse: python analysis/scaling_analysis.py --results {path}")
