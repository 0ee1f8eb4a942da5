"""Plot one run's rank-decay dynamics: the old notebook's three panels and a per-layer heat map.

    python analysis/plot_rank_dynamics.py --run-dir outputs/rank_sweep/<time> [--rank-type
        effective_rank] [--mode difference|ratio] [--out DIR]
    python analysis/plot_rank_dynamics.py --run ENTITY/PROJECT/RUN_ID ...

Reads per-layer ranks logged as ``ranks/{layer}/{measure}`` (this suite, the old notebook) or
``{layer}_{measure}`` (the old training scripts). Layers are taken in the order the run logged
them (the probe logs in forward order); indexed names (``layer_2`` before ``layer_10``) are
sorted by number. Writes ``rank_dynamics_{measure}_{mode}.png`` and
``rank_heatmap_{measure}.png``.
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

if __package__ in (None, ""):  # run as a plain script: make the repo importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np
import pandas as pd
from matplotlib.figure import Figure

from analysis.cli import ArgumentParser, UserError, run_cli
from analysis.ranks import MODES, RANK_MEASURES, compute_rank_decay_dynamics
from experiments.runstore import METRICS_FILE, read_metrics, save_figure


def layer_columns(columns: list[str], measure: str) -> list[tuple[str, str]]:
    """(layer, column) pairs for ``measure`` in either key style, in layer order."""
    pairs = []
    for col in columns:
        m = re.fullmatch(rf"(?:.*/)?ranks/(.+)/{measure}", col) or re.fullmatch(
            rf"(.+)_{measure}", col
        )
        if m and "/" not in m.group(1) and not col.startswith(f"{measure}_"):
            pairs.append((m.group(1), col))
    indexed = [re.fullmatch(r"(.*?)(\d+)", layer) for layer, _ in pairs]
    if pairs and all(indexed) and len({i.group(1) for i in indexed}) == 1:
        pairs.sort(key=lambda p: int(re.fullmatch(r".*?(\d+)", p[0]).group(1)))
    return pairs


def rank_table(history: pd.DataFrame, measure: str) -> tuple[pd.DataFrame, list[str]]:
    """(steps x layers) ranks, one row per logged step that holds all of them."""
    pairs = layer_columns(list(history.columns), measure)
    if not pairs:
        raise UserError(f"no rank metrics for {measure} (expected ranks/<layer>/{measure})")
    cols = [c for _, c in pairs]
    table = history[["_step", *cols]].dropna(subset=cols, how="any").set_index("_step")
    table.columns = [layer for layer, _ in pairs]
    return table, list(table.columns)


def load_history(run_dir: Path | None, run_path: str | None) -> tuple[pd.DataFrame, str]:
    if run_dir is not None:
        if not (run_dir / METRICS_FILE).is_file():
            raise UserError(f"{run_dir} holds no {METRICS_FILE} (not a run folder?)")
        return read_metrics(run_dir), run_dir.name
    import wandb  # only the W&B source needs it

    run = wandb.Api().run(run_path)
    keys = [k for k in run.summary.keys() if "rank" in k]  # noqa: SIM118 - a W&B summary
    # scan_history returns every row (history() is sampled); no keys filter: it drops rows
    rows = list(run.scan_history(page_size=1000))
    frame = pd.DataFrame(rows)
    if "_step" not in frame.columns or not keys:
        raise UserError(f"run {run_path} has no rank metrics")
    return frame, run.name


def plot(table: pd.DataFrame, dynamics: dict[str, np.ndarray], title: str, out: Path) -> Path:
    steps = table.index.to_numpy()
    fig = Figure(figsize=(10, 10), layout="tight")
    axes = fig.subplots(3, 1, sharex=True)
    panels = [
        ("rank_drop_gini", "Rank drop Gini coefficient", "Gini coefficient"),
        ("rank_decay_centroid", "Rank decay centroid", "centroid (layer index)"),
        ("normalized_aurc", "Normalized AURC", "normalized area"),
    ]
    for ax, (key, name, ylabel) in zip(axes, panels, strict=True):
        ax.plot(steps, dynamics[key], marker="o", markersize=3)
        ax.set_title(f"{name} vs. training step")
        ax.set_ylabel(ylabel)
        ax.grid(True, linestyle="--", alpha=0.5)
    axes[-1].set_xlabel("training step")
    fig.suptitle(title)
    return save_figure(fig, out)


def plot_heatmap(table: pd.DataFrame, measure: str, title: str, out: Path) -> Path:
    fig = Figure(figsize=(10, 0.45 * len(table.columns) + 2), layout="tight")
    ax = fig.subplots()
    image = ax.imshow(table.to_numpy().T, aspect="auto", cmap="viridis", origin="upper")
    ax.set_yticks(range(len(table.columns)), table.columns)
    ticks = np.linspace(0, len(table) - 1, min(len(table), 8)).round().astype(int)
    ax.set_xticks(ticks, table.index.to_numpy()[ticks])
    ax.set_xlabel("training step")
    ax.set_ylabel("layer (forward order)")
    fig.colorbar(image, ax=ax, label=measure)
    ax.set_title(title)
    return save_figure(fig, out)


def main(argv: list[str] | None = None) -> int:
    parser = ArgumentParser(description="Plot a run's rank-decay dynamics.")
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--run-dir", type=Path, help="a local run folder (metrics.jsonl)")
    source.add_argument("--run", help="ENTITY/PROJECT/RUN_ID of a W&B run")
    parser.add_argument("--rank-type", default="effective_rank", choices=RANK_MEASURES)
    parser.add_argument("--mode", default="difference", choices=MODES)
    parser.add_argument("--out", type=Path, help="output folder (default: the run folder or .)")
    args = parser.parse_args(argv)
    history, name = load_history(args.run_dir, args.run)
    table, layers = rank_table(history, args.rank_type)
    if table.empty:
        raise UserError(f"no step holds {args.rank_type} for every layer ({', '.join(layers)})")
    dynamics = compute_rank_decay_dynamics(table.to_numpy(), mode=args.mode)
    out = args.out or args.run_dir or Path(".")
    title = f"Rank decay dynamics ({args.mode} mode, {args.rank_type}) for run: {name}"
    paths = [
        plot(table, dynamics, title, out / f"rank_dynamics_{args.rank_type}_{args.mode}.png"),
        plot_heatmap(
            table,
            args.rank_type,
            f"{args.rank_type} per layer: {name}",
            out / f"rank_heatmap_{args.rank_type}.png",
        ),  # fmt: skip
    ]
    print(f"{len(table)} steps x {len(layers)} layers ({', '.join(layers)})")
    for path in paths:
        print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    run_cli(main)
