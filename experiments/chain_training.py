"""Training a KS chain to approximate a dense weight: data, model, loop and loss curves.

Kept apart from the entry point so that ``experiments/rank_sweep.py`` reads like a table of
contents, and so tests and benchmarks can call the loop directly.
"""

from __future__ import annotations

import contextlib
import logging
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf

from common import runstore
from common.cli import UserError
from experiments.logger import ExperimentLogger, describe_error
from experiments.progress import progress
from experiments.rank_probe import ProbeSchedule, RankProbe, chain_probe_layers
from experiments.rank_sweep_records import LossCurves
from experiments.resources import (
    FRACTION,
    NON_NEGATIVE,
    POSITIVE,
    POSITIVE_INT,
    SEED,
    check_numbers,
    interruptible,
    rank_sweep_memory,
)
from experiments.runtime import TrainingFailed, lr_factor, resolve_device
from experiments.schemas import Precision
from experiments.weights import DTYPES, finish_weight, make_weight, open_weight, weight_nbytes
from ksmm import KSLinearChain, check_structure, expected_mse, loss_floor, zero_predictor_loss

log = logging.getLogger(__name__)

LAST_CHECKPOINT = "last.pt"  # the state after the last finished epoch, while the run trains
PRECISIONS = {p.value: getattr(torch, p.value) for p in Precision}


# Numbers of the rank sweep's config (every number must also be finite:
# experiments.resources.check_numbers); null values are "not set" and pass.
RULES = {
    "rank": POSITIVE_INT,
    "max_rank": POSITIVE_INT,
    "weight.out_features": POSITIVE_INT,
    "weight.in_features": POSITIVE_INT,
    "weight.seed": SEED,
    "model.nblocks": POSITIVE_INT,
    "data.input_std": POSITIVE,
    "data.num_samples": POSITIVE_INT,
    "data.val_fraction": FRACTION,
    "train.num_epochs": POSITIVE_INT,
    "train.steps_per_epoch": POSITIVE_INT,
    "train.batch_size": POSITIVE_INT,
    "train.lr": POSITIVE,
    "train.warmup_steps": NON_NEGATIVE,
    "train.grad_clip": NON_NEGATIVE,  # 0 or null: no clipping; below 0 reverses the step
}


def validate_config(cfg: DictConfig) -> None:
    """Every check that needs no training, run before anything is written: each number on its
    own (RULES), then the rules between fields. (The choices are the schema's Enums: Hydra
    rejects a bad one when it composes the config.)"""
    check_numbers(cfg, RULES)
    if cfg.data.mode == "fixed" and cfg.data.num_samples * (1 - cfg.data.val_fraction) < 1:
        raise UserError(f"data.num_samples={cfg.data.num_samples} leaves no training samples")
    if (
        cfg.data.mode == "fixed"
        and cfg.data.num_samples - int(cfg.data.num_samples * (1 - cfg.data.val_fraction)) < 1
    ):
        raise UserError(f"data.num_samples={cfg.data.num_samples} with data.val_fraction="
                        f"{cfg.data.val_fraction} leaves no validation samples")  # fmt: skip


def build_rank_probe(cfg: DictConfig, chain: KSLinearChain, device: torch.device) -> RankProbe:
    """Ranks of every factor's output on a fixed probe batch x ~ N(0, s^2 I)."""
    pc = cfg.rank_probe
    g = torch.Generator().manual_seed(cfg.seed + 7919)  # fixed, apart from the training data
    x = (cfg.data.input_std * torch.randn(pc.probe_size, chain.in_features, generator=g)).to(device)

    def features() -> dict[str, torch.Tensor]:
        outputs = chain.factor_outputs(x)
        return dict(zip(chain_probe_layers(len(outputs)), outputs, strict=True))

    return RankProbe.from_config(features, x, pc, layers=chain_probe_layers(len(chain.factors)))


def check_precision(precision: str, device: torch.device) -> None:
    if precision == "float16" and device.type != "cuda":
        raise UserError(
            f"train.precision=float16 needs a CUDA device (this job runs on {device.type}); "
            "use bfloat16 or float32"
        )


def build_weight(cfg: DictConfig) -> torch.Tensor:
    """The target W (out x in), float32: loaded from ``weight.path`` or generated, each step
    only once the memory it needs has been found on this machine (nothing allocated before),
    then checked for signal.

    Order: the memory the weight alone needs (any size), reading the file's values (checked as
    they are read), the rank and structure against the shape, the memory of the whole job (the
    chain, its data and evaluation), drawing a generated weight."""
    w = cfg.weight
    device = resolve_device(cfg.runtime.device)
    weight = None
    if w.path is not None:
        path = Path(w.path).expanduser()
        source = open_weight(path)  # memory-mapped: its shape, not its values
        shape = (int(source.shape[0]), int(source.shape[1]))
        kw = {
            "source_bytes": weight_nbytes(source),
            "size_hint": f"use a smaller weight than {path}",
        }
        _check_memory(cfg, shape, device, weight_only=True, **kw)
        weight = finish_weight(source, path)
        where = str(path)
    else:
        shape = (w.out_features, w.in_features)
        kw = {"init": w.init, "dtype_bytes": DTYPES[w.dtype].itemsize}
        _check_memory(cfg, shape, device, weight_only=True, **kw)
        where = f"the generated weight (weight.init={w.init}, weight.dtype={w.dtype})"
    check_rank_shape(cfg, shape)
    _check_memory(cfg, shape, device, weight_only=False, **kw)
    if weight is None:
        weight = make_weight(w.out_features, w.in_features, w.init, w.dtype, w.seed).float()
    check_signal(cfg, weight, where)
    return weight


def _check_memory(cfg: DictConfig, shape, device: torch.device, **kw) -> None:
    for kind, need in rank_sweep_memory(cfg, shape, device, **kw).items():
        need.check(device if kind == "cuda" else "cpu")


# The targets' mean square, s^2 ||W||_F^2 / M, must sit well inside float32's range: the loss
# is computed in float32 and would overflow to inf or underflow to 0 outside it.
TARGET_RANGE = (1e-30, 1e30)


def check_signal(cfg: DictConfig, weight: torch.Tensor, where: str) -> None:
    """A weight with nothing to approximate (all zeros), or whose targets' scale float32
    cannot hold, is bad input: the floor would be 0 and loss/floor NaN, or every loss inf."""
    energy = 0.0  # ||W||_F^2 in float64, a block of rows at a time (no full float64 copy)
    rows = max(1, 2**22 // weight.shape[1])
    for i in range(0, weight.shape[0], rows):
        energy += float(weight[i : i + rows].double().pow(2).sum())
    if energy == 0:
        raise UserError(f"{where} is all zeros: there is nothing to approximate (the loss floor "
                        "and the zero predictor's loss would be 0)")  # fmt: skip
    scale = cfg.data.input_std**2 * energy / weight.shape[0]
    low, high = TARGET_RANGE
    if not low <= scale <= high:
        raise UserError(
            f"the targets' mean square data.input_std^2 * ||W||_F^2 / out_features = {scale:.3g} "
            f"for {where} is outside float32's safe range [{low:g}, {high:g}]: rescale the "
            "weight or data.input_std"
        )


def check_rank_shape(cfg: DictConfig, shape: tuple[int, int]) -> None:
    """The rank against the weight's shape, then the structure's own constraints (nblocks)."""
    limit = min(shape)
    if cfg.rank > limit:
        raise UserError(f"rank {cfg.rank} is above min(shape) = {limit} of the {tuple(shape)} "
                        "weight")  # fmt: skip
    m, n = shape
    try:
        check_structure(m, n, cfg.rank, cfg.model.structure, cfg.model.nblocks)
    except ValueError as exc:
        raise UserError(str(exc)) from None


def check_rank(cfg: DictConfig, weight: torch.Tensor) -> None:
    """The rank against the weight's shape, then the structure's own constraints (nblocks)."""
    check_rank_shape(cfg, (int(weight.shape[0]), int(weight.shape[1])))


def build_chain(cfg: DictConfig, weight: torch.Tensor, device: torch.device) -> KSLinearChain:
    out_features, in_features = weight.shape
    try:
        chain = KSLinearChain(
            in_features,
            out_features,
            cfg.rank,
            structure=cfg.model.structure,
            nblocks=cfg.model.nblocks,
            # Match the target's output scale: E|Wx|^2 / M = s^2 ||W||_F^2 / M.
            output_scale=float(weight.norm() / math.sqrt(out_features)),
        )
    except ValueError as exc:
        raise UserError(str(exc)) from None
    if cfg.model.init == "svd":  # an SVD with singular vectors: minutes at large sizes
        interruptible(chain.load_projection, weight)
    return chain.to(device)


@dataclass
class Targets:
    weight: torch.Tensor
    floor: float
    zero_loss: float
    input_std: float


class ChainData:
    """Minibatches of (x, W x) with x ~ N(0, s^2 I): fresh each step, or a fixed split."""

    def __init__(self, cfg: DictConfig, weight: torch.Tensor, device: torch.device, seed: int):
        self.mode = cfg.data.mode
        self.std = cfg.data.input_std
        self.batch_size = cfg.train.batch_size
        self.weight = weight
        self.device = device
        self.generator = torch.Generator(device="cpu").manual_seed(seed)
        num_train = int(cfg.data.num_samples * (1 - cfg.data.val_fraction))
        self.steps_per_epoch = cfg.train.steps_per_epoch or max(1, num_train // self.batch_size)
        if self.mode == "fixed":
            x = self.std * torch.randn(
                cfg.data.num_samples, weight.shape[1], generator=self.generator
            )
            x = x.to(device)
            self.x_train, self.x_val = x[:num_train], x[num_train:]
            self.y_train, self.y_val = self.x_train @ weight.T, self.x_val @ weight.T

    def batches(self):
        """One epoch of (x, y) minibatches (``None`` pairs in exact mode)."""
        if self.mode == "fixed":
            order = torch.randperm(len(self.x_train), generator=self.generator).to(self.device)
            for i in range(self.steps_per_epoch):
                idx = order[(i * self.batch_size) % len(order) :][: self.batch_size]
                yield self.x_train[idx], self.y_train[idx]
        else:
            for _ in range(self.steps_per_epoch):
                if self.mode == "exact":
                    yield None, None
                    continue
                x = self.std * torch.randn(
                    self.batch_size, self.weight.shape[1], generator=self.generator
                )
                x = x.to(self.device)
                yield x, x @ self.weight.T


@dataclass
class TrainingState:
    """What the loop needs to go on from the end of an epoch exactly as if never stopped."""

    chain: KSLinearChain
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    scaler: torch.amp.GradScaler
    data: ChainData
    curves: LossCurves
    best: dict[str, float]
    epoch: int = 0

    def save(self, path: Path) -> None:
        """``last.pt``, written atomically after every epoch (a few state dicts: small)."""
        payload = {
            "epoch": self.epoch,
            "chain": self.chain.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "scaler": self.scaler.state_dict(),
            "data_rng": self.data.generator.get_state(),
            "torch_rng": torch.get_rng_state(),
            "best": self.best,
            "curves": self.curves.rows,
        }
        with runstore.atomic_path(path) as tmp:
            torch.save(payload, tmp)

    def load(self, path: Path) -> None:
        saved = torch.load(path, weights_only=False, map_location="cpu")
        self.chain.load_state_dict(saved["chain"])
        self.optimizer.load_state_dict(saved["optimizer"])
        self.scheduler.load_state_dict(saved["scheduler"])
        self.scaler.load_state_dict(saved["scaler"])
        self.data.generator.set_state(saved["data_rng"])
        torch.set_rng_state(saved["torch_rng"])
        self.best, self.epoch = saved["best"], saved["epoch"]
        self.curves.restore(saved["curves"])


def resume_training(state: TrainingState, last: Path, logger: ExperimentLogger) -> None:
    """Go on from ``last`` (the run's last finished epoch); without it start over in the same
    run (stopped before its first epoch ended). Either way the local record is cut back so each
    epoch is recorded once."""
    if last.is_file():
        try:
            state.load(last)
        except (RuntimeError, KeyError, ValueError) as exc:
            raise UserError(f"{last} does not fit this run's config (resume with the same "
                            f"overrides): {describe_error(exc)}") from None  # fmt: skip
        where = f"after epoch {state.epoch}"
    else:
        where = "from the start (no checkpoint yet)"
    dropped = logger.rewind(state.epoch)
    log.info("resuming %s %s; %d records after it dropped", last.parent, where, dropped)


def new_training_state(cfg: DictConfig, chain: KSLinearChain, data: ChainData,
                       curves: LossCurves) -> TrainingState:  # fmt: skip
    """The optimizer, schedule and loss scaler of a fresh run."""
    tc = cfg.train
    device = next(chain.parameters()).device
    scaler = torch.amp.GradScaler(device.type, enabled=PRECISIONS[tc.precision] == torch.float16)
    # No weight decay on the structured factors: it biases them away from the floor.
    optimizer = torch.optim.AdamW(chain.parameters(), lr=tc.lr, weight_decay=0.0)
    total_steps = tc.num_epochs * data.steps_per_epoch
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: lr_factor(s, total_steps, tc.warmup_steps, tc.schedule)
    )
    return TrainingState(chain, optimizer, scheduler, scaler, data, curves,
                         best={"train": math.inf, "val": math.inf})  # fmt: skip


def train_epoch(
    cfg: DictConfig, state: TrainingState, targets: Targets, epoch: int
) -> tuple[float, float]:
    """One epoch of steps; its mean train loss and the last step's gradient norm."""
    chain, optimizer, scaler = state.chain, state.optimizer, state.scaler
    device, dtype = targets.weight.device, PRECISIONS[cfg.train.precision]
    autocast = (
        torch.autocast(device.type, dtype=dtype)
        if dtype != torch.float32
        else contextlib.nullcontext()
    )
    chain.train()
    loss_sum, grad_norm = 0.0, 0.0
    for x, y in state.data.batches():
        with autocast:
            if x is None:  # exact mode
                loss = expected_mse(targets.weight, chain.to_dense(), targets.input_std)
            else:
                loss = torch.nn.functional.mse_loss(chain(x).float(), y)
        if not torch.isfinite(loss):
            raise TrainingFailed(f"diverged at epoch {epoch}: train loss is {loss.item()}")
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.unscale_(optimizer)
        # clip_grad_norm_ returns the norm before clipping: the value worth logging.
        grad_norm = float(
            torch.nn.utils.clip_grad_norm_(chain.parameters(), cfg.train.grad_clip or math.inf)
        )
        scaler.step(optimizer)
        scaler.update()
        state.scheduler.step()
        loss_sum += loss.item()
    return loss_sum / state.data.steps_per_epoch, grad_norm


def train_chain(
    cfg: DictConfig,
    chain: KSLinearChain,
    targets: Targets,
    data: ChainData,
    logger: ExperimentLogger,
    curves: LossCurves,
    last: Path | None = None,
    probe: ProbeSchedule | None = None,
) -> dict[str, Any]:
    """Train; log per epoch; return the final numbers. Raises TrainingFailed on divergence.

    With ``last`` the state after each epoch is saved there, and ``cfg.resume`` goes on from it;
    ``probe`` runs with the epochs it is due at.
    """
    probe = probe or ProbeSchedule(None)
    state = new_training_state(cfg, chain, data, curves)
    if last is not None and cfg.get("resume"):
        resume_training(state, last, logger)
    best = state.best
    started = time.perf_counter()
    epochs = range(state.epoch + 1, cfg.train.num_epochs + 1)
    bar = progress(epochs, desc=f"rank {cfg.rank}", unit="epoch", leave=False)
    for epoch in bar:
        train_loss, grad_norm = train_epoch(cfg, state, targets, epoch)
        val_loss = evaluate(chain, targets, data)
        if not math.isfinite(val_loss):
            raise TrainingFailed(f"diverged at epoch {epoch}: val loss is {val_loss}")
        best["train"], best["val"] = min(best["train"], train_loss), min(best["val"], val_loss)
        row = record_epoch(cfg, state, targets, (epoch, train_loss, val_loss, grad_norm),
                           logger, probe)  # fmt: skip
        bar.set_postfix(
            val=f"{val_loss:.4g}", over_floor=f"{row['loss_over_floor']:.3f}", refresh=False
        )
        if last is not None:
            state.epoch = epoch
            state.save(last)
    row = curves.rows[-1]
    return {
        "final_train_loss": row["train_loss"],
        "final_val_loss": row["val_loss"],
        "min_train_loss": best["train"],
        "min_val_loss": best["val"],
        "loss_over_floor": row["loss_over_floor"],
        "epochs_completed": row["epoch"],
        "wall_time_s": time.perf_counter() - started,
    }


def record_epoch(cfg: DictConfig, state: TrainingState, targets: Targets, losses: tuple,
                 logger: ExperimentLogger, probe: ProbeSchedule) -> dict[str, Any]:  # fmt: skip
    """The epoch's row in the loss curves and its metrics (with the probe's when due); the row."""
    epoch, train_loss, val_loss, grad_norm = losses
    row = {
        "epoch": epoch,
        "train_loss": train_loss,
        "val_loss": val_loss,
        "rank": cfg.rank,
        "floor": targets.floor,
        "loss_over_floor": val_loss / targets.floor if targets.floor > 0 else math.nan,
    }
    state.curves.append(row)
    probe.log(
        logger,
        {
            **{k: row[k] for k in ("epoch", "train_loss", "val_loss", "floor")},
            "loss_over_floor": row["loss_over_floor"],
            "lr": state.scheduler.get_last_lr()[0],
            "grad_norm": grad_norm,
        },
        step=epoch,
    )
    return row


@torch.no_grad()
def evaluate(chain: KSLinearChain, targets: Targets, data: ChainData) -> float:
    """Held-out MSE in fixed mode; otherwise the exact expected loss (no sampling noise)."""
    chain.eval()
    if data.mode == "fixed":
        return float(torch.nn.functional.mse_loss(chain(data.x_val), data.y_val))
    return float(expected_mse(targets.weight, chain.to_dense(), targets.input_std))


def save_checkpoint(path: Path, chain: KSLinearChain, cfg: DictConfig) -> None:
    """``final.pth``: state dict, patterns and config, written atomically."""
    payload = {
        "state_dict": chain.state_dict(),
        "patterns": [tuple(p) for p in chain.patterns],
        "in_features": chain.in_features,
        "out_features": chain.out_features,
        "rank": chain.rank,
        "structure": str(chain.structure),  # a plain string: loads without this repo's Enums
        "config": OmegaConf.to_container(cfg, resolve=True, enum_to_str=True),
    }
    with runstore.atomic_path(path) as tmp:
        torch.save(payload, tmp)


def floor_and_baseline(cfg: DictConfig, weight: torch.Tensor) -> tuple[float, float]:
    """The loss floor (an SVD: minutes at large sizes, so Ctrl-C/SIGTERM are honoured during
    it) and the zero predictor's loss."""
    floor = interruptible(
        loss_floor, weight, cfg.rank, cfg.model.structure, cfg.model.nblocks, cfg.data.input_std
    )
    return float(floor), float(interruptible(zero_predictor_loss, weight, cfg.data.input_std))
