"""Cost of the live rank probe at its default cadence, in the rank sweep.

    python benchmarks/bench_rank_probe.py [--epochs 10] [--repeats 2]

Trains the same chain (1024x2048 Gaussian weight, rank 64, the default config otherwise: 250
steps of batch 32 per epoch) with the probe off and on (``rank_probe.every`` from the config: 5 epochs) and
prints the training time of each, and the time the probe itself took in the "on" run (the
logger's ``rank_probe_seconds`` summary) as a share of the rest of that run: the direct measure,
free of the run-to-run noise of comparing two runs. Target: <= 10% of training time.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def train_seconds(extra: list[str]) -> tuple[float, float]:
    """(wall time, seconds spent in the probe) of one training job."""
    with tempfile.TemporaryDirectory() as tmp:
        subprocess.run(
            [sys.executable, str(REPO / "experiments" / "rank_sweep.py"), *extra,
             "logger=disabled", f"hydra.run.dir={tmp}/run"],
            check=True, capture_output=True, cwd=tmp,
        )  # fmt: skip
        summary = json.loads((Path(tmp) / "run" / "summary.json").read_text())
        return summary["wall_time_s"], summary.get("rank_probe_seconds", 0.0)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args()
    base = ["rank=64", f"train.num_epochs={args.epochs}"]
    off = min(train_seconds([*base, "rank_probe.enabled=false"])[0] for _ in range(args.repeats))
    on, probe = min(train_seconds(base) for _ in range(args.repeats))
    print(
        f"rank sweep 1024x2048 rank 64, {args.epochs} epochs x 250 steps (best of {args.repeats})"
    )
    print(f"  probe off  {off:8.2f} s")
    print(f"  probe on   {on:8.2f} s  (every 5 epochs, 256 probe samples, every factor)")
    print(f"  of which the probe  {probe:.2f} s")
    share = probe / (on - probe)
    print(f"run-to-run difference: {on / off - 1:+.1%} (noise included)")
    print(f"probe cost: {share:.1%} of training time; target <= 10%: "
          f"{'MET' if share <= 0.10 else 'MISSED'}")  # fmt: skip


if __name__ == "__main__":
    main()
