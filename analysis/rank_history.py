"""Per-layer ranks in a run's logged history: find them, order the layers, compute the dynamics.

Plain functions over column names and pandas DataFrames (one row per logged step, ``_step``
first), shared by ``plot_rank_dynamics.py`` and ``upload_rank_dynamics.py``. Imports no Hydra
and no W&B.

Two key styles are read:

- ``ranks/{layer}/{measure}``: this suite's probe (and earlier runs logged that way);
- ``{layer}_{measure}``: runs from before the suite, kept readable.

Either may sit under a scope, ``{scope}/ranks/{layer}/{measure}``: the scaling sweep logs one
scope per (batch size, lr) cell in one run. Each scope is its own layer stack and gets its own
dynamics, written as ``{scope}/{measure}_{metric}`` (no scope: ``{measure}_{metric}``).
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import numpy as np
import pandas as pd

from common.ranks import DYNAMICS_METRICS, compute_rank_decay_dynamics

STEP = "_step"
# one tidy row per (step, scope, rank type): what rank_dynamics.csv holds
DYNAMICS_COLUMNS = ["step", "scope", "rank_type", *DYNAMICS_METRICS]

# {scope: {measure: {layer: column}}}
RankColumns = dict[str, dict[str, dict[str, str]]]


def parse_rank_column(column: str, measures: Sequence[str]) -> tuple[str, str, str] | None:
    """(scope, layer, measure) of a rank column in either key style, else None."""
    padded = f"/{column}"
    if "/ranks/" in padded:
        head, _, tail = padded.rpartition("/ranks/")
        layer, sep, measure = tail.partition("/")
        if sep and layer and measure in measures:
            return head.strip("/"), layer, measure
        return None  # ranks/input_rank and the like
    scope, _, name = column.rpartition("/")
    for measure in measures:
        # {layer}_{measure}; a dynamics key ({measure}_{metric}) never ends in _{measure}
        if name.endswith(f"_{measure}") and len(name) > len(measure) + 1:
            return scope, name[: -len(measure) - 1], measure
    return None


def rank_columns(columns: Iterable[str], measures: Sequence[str]) -> RankColumns:
    """Every rank column, grouped by scope and measure."""
    found: RankColumns = {}
    for col in columns:
        parsed = parse_rank_column(str(col), measures)
        if parsed is not None:
            scope, layer, measure = parsed
            found.setdefault(scope, {}).setdefault(measure, {})[layer] = col
    return found


def indexed_order(layers: Iterable[str]) -> list[str] | None:
    """Layers sorted by their number (``layer_2`` before ``layer_10``) when every name is one
    common stem plus a distinct number; else None (the order cannot be read off the names)."""
    layers = list(layers)
    matches = [re.fullmatch(r"(.*?)(\d+)", layer) for layer in layers]
    if not layers or not all(matches) or len({m.group(1) for m in matches}) != 1:
        return None
    numbers = [int(m.group(2)) for m in matches]
    if len(set(numbers)) != len(numbers):
        return None
    return [layer for _, layer in sorted(zip(numbers, layers, strict=True))]


def recorded_layer_order(record: Mapping[str, Any], config: Mapping[str, Any]) -> list[str] | None:
    """The probed layers in forward order as the logger recorded them: ``rank_probe.layers`` in
    a local run's run.json, ``rank_probe_layers`` in a W&B run's config. None for a run
    recorded before the logger kept them (or without a live probe)."""
    probe = record.get("rank_probe")
    layers = probe.get("layers") if isinstance(probe, Mapping) else None
    if layers is None:
        layers = config.get("rank_probe_layers")
    if isinstance(layers, (list, tuple)) and layers and all(isinstance(x, str) for x in layers):
        return list(layers)
    return None


def logged_in_forward_order(config: Mapping[str, Any]) -> bool:
    """Whether the run's layers were logged in forward order: this suite's live probe (a
    ``rank_probe`` group in the run's config) logs each probed step's layers in forward order
    (``RankProbe.measure``), so a run of it recorded before run.json kept the order has it in
    the order its layers first appear in the history (metrics.jsonl's keys as written; a W&B
    history row's keys as W&B returns them, which is the order they were logged). No model is
    rebuilt. Runs from before the suite have no such group: their order is never guessed."""
    return isinstance(config.get("rank_probe"), Mapping)


def resolve_layer_order(
    layers: Iterable[str],
    recorded_order: Sequence[str] | None = None,
    given_order: Sequence[str] | None = None,
    logged_order: bool = False,
) -> tuple[list[str] | None, str]:
    """(order, source) for a run's logged layer names (``layers`` in the order they first
    appear in its history), never a guess.

    Sources, first that covers exactly these layers: ``--layer-order`` (the user said so), the
    order the run recorded (``recorded_layer_order``), the order the layers were logged in when
    that is the forward order (``logged_in_forward_order``), indexed names. None and an
    explanation otherwise.
    """
    names = list(dict.fromkeys(layers))
    for order, source in ((given_order, "--layer-order"), (recorded_order, "run record")):
        if order and set(order) >= set(names):
            return [layer for layer in order if layer in names], source
    if logged_order and names:
        return names, "logged order"
    indexed = indexed_order(names)
    if indexed is not None:
        return indexed, "indexed names"
    listed = ", ".join(sorted(names))
    return None, f"layer order unknown for {listed}: pass --layer-order"


def layer_order_problem(given: Sequence[str], layers: Iterable[str]) -> str | None:
    """Why a user's layer order does not fit a run whose logged layers are ``layers`` (names
    the run lacks, its layers the order leaves out, a name given twice), or None when it names
    exactly those layers. The order is the user's word: a mismatch is an error, never skipped."""
    names = set(layers)
    ordered = indexed_order(names) or sorted(names)  # layer_2 before layer_10 where it can
    unknown = [x for x in dict.fromkeys(given) if x not in names]
    missing = [x for x in ordered if x not in set(given)]
    twice = sorted({x for x in given if list(given).count(x) > 1})
    found = {"not layers of the run": unknown, "the run's layers left out": missing,
             "given twice": twice}  # fmt: skip
    parts = [f"{k}: {', '.join(map(repr, v))}" for k, v in found.items() if v]
    if not parts:
        return None
    layers_text = ", ".join(ordered)
    return f"--layer-order does not match the run ({'; '.join(parts)}); its layers: {layers_text}"


def dynamics_key(scope: str, measure: str, metric: str) -> str:
    return f"{scope}/{measure}_{metric}" if scope else f"{measure}_{metric}"


def rank_table(history: pd.DataFrame, columns: Sequence[str]) -> pd.DataFrame:
    """(steps x layers) ranks: the rows that hold every given column, indexed by step."""
    present = [c for c in columns if c in history.columns]
    if len(present) < len(columns) or STEP not in history.columns:
        return pd.DataFrame(columns=list(columns), dtype=float)
    table = history[[STEP, *columns]]
    if not all(pd.api.types.is_numeric_dtype(t) for t in table.dtypes):
        table = table.apply(pd.to_numeric, errors="coerce")  # W&B rows may hold "NaN" strings
    table = table.dropna(how="any").drop_duplicates(STEP, keep="last")
    return table.set_index(STEP).sort_index()


def dynamics_rows(
    history: pd.DataFrame,
    scope: str,
    measure: str,
    columns: Sequence[str],
    mode: str = "difference",
    input_rank_column: str | None = None,
) -> pd.DataFrame:
    """Tidy dynamics of one scope and measure: one row per step that holds every layer's rank
    (``columns`` in layer order) and, when given, the input rank (prepended as R_0)."""
    wanted = [*columns, input_rank_column] if input_rank_column else list(columns)
    table = rank_table(history, wanted)
    ranks = table[list(columns)].to_numpy(dtype=np.float64)
    input_rank = table[input_rank_column].to_numpy(np.float64) if input_rank_column else None
    dyn = compute_rank_decay_dynamics(ranks.reshape(len(table), len(columns)), mode, input_rank)
    frame = pd.DataFrame({"step": table.index.to_numpy(dtype=np.int64), **dyn})
    frame.insert(1, "scope", scope)
    frame.insert(2, "rank_type", measure)
    return frame[DYNAMICS_COLUMNS]


def input_rank_column(scope: str) -> str:
    return f"{scope}/ranks/input_rank" if scope else "ranks/input_rank"
