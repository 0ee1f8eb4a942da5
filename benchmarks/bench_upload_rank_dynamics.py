"""The uploader end to end over a local run store: first pass, then a second that adds nothing.

    python benchmarks/bench_upload_rank_dynamics.py [--runs 200] [--steps 2000] [--layers 8]

Builds a store of runs that logged per-layer ranks (all four measures, ``ranks/{layer}/{m}``)
at every step but no dynamics (what an old run, or one probed without them, looks like), then
times ``python analysis/upload_rank_dynamics.py --runs-dir STORE --yes`` twice as a user runs
it (a fresh process, start-up included).
Target: 200 runs x 2,000 steps in <= 30 s; the second pass adds 0 steps.
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from common.ranks import RANK_MEASURES  # noqa: E402


def build_store(root: Path, runs: int, steps: int, layers: int, seed: int = 0) -> int:
    """Run folders as the shared logger writes them; returns the bytes of metrics written."""
    rng = np.random.default_rng(seed)
    total = 0
    names = [f"layer_{i}" for i in range(layers)]
    for r in range(runs):
        folder = root / f"run_{r:03d}"
        folder.mkdir(parents=True)
        (folder / "run.json").write_text(json.dumps({"run_id": f"r{r:03d}", "state": "finished"}))
        (folder / "config.yaml").write_text("seed: 0\n")
        ranks = np.sort(rng.uniform(1, 256, size=(steps, len(RANK_MEASURES), layers)))[..., ::-1]
        lines = []
        for s in range(steps):
            row = {"_step": s, "train_loss": float(rng.random())}
            for k, measure in enumerate(RANK_MEASURES):
                for i, name in enumerate(names):
                    row[f"ranks/{name}/{measure}"] = float(ranks[s, k, i])
            lines.append(json.dumps(row))
        text = "\n".join(lines) + "\n"
        (folder / "metrics.jsonl").write_text(text)
        total += len(text)
    return total


def upload(store: Path) -> tuple[float, int, str]:
    started = time.perf_counter()
    proc = subprocess.run(
        [sys.executable, str(ROOT / "analysis" / "upload_rank_dynamics.py"),
         "--runs-dir", str(store), "--yes"],
        capture_output=True, text=True, check=False,
    )  # fmt: skip
    seconds = time.perf_counter() - started
    if proc.returncode != 0:
        sys.exit(f"uploader failed (exit {proc.returncode}):\n{proc.stdout}\n{proc.stderr}")
    added = int(re.search(r"New steps added: ([\d,]+)", proc.stdout).group(1).replace(",", ""))
    return seconds, added, proc.stdout


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=200)
    parser.add_argument("--steps", type=int, default=2000)
    parser.add_argument("--layers", type=int, default=8)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        store = Path(tmp) / "store"
        started = time.perf_counter()
        size = build_store(store, args.runs, args.steps, args.layers)
        build_s = time.perf_counter() - started
        first_s, first_added, _ = upload(store)
        second_s, second_added, _ = upload(store)
    print(f"local run store: {args.runs} runs x {args.steps:,} steps x {args.layers} layers x "
          f"{len(RANK_MEASURES)} measures ({size / 2**20:,.0f} MiB of metrics.jsonl, built in "
          f"{build_s:.0f} s)")  # fmt: skip
    print(f"{'pass':<8}{'wall s':>10}{'steps added':>14}")
    print(f"{'first':<8}{first_s:>10.1f}{first_added:>14,}")
    print(f"{'second':<8}{second_s:>10.1f}{second_added:>14,}")
    ok_time, ok_zero = first_s <= 30, second_added == 0
    print(f"target: first pass <= 30 s: {'MET' if ok_time else 'MISSED'}; "
          f"second pass adds 0: {'MET' if ok_zero else 'MISSED'}")  # fmt: skip


if __name__ == "__main__":
    main()
