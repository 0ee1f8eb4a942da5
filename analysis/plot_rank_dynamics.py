"""Plot one run's rank-decay dynamics: Gini, centroid and AURC panels, and a per-layer heat map.

    python analysis/plot_rank_dynamics.py --run-dir outputs/rank_sweep/<time> [--rank-type
        effective_rank] [--mode difference|ratio] [--out DIR]
    python analysis/plot_rank_dynamics.py --run ENTITY/PROJECT/RUN_ID ...

Reads per-layer ranks logged as ``ranks/{layer}/{measure}`` (this suite's probe) or
``{layer}_{measure}`` (runs from before the suite). Layers are put in forward order the way the
uploader does it (``--layer-order``, the order the run recorded, for an older run of the suite's
probe the order it logged them in, indexed names); a run whose order cannot be known is an
error, never a guess. A run with several scopes (the
scaling sweep's cells) gets one line per scope in the panels; ``--scope`` picks one, and the
heat map needs one. ``--layer-order`` must name exactly the run's layers (an unknown or a
missing name is an error naming them). Writes ``rank_dynamics_{measure}_{mode}.png`` and
``rank_heatmap_{measure}.png``.
"""

from __future__ import annotations

import sys
from pathlib import Path

if __package__ in (None, ""):  # run as a plain script: make the repo importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np
import pandas as pd
import yaml
from matplotlib import colormaps
from matplotlib.figure import Figure

from analysis.rank_history import (
    layer_order_problem,
    logged_in_forward_order,
    rank_columns,
    rank_table,
    recorded_layer_order,
    resolve_layer_order,
)
from common.cli import ArgumentParser, UserError, run_cli
from common.ranks import MODES, RANK_MEASURES, compute_rank_decay_dynamics
from common.runstore import (
    CONFIG_FILE,
    METRICS_FILE,
    RUN_FILE,
    read_json,
    read_metrics,
    save_figure,
)


def scope_tables(
    history: pd.DataFrame,
    measure: str,
    config: dict | None = None,
    layer_order: list[str] | None = None,
    record: dict | None = None,
) -> dict[str, pd.DataFrame]:
    """{scope: (steps x layers) ranks in forward order}, one row per step holding every layer
    (``record``: the run's run.json, ``config``: its config, for the order it recorded)."""
    groups = {
        scope: by_measure[measure]
        for scope, by_measure in rank_columns(history.columns, [measure]).items()
    }
    if not groups:
        raise UserError(f"no rank metrics for {measure} (expected ranks/<layer>/{measure})")
    if layer_order is not None:  # checked against every scope's layers: never ignored
        for by_layer in groups.values():
            problem = layer_order_problem(layer_order, by_layer)
            if problem:
                raise UserError(problem)
    config, record = config or {}, record or {}
    recorded, logged = recorded_layer_order(record, config), logged_in_forward_order(config)
    tables = {}
    for scope, columns in sorted(groups.items()):
        order, reason = resolve_layer_order(columns, recorded, layer_order, logged)
        if order is None:
            raise UserError(reason)
        table = rank_table(history, [columns[layer] for layer in order])
        table.columns = order
        tables[scope] = table
    return tables


def cell_steps(history: pd.DataFrame, scope: str, table: pd.DataFrame) -> np.ndarray:
    """The x axis of a scope: its own step counter (``{scope}/step``, what the scaling sweep
    logs per cell) when the run has one, else the run's ``_step``."""
    column = f"{scope}/step"
    if scope and column in history.columns:
        own = history.drop_duplicates("_step", keep="last").set_index("_step")[column]
        return own.reindex(table.index).to_numpy()
    return table.index.to_numpy()


def load_history(
    run_dir: Path | None, run_path: str | None
) -> tuple[pd.DataFrame, dict, dict, str]:
    """(history, config, run record, name) of a local run folder or a W&B run (whose record,
    having no run.json, is empty)."""
    if run_dir is not None:
        if not (run_dir / METRICS_FILE).is_file():
            raise UserError(f"{run_dir} holds no {METRICS_FILE} (not a run folder?)")
        config_path = run_dir / CONFIG_FILE
        try:
            config = yaml.safe_load(config_path.read_text()) if config_path.exists() else {}
        except (OSError, yaml.YAMLError) as exc:
            raise UserError(f"unreadable {config_path}: {exc}") from None
        try:
            record = read_json(run_dir / RUN_FILE) if (run_dir / RUN_FILE).exists() else {}
        except (OSError, ValueError) as exc:
            raise UserError(f"unreadable {run_dir / RUN_FILE}: {exc}") from None
        record = record if isinstance(record, dict) else {}
        return read_metrics(run_dir), config or {}, record, run_dir.name
    # the uploader's W&B client: its retries and timeouts, scan_history for every row
    # (history() is sampled), the lazy config load retried too
    from analysis.upload_rank_dynamics import describe, public_api, run_config, scan, with_retries

    try:
        api = public_api()
        run = with_retries(f"reading {run_path}", lambda: api.run(run_path))
        frame = scan(run, f"reading {run_path}")
        config = run_config(run)
    except UserError:
        raise
    except Exception as exc:  # no API key, no network, no such run, retries spent: one line
        raise UserError(f"cannot read W&B run {run_path}: {describe(exc)}") from None
    if "_step" not in frame.columns:
        raise UserError(f"run {run_path} has no history")
    return frame, config, {}, run.name


def plot(dynamics: dict[str, dict[str, np.ndarray]], steps: dict[str, np.ndarray], title: str,
         out: Path) -> Path:  # fmt: skip
    """Three panels (Gini, centroid, AURC) against step, one line per scope."""
    fig = Figure(figsize=(10, 10), layout="tight")
    axes = fig.subplots(3, 1, sharex=True)
    panels = [
        ("rank_drop_gini", "Rank drop Gini coefficient", "Gini coefficient"),
        ("rank_decay_centroid", "Rank decay centroid", "centroid (layer index)"),
        ("normalized_aurc", "Normalized AURC", "normalized area"),
    ]
    colors = colormaps["viridis"](np.linspace(0, 0.9, len(dynamics)))
    for ax, (key, name, ylabel) in zip(axes, panels, strict=True):
        for color, (scope, dyn) in zip(colors, dynamics.items(), strict=True):
            ax.plot(steps[scope], dyn[key], marker="o", markersize=3, color=color,
                    label=scope or None)  # fmt: skip
        ax.set_title(f"{name} vs. training step")
        ax.set_ylabel(ylabel)
        ax.grid(True, linestyle="--", alpha=0.5)
    if 1 < len(dynamics) <= 12:
        axes[0].legend(fontsize="small", ncols=2)
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
    parser.add_argument("--scope", help="one scope (a scaling-sweep cell, e.g. B16_LR0.010000)")
    parser.add_argument("--layer-order", metavar="A,B,C", help="forward order of the layers")
    parser.add_argument("--out", type=Path, help="output folder (default: the run folder or .)")
    args = parser.parse_args(argv)
    history, config, record, name = load_history(args.run_dir, args.run)
    given = args.layer_order
    order = [x.strip() for x in given.split(",")] if given is not None else None  # "" is an error
    tables = scope_tables(history, args.rank_type, config, order, record)
    if args.scope is not None:
        if args.scope not in tables:
            raise UserError(f"no scope {args.scope!r}; the run has {', '.join(tables) or 'none'}")
        tables = {args.scope: tables[args.scope]}
    tables = {scope: table for scope, table in tables.items() if not table.empty}
    if not tables:
        raise UserError(f"no step holds {args.rank_type} for every layer")
    if all(len(table.columns) < 2 for table in tables.values()):
        layers = ", ".join(next(iter(tables.values())).columns)
        raise UserError(f"fewer than two layers ({layers}): rank decay needs a layer-to-layer drop")
    dynamics = {
        scope: compute_rank_decay_dynamics(table.to_numpy(), mode=args.mode)
        for scope, table in tables.items()
    }
    steps = {scope: cell_steps(history, scope, table) for scope, table in tables.items()}
    out = args.out or args.run_dir or Path(".")
    if out.exists() and not out.is_dir():
        raise UserError(f"--out {out} is a file, not a folder")
    title = f"Rank decay dynamics ({args.mode} mode, {args.rank_type}) for run: {name}"
    paths = [plot(dynamics, steps, title, out / f"rank_dynamics_{args.rank_type}_{args.mode}.png")]
    if len(tables) == 1:
        ((scope, table),) = tables.items()
        label = f"{name}/{scope}" if scope else name
        paths.append(plot_heatmap(table, args.rank_type, f"{args.rank_type} per layer: {label}",
                                  out / f"rank_heatmap_{args.rank_type}.png"))  # fmt: skip
        print(f"{len(table)} steps x {len(table.columns)} layers ({', '.join(table.columns)})")
    else:
        print(f"{len(tables)} scopes; pass --scope for one scope's heat map")
    for path in paths:
        print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    run_cli(main)
