"""Rank sweep: train a Kronecker-sparse chain to approximate a dense weight.

    python experiments/rank_sweep.py rank=8
    python experiments/rank_sweep.py -m rank=2,4,8,16,32,64
    python experiments/rank_sweep.py -m experiment=demo

Each job writes loss_curves.csv/.json, final.pth and the logger's run record into its output
folder; a multirun ends with rank_sweep_summary.csv/.json and two plots in the sweep folder.
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path

if __package__ in (None, ""):  # run as a plain script: make the repo importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import hydra
import torch
from omegaconf import DictConfig

from experiments.callbacks import exit_if_incomplete
from experiments.chain_training import (
    LAST_CHECKPOINT,
    ChainData,
    Targets,
    build_chain,
    build_rank_probe,
    build_weight,
    check_precision,
    check_rank,
    floor_and_baseline,
    save_checkpoint,
    train_chain,
    validate_config,
)
from experiments.logger import ExperimentLogger
from experiments.rank_probe import ProbeSchedule
from experiments.rank_sweep_records import LossCurves
from experiments.runtime import (
    check_override_keys,
    job_dir,
    remove_job_folder,
    resolve_device,
    run_job,
)
from experiments.schemas import RankSweepConfig, register_configs

log = logging.getLogger(__name__)


def validate(cfg: DictConfig) -> torch.Tensor:
    """Check the config and the weight; return the weight for the job."""
    validate_config(cfg)
    weight = build_weight(cfg)
    check_rank(cfg, weight)
    check_precision(cfg.train.precision, resolve_device(cfg.runtime.device))
    return weight


def report_chain(cfg: DictConfig, chain, weight: torch.Tensor, losses: tuple[float, float],
                 device: torch.device, logger: ExperimentLogger) -> None:  # fmt: skip
    """The chain's size and the loss floor, in the summary and the job's log."""
    floor, zero_loss = losses
    logger.log_summary(
        rank=cfg.rank,
        structure=str(cfg.model.structure),
        out_features=weight.shape[0],
        in_features=weight.shape[1],
        parameters=chain.num_parameters,
        compression=chain.compression_ratio,
        num_factors=len(chain.patterns),
        floor=floor,
        zero_predictor_loss=zero_loss,
        device=str(device),
    )
    log.info(
        "rank %d %s chain: %d factors, %d parameters (%.1fx compression), floor %.4g "
        "(zero predictor %.4g)",
        cfg.rank,
        cfg.model.structure,
        len(chain.patterns),
        chain.num_parameters,
        chain.compression_ratio,
        floor,
        zero_loss,
    )


def rank_sweep_job(cfg: DictConfig, logger: ExperimentLogger, weight: torch.Tensor) -> None:
    out = job_dir()
    device = resolve_device(cfg.runtime.device)

    # data: the target weight and its floor
    weight = weight.to(device)
    floor, zero_loss = floor_and_baseline(cfg, weight)
    targets = Targets(weight, floor, zero_loss, cfg.data.input_std)
    data = ChainData(cfg, weight, device, seed=cfg.seed)

    # model
    chain = build_chain(cfg, weight, device)
    report_chain(cfg, chain, weight, (floor, zero_loss), device, logger)

    probe = ProbeSchedule(None, logger.summary.get("rank_probe_seconds", 0.0))
    if cfg.rank_probe.enabled:
        probe.probe = build_rank_probe(cfg, chain, device)
        logger.attach_rank_probe(probe.probe)

    # train
    curves = LossCurves(out, cfg.rank, floor)
    last = out / LAST_CHECKPOINT  # after each epoch; resume=true (a SLURM requeue) goes on there
    result = train_chain(cfg, chain, targets, data, logger, curves, last, probe)

    # report
    if cfg.train.save_checkpoint:
        save_checkpoint(out / "final.pth", chain, cfg)
    logger.log_summary(result, status="finished")
    last.unlink(missing_ok=True)  # final.pth holds the result; the optimizer state is done
    vs_floor = (  # a zero floor (rank = the weight's rank) has no ratio
        f"{result['loss_over_floor']:.3f} x floor" if floor > 0 else "floor 0: no ratio"
    )
    log.info(
        "rank %d: final val loss %.4g (%s; %d epochs, %.1f s)",
        cfg.rank,
        result["final_val_loss"],
        vs_floor,
        result["epochs_completed"],
        result["wall_time_s"],
    )


@hydra.main(version_base="1.3", config_path="../conf", config_name="rank_sweep")
def main(cfg: DictConfig) -> None:
    # a max_rank below 1 is bad input, for validate to say (not a reason to skip every job)
    if cfg.max_rank is not None and 0 < cfg.max_rank < cfg.rank:
        log.info("rank %d > max_rank %d: skipped", cfg.rank, cfg.max_rank)
        remove_job_folder(job_dir())  # nothing of ours in it: leave no stub behind
        return
    run_job(cfg, rank_sweep_job, validate)


register_configs()

if __name__ == "__main__":
    check_override_keys(RankSweepConfig, sys.argv[1:], "conf/rank_sweep.yaml")
    main()
    exit_if_incomplete()  # a sweep with jobs that did not finish: reported above
