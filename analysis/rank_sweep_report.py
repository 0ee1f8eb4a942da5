"""Aggregate a rank-sweep folder: one summary row per job, loss-curve and final-loss plots.

A sweep folder holds one sub-folder per job (Hydra multirun job dirs, any names), each with
``run.json``, ``config.yaml``, ``summary.json``, ``loss_curves.csv`` and ``loss_curves.json`` as
written by the experiment; failed jobs may lack some. Folders in the pre-suite layout
(``rank_<r>/<prefix>_rank_<r>_loss_curves.csv``) stay readable. No Hydra, no W&B; plots use
matplotlib's ``Figure`` directly (Agg), so importing this never switches anyone's backend.
"""

from __future__ import annotations

import json
import math
import os
import re
import warnings
from collections.abc import Callable, Mapping
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import matplotlib
import numpy as np
import pandas as pd
import yaml
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.patches import Patch
from matplotlib.ticker import MaxNLocator

from analysis.scaling_results import FIELDS, LINE, read_csv_text
from common.cli import UserError
from common.runstore import (
    CONFIG_FILE,
    KILLED,
    RUN_FILE,
    SUMMARY_FILE,
    atomic_path,
    killed_reason,
    run_state,
)
from experiments.rank_sweep_records import CURVE_COLUMNS, CURVES_CSV, CURVES_JSON

SUMMARY_COLUMNS = [
    "rank",
    "structure",
    "parameters",
    "compression",
    "final_train_loss",
    "final_val_loss",
    "min_train_loss",
    "min_val_loss",
    "floor",
    "zero_predictor_loss",
    "loss_over_floor",
    "status",
    "reason",
    "wall_time_s",
    "epochs_completed",
    "job_dir",
]
_INT_COLUMNS = ("rank", "parameters", "epochs_completed")
_FLOAT_COLUMNS = (
    "compression",
    "final_train_loss",
    "final_val_loss",
    "min_train_loss",
    "min_val_loss",
    "floor",
    "zero_predictor_loss",
    "loss_over_floor",
    "wall_time_s",
)
# Statuses whose numbers are complete; "unknown" covers old-script folders, which had no run.json.
OK_STATUSES = ("finished", "unknown")
_DPI = 120
_FONT = {"font.size": 10, "axes.titlesize": 12, "axes.labelsize": 11, "legend.fontsize": 9}


# ---------------------------------------------------------------------------- reading


def _read_json(path: Path) -> Any:
    """The parsed file, or None if it is missing; a corrupt file warns and counts as missing."""
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        warnings.warn(f"{path}: unreadable JSON, ignored ({exc})", stacklevel=3)
        return None


def _read_yaml(path: Path) -> Any:
    if not path.is_file():
        return None
    try:
        return yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError) as exc:
        warnings.warn(f"{path}: unreadable YAML, ignored ({exc})", stacklevel=3)
        return None


def _as_dict(value: Any) -> dict[str, Any]:
    return value if isinstance(value, dict) else {}


def _as_float(value: Any) -> float:
    try:
        return float(value)
    except (TypeError, ValueError):
        return math.nan


def _as_int(value: Any) -> int | None:
    number = _as_float(value)
    return int(number) if math.isfinite(number) and number == int(number) else None


def _legacy_curve_files(job_dir: Path, suffix: str) -> list[Path]:
    return sorted(p for p in job_dir.glob(f"*_loss_curves.{suffix}") if p.is_file())


def _is_job_dir(path: Path) -> bool:
    if not path.is_dir() or path.name.startswith("."):  # skips .hydra, .submitit, ...
        return False
    markers = (RUN_FILE, CONFIG_FILE, SUMMARY_FILE, CURVES_CSV, CURVES_JSON)
    return any((path / m).is_file() for m in markers) or bool(_legacy_curve_files(path, "csv"))


def _job_rank(job_dir: Path) -> int | None:
    """summary.json, else config.yaml (top level, then model.rank), else loss_curves.json, else an
    old-style ``rank_<r>`` folder name."""
    summary = _as_dict(_read_json(job_dir / SUMMARY_FILE))
    config = _as_dict(_read_yaml(job_dir / CONFIG_FILE))
    curves = _as_dict(_read_json(job_dir / CURVES_JSON))
    for value in (
        summary.get("rank"),
        config.get("rank"),
        _as_dict(config.get("model")).get("rank"),
        curves.get("rank"),
    ):
        rank = _as_int(value)
        if rank is not None:
            return rank
    match = re.fullmatch(r"rank[_-]?(\d+)", job_dir.name)
    return int(match.group(1)) if match else None


def _sort_key(rank: int | None, name: str) -> tuple[bool, int, str]:
    return (rank is None, rank if rank is not None else 0, name)


def find_job_dirs(sweep_dir: str | os.PathLike[str]) -> list[Path]:
    """The job folders one level below ``sweep_dir``, sorted by rank (unknown last) then name."""
    sweep_dir = Path(sweep_dir)
    if not sweep_dir.is_dir():
        return []
    jobs = [p for p in sweep_dir.iterdir() if _is_job_dir(p)]
    return sorted(jobs, key=lambda p: _sort_key(_job_rank(p), p.name))


_MISSING_TEXT = frozenset({"", "nan", "-nan", "na", "n/a", "null", "none"})


def _curves_from_csv(path: Path) -> tuple[pd.DataFrame | None, str | None]:
    """(the curve, None), or (None, what is wrong with the file). A last row cut short is a
    job killed mid-write: the rows before it are its curve."""
    try:
        text = read_csv_text(path)
    except UserError as exc:
        return None, str(exc)
    except OSError as exc:
        return None, f"{path}: {exc.strerror or exc}"
    width = len(text.columns) - 2  # the header's fields (LINE and FIELDS are the reader's)
    if len(text) and text[FIELDS].iloc[-1] < width:
        text = text.iloc[:-1]
    missing = [c for c in ("epoch", "train_loss", "val_loss") if c not in text.columns]
    if missing:
        return None, f"{path} has no {', '.join(missing)} column"
    if (text[FIELDS] != width).any():
        line = text[LINE][text[FIELDS] != width].iloc[0]
        return None, f"{path} line {line}: not {width} fields, as the header has"
    frame = text.drop(columns=[LINE, FIELDS])
    for column in [c for c in CURVE_COLUMNS if c in frame.columns]:
        values = pd.to_numeric(frame[column].str.strip(), errors="coerce")
        bad = values.isna() & ~frame[column].str.strip().str.lower().isin(_MISSING_TEXT)
        if bad.any():
            i = bad.idxmax()
            value = frame.at[i, column]
            return None, f"{path} line {text.at[i, LINE]}: {column} is {value!r}, not a number"
        frame[column] = values
    return frame, None


def _curves_from_json(job_dir: Path) -> pd.DataFrame | None:
    for path in [job_dir / CURVES_JSON, *_legacy_curve_files(job_dir, "json")]:
        data = _read_json(path)
        rows = data.get("curves") if isinstance(data, dict) else data
        if isinstance(rows, list) and rows:
            return pd.DataFrame.from_records([r for r in rows if isinstance(r, dict)])
    return None


def load_curves(job_dir: str | os.PathLike[str], warn: bool = True) -> pd.DataFrame:
    """Per-epoch losses of one job (``CURVE_COLUMNS`` first); an empty frame if none were saved.

    A curve CSV that cannot be read (empty, cut, not numbers) is warned about in one line naming
    it, and loss_curves.json (written beside it) is read instead; when that gives no curve
    either, ``frame.attrs["problem"]`` says which file was unreadable. ``warn=False``: a
    second read, after ``collect_summary`` has said it."""
    job_dir = Path(job_dir)
    frame, problems = None, []
    for path in [job_dir / CURVES_CSV, *_legacy_curve_files(job_dir, "csv")]:
        if path.is_file():
            frame, problem = _curves_from_csv(path)
            if frame is not None:
                break
            problems.append(f"unreadable {path.name}")
            if warn:
                warnings.warn(f"unreadable loss curves: {problem}", stacklevel=2)
    if frame is None:
        frame = _curves_from_json(job_dir)
    if frame is None:
        frame = pd.DataFrame({c: pd.Series(dtype=float) for c in CURVE_COLUMNS})
        frame.attrs["problem"] = "; ".join(problems) or None
        return frame
    for column in CURVE_COLUMNS:
        frame[column] = pd.to_numeric(frame[column], errors="coerce") if column in frame else np.nan
    extra = [c for c in frame.columns if c not in CURVE_COLUMNS]
    frame = frame[CURVE_COLUMNS + extra]
    return frame.sort_values("epoch", kind="stable").reset_index(drop=True)


def _job_state(job_dir: Path, run: dict[str, Any] | None) -> tuple[str, Any]:
    """(status, reason) of a job as it is now: run.json's state, except "killed" (with why)
    for a "running" record whose process is gone; "unknown" without run.json (old-script
    folders); "unreadable" when run.json is there but cannot be read."""
    if run is None:
        if (job_dir / RUN_FILE).exists():
            return "unreadable", f"unreadable {RUN_FILE}: {job_dir / RUN_FILE}"
        return "unknown", None
    try:
        state = run_state(job_dir, run)
    except (OSError, ValueError) as exc:
        return "unreadable", f"{job_dir / RUN_FILE}: {exc}"
    if state == KILLED:
        return state, killed_reason(run)
    return state, run.get("reason")


def _summary_row(job_dir: Path) -> dict[str, Any]:
    run = _read_json(job_dir / RUN_FILE)
    config = _as_dict(_read_yaml(job_dir / CONFIG_FILE))
    summary = _as_dict(_read_json(job_dir / SUMMARY_FILE))
    curves = load_curves(job_dir)

    row: dict[str, Any] = {c: summary.get(c) for c in SUMMARY_COLUMNS}
    row["rank"] = _job_rank(job_dir)
    row["structure"] = summary.get("structure") or _as_dict(config.get("model")).get("structure")
    row["status"], reason = _job_state(job_dir, run if isinstance(run, dict) else None)
    # A curve file that could not be read is said in the reason, so no table claims its curve.
    row["reason"] = "; ".join(str(r) for r in (reason, curves.attrs.get("problem")) if r) or None
    row["job_dir"] = str(job_dir)

    # Fill what summary.json lacks from the curves (old-script folders have only curves; a failed
    # job's partial curves still say how far it got). The status column tells the two apart.
    if not curves.empty:
        last = curves.iloc[-1]
        fills = {
            "final_train_loss": last["train_loss"],
            "final_val_loss": last["val_loss"],
            "min_train_loss": curves["train_loss"].min(),
            "min_val_loss": curves["val_loss"].min(),
            "floor": curves["floor"].dropna().iloc[-1] if curves["floor"].notna().any() else None,
            "epochs_completed": len(curves),
        }
        for key, value in fills.items():
            if not math.isfinite(_as_float(row[key])):
                row[key] = value
    if not math.isfinite(_as_float(row["floor"])):
        row["floor"] = _as_dict(_read_json(job_dir / CURVES_JSON)).get("floor")
    if not math.isfinite(_as_float(row["loss_over_floor"])):
        loss, floor = _as_float(row["final_val_loss"]), _as_float(row["floor"])
        if math.isfinite(loss) and math.isfinite(floor) and floor > 0:
            row["loss_over_floor"] = loss / floor
    return row


def collect_summary(sweep_dir: str | os.PathLike[str]) -> pd.DataFrame:
    """One row per job (``SUMMARY_COLUMNS``), sorted by rank; failed jobs are rows too.

    Missing numbers are NaN (``rank``, ``parameters`` and ``epochs_completed`` are nullable ints);
    ``status`` is the job's state as it is now (``runstore.run_state``): run.json's state, except
    "killed" for a record left "running" by a process that is gone (the reason says so);
    "unknown" without run.json (old-script folders), "unreadable" with a corrupt one. A curve
    file that could not be read is named in ``reason``.
    """
    rows = [_summary_row(job) for job in find_job_dirs(sweep_dir)]
    frame = pd.DataFrame.from_records(rows, columns=SUMMARY_COLUMNS)
    for column in _FLOAT_COLUMNS:
        frame[column] = pd.to_numeric(frame[column], errors="coerce").astype(float)
    for column in _INT_COLUMNS:
        values = [_as_int(v) for v in frame[column]]
        frame[column] = pd.array(values, dtype="Int64")
    for column in ("structure", "reason"):
        frame[column] = frame[column].astype(object).where(frame[column].notna(), None)
    return frame.reset_index(drop=True)


# ---------------------------------------------------------------------------- formatting


def _fmt(value: Any, spec: str, missing: str = "-") -> str:
    number = _as_float(value)
    return format(number, spec) if math.isfinite(number) else missing


def _rank_label(row: Mapping[str, Any], duplicated: bool) -> str:
    rank = "?" if pd.isna(row["rank"]) else str(int(row["rank"]))
    return f"{rank} ({Path(str(row['job_dir'])).name})" if duplicated else rank


def _rank_labels(summary: pd.DataFrame) -> list[str]:
    duplicated = summary["rank"].duplicated(keep=False) | summary["rank"].isna()
    return [
        _rank_label(row, bool(dup))
        for (_, row), dup in zip(summary.iterrows(), duplicated, strict=True)
    ]


def _status_text(row: Mapping[str, Any], width: int = 48) -> str:
    status = str(row["status"])
    if not row.get("reason"):  # a finished job has a reason only when a file of it is unreadable
        return status
    text = f"{status}: {' '.join(str(row['reason']).split())}"
    return text if len(text) <= width else text[: width - 3] + "..."


def format_summary_table(summary: pd.DataFrame) -> str:
    """A compact text table: rank, params, compression, final val, floor, loss/floor, status."""
    header = ["rank", "params", "compression", "final val", "floor", "loss/floor", "status"]
    body = [
        [
            label,
            "-" if pd.isna(row["parameters"]) else f"{int(row['parameters']):,}",
            _fmt(row["compression"], ".2f") + ("x" if pd.notna(row["compression"]) else ""),
            _fmt(row["final_val_loss"], ".4g"),
            _fmt(row["floor"], ".4g"),
            _fmt(row["loss_over_floor"], ".3f"),
            _status_text(row),
        ]
        for label, (_, row) in zip(_rank_labels(summary), summary.iterrows(), strict=True)
    ]
    widths = [max(len(r[i]) for r in [header, *body]) for i in range(len(header))]
    # Numbers right-aligned, the status (last column) left-aligned.
    lines = [
        "  ".join(
            cell.ljust(w) if i == len(header) - 1 else cell.rjust(w)
            for i, (cell, w) in enumerate(zip(r, widths, strict=True))
        ).rstrip()
        for r in [header, *body]
    ]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def best_ranks(summary: pd.DataFrame) -> dict[str, Any]:
    """The rank with the lowest final val loss and the one with the lowest loss/floor, among jobs
    that finished (None where no job has the number)."""
    ok = summary[summary["status"].isin(OK_STATUSES)]
    best: dict[str, Any] = {}
    for key in ("final_val_loss", "loss_over_floor"):
        values = ok[key].dropna()
        best[key] = None if values.empty else ok.loc[values.idxmin()]
    return best


# ---------------------------------------------------------------------------- plotting


def _rank_colors(n: int) -> list[tuple[float, ...]]:
    # Sequential by rank order; the top of viridis is cut because pale yellow is hard to see.
    cmap = matplotlib.colormaps["viridis"]
    return [cmap(x) for x in np.linspace(0.0, 0.85, n)] if n > 1 else [cmap(0.35)]


def _summary_and_curves(
    source: str | os.PathLike[str] | pd.DataFrame,
    curves: Mapping[str, pd.DataFrame] | None,
) -> tuple[pd.DataFrame, dict[str, pd.DataFrame]]:
    summary = source if isinstance(source, pd.DataFrame) else collect_summary(source)
    found = dict(curves or {})
    for job_dir in summary["job_dir"]:
        if str(job_dir) not in found:  # collect_summary read it first and warned
            found[str(job_dir)] = load_curves(job_dir, warn=False)
    return summary, found


def plot_loss_curves(
    source: str | os.PathLike[str] | pd.DataFrame,
    out_path: str | os.PathLike[str],
    log_scale: bool = False,
    curves: Mapping[str, pd.DataFrame] | None = None,
) -> Path:
    """Write ``loss_curves_figure`` to ``out_path`` (atomically)."""
    write_all(
        {Path(out_path): lambda tmp: save_png(loss_curves_figure(source, log_scale, curves), tmp)}
    )
    return Path(out_path)


def _legend_text(row: Mapping[str, Any], label: str, frame: pd.DataFrame, drawn: bool) -> str:
    """The legend entry: a job whose curve is not drawn says so, and why when its curve file
    was unreadable (the legend never claims a curve the axes lack)."""
    ok = row["status"] in OK_STATUSES
    text = f"rank {label}" + ("" if ok else f" ({row['status']})")
    if not drawn:
        problem = frame.attrs.get("problem")
        text += " - no curve" + (f" ({problem})" if problem else "")
    return text


def _draw_job(
    axes: Any, frame: pd.DataFrame, ok: bool, style: dict[str, Any], floor: float, log_scale: bool
) -> bool:
    """One job's train and val curves (an x where a failed job stopped) and its floor; whether
    any point was drawn."""
    drew = False
    for ax, column in zip(axes, ("train_loss", "val_loss"), strict=True):
        points = frame[["epoch", column]].dropna() if not frame.empty else frame
        if len(points):
            drew = True
            ax.plot(points["epoch"], points[column], **style)
            if not ok:  # where the failed job stopped
                last = (points["epoch"].iloc[-1], points[column].iloc[-1])
                ax.plot(*last, "x", color=style["color"], ms=8, mew=2)
        if math.isfinite(floor) and (floor > 0 or not log_scale):
            ax.axhline(floor, color=style["color"], ls="--", lw=1.0, alpha=0.7)
    return drew


def loss_curves_figure(
    source: str | os.PathLike[str] | pd.DataFrame,
    log_scale: bool = False,
    curves: Mapping[str, pd.DataFrame] | None = None,
) -> Figure:
    """Train and val loss vs epoch side by side, one curve per rank, its floor dashed.

    ``source`` is a sweep folder or a summary from ``collect_summary``; ``curves`` maps job_dir to
    a frame from ``load_curves`` (loaded from job_dir where absent).
    """
    summary, curves = _summary_and_curves(source, curves)
    colors = _rank_colors(len(summary))
    with matplotlib.rc_context(_FONT):
        fig = Figure(figsize=(13, 5), layout="constrained")
        axes = fig.subplots(1, 2, sharey=True)
        handles: list[Any] = []
        drawn = 0
        for (_, row), label, color in zip(
            summary.iterrows(), _rank_labels(summary), colors, strict=True
        ):
            frame = curves.get(str(row["job_dir"]), pd.DataFrame(columns=CURVE_COLUMNS))
            ok = row["status"] in OK_STATUSES
            style = {"color": color, "lw": 1.8, "ls": "-" if ok else ":"}
            drew = _draw_job(axes, frame, ok, style, _as_float(row["floor"]), log_scale)
            drawn += int(drew)
            handles.append(Line2D([], [], **style, label=_legend_text(row, label, frame, drew)))
        handles.append(Line2D([], [], color="0.4", ls="--", lw=1.0, label="floor (same colour)"))

        for ax, title in zip(axes, ("Training loss", "Validation loss"), strict=True):
            ax.set_title(title)
            ax.set_xlabel("epoch")
            ax.xaxis.set_major_locator(MaxNLocator(integer=True))
            ax.grid(True, which="major", alpha=0.3)
            if log_scale:
                ax.set_yscale("log")
                ax.grid(True, which="minor", alpha=0.1)
            if not drawn:
                ax.text(
                    0.5,
                    0.5,
                    "no loss curves recorded",
                    ha="center",
                    va="center",
                    transform=ax.transAxes,
                    color="0.4",
                )
        axes[0].set_ylabel("loss (log scale)" if log_scale else "loss")
        fig.suptitle("Rank sweep: loss curves")
        fig.legend(handles=handles, loc="outside right center", frameon=False)
        return fig


def plot_final_losses(
    summary: pd.DataFrame, out_path: str | os.PathLike[str], log_scale: bool = False
) -> Path:
    """Write ``final_losses_figure`` to ``out_path`` (atomically)."""
    write_all({Path(out_path): lambda tmp: save_png(final_losses_figure(summary, log_scale), tmp)})
    return Path(out_path)


def final_losses_figure(summary: pd.DataFrame, log_scale: bool = False) -> Figure:
    """Per rank: the final val loss bar beside the floor bar, values annotated, the zero
    predictor's loss dotted; failed ranks are a hatched marker, not left out."""
    labels = _rank_labels(summary)
    x = np.arange(len(summary))
    width = 0.38
    losses = summary["final_val_loss"].to_numpy(dtype=float)
    floors = summary["floor"].to_numpy(dtype=float)
    zeros = summary["zero_predictor_loss"].to_numpy(dtype=float)

    def _max(values: np.ndarray, default: float) -> float:
        values = values[np.isfinite(values) & ((values > 0) if log_scale else True)]
        return float(values.max()) if values.size else default

    top = _max(np.concatenate([losses, floors, zeros]), 1.0)
    marker_height = _max(np.concatenate([losses, floors]), top)  # the zero level may be far above

    with matplotlib.rc_context(_FONT):
        fig = Figure(figsize=(max(7.0, 1.1 * len(summary) + 3.0), 5.2), layout="constrained")
        ax = fig.subplots()
        for i, (_, row) in enumerate(summary.iterrows()):
            ok = row["status"] in OK_STATUSES
            loss, floor = losses[i], floors[i]
            if ok and math.isfinite(loss):
                ax.bar(x[i] - width / 2, loss, width, color="tab:blue")
                ratio = _as_float(row["loss_over_floor"])
                note = f"{loss:.3g}" + (f"\n{ratio:.3f}x floor" if math.isfinite(ratio) else "")
                ax.annotate(
                    note,
                    (x[i] - width / 2, loss),
                    ha="center",
                    va="bottom",
                    fontsize=8,
                    xytext=(0, 2),
                    textcoords="offset points",
                )
            else:
                # No usable final loss: a hatched full-height marker says so at a glance.
                height = loss if math.isfinite(loss) and not ok else marker_height
                ax.bar(
                    x[i] - width / 2,
                    height,
                    width,
                    facecolor="none",
                    edgecolor="tab:red",
                    hatch="///",
                    lw=1.2,
                )
                note = "no result" if ok else str(row["status"])
                if math.isfinite(loss):
                    note += f"\n(last {loss:.3g})"
                ax.annotate(
                    note,
                    (x[i] - width / 2, height),
                    ha="center",
                    va="bottom",
                    fontsize=8,
                    color="tab:red",
                    xytext=(0, 2),
                    textcoords="offset points",
                )
            if math.isfinite(floor) and (floor > 0 or not log_scale):
                ax.bar(x[i] + width / 2, floor, width, color="0.65")
                ax.annotate(
                    f"{floor:.3g}",
                    (x[i] + width / 2, floor),
                    ha="center",
                    va="bottom",
                    fontsize=8,
                    xytext=(0, 2),
                    textcoords="offset points",
                )

        handles: list[Any] = [
            Patch(color="tab:blue", label="final val loss"),
            Patch(color="0.65", label="floor"),
        ]
        finite_zeros = np.unique(zeros[np.isfinite(zeros)])
        if finite_zeros.size == 1:
            ax.axhline(finite_zeros[0], color="k", ls=":", lw=1.2)
        elif finite_zeros.size > 1:  # differs by job: one segment over each rank's pair of bars
            ok_zero = np.isfinite(zeros)
            ax.hlines(
                zeros[ok_zero],
                x[ok_zero] - 0.45,
                x[ok_zero] + 0.45,
                colors="k",
                linestyles=":",
                lw=1.2,
            )
        if finite_zeros.size:
            handles.append(Line2D([], [], color="k", ls=":", lw=1.2, label="zero predictor"))
        if not summary["status"].isin(OK_STATUSES).all():
            handles.append(
                Patch(
                    facecolor="none",
                    edgecolor="tab:red",
                    hatch="///",
                    label="failed / not finished",
                )
            )

        ax.set_xticks(x, labels)
        ax.set_xlabel("rank")
        ax.set_ylabel("loss (log scale)" if log_scale else "loss")
        if log_scale:
            ax.set_yscale("log", nonpositive="clip")
            bottom, _ = ax.get_ylim()
            ax.set_ylim(bottom, top * 1.6)  # room for the annotations above the tallest bar
        else:
            ax.set_ylim(0, top * 1.18)  # room for the annotations
        ax.set_title("Rank sweep: final validation loss vs floor")
        ax.grid(True, axis="y", alpha=0.3)
        ax.set_axisbelow(True)
        fig.legend(handles=handles, loc="outside right upper", frameon=False)
        if summary.empty:
            ax.text(0.5, 0.5, "no jobs", ha="center", va="center", transform=ax.transAxes)
        return fig


# ---------------------------------------------------------------------------- writing


def save_png(fig: Figure, path: Path, dpi: int = _DPI) -> None:
    fig.savefig(path, format="png", dpi=dpi, bbox_inches="tight")


def write_all(writers: Mapping[Path, Callable[[Path], Any]]) -> list[Path]:
    """Write a report's files all or none: each writer fills a temp file beside its path, and
    only when every one succeeded are they renamed into place, so a full disk half-way leaves
    the old outputs, not a mix. An OSError is raised naming the file it hit (a failed write()
    names none: a bare "No space left on device")."""
    with ExitStack() as stack:
        for path, write in writers.items():
            tmp = stack.enter_context(atomic_path(path))
            try:
                write(tmp)
            except OSError as exc:
                raise OSError(exc.errno, exc.strerror or str(exc), str(path)) from exc
    return list(writers)


# ---------------------------------------------------------------------------- report


def _plain(value: Any) -> Any:
    """A JSON-ready scalar: numpy/pandas scalars unwrapped, NaN/NA/Inf -> None."""
    if value is None or value is pd.NA:
        return None
    if hasattr(value, "item"):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def _for_files(summary: pd.DataFrame, sweep_dir: Path) -> pd.DataFrame:
    # job_dir relative to the sweep folder, so the files stay right when the folder moves.
    out = summary.copy()
    out["job_dir"] = [os.path.relpath(p, sweep_dir) for p in summary["job_dir"]]
    return out


def write_report(
    sweep_dir: str | os.PathLike[str],
    prefix: str = "rank_sweep",
    log_scale: bool = False,
    summary: pd.DataFrame | None = None,
) -> dict[str, Path]:
    """Write ``{prefix}_loss_curves.png``, ``{prefix}_final_losses.png``, ``{prefix}_summary.csv``
    and ``{prefix}_summary.json`` into ``sweep_dir`` (all or none); return their paths.
    ``summary``: the folder's ``collect_summary``, when the caller has already read it."""
    sweep_dir = Path(sweep_dir)
    if not sweep_dir.exists():
        raise UserError(f"results folder {sweep_dir} does not exist")
    if not sweep_dir.is_dir():
        raise UserError(f"results path {sweep_dir} is not a folder")
    if not prefix or Path(prefix).name != prefix:
        raise UserError(f"save prefix {prefix!r} must be a plain file-name part, without folders")
    if summary is None:
        summary = collect_summary(sweep_dir)
    if summary.empty:
        hint = (
            f" ({sweep_dir} is one job's folder: pass the folder above it, {sweep_dir.parent})"
            if (sweep_dir / "run.json").is_file()
            else ""
        )
        raise UserError(
            f"results folder {sweep_dir} holds no job folders (none with run.json){hint}"
        )

    paths = {
        "loss_curves": sweep_dir / f"{prefix}_loss_curves.png",
        "final_losses": sweep_dir / f"{prefix}_final_losses.png",
        "summary_csv": sweep_dir / f"{prefix}_summary.csv",
        "summary_json": sweep_dir / f"{prefix}_summary.json",
    }
    table = _for_files(summary, sweep_dir)
    records = [{k: _plain(v) for k, v in r.items()} for r in table.to_dict("records")]
    text = json.dumps(records, indent=2, allow_nan=False) + "\n"
    write_all(
        {
            paths["loss_curves"]: lambda tmp: save_png(loss_curves_figure(summary, log_scale), tmp),
            paths["final_losses"]: lambda tmp: save_png(
                final_losses_figure(summary, log_scale), tmp
            ),
            paths["summary_csv"]: lambda tmp: table.to_csv(tmp, index=False),
            paths["summary_json"]: lambda tmp: tmp.write_text(text),
        }
    )
    return paths
