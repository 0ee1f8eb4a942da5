"""``make analyze``: run every report on the newest local outputs and link them on one page.

    python analysis/analyze_newest.py [--root .]

- the rank-sweep report on the newest ``multirun/rank_sweep/<time>/``;
- the scaling analysis on the newest ``results.csv`` of a scaling sweep (grid runner under
  ``outputs/laplace_scaling/``, or multirun under ``multirun/laplace_scaling/``);
- rank dynamics of every run in the newest output folder of each experiment: the uploader
  writes ``rank_dynamics.csv`` into runs that lack the dynamics, and each run with rank metrics
  gets the three-panel plot and the per-layer heat map;
- ``outputs/index.html``: one page linking every plot and table above.

A kind of output that does not exist yet is skipped with a note. Every report runs whatever
the others do: one that fails (bad input, a file-system error, a bug) is noted and the rest go
on; the runs analysed are checked against their run records (a run whose process died reads
killed). The index is written all the same, then what went wrong is listed, one line each, and
the exit code is 1.
"""

from __future__ import annotations

import contextlib
import html
import io
import os
import sys
import traceback
from collections.abc import Iterator
from pathlib import Path

if __package__ in (None, ""):  # run as a plain script: make the repo importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from common.cli import ArgumentParser, UserError, run_cli
from common.runstore import (
    KILLED,
    RUN_FILE,
    find_runs,
    killed_reason,
    read_json,
    run_state,
    write_text_atomic,
)

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


def one_line(exc: BaseException) -> str:
    if isinstance(exc, OSError) and exc.filename:
        return f"{exc.strerror or exc}: {exc.filename}"
    return " ".join(str(exc).split()) or type(exc).__name__


class Outcome:
    """What went wrong across the reports: each report runs whatever the others did, and its
    failure (bad input, a file-system error, a bug) becomes one line of the closing list."""

    def __init__(self) -> None:
        self.failures: list[str] = []

    def fail(self, line: str) -> None:
        self.failures.append(line)
        print(f"  failed: {line}")

    @contextlib.contextmanager
    def guard(self, name: str) -> Iterator[None]:
        """Run the block; an exception it raises is noted as ``name``'s failure, not raised."""
        try:
            yield
        except UserError as exc:
            self.fail(f"{name}: error: {one_line(exc)}")
        except OSError as exc:
            self.fail(f"{name}: {one_line(exc)}")
        except Exception as exc:  # a bug: its traceback now, and the other reports still run
            traceback.print_exc()
            self.fail(f"{name}: {type(exc).__name__}: {one_line(exc)}")

    def check(self, name: str, code: int | None) -> None:
        if code:
            self.fail(f"{name}: exit {code} (not everything finished; see above)")


def _plot_run(run: Path) -> bool:
    """Plot one run's dynamics; False (said) when it has none to plot."""
    from analysis import plot_rank_dynamics

    try:
        with contextlib.redirect_stdout(io.StringIO()):
            plot_rank_dynamics.main(["--run-dir", str(run)])
    except UserError as exc:  # no rank metrics, order unknown: a note, not a failure
        print(f"  {run}: no rank dynamics plot ({exc})")
        return False
    print(f"  {run}: rank dynamics plotted")
    return True


def rank_dynamics(folder: Path, outcome: Outcome) -> list[Path]:
    """Upload (locally) and plot the rank dynamics of every run under ``folder``."""
    from analysis import upload_rank_dynamics

    if not find_runs(folder):  # nothing to do there (results only, no run records): a note
        print(f"  no runs (folders with {RUN_FILE}) in {folder}")
        return []
    name = f"rank dynamics upload {folder}"
    with outcome.guard(name):
        outcome.check(name, upload_rank_dynamics.main(["--runs-dir", str(folder), "--yes"]))
    plotted = []
    for run in find_runs(folder):
        with outcome.guard(f"rank dynamics plot {run}"):
            if _plot_run(run):
                plotted.append(run)
    return plotted


def unfinished_runs(folder: Path, root: Path) -> list[str]:
    """One line per run under ``folder`` that did not finish, from its run record as it is now
    (``runstore.run_state``: a "running" record whose process is gone reads killed)."""
    lines = []
    for run in find_runs(folder):
        name = os.path.relpath(run, root)
        try:
            record = read_json(run / RUN_FILE)
            state = run_state(run, record)
        except (OSError, ValueError, AttributeError):
            lines.append(f"{name}: unreadable run record {run / RUN_FILE}")
            continue
        if state != "finished":
            reason = killed_reason(record) if state == KILLED else record.get("reason")
            lines.append(f"{name}: {state}" + (f" ({reason})" if reason else ""))
    return lines


def write_index(root: Path, sections: dict[str, list[Path]], problems: list[str]) -> Path:
    """One HTML page: what went wrong first, then a section per report, every PNG shown and
    linked, CSV/JSON linked."""
    index = root / INDEX
    parts = ["<!doctype html><meta charset='utf-8'><title>Experiment analysis</title>",
             "<style>body{font-family:sans-serif;margin:2em}img{max-width:480px;margin:4px;"
             "border:1px solid #ccc}figure{display:inline-block;margin:0 8px 16px 0}"
             "figcaption{font-size:small}</style>", "<h1>Experiment analysis</h1>"]  # fmt: skip
    if problems:
        items = "".join(f"<li>{html.escape(line)}</li>" for line in problems)
        parts.append(f"<h2>Did not complete</h2><ul>{items}</ul>")
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
    try:
        write_text_atomic(index, "\n".join(parts) + "\n")
    except OSError as exc:  # a failed write() names no file: say which
        raise OSError(exc.errno, exc.strerror or str(exc), str(index)) from exc
    return index


def files(folder: Path, patterns: tuple[str, ...]) -> list[Path]:
    return sorted(p for pattern in patterns for p in folder.glob(pattern))


def rank_sweep_report(root: Path, outcome: Outcome, sections: dict[str, list[Path]]) -> Path | None:
    from analysis import plot_rank_results

    sweep = newest([p for p in (root / "multirun" / "rank_sweep").glob("*") if p.is_dir()])
    if sweep is None:
        print("rank sweep: none yet (make demo runs one)")
        return None
    print(f"== rank sweep report: {sweep}")
    name = f"rank sweep report {sweep.relative_to(root)}"
    with outcome.guard(name):
        outcome.check(name, plot_rank_results.main(["--results_dir", str(sweep), "--log_scale"]))
        sections[f"Rank sweep: {sweep.relative_to(root)}"] = files(
            sweep, ("*.png", "*summary*.csv")
        )
    return sweep


def scaling_report(root: Path, outcome: Outcome, sections: dict[str, list[Path]]) -> Path | None:
    from analysis import scaling_analysis

    results = newest(
        list((root / "outputs" / "laplace_scaling").glob("*/results.csv"))
        + list((root / "multirun" / "laplace_scaling").glob("*/results.csv"))
    )
    if results is None:
        print("scaling sweep: none yet (python experiments/laplace_scaling.py runner=grid)")
        return None
    print(f"== scaling analysis: {results}")
    name = f"scaling analysis {results.relative_to(root)}"
    with outcome.guard(name):
        outcome.check(name, scaling_analysis.main(["--results", str(results)]))
        sections[f"Scaling sweep: {results.parent.relative_to(root)}"] = files(
            results.parent, ("*.png", "*.csv", "*fit*.json")
        )
    return results.parent


def main(argv: list[str] | None = None) -> int:
    parser = ArgumentParser(description="Run every report on the newest local outputs.")
    parser.add_argument(
        "--root", type=Path, default=Path("."), help="where outputs/ and multirun/ are"
    )
    args = parser.parse_args(argv)
    root = args.root.resolve()
    outcome = Outcome()
    sections: dict[str, list[Path]] = {}
    analysed = [rank_sweep_report(root, outcome, sections), scaling_report(root, outcome, sections)]
    for experiment in EXPERIMENTS:
        folder = newest_output(root, experiment)
        if folder is None:
            continue
        print(f"== rank dynamics: {folder}")
        analysed.append(folder)
        plotted = rank_dynamics(folder, outcome)
        if plotted:
            sections[f"Rank dynamics: {folder.relative_to(root)}"] = [
                p for run in plotted for p in files(run, ("rank_*.png", "rank_dynamics.csv"))
            ]
    folders = list(dict.fromkeys(f for f in analysed if f is not None))
    if not folders:
        raise UserError(f"no outputs to analyse under {root}")
    for folder in folders:  # a killed run is no result, whatever its plots look like
        outcome.failures += unfinished_runs(folder, root)
    with outcome.guard("index"):
        print(f"index of every plot: {write_index(root, sections, outcome.failures)}")
    if outcome.failures:
        print(f"{len(outcome.failures)} thing(s) did not complete:", file=sys.stderr)
        for line in dict.fromkeys(outcome.failures):
            print(f"  {line}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    run_cli(main)
