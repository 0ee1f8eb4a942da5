"""Fit lr_opt(B) ~ B^beta on a batch-size x learning-rate sweep (its ``--results`` kept
compatible with the earlier ``phase_2_analysis.py``; the method: ``docs/scaling_fit.md``).

    python analysis/scaling_analysis.py --results outputs/scaling/results.csv [--out DIR]
        [--n-boot 2000] [--seed 0] [--loss final_val_loss|min_val_loss] [--window 3|5]

Writes into DIR (default: the results file's folder), all or none: ``scaling_fit.json``,
``lr_opt_vs_batch.png``, ``loss_vs_lr.png`` and ``final_loss_heatmap.png``; prints the
interpretation and the written paths. Bad input (a cell that is no number, a row cut short,
one cell twice with two losses, a design without a slope) is one ``error:`` line and exit 2,
before anything is written; rows whose cell did not finish (status failed, killed, ...) are
left out of the fit, said, and make the exit code 1. The math lives in
``analysis.scaling_fit``. No Hydra, no W&B; plots use matplotlib's ``Figure`` directly (Agg).
"""

from __future__ import annotations

import json
import math
import os
import sys
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # run as a plain script: make the repo root importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import matplotlib  # noqa: E402
import numpy as np  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402
from matplotlib.patches import Rectangle  # noqa: E402

from analysis.rank_sweep_report import save_png, write_all  # noqa: E402
from analysis.scaling_fit import (  # noqa: E402
    DEFAULT_WINDOW,
    LOSS_COLUMNS,
    REFERENCE_SLOPES,
    FamilyGrid,
    analyze,
    family_grid,
    interpret,
    load_results,
)
from common.cli import ArgumentParser, UserError, run_cli  # noqa: E402
from common.runstore import to_jsonable  # noqa: E402

_DPI = 120
FIT_JSON = "scaling_fit.json"
LR_OPT_PNG = "lr_opt_vs_batch.png"
LOSS_VS_LR_PNG = "loss_vs_lr.png"
HEATMAP_PNG = "final_loss_heatmap.png"
_REF_STYLES = {0.5: "--", 0.67: "-.", 1.0: ":"}


def _seed_stats(values: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Mean, min and max over the last axis, ignoring NaN; NaN (no warning) where all are."""
    ok = np.isfinite(values)
    n = ok.sum(axis=-1)
    with np.errstate(invalid="ignore", divide="ignore"):
        mean = np.where(ok, values, 0.0).sum(axis=-1) / n
    low = np.where(ok, values, np.inf).min(axis=-1)
    high = np.where(ok, values, -np.inf).max(axis=-1)
    none = n == 0
    return np.where(none, np.nan, mean), np.where(none, np.nan, low), np.where(none, np.nan, high)


def _family_colors(names: list[str]) -> dict[str, Any]:
    cmap = matplotlib.colormaps["tab10"]
    return {name: cmap(i % 10) for i, name in enumerate(names)}


def _batch_colors(n: int) -> list[tuple[float, ...]]:
    cmap = matplotlib.colormaps["viridis"]
    return [cmap(x) for x in np.linspace(0.0, 0.85, n)] if n > 1 else [cmap(0.35)]


def _panels(n: int, width: float, height: float) -> tuple[Figure, list[Any]]:
    fig = Figure(figsize=(width * n, height), layout="constrained")
    axes = fig.subplots(1, n, squeeze=False)[0]
    return fig, list(axes)


def lr_opt_figure(result: dict[str, Any]) -> Figure:
    """log-log lr_opt against B per family: per-seed range as error bars, the fit line, the
    reference slopes through the primary fit's geometric centre; flagged points hollow."""
    fams = result["families"]
    colors = _family_colors(list(fams))
    fig = Figure(figsize=(7.5, 5.5), layout="constrained")
    ax = fig.subplots()
    grid_lrs = sorted({lr for fam in fams.values() for lr in fam["grid"]["lrs"]})
    for lr in grid_lrs:
        ax.axhline(lr, color="0.9", lw=0.8, zorder=0)
    for name, fam in fams.items():
        color = colors[name]
        recs = [r for r in fam["lr_opt"] if r["lr_opt"] is not None]
        for rec in recs:
            seeds = np.array([v for v in rec["lr_opt_per_seed"] if v is not None], dtype=float)
            low, high = (seeds.min(), seeds.max()) if seeds.size else (rec["lr_opt"],) * 2
            yerr = [[max(rec["lr_opt"] - low, 0.0)], [max(high - rec["lr_opt"], 0.0)]]
            hollow = bool(rec["flags"])
            ax.errorbar(
                [rec["batch_size"]],
                [rec["lr_opt"]],
                yerr=yerr,
                fmt="o",
                color=color,
                mfc="none" if hollow else color,
                ms=7,
                capsize=3,
                zorder=3,
            )
        if fam["beta"] is not None and fam["intercept"] is not None:
            b = np.array(fam["used_batch_sizes"] or [r["batch_size"] for r in recs], float)
            bb = np.geomspace(b.min(), b.max(), 50)
            lo, hi = fam["beta_ci"]
            ci = f" [{lo:.2f}, {hi:.2f}]" if lo is not None and hi is not None else ""
            ax.plot(
                bb,
                np.exp(fam["intercept"]) * bb ** fam["beta"],
                color=color,
                lw=2,
                label=f"{name}: beta = {fam['beta']:.3f}{ci}",
            )
    primary = fams[result["primary_family"]]
    if primary["beta"] is not None and primary["intercept"] is not None:
        b_all = np.array([r["batch_size"] for r in primary["lr_opt"]], float)
        used = np.array(primary["used_batch_sizes"] or b_all, float)
        b0 = float(np.exp(np.log(used).mean()))
        lr0 = float(np.exp(primary["intercept"]) * b0 ** primary["beta"])
        bb = np.geomspace(b_all.min(), b_all.max(), 50)
        for slope, words in REFERENCE_SLOPES.items():
            ax.plot(
                bb,
                lr0 * (bb / b0) ** slope,
                color="0.35",
                lw=1,
                ls=_REF_STYLES.get(slope, "--"),
                label=f"slope {slope:g} ({words})",
            )
    ax.errorbar([], [], fmt="o", color="0.4", mfc="none", label="flagged (e.g. edge): hollow")
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("batch size B")
    ax.set_ylabel("refined lr_opt (bars: per-seed range)")
    ax.set_title(f"lr_opt vs batch size ({result['loss']}); grey lines: grid lrs")
    ax.legend(fontsize=8, loc="best")
    ax.grid(True, which="major", alpha=0.3)
    return fig


def loss_vs_lr_figure(result: dict[str, Any], grids: dict[str, FamilyGrid]) -> Figure:
    """Per family, one curve per batch size: seed-mean loss (geometric) with a min-max band
    over seeds, the refined optimum as a star."""
    fig, axes = _panels(len(grids), 6.5, 5.0)
    for ax, (name, grid) in zip(axes, grids.items(), strict=True):
        colors = _batch_colors(len(grid.batch_sizes))
        recs = {r["batch_size"]: r for r in result["families"][name]["lr_opt"]}
        for ib, batch in enumerate(grid.batch_sizes):
            logs = grid.log_loss[ib]  # (nL, nS)
            ok = np.isfinite(logs).any(axis=1) & ~grid.diverged[ib].any(axis=1)
            mean, low, high = (np.exp(v) for v in _seed_stats(np.where(ok[:, None], logs, np.nan)))
            ax.plot(grid.lrs, mean, "o-", color=colors[ib], ms=3, label=f"B={batch}")
            ax.fill_between(grid.lrs, low, high, color=colors[ib], alpha=0.2, lw=0)
            rec = recs.get(int(batch))
            if rec and rec["lr_opt"] is not None and rec["min_loss"] is not None:
                ax.plot(
                    [rec["lr_opt"]],
                    [rec["min_loss"]],
                    marker="*",
                    ms=13,
                    color=colors[ib],
                    mec="black",
                    mew=0.6,
                    mfc="none" if rec["flags"] else colors[ib],
                    zorder=4,
                )
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("learning rate")
        ax.set_ylabel(f"{result['loss']} (seed mean, band: min-max)")
        ax.set_title(f"{name}: stars = refined lr_opt (hollow: flagged)")
        ax.legend(fontsize=8, ncol=2)
        ax.grid(True, which="major", alpha=0.3)
    return fig


def heatmap_figure(result: dict[str, Any], grids: dict[str, FamilyGrid]) -> Figure:
    """Per family: log10 of the seed-mean loss over (batch size, lr); cells with a diverged
    seed are hatched and marked "div" (with k/n when only some seeds diverged)."""
    fig, axes = _panels(len(grids), 6.8, 5.2)
    values = []
    for grid in grids.values():
        values.append(_seed_stats(grid.log_loss)[0] / math.log(10))
    finite = np.concatenate([v[np.isfinite(v)] for v in values])
    vmin, vmax = (float(finite.min()), float(finite.max())) if finite.size else (0.0, 1.0)
    image = None
    for ax, (name, grid), val in zip(axes, grids.items(), values, strict=True):
        n_b, n_l = len(grid.batch_sizes), len(grid.lrs)
        image = ax.imshow(
            np.ma.masked_invalid(val), origin="lower", aspect="auto", cmap="viridis",
            vmin=vmin, vmax=vmax,
        )  # fmt: skip
        recs = {r["batch_size"]: r for r in result["families"][name]["lr_opt"]}
        mid = (vmin + vmax) / 2
        for ib in range(n_b):
            for il in range(n_l):
                n_div = int(grid.diverged[ib, il].sum())
                n_run = n_div + int(np.isfinite(grid.log_loss[ib, il]).sum())
                if n_div:
                    ax.add_patch(
                        Rectangle(
                            (il - 0.5, ib - 0.5), 1, 1, fill=False, hatch="///",
                            edgecolor="0.5", lw=0,
                        )
                    )  # fmt: skip
                    text = "div" if n_div == n_run else f"div {n_div}/{n_run}"
                    ax.text(il, ib, text, ha="center", va="center", fontsize=7, color="red")
                elif np.isfinite(val[ib, il]):
                    color = "black" if val[ib, il] > mid else "white"
                    ax.text(il, ib, f"{val[ib, il]:.2f}", ha="center", va="center",
                            fontsize=6.5, color=color)  # fmt: skip
            rec = recs.get(int(grid.batch_sizes[ib]))
            if rec and rec["lr_grid_argmin"] is not None:
                il = int(np.argmin(np.abs(np.log(grid.lrs) - math.log(rec["lr_grid_argmin"]))))
                ax.add_patch(
                    Rectangle((il - 0.5, ib - 0.5), 1, 1, fill=False, edgecolor="red", lw=1.8)
                )
        ax.set_xticks(range(n_l), [f"{lr:.2g}" for lr in grid.lrs], rotation=45)
        ax.set_yticks(range(n_b), [str(b) for b in grid.batch_sizes])
        ax.set_xlabel("learning rate")
        ax.set_ylabel("batch size")
        ax.set_title(f"{name}: log10 {result['loss']} (red box: grid argmin)")
    if image is not None:
        fig.colorbar(image, ax=axes, label=f"log10 {result['loss']} (seed mean)")
    return fig


def write_outputs(
    result: dict[str, Any], grids: dict[str, FamilyGrid], out_dir: str | os.PathLike[str]
) -> dict[str, Path]:
    """Write the JSON and the three plots into ``out_dir``, all or none (a full disk half-way
    leaves no new file and names the one it hit); return their paths."""
    out_dir = Path(out_dir)
    paths = {
        "json": out_dir / FIT_JSON,
        "lr_opt": out_dir / LR_OPT_PNG,
        "loss_vs_lr": out_dir / LOSS_VS_LR_PNG,
        "heatmap": out_dir / HEATMAP_PNG,
    }
    text = json.dumps(to_jsonable(result), indent=2) + "\n"
    write_all(
        {
            paths["json"]: lambda tmp: tmp.write_text(text),
            paths["lr_opt"]: lambda tmp: save_png(lr_opt_figure(result), tmp, _DPI),
            paths["loss_vs_lr"]: lambda tmp: save_png(loss_vs_lr_figure(result, grids), tmp, _DPI),
            paths["heatmap"]: lambda tmp: save_png(heatmap_figure(result, grids), tmp, _DPI),
        }
    )
    return paths


def main(argv: list[str] | None = None) -> int:
    parser = ArgumentParser(
        description="Fit lr_opt(B) ~ B^beta on a batch-size x learning-rate sweep."
    )
    parser.add_argument("--results", required=True, help="the sweep's results.csv")
    parser.add_argument("--out", default=None, help="output folder (default: the results folder)")
    parser.add_argument("--n-boot", type=int, default=2000, help="bootstrap replicates")
    parser.add_argument("--seed", type=int, default=0, help="bootstrap random seed")
    parser.add_argument("--loss", choices=LOSS_COLUMNS, default="final_val_loss")
    parser.add_argument(
        "--window", type=int, choices=(3, 5), default=DEFAULT_WINDOW,
        help="points in the parabola window around the grid argmin",
    )  # fmt: skip
    parser.add_argument(
        "--include-flagged", action="store_true",
        help="keep edge-flagged batch sizes in the fit",
    )  # fmt: skip
    args = parser.parse_args(argv)
    if args.n_boot < 1:
        raise UserError(f"--n-boot must be at least 1, not {args.n_boot}")

    results = Path(args.results)
    df = load_results(results, loss=args.loss)
    result = analyze(
        df,
        n_boot=args.n_boot,
        seed=args.seed,
        loss=args.loss,
        include_flagged=args.include_flagged,
        window=args.window,
    )
    result["results_file"] = str(results)
    grids = {name: family_grid(df, name, args.loss) for name in result["families"]}
    out_dir = Path(args.out) if args.out else results.resolve().parent
    paths = write_outputs(result, grids, out_dir)
    print(interpret(result))
    print()
    for path in paths.values():
        print(f"wrote {path}")
    return 1 if result["unfinished_rows"] else 0  # the fit is written, but cells are missing


if __name__ == "__main__":
    run_cli(main)
