"""The rank and scaling sweeps' end-of-sweep callbacks: the report over the sweep folder, then
the sweep's outcome (:class:`experiments.callbacks.SweepOutcome`).

They sit in the analysis because they call it; Hydra reaches them through the ``_target_`` lines
of conf/rank_sweep.yaml and conf/laplace_scaling.yaml, so no experiment imports this module.
"""

from __future__ import annotations

import logging
from typing import Any

from omegaconf import DictConfig

from experiments.callbacks import SweepOutcome, check_sweep

log = logging.getLogger(__name__)


class RankSweepReport(SweepOutcome):
    """At the end of a rank-sweep multirun, write the summary table and the plots, then say
    which jobs did not finish."""

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        # imported when the sweep ends: every job instantiates the callbacks too, and a job
        # needs neither pandas nor matplotlib
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
        from analysis.scaling_results import assemble_results  # as above: at the end

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
