"""``make analyze``: run every report on the newest local outputs and link them on one page.

    python analysis/analyze_newest.py [--root .]

- the rank-sweep report on the newest ``multirun/rank_sweep/<time>/``;
- the scaling analysis on the newest ``results.csv`` of a scaling sweep (grid runner under
  ``outputs/laplace_scaling/``, or multirun under ``multirun/laplace_scaling/``);
- rank dynamics of every run in the newest output folder of each experiment: the uploader
  writes ``rank_dynamics.csv`` into runs that lack the dynamics, and each run with rank metrics
  gets the three-panel plot and the per-layer heat map;
- ``outputs/index.html``: one page linking every plot and table above.

A kind of output that does not exist yet is skipped with a note.
"""

from __future__ import annotations

import contextlib
import html
import io
import os
import sys
from pathlib import Path

if __package__ in (None, ""):  # run as a plain script: make the repo importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from analysis.cli import ArgumentParser, UserError, run_cli
from experiments.runstore import find_runs, write_text_atomic

EXPERIMENTS = ("rank_sweep", "laplace_scaling", "multimodal")
INDEX = Path("outputs") / "index.html"


def newest(paths: list[Path]) -> Path | None:
    return max(paths, key=lambda p: p.stat().st_mtime, default=None)


def newest_output(root: Path, experiment: str) -> Path | None:
    """The newest output folder of an experiment, single run or multirun."""
    return newest(
        [p for kind in ("outputs", "multirun") for p in (root / kind / experiment).glob("*")
         if p.is_dir()]
    )  # fmt: skip


def rank_dynamics(folder: Path) -> list[Path]:
    """Upload (locally) and plot the rank dynamics of every run under ``folder``."""
    from analysis import plot_rank_dynamics, upload_rank_dynamics

    upload_rank_dynamics.main(["--runs-dir", str(folder), "--yes"])
    plotted = []
    for run in find_runs(folder):
        quiet = io.StringIO()
        try:
            with contextlib.redirect_stdout(quiet):
                plot_rank_dynamics.main(["--run-dir", str(run)])
        except UserError as exc:  # no rank metrics, order unknown: say so, go on
            print(f"  {run}: no rank dynamics plot ({exc})")
            continue
        plotted.append(run)
        print(f"  {run}: rank dynamics plotted")
    return plotted


def write_index(root: Path, sections: dict[str, list[Path]]) -> Path:
    """One HTML page: a section per report, every PNG shown and linked, CSV/JSON linked."""
    index = root / INDEX
    parts = ["<!doctype html><meta charset='utf-8'><title>Experiment analysis</title>",
             "<style>body{font-family:sans-serif;margin:2em}img{max-width:480px;margin:4px;"
             "border:1px solid #ccc}figure{display:inline-block;margin:0 8px 16px 0}"
             "figcaption{font-size:small}</style>", "<h1>Experiment analysis</h1>"]  # fmt: skip
    for title, files in sections.items():
        parts.append(f"<h2>{html.escape(title)}</h2>")
        if not files:
            parts.append("<p>nothing yet</p>")
        for path in files:
            href = html.escape(os.path.relpath(path, index.parent))
            name = html.escape(str(path.relative_to(root)))
            if path.suffix == ".png":
                parts.append(f"<figure><a href='{href}'><img src='{href}' alt='{name}'></a>"
                             f"<figcaption>{name}</figcaption></figure>")  # fmt: skip
            else:
                parts.append(f"<p><a href='{href}'>{name}</a></p>")
    write_text_atomic(index, "\n".join(parts) + "\n")
    return index


def files(folder: Path, patterns: tuple[str, ...]) -> list[Path]:
    return sorted(p for pattern in patterns for p in folder.glob(pattern))


def main(argv: list[str] | None = None) -> int:
    parser = ArgumentParser(description="Run every report on the newest local outputs.")
    parser.add_argument(
        "--root", type=Path, default=Path("."), help="where outputs/ and multirun/ are"
    )
    args = parser.parse_args(argv)
    root = args.root.resolve()
    from analysis import plot_rank_results, scaling_analysis

    sections: dict[str, list[Path]] = {}
    sweep = newest([p for p in (root / "multirun" / "rank_sweep").glob("*") if p.is_dir()])
    if sweep is None:
        print("rank sweep: none yet (make demo runs one)")
    else:
        print(f"== rank sweep report: {sweep}")
        plot_rank_results.main(["--results_dir", str(sweep), "--log_scale"])
        sections[f"Rank sweep: {sweep.relative_to(root)}"] = files(
            sweep, ("*.png", "*summary*.csv")
        )
    results = newest(
        list((root / "outputs" / "laplace_scaling").glob("*/results.csv"))
        + list((root / "multirun" / "laplace_scaling").glob("*/results.csv"))
    )
    if results is None:
        print("scaling sweep: none yet (python experiments/laplace_scaling.py runner=grid)")
    else:
        print(f"== scaling analysis: {results}")
        scaling_analysis.main(["--results", str(results)])
        sections[f"Scaling sweep: {results.parent.relative_to(root)}"] = files(
            results.parent, ("*.png", "*.csv", "*fit*.json")
        )
    for experiment in EXPERIMENTS:
        folder = newest_output(root, experiment)
        if folder is None:
            continue
        print(f"== rank dynamics: {folder}")
        plotted = rank_dynamics(folder)
        if plotted:
            sections[f"Rank dynamics: {folder.relative_to(root)}"] = [
                p for run in plotted for p in files(run, ("rank_*.png", "rank_dynamics.csv"))
            ]
    if not sections:
        raise UserError(f"no outputs to analyse under {root}")
    print(f"index of every plot: {write_index(root, sections)}")
    return 0


if __name__ == "__main__":
    run_cli(main)
