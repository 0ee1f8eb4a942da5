"""Re-plot a saved rank sweep (flags kept compatible with the earlier ``plot_rank_results.py``).

    python analysis/plot_rank_results.py --results_dir multirun/2024-01-01/12-00-00 --log_scale

Writes ``<prefix>_loss_curves.png``, ``<prefix>_final_losses.png``, ``<prefix>_summary.csv`` and
``<prefix>_summary.json`` into the results folder and prints the summary table. Exits 1 when a
job did not finish (failed, killed, interrupted, still running), as the sweep itself does.
"""

from __future__ import annotations

from analysis.rank_sweep_report import (
    OK_STATUSES,
    best_ranks,
    collect_summary,
    format_summary_table,
    write_report,
)
from common.cli import ArgumentParser, run_cli


def main(argv: list[str] | None = None) -> int:
    parser = ArgumentParser(description="Re-plot a saved rank sweep and print its summary.")
    parser.add_argument(
        "--results_dir", required=True, help="the sweep folder (one job per sub-folder)"
    )
    parser.add_argument("--save_prefix", default="rank_sweep", help="output file prefix")
    parser.add_argument("--log_scale", action="store_true", help="log-scale loss axes")
    args = parser.parse_args(argv)

    summary = collect_summary(args.results_dir)
    paths = write_report(args.results_dir, args.save_prefix, args.log_scale, summary)
    print(format_summary_table(summary))
    print()
    for key, what in (("final_val_loss", "final val loss"), ("loss_over_floor", "loss/floor")):
        row = best_ranks(summary)[key]
        if row is None:
            print(f"best rank by {what}: none (no finished job has it)")
        else:
            print(f"best rank by {what}: {row['rank']} ({what} {row[key]:.4g})")
    failed = int((~summary["status"].isin(OK_STATUSES)).sum())
    if failed:
        print(f"{failed} of {len(summary)} job(s) did not finish; see the status column")
    print()
    for path in paths.values():
        print(f"wrote {path}")
    return 1 if failed else 0  # the report is written; the exit code says it is incomplete


if __name__ == "__main__":
    run_cli(main)
