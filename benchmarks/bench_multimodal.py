"""Benchmark the multimodal trainer: does the default config learn in 10 minutes on this CPU,
and what does logging cost?

    python benchmarks/bench_multimodal.py            # both parts (~10 minutes on 2 cores)
    python benchmarks/bench_multimodal.py --skip-learning

1. The default config on the built-in data (W&B off: part 2 prices logging): validation caption
   token accuracy (target >= 0.9), reconstruction MSE against predicting the mean image (target
   < half), image-to-caption retrieval top-1 within validation batches against chance,
   samples/second, wall time (target <= 600 s).
2. Step time with logging on (log_frequency=10, images every 500 batches, W&B offline) against
   off, alternating runs of the same steps; the ratio's target is <= 1.05.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "experiments" / "multimodal.py"


def train(args: list[str], workdir: Path) -> tuple[dict, float]:
    out = workdir / f"job{len(list(workdir.iterdir()))}"
    env = {**os.environ, "WANDB_SILENT": "true"}
    started = time.perf_counter()
    proc = subprocess.run(
        [sys.executable, str(SCRIPT), *args, f"hydra.run.dir={out}"],
        cwd=workdir,
        env=env,
        capture_output=True,
        text=True,
    )
    wall = time.perf_counter() - started
    if proc.returncode != 0:
        sys.exit(f"training failed:\n{proc.stderr[-2000:]}")
    return json.loads((out / "summary.json").read_text()), wall


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--skip-learning", action="store_true")
    parser.add_argument("--overhead-steps", type=int, default=120)
    parser.add_argument("--repeats", type=int, default=2)
    ns = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        if not ns.skip_learning:
            s, wall = train(["logger=disabled"], work)
            acc = s["final_val_caption_accuracy"]
            mse, base = s["final_val_image_mse"], s["final_val_mean_image_mse"]
            top1, chance = s["final_val_retrieval_top1"], s["final_val_retrieval_chance"]
            print(f"default config: {s['total_parameters']:,} parameters, {s['steps']} steps")
            print(f"wall time              {wall:8.1f} s    (target <= 600)")
            print(f"val caption accuracy   {acc:8.3f}      (target >= 0.9)")
            print(
                f"val image MSE          {mse:8.4f}      mean image {base:.4f}, ratio "
                f"{mse / base:.3f} (target < 0.5)"
            )
            print(f"val retrieval top-1    {top1:8.3f}      chance {chance:.3f}")
            print(f"samples/second         {s['samples_per_second']:8.1f}")
        # same steps, same data, logging on vs off, alternated so drift hits both alike
        common = [
            f"train.max_steps={ns.overhead_steps}",
            "train.epochs=4",
            "data.num_train=1024",
            "data.num_val=128",
        ]
        on = [*common, "train.log_frequency=10", "logger=wandb", "logger.mode=offline"]
        off = [*common, "train.log_frequency=0", "train.image_log_frequency=0",
               "logger=disabled"]  # fmt: skip
        times: dict[str, list[float]] = {"on": [], "off": []}
        for _ in range(ns.repeats):
            for name, args in (("off", off), ("on", on)):
                times[name].append(train(args, work)[0]["step_time_s"])
        t_on, t_off = statistics.median(times["on"]), statistics.median(times["off"])
        print(f"step time logging off  {t_off * 1000:8.1f} ms")
        print(f"step time logging on   {t_on * 1000:8.1f} ms   (log_frequency=10)")
        print(f"logging overhead ratio {t_on / t_off:8.3f}      (target <= 1.05)")


if __name__ == "__main__":
    main()
