"""Speed of the rank-decay dynamics: vectorised over (step x run) rows against a per-row loop.

    python benchmarks/bench_rank_dynamics.py [--rows 1000000] [--loop-rows 5000]

The baseline, a loop over history rows with ``DataFrame.iterrows`` that calls the dynamics
function once per step (the pattern of the earlier notebook and uploader: look the layer keys up
in each row, call the function on the list, add ``_step``, collect dicts into a DataFrame; with
this suite's dynamics function), is timed on ``--loop-rows`` rows and scaled up
linearly.
Target: 1,000,000 rows x 8 layers x 4 measures in <= 2 s, >= 500x faster than the loop.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from common.ranks import RANK_MEASURES, compute_rank_decay_dynamics  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--loop-rows", type=int, default=5_000)
    args = parser.parse_args()
    rng = np.random.default_rng(0)
    # non-increasing ranks per row, as in a real network
    tables = {
        m: np.sort(rng.uniform(1, 512, size=(args.rows, args.layers)), axis=1)[:, ::-1].copy()
        for m in RANK_MEASURES
    }

    started = time.perf_counter()
    for table in tables.values():
        compute_rank_decay_dynamics(table, mode="difference")
    vec_s = time.perf_counter() - started

    started = time.perf_counter()
    for measure in RANK_MEASURES:
        rank_keys = [f"ranks/layer_{i}/{measure}" for i in range(args.layers)]
        history = pd.DataFrame(tables[measure][: args.loop_rows], columns=rank_keys)
        history.insert(0, "_step", np.arange(len(history)))
        results = []
        for _, row in history.iterrows():  # the notebook's loop
            ranks_at_step = [row[key] for key in rank_keys if key in row]
            if len(ranks_at_step) == args.layers:
                dynamics = compute_rank_decay_dynamics(ranks_at_step, mode="difference")
                dynamics["_step"] = row["_step"]
                results.append(dynamics)
        pd.DataFrame(results)
    loop_s = (time.perf_counter() - started) * args.rows / args.loop_rows

    cells = f"{args.rows:,} rows x {args.layers} layers x {len(RANK_MEASURES)} measures"
    print(f"rank-decay dynamics over {cells}")
    print(f"  vectorised (numpy)                         {vec_s:10.2f} s")
    print(f"  the notebook's iterrows loop ({args.loop_rows:,} rows, scaled)  {loop_s:10.1f} s")
    print(f"speed-up: {loop_s / vec_s:,.0f}x")
    print(f"target: <= 2 s: {'MET' if vec_s <= 2 else 'MISSED'}; "
          f">= 500x: {'MET' if loop_s / vec_s >= 500 else 'MISSED'}")  # fmt: skip


if __name__ == "__main__":
    main()
