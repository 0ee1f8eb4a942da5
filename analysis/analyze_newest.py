"""``make analyze``: run every report on the newest local outputs.

    python analysis/analyze_newest.py [--root .]

- the rank-sweep report on the newest ``multirun/rank_sweep/<time>/``;
- the scaling analysis on the newest ``results.csv`` of a scaling sweep (grid runner under
  ``outputs/laplace_scaling/``, or multirun under ``multirun/laplace_scaling/``).
A kind of output that does not exist yet is skipped with a note.
"""

from __future__ import annotations

import sys
from pathlib import Path

if __package__ in (None, ""):  # run as a plain script: make the repo importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from analysis.cli import ArgumentParser, UserError, run_cli


def newest(paths: list[Path]) -> Path | None:
    return max(paths, key=lambda p: p.stat().st_mtime, default=None)


def main(argv: list[str] | None = None) -> int:
    parser = ArgumentParser(description="Run every report on the newest local outputs.")
    parser.add_argument(
        "--root", type=Path, default=Path("."), help="where outputs/ and multirun/ are"
    )
    args = parser.parse_args(argv)
    from analysis import plot_rank_results, scaling_analysis

    done = 0
    sweep = newest([p for p in (args.root / "multirun" / "rank_sweep").glob("*") if p.is_dir()])
    if sweep is None:
        print("rank sweep: none yet (make demo runs one)")
    else:
        print(f"== rank sweep report: {sweep}")
        plot_rank_results.main(["--results_dir", str(sweep), "--log_scale"])
        done += 1
    results = newest(
        list((args.root / "outputs" / "laplace_scaling").glob("*/results.csv"))
        + list((args.root / "multirun" / "laplace_scaling").glob("*/results.csv"))
    )
    if results is None:
        print("scaling sweep: none yet (python experiments/laplace_scaling.py runner=grid)")
    else:
        print(f"== scaling analysis: {results}")
        scaling_analysis.main(["--results", str(results)])
        done += 1
    if not done:
        raise UserError(f"no outputs to analyse under {args.root.resolve()}")
    return 0


if __name__ == "__main__":
    run_cli(main)
