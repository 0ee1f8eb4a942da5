"""The batch-size x learning-rate scaling sweep ("Laplace scaling" phase 2; docs/scaling_fit.md).

    python experiments/laplace_scaling.py batch_size=64 lr=1e-3          # one cell
    python experiments/laplace_scaling.py -m experiment=scaling_grid     # one job per cell
    python experiments/laplace_scaling.py runner=grid                    # whole grid, one run

Both ways write ``results.csv`` (one row per cell and seed) for
``python analysis/scaling_analysis.py --results PATH/results.csv``.
"""

from __future__ import annotations

import logging
import math
import sys
from pathlib import Path

if __package__ in (None, ""):  # run as a plain script: make the repo importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import hydra
import pandas as pd
import torch
from omegaconf import DictConfig, OmegaConf

from common.cli import UserError
from common.runstore import read_json, write_json_atomic
from experiments.callbacks import exit_if_incomplete
from experiments.logger import ExperimentLogger
from experiments.progress import progress
from experiments.rank_probe import RankProbe, mlp_probe_layers
from experiments.resources import (
    NON_EMPTY,
    NON_NEGATIVE,
    POSITIVE,
    POSITIVE_INT,
    SEED,
    UNIT,
    check_finite,
    check_numbers,
    check_rules,
    scaling_memory,
)
from experiments.runtime import check_override_keys, is_multirun, job_dir, run_job
from experiments.scaling_records import CELL_FILE, RESULTS_FILE, write_results
from experiments.scaling_training import (
    CellResult,
    EvalPoint,
    cell_name,
    make_task,
    train_group,
)
from experiments.schemas import LaplaceScalingConfig, register_configs

log = logging.getLogger(__name__)


# Numbers of the scaling sweep's config (every number must also be finite); the grid's lists
# are checked whichever the runner, so a bad grid never waits for runner=grid to show.
RULES = {
    "batch_size": POSITIVE_INT,
    "lr": POSITIVE,
    "seed": SEED,
    "task.n_features": POSITIVE_INT,
    "task.n_train": POSITIVE_INT,
    "task.noise_std": POSITIVE,
    "model.hidden": POSITIVE_INT,
    "model.depth": POSITIVE_INT,
    "optim.momentum": UNIT,
    "optim.betas": UNIT,
    "optim.eps": POSITIVE,
    "optim.weight_decay": NON_NEGATIVE,
    "train.epochs": POSITIVE_INT,
    "train.steps": POSITIVE_INT,
    "train.evals": POSITIVE_INT,
    "grid.batch_sizes": (NON_EMPTY, POSITIVE_INT),
    "grid.lrs": (NON_EMPTY, POSITIVE),
    "grid.seeds": (NON_EMPTY, SEED),
    "grid.noises": NON_EMPTY,
}
# labels are y = x . w* + noise with Var(x . w*) ~ 1: their square must fit float32's losses
MAX_NOISE_STD = 1e15
# the grid runner's finished groups of cells, their rows and the logger's step after them
GRID_PROGRESS = "grid_progress.json"


def validate(cfg: DictConfig) -> None:
    g, t = cfg.grid, cfg.task
    check_finite(cfg)  # NaN passes no comparison below
    if t.n_val < 1:
        raise UserError(f"task.n_val={t.n_val} leaves the validation set empty: it must be at "
                        "least 1")  # fmt: skip
    for key in ("grid.lrs", "grid.batch_sizes", "grid.seeds", "grid.noises"):
        if not len(OmegaConf.select(cfg, key)):
            raise UserError(f"{key} is empty: it must list at least one value")
    check_rules(cfg, {k: v for k, v in RULES.items() if k.startswith("task.")})  # sizes first
    cell = cfg.runner == "cell"
    lrs = [cfg.lr] if cell else list(g.lrs)
    batch_sizes = [cfg.batch_size] if cell else list(g.batch_sizes)
    noises = [t.noise] if cell else list(g.noises)
    keys = ("lr", "batch_size") if cell else ("grid.lrs", "grid.batch_sizes")
    # (runner, noise, optim.name, model.kind, train.protocol: the schema's Enums)
    checks = [
        (all(lr > 0 for lr in lrs), f"learning rates ({keys[0]}) must be positive, got {lrs}"),
        (all(0 < b <= t.n_train for b in batch_sizes), f"batch sizes ({keys[1]}) must be in 1..task.n_train={t.n_train}, got {batch_sizes}"),
        (t.noise_std > 0, f"task.noise_std must be positive, got {t.noise_std}"),
        (t.noise_std <= MAX_NOISE_STD, f"task.noise_std={t.noise_std:g} is too large: float32 losses overflow above {MAX_NOISE_STD:g}"),
        ("student_t" not in noises or t.student_t_df > 2, f"task.student_t_df must be > 2 (finite variance), got {t.student_t_df}"),
        (len(cfg.optim.betas) == 2, f"optim.betas must hold two values (beta1, beta2), got {list(cfg.optim.betas)}"),
    ]  # fmt: skip
    for ok, message in checks:
        if not ok:
            raise UserError(message)
    check_numbers(cfg, RULES)
    if cfg.runner == "grid":
        for key in ("grid.lrs", "grid.batch_sizes", "grid.seeds", "grid.noises"):
            values = list(OmegaConf.select(cfg, key))
            repeated = [v for i, v in enumerate(values) if v in values[:i]]
            if repeated:
                raise UserError(f"{key} lists {repeated[0]} twice: its cells would run twice")
    for lr in lrs:
        if float(torch.tensor(lr, dtype=torch.float32)) == 0:
            raise UserError(f"learning rate {lr} is 0 in float32: nothing would train")
    names = {}
    for lr in lrs:  # the cells' W&B names keep 6 decimals of the lr
        other = names.setdefault(cell_name(batch_sizes[0], lr), lr)
        if other != lr:
            raise UserError(f"learning rates {other} and {lr} share the W&B name "
                            f"{cell_name(batch_sizes[0], lr)} (6 decimals): use lrs that differ "
                            "there")  # fmt: skip
    scaling_memory(cfg, len(lrs), batch_sizes).check("cpu")


class CellLogger:
    """The phase-2 dashboards' W&B names for the cells of one (batch size, seed, noise) group.

    Per cell ``B{b}_LR{lr:.6f}/{train_loss,val_loss,learning_rate,step}``; flat ``train_loss``,
    ``val_loss``, ``batch_size``, ``lr``, ``step``; ``summary/...`` when a cell ends;
    ``config/...`` when it starts. The first seed and noise family keep those names exactly;
    other seeds and families get ``_seed{s}`` / ``_{noise}`` appended so nothing collides.
    """

    def __init__(
        self,
        logger: ExperimentLogger,
        cfg: DictConfig,
        batch_size: int,
        seed: int,
        noise: str,
        lrs,
        probe_x=None,
    ):
        self.logger, self.batch_size, self.lrs = logger, batch_size, list(lrs)
        self.probe_cfg, self.probe_x, self.evals = cfg.rank_probe, probe_x, 0
        suffix = ""
        if cfg.runner == "grid":
            suffix += f"_seed{seed}" if seed != cfg.grid.seeds[0] else ""
            suffix += f"_{noise}" if noise != cfg.grid.noises[0] else ""
        self.names = [cell_name(batch_size, lr) + suffix for lr in self.lrs]
        grid_b, grid_lr = list(cfg.grid.batch_sizes), [float(x) for x in cfg.grid.lrs]
        self.numbers = [
            grid_b.index(batch_size) * len(grid_lr) + grid_lr.index(float(lr)) + 1
            if batch_size in grid_b and float(lr) in grid_lr
            else None
            for lr in self.lrs
        ]
        for name, lr, num in zip(self.names, self.lrs, self.numbers, strict=True):
            logger.define_metric(f"{name}/*", step_metric=f"{name}/step")
            logger.log(
                {"config/batch_size": batch_size, "config/lr": lr, "config/experiment_num": num}
            )

    def slice_ranks(self, point: EvalPoint) -> list[dict[str, float]]:
        """Per lr slice: the rank probe over the MLP's hidden layers, when it is due."""
        pc, x = self.probe_cfg, self.probe_x
        self.evals += 1
        if x is None or not pc.enabled or not pc.every or self.evals % pc.every:
            return [{} for _ in self.lrs]
        hidden = point.model.hidden_outputs(x)
        if not hidden:  # a linear student has no hidden layer to probe
            return [{} for _ in self.lrs]
        probes = []
        for j in range(len(self.lrs)):
            feats = dict(zip(mlp_probe_layers(len(hidden)), (h[j] for h in hidden), strict=True))
            # every=1: this callback already chose the evaluation
            probe = RankProbe.from_config(lambda f=feats: f, x, pc, every=1)
            probes.append(probe.measure())
        return probes

    def on_eval(self, point: EvalPoint) -> None:
        ranks = self.slice_ranks(point)
        for j, (name, lr) in enumerate(zip(self.names, self.lrs, strict=True)):
            if not point.active[j] and not math.isfinite(float(point.val_loss[j])):
                continue
            train, val = float(point.train_loss[j]), float(point.val_loss[j])
            self.logger.log(
                {
                    **{f"{name}/{k}": v for k, v in ranks[j].items()},
                    f"{name}/train_loss": train,
                    f"{name}/val_loss": val,
                    f"{name}/learning_rate": lr,
                    f"{name}/step": point.step,
                    "train_loss": train,
                    "val_loss": val,
                    "batch_size": self.batch_size,
                    "lr": lr,
                    "step": point.step,
                }
            )

    def on_done(self, results: list[CellResult]) -> None:
        for name, r in zip(self.names, results, strict=True):
            self.logger.log(
                {
                    f"summary/{name}_final_val_loss": r.final_val_loss,
                    f"summary/{name}_final_train_loss": r.final_train_loss,
                    f"summary/{name}_converged": r.converged,
                    "summary/final_val_loss": r.final_val_loss,
                    "summary/final_train_loss": r.final_train_loss,
                    "summary/batch_size": self.batch_size,
                    "summary/lr": r.lr,
                }
            )


def run_group(
    cfg: DictConfig, logger: ExperimentLogger, batch_size: int, seed: int, noise: str, lrs
) -> list[dict]:
    """Train one (batch size, seed, noise) group at ``lrs``; its results.csv rows."""
    m, o, tr = cfg.model, cfg.optim, cfg.train
    task = make_task(cfg.task, seed, noise)
    probe_x = task.x_val[: cfg.rank_probe.probe_size]  # fixed: the same for every lr and step
    cells = CellLogger(logger, cfg, batch_size, seed, noise, lrs, probe_x)
    results = train_group(task, batch_size, list(lrs), seed, cfg.model, cfg.optim, cfg.train,
                          on_eval=cells.on_eval)  # fmt: skip
    cells.on_done(results)
    return [
        {
            "cell": cell_name(batch_size, r.lr),
            "experiment_num": num,
            "batch_size": batch_size,
            "lr": r.lr,
            "seed": seed,
            "noise": str(noise),  # plain strings from the Enums, for results.csv and cell.json
            "optimizer": str(o.name),
            "model": str(m.kind),
            "protocol": str(tr.protocol),
            "final_train_loss": r.final_train_loss,
            "final_val_loss": r.final_val_loss,
            "min_val_loss": r.min_val_loss,
            "initial_val_loss": r.initial_val_loss,
            "converged": r.converged,
            "diverged": r.diverged,
            "steps": r.steps,
            "epochs": r.epochs,
            "wall_time_s": round(r.wall_time_s, 4),
            "status": "diverged" if r.diverged else "finished",
            "reason": r.reason,
        }
        for r, num in zip(results, cells.numbers, strict=True)
    ]


def cell_job(cfg: DictConfig, logger: ExperimentLogger, _inputs: None = None) -> None:
    """One (batch_size, lr, seed) cell: ``cell.json`` (its results.csv row) in the job folder."""
    if cfg.resume:  # a cell keeps nothing part-way: it trains again from its start
        logger.rewind(0)
    (row,) = run_group(cfg, logger, cfg.batch_size, cfg.seed, cfg.task.noise, [cfg.lr])
    write_json_atomic(job_dir() / CELL_FILE, row)
    logger.log_summary(
        {
            k: row[k]
            for k in ("final_val_loss", "final_train_loss", "converged", "diverged", "steps")
        }
    )
    if not is_multirun():
        write_results(pd.DataFrame([row]), job_dir() / RESULTS_FILE)
    log.info("%s seed %d: final val loss %.5g%s", row["cell"], cfg.seed, row["final_val_loss"],
             " (diverged)" if row["diverged"] else "")  # fmt: skip


def resume_grid(logger: ExperimentLogger) -> tuple[int, list[dict]]:
    """Where a stopped grid run goes on: the groups it finished (their rows as written) and the
    logger cut back to the step after the last of them, so each step is recorded once."""
    path = job_dir() / GRID_PROGRESS
    saved = read_json(path) if path.is_file() else {"groups_done": 0, "step": 0, "rows": []}
    dropped = logger.rewind(saved["step"])
    log.info("resuming the grid after %d finished groups (%d rows); %d records after them dropped",
             saved["groups_done"], len(saved["rows"]), dropped)  # fmt: skip
    return saved["groups_done"], saved["rows"]


def grid_job(cfg: DictConfig, logger: ExperimentLogger, _inputs: None = None) -> None:
    """The whole grid in this process, the lrs of each (batch size, seed) stacked."""
    g = cfg.grid
    groups = [(n, s, b) for n in g.noises for s in g.seeds for b in g.batch_sizes]
    out = job_dir() / RESULTS_FILE
    done, rows = resume_grid(logger) if cfg.resume else (0, [])
    total = len(groups) * len(g.lrs)
    with progress(total=total, initial=done * len(g.lrs), desc="cells", unit="cell") as bar:
        for noise, seed, batch_size in groups[done:]:
            bar.set_postfix(noise=noise, seed=seed, B=batch_size, refresh=False)
            rows += run_group(cfg, logger, batch_size, seed, noise, g.lrs)
            write_results(pd.DataFrame(rows), out)  # after every group: nothing lost on a kill
            done += 1
            write_json_atomic(
                job_dir() / GRID_PROGRESS, {"groups_done": done, "step": logger.step, "rows": rows}
            )
            bar.update(len(g.lrs))
    diverged = sum(r["diverged"] for r in rows)
    logger.log_summary(cells=len(rows), diverged=diverged, results=str(out))
    print(f"results: {out} ({len(rows)} rows, {diverged} diverged)")
    print(f"analyse: python analysis/scaling_analysis.py --results {out}")


@hydra.main(version_base="1.3", config_path="../conf", config_name="laplace_scaling")
def main(cfg: DictConfig) -> None:
    run_job(cfg, grid_job if cfg.runner == "grid" else cell_job, validate)


register_configs()

if __name__ == "__main__":
    check_override_keys(LaplaceScalingConfig, sys.argv[1:], "conf/laplace_scaling.yaml")
    main()
    exit_if_incomplete()  # a sweep with jobs that did not finish: reported above
