"""Multimodal trainer: image reconstruction, captioning and image-caption latent alignment.

    python experiments/multimodal.py
    python experiments/multimodal.py train.epochs=1 data.num_train=64 data.num_val=32
    python experiments/multimodal.py resume=true          # the newest run goes on
    python experiments/multimodal.py data.source=folder data.folder=~/engravings

Each run writes best.pt and last.pt (model, optimizer, tokenizer, step) and the logger's run
record (metrics.jsonl, media/ with original|reconstruction images, tables/ with sample captions).
"""

from __future__ import annotations

import logging
import math
import shutil
import sys
import time
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # run as a plain script: make the repo importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import hydra
import pandas as pd
import psutil
import torch
import torch.nn.functional as F
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf

from common import runstore
from common.cli import UserError
from experiments.callbacks import exit_if_incomplete
from experiments.logger import ExperimentLogger
from experiments.multimodal_data import (
    PairSet,
    Tokenizer,
    distinct_scenes,
    load_pairs,
    plan_pairs,
    words,
)
from experiments.multimodal_model import (
    MultimodalModel,
    alignment_loss,
    caption_metrics,
    grad_stats,
    latent_stats,
    retrieval_top1,
)
from experiments.progress import progress
from experiments.rank_probe import (
    ProbeSchedule,
    RankProbe,
    encoder_probe_layers,
    hooked_features,
)
from experiments.resources import (
    FRACTION,
    NON_NEGATIVE,
    POSITIVE,
    SEED,
    check_finite,
    check_numbers,
    multimodal_memory,
)
from experiments.runtime import (
    TrainingFailed,
    check_override_keys,
    job_dir,
    lr_factor,
    resolve_device,
    run_job,
)
from experiments.schemas import MultimodalConfig, register_configs

log = logging.getLogger(__name__)


def validate(cfg: DictConfig) -> tuple[PairSet, PairSet]:
    """Check the config and load the data (errors name the file); the job gets the pairs.
    (The choices are the schema's Enums: Hydra rejects a bad one when it composes the config.)"""
    check_ranges(cfg)
    check_cross_field_rules(cfg)
    if cfg.resume:
        check_resume_config(cfg)
    dc = cfg.data
    device = resolve_device(cfg.runtime.device)
    plan = plan_pairs(cfg)  # the captions and the image files' presence; no image decoded
    max_len = dc.max_caption_len or plan.longest_caption + 2
    vocab = min(dc.vocab_size, 4 + plan.longest_caption * plan.num_images)
    for kind, need in multimodal_memory(
        cfg, plan.num_images, vocab, max_len, plan.channels, device
    ).items():
        need.check(device if kind == "cuda" else "cpu")
    return load_pairs(cfg, cfg.seed, plan)


def check_ranges(cfg: DictConfig) -> None:
    """Each number on its own: finite, in its range (RULES)."""
    dc = cfg.data
    check_finite(cfg)  # NaN passes no comparison below
    if dc.vocab_size < 5:
        raise UserError(f"data.vocab_size={dc.vocab_size} is too small: it must be at least 5")
    if dc.channels not in (1, 3):
        raise UserError(f"data.channels must be 1 (grayscale) or 3 (RGB), got {dc.channels}")
    check_numbers(cfg, RULES)


def check_cross_field_rules(cfg: DictConfig) -> None:
    """The rules between fields (and the model's shape constraints), once each number is sane."""
    dc, mc, tc = cfg.data, cfg.model, cfg.train
    if not (cfg.loss.image_weight or cfg.loss.caption_weight or cfg.loss.alignment_weight):
        raise UserError("loss.image_weight, loss.caption_weight and loss.alignment_weight are "
                        "all 0: the total loss is 0 and nothing would train")  # fmt: skip
    if tc.min_lr > tc.lr:
        raise UserError(f"train.min_lr={tc.min_lr} is above train.lr={tc.lr}: the cosine "
                        "schedule would raise the learning rate")  # fmt: skip
    if mc.conv_width % 8:  # the decoder's GroupNorm: 8 groups over conv_width channels
        raise UserError(f"model.conv_width must be a multiple of 8, got {mc.conv_width}")
    if not 0 <= mc.dropout < 1:
        raise UserError(f"model.dropout must be in [0, 1), got {mc.dropout}")
    if dc.max_caption_len and dc.max_caption_len < 3:
        raise UserError(
            f"data.max_caption_len={dc.max_caption_len} leaves no room for a word between bos "
            "and eos: use 0 (the longest training caption) or at least 3"
        )
    if dc.source == "synthetic" and (dc.num_train < 2 or dc.num_val < 2):
        raise UserError("data.num_train and data.num_val must be at least 2")
    if dc.source == "synthetic" and 1 <= dc.max_objects <= 9:
        available = distinct_scenes(dc.max_objects)
        if dc.num_train + dc.num_val > available:
            raise UserError(
                f"data.num_train + data.num_val = {dc.num_train + dc.num_val} pairs, but only "
                f"{available} different scenes exist with data.max_objects={dc.max_objects}"
            )
    if dc.source == "synthetic" and dc.max_objects > 9:
        raise UserError(f"data.max_objects must be at most 9 (a 3x3 grid), got {dc.max_objects}")
    if mc.embedding_dim % mc.num_heads:
        raise UserError(
            f"model.embedding_dim={mc.embedding_dim} must be divisible by "
            f"model.num_heads={mc.num_heads}"
        )


# Each number on its own (every number must also be finite)
RULES = {
    **dict.fromkeys(
        [
            "data.image_size",
            "data.max_objects",
            "model.image_encoder_layers",
            "model.conv_width",
            "model.latent_dim",
            "model.embedding_dim",
            "model.num_heads",
            "model.transformer_layers",
            "model.prefix_tokens",
            "train.epochs",
            "train.batch_size",
            "train.lr",
        ],
        POSITIVE,
    ),
    **dict.fromkeys(
        [
            "train.grad_clip",  # 0: no clipping; below 0 would reverse the step
            "train.weight_decay",
            "train.min_lr",
            "train.warmup_steps",
            "loss.image_weight",
            "loss.caption_weight",
            "loss.alignment_weight",
        ],
        NON_NEGATIVE,
    ),
    "seed": SEED,
    "data.val_fraction": FRACTION,
    "data.max_caption_len": NON_NEGATIVE,
    "model.caption_encoder_layers": NON_NEGATIVE,
    "train.log_frequency": NON_NEGATIVE,
    "train.image_log_frequency": NON_NEGATIVE,
    "train.checkpoint_frequency": NON_NEGATIVE,
    "train.num_samples": NON_NEGATIVE,
    "train.max_steps": NON_NEGATIVE,
}


# What a resumed run may change: when and how it logs, where it runs, and when it stops.
RESUMABLE_CHANGES = (
    "resume",
    "run_dir",
    "logger",
    "runtime",
    "rank_probe",
    "train.max_steps",
    "train.log_frequency",
    "train.image_log_frequency",
    "train.checkpoint_frequency",
    "train.num_samples",
)


def check_resume_config(cfg: DictConfig) -> None:
    """A resumed run goes on with the data, model, loss and schedule it started with: any other
    difference from the run's saved config.yaml is an error that names the keys."""
    out = job_dir()
    if not (out / "last.pt").is_file() and not (out / runstore.RUN_FILE).is_file():
        # (a run stopped before its first checkpoint starts over in its own record)
        raise UserError(f"resume=true but there is no run in {out} (set run_dir=...)")
    saved_path = out / "config.yaml"
    if not saved_path.is_file():
        return  # a run folder from before config.yaml was written: nothing to compare with
    saved, now = (
        pd.json_normalize(OmegaConf.to_container(c, resolve=True, enum_to_str=True))
        .iloc[0]
        .to_dict()
        for c in (OmegaConf.load(saved_path), cfg)
    )
    changed = [  # keys the run added to its config after it started are not settings
        f"{k} ({saved[k]!r} there, {now[k]!r} now)"
        for k in sorted(now)
        if k in saved and saved[k] != now[k] and not k.startswith(RESUMABLE_CHANGES)
    ]
    if changed:
        # this launch's own Hydra files (.hydra/resume-<time>) go; the run's are untouched
        shutil.rmtree(out / HydraConfig.get().output_subdir, ignore_errors=True)
        raise UserError(
            f"resume=true with other settings than the run in {out} was started with: "
            f"{', '.join(changed[:4])}{' ...' if len(changed) > 4 else ''}; "
            "resume with the same overrides"
        )


# -- pieces -------------------------------------------------------------------------------------


def build_model(cfg: DictConfig, tokenizer: Tokenizer, max_len: int, channels: int):
    return MultimodalModel(cfg.model, vocab_size=len(tokenizer), max_len=max_len,
                           channels=channels, image_size=cfg.data.image_size,
                           pad_id=tokenizer.pad)  # fmt: skip


def compute_losses(
    model: MultimodalModel, images: torch.Tensor, tokens: torch.Tensor, cfg: DictConfig
) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    lc = cfg.loss
    out = model(images, tokens)
    targets = tokens[:, 1:]
    losses = {
        "loss_image": F.mse_loss(out["recon"], images),
        "loss_caption": F.cross_entropy(
            out["logits"].flatten(0, 1), targets.flatten(), ignore_index=model.pad_id
        ),
        "loss_alignment": alignment_loss(
            out["latent"], out["caption_latent"], lc.alignment, model.logit_scale
        ),
    }
    losses["total_loss"] = (
        lc.image_weight * losses["loss_image"]
        + lc.caption_weight * losses["loss_caption"]
        + lc.alignment_weight * losses["loss_alignment"]
    )
    return losses, out


def hardware_stats(device: torch.device) -> dict[str, float]:
    stats = {"cpu_percent": psutil.cpu_percent(interval=None)}  # since the last call: no wait
    if device.type == "cuda":
        used = torch.cuda.memory_allocated(device)
        total = torch.cuda.get_device_properties(device).total_memory
        stats["gpu_memory_used"] = used / 2**20  # MB
        stats["gpu_memory_percent"] = 100.0 * used / total
    return stats


def step_metrics(
    losses: dict[str, torch.Tensor],
    out: dict[str, torch.Tensor],
    images: torch.Tensor,
    tokens: torch.Tensor,
    model: MultimodalModel,
    grad_norm: float,
) -> dict[str, float]:
    """Per-batch metrics, named as existing dashboards expect (every log_frequency batches)."""
    recon = out["recon"].detach()
    return {
        **{k: float(v.detach()) for k, v in losses.items()},
        **latent_stats(out["latent"]),
        "image_mse": float(F.mse_loss(recon, images)),
        "image_l1": float(F.l1_loss(recon, images)),
        **caption_metrics(out["logits"].detach(), tokens[:, 1:], model.pad_id),
        **grad_stats([p for p in model.parameters() if p.grad is not None]),
        "grad_norm": grad_norm,
    }


def side_by_side(images: torch.Tensor, recon: torch.Tensor, n: int = 8) -> torch.Tensor:
    """Originals on the top row, reconstructions below, (C, 2H, nW)."""
    n = min(n, len(images))
    top = torch.cat(list(images[:n]), dim=-1)
    bottom = torch.cat(list(recon[:n]), dim=-1)
    return torch.cat([top, bottom], dim=-2).detach().cpu()


@torch.no_grad()
def evaluate(
    model: MultimodalModel,
    val: PairSet,
    val_tokens: torch.Tensor,
    mean_image: torch.Tensor,
    cfg: DictConfig,
    device: torch.device,
) -> dict[str, float]:
    """Validation losses, caption metrics (teacher forced), reconstruction MSE against the mean
    image's, and image-to-caption retrieval top-1 within batches of train.batch_size."""
    model.eval()
    bs = cfg.train.batch_size
    sums: dict[str, float] = {}
    n_tok = n_img = 0
    hits = chance = n_ret = 0.0
    for i in range(0, len(val.images), bs):
        images, tokens = val.images[i : i + bs].to(device), val_tokens[i : i + bs].to(device)
        losses, out = compute_losses(model, images, tokens, cfg)
        b = len(images)
        k = int((tokens[:, 1:] != model.pad_id).sum())
        cm = caption_metrics(out["logits"], tokens[:, 1:], model.pad_id)
        batch = {
            **{k_: float(v) * b for k_, v in losses.items() if k_ != "loss_caption"},
            "loss_caption": float(losses["loss_caption"]) * k,
            "caption_accuracy": cm["caption_accuracy"] * k,
            "caption_entropy": cm["caption_entropy"] * k,
            "image_mse": float(F.mse_loss(out["recon"], images)) * b,
            "mean_image_mse": float(F.mse_loss(mean_image.expand_as(images), images)) * b,
        }
        for key, v in batch.items():
            sums[key] = sums.get(key, 0.0) + v
        n_tok, n_img = n_tok + k, n_img + b
        if b >= 2:
            hits += retrieval_top1(out["latent"], out["caption_latent"]) * b
            chance += 1.0
            n_ret += b
    model.train()
    per_token = ("loss_caption", "caption_accuracy", "caption_entropy")
    result = {k: v / (n_tok if k in per_token else n_img) for k, v in sums.items()}
    # total loss with the token-weighted caption loss, so it matches the per-term averages
    lc = cfg.loss
    result["total_loss"] = (
        lc.image_weight * result["loss_image"]
        + lc.caption_weight * result["loss_caption"]
        + lc.alignment_weight * result["loss_alignment"]
    )
    result["caption_perplexity"] = math.exp(result["loss_caption"])
    # NaN, not 0, when no batch had two pairs to retrieve between (batch_size=1)
    result["retrieval_top1"] = hits / n_ret if n_ret else math.nan
    result["retrieval_chance"] = chance / n_ret if n_ret else math.nan
    return result


def sample_table(
    model: MultimodalModel, val: PairSet, tokenizer: Tokenizer, n: int, device: torch.device
) -> list[list[Any]]:
    model.eval()
    ids = model.generate(val.images[:n].to(device), tokenizer.bos, tokenizer.eos)
    model.train()
    rows = []
    for i, caption in enumerate(val.captions[:n]):
        generated = tokenizer.decode(ids[i].tolist())
        rows.append([i, caption, generated, generated == " ".join(words(caption))])
    return rows


def save_checkpoint(path: Path, state: dict[str, Any]) -> None:
    with runstore.atomic_path(path) as tmp:
        torch.save(state, tmp)


# -- the job ------------------------------------------------------------------------------------


def old_config_names(cfg: DictConfig, train_samples: int, val_samples: int, model) -> dict:
    """Flat config names kept compatible with existing W&B dashboards, which filter on them."""
    mc, tc, lc = cfg.model, cfg.train, cfg.loss
    return {
        "latent_dim": mc.latent_dim,
        "vocab_size": cfg.data.vocab_size,
        "embedding_dim": mc.embedding_dim,
        "image_encoder_layers": mc.image_encoder_layers,
        "transformer_layers": mc.transformer_layers,
        "batch_size": tc.batch_size,
        "learning_rate": tc.lr,
        "weight_decay": tc.weight_decay,
        "optimizer": "AdamW",
        "scheduler": "CosineAnnealing",
        "image_loss_weight": lc.image_weight,
        "caption_loss_weight": lc.caption_weight,
        "alignment_loss_weight": lc.alignment_weight,
        "train_samples": train_samples,
        "val_samples": val_samples,
        "total_parameters": model.num_parameters,
    }


def encoder_rank_probe(
    cfg: DictConfig, model: torch.nn.Module, images: torch.Tensor, device: torch.device
) -> RankProbe:
    """Ranks of each encoder block's output (after its activation) and of the latent."""
    pc, encoder = cfg.rank_probe, model.encoder
    batch = images[: pc.probe_size].to(device)
    layers = encoder_probe_layers(encoder)  # in forward order: the blocks, then the projection
    features = hooked_features(encoder, layers, batch)
    return RankProbe.from_config(features, batch, pc, layers=layers)


class Training:
    """The multimodal run's state and its named steps: a train step, the per-batch log, the
    media, the end-of-epoch evaluation, the checkpoint. ``multimodal_job`` strings them."""

    def __init__(self, cfg: DictConfig, pairs: tuple[PairSet, PairSet], device: torch.device,
                 resume: dict[str, Any] | None):  # fmt: skip
        tc, dc = cfg.train, cfg.data
        self.cfg, self.device = cfg, device
        self.train, self.val = pairs
        if resume is not None:  # the vocabulary and caption length the run started with
            self.tokenizer = Tokenizer.from_state_dict(resume["tokenizer"])
            self.max_len = resume["max_len"]
        else:
            self.tokenizer = Tokenizer.build(self.train.captions, dc.vocab_size)
            longest = max(len(words(c)) for c in self.train.captions) + 2  # bos, eos
            self.max_len = dc.max_caption_len or longest
        self.train_tokens = self.tokenizer.encode_batch(self.train.captions, self.max_len)
        self.val_tokens = self.tokenizer.encode_batch(self.val.captions, self.max_len)
        channels = self.train.images.shape[1]
        self.model = build_model(cfg, self.tokenizer, self.max_len, channels).to(device)
        self.optimizer = torch.optim.AdamW(
            self.model.parameters(), lr=tc.lr, weight_decay=tc.weight_decay
        )
        self.steps_per_epoch = math.ceil(len(self.train.images) / tc.batch_size)
        self.total_steps = tc.epochs * self.steps_per_epoch
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer,
            lambda s: lr_factor(s, self.total_steps, tc.warmup_steps, floor=tc.min_lr / tc.lr),
        )
        self.stop = min(self.total_steps, tc.max_steps) if tc.max_steps else self.total_steps
        self.mean_image = self.train.images.mean(0, keepdim=True).to(device)
        self.step, self.best_val = 0, math.inf
        self.epoch_loss, self.epoch_batches = 0.0, 0  # the running epoch, for its average
        self.eval_time = 0.0
        self.probe = ProbeSchedule(None)  # report_setup attaches the rank probe
        if resume is not None:
            self.load(resume)

    # -- checkpoints ---------------------------------------------------------------------------

    def save(self, path: Path) -> None:
        save_checkpoint(
            path,
            {
                "model": self.model.state_dict(),
                "optimizer": self.optimizer.state_dict(),
                "scheduler": self.scheduler.state_dict(),
                "step": self.step,
                "best_val_loss": self.best_val,
                "epoch_loss": self.epoch_loss,
                "epoch_batches": self.epoch_batches,
                "torch_rng": torch.get_rng_state(),
                "tokenizer": self.tokenizer.state_dict(),
                "max_len": self.max_len,
                "config": OmegaConf.to_container(self.cfg, resolve=True, enum_to_str=True),
            },
        )

    def load(self, saved: dict[str, Any]) -> None:
        try:
            self.model.load_state_dict(saved["model"])
        except RuntimeError:
            raise UserError(
                f"{job_dir() / 'last.pt'} was trained with another model config: resume with "
                "the same model.* and data.* settings"
            ) from None
        self.optimizer.load_state_dict(saved["optimizer"])
        self.scheduler.load_state_dict(saved["scheduler"])
        self.step, self.best_val = saved["step"], saved["best_val_loss"]
        self.epoch_loss = saved.get("epoch_loss", 0.0)
        self.epoch_batches = saved.get("epoch_batches", 0)
        if "torch_rng" in saved:  # dropout draws from it
            torch.set_rng_state(saved["torch_rng"])

    # -- one batch -----------------------------------------------------------------------------

    def batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        """This step's batch: the order depends on the seed and the epoch only, so a resumed run
        sees the same batches."""
        epoch, batch_idx = divmod(self.step, self.steps_per_epoch)
        seed = self.cfg.seed * 100_003 + epoch
        order = torch.randperm(
            len(self.train.images), generator=torch.Generator().manual_seed(seed)
        )
        bs = self.cfg.train.batch_size
        idx = order[batch_idx * bs : (batch_idx + 1) * bs]
        return self.train.images[idx].to(self.device), self.train_tokens[idx].to(self.device)

    def train_step(self, images: torch.Tensor, tokens: torch.Tensor) -> dict[str, float] | None:
        """One optimizer step; the batch's metrics when this step is logged, else None."""
        tc = self.cfg.train
        losses, outputs = compute_losses(self.model, images, tokens, self.cfg)
        if not torch.isfinite(losses["total_loss"]):
            raise TrainingFailed(f"diverged at step {self.step}: total_loss is not finite")
        self.optimizer.zero_grad(set_to_none=True)
        losses["total_loss"].backward()
        # clip_grad_norm_ returns the global norm before clipping: the value worth logging
        grad_norm = torch.nn.utils.clip_grad_norm_(
            self.model.parameters(), tc.grad_clip or math.inf
        )
        # the last step logs too, so a run shorter than log_frequency still shows its scalars
        next_step = self.step + 1
        logged = tc.log_frequency and (next_step % tc.log_frequency == 0 or next_step == self.stop)
        metrics = None
        if logged:  # before the update: the metrics of the weights that saw this batch
            metrics = step_metrics(losses, outputs, images, tokens, self.model, float(grad_norm))
            metrics.update(learning_rate=self.scheduler.get_last_lr()[0], batch_size=len(images))
            metrics["epoch"] = next_step / self.steps_per_epoch
        self.optimizer.step()
        self.scheduler.step()
        self.step = next_step
        self.epoch_loss += float(losses["total_loss"].detach())
        self.epoch_batches += 1
        self.last_recon = outputs["recon"].detach()
        return metrics

    def log_media(self, logger: ExperimentLogger, images: torch.Tensor) -> None:
        """The batch and its reconstruction, every image_log_frequency steps and at the end."""
        every = self.cfg.train.image_log_frequency
        if not every or (self.step % every and self.step != self.stop):
            return
        recon = self.last_recon
        logger.log_image("reconstruction", side_by_side(images, recon), self.step, "top: original")
        logger.log_image("image_diff", side_by_side(images, (images - recon).abs()), self.step)

    # -- end of an epoch -----------------------------------------------------------------------

    def epoch_ends(self) -> bool:
        return self.step % self.steps_per_epoch == 0 or self.step == self.stop

    def evaluate_epoch(self, logger: ExperimentLogger) -> None:
        """Validation metrics, sample captions, checkpoints and the summary at an epoch's end."""
        started = time.perf_counter()
        ev = evaluate(self.model, self.val, self.val_tokens, self.mean_image, self.cfg, self.device)
        train_avg = self.epoch_loss / max(1, self.epoch_batches)
        epoch_metrics = {f"val_{k}": v for k, v in ev.items()}
        epoch_metrics.update(
            epoch=self.step / self.steps_per_epoch,
            epoch_train_loss_avg=train_avg,
            epoch_val_loss_avg=ev["total_loss"],
            val_train_loss_ratio=ev["total_loss"] / train_avg if train_avg else math.nan,
            image_caption_loss_ratio=ev["loss_image"] / max(ev["loss_caption"], 1e-12),
        )
        # the last evaluation always probes ranks, so a short run has them too
        self.probe.log(logger, epoch_metrics, step=self.step, force=self.step == self.stop)
        rows = sample_table(self.model, self.val, self.tokenizer, self.cfg.train.num_samples,
                            self.device)  # fmt: skip
        logger.log_table(
            "sample_captions", ["index", "reference", "generated", "exact"], rows, self.step
        )
        self.epoch_loss, self.epoch_batches = 0.0, 0
        out = job_dir()
        if ev["total_loss"] < self.best_val:
            self.best_val = ev["total_loss"]
            self.save(out / "best.pt")
        self.save(out / "last.pt")
        logger.log_summary(
            {f"final_{k}": v for k, v in epoch_metrics.items()}, best_val_loss=self.best_val
        )
        log.info(
            "epoch %.2f: train %.4f val %.4f | caption acc %.3f | image mse %.4f "
            "(mean image %.4f) | retrieval top-1 %.3f (chance %.3f)",
            self.step / self.steps_per_epoch, train_avg, ev["total_loss"],
            ev["caption_accuracy"], ev["image_mse"], ev["mean_image_mse"],
            ev["retrieval_top1"], ev["retrieval_chance"],
        )  # fmt: skip
        self.eval_time += time.perf_counter() - started


def load_resume_point(cfg: DictConfig) -> dict[str, Any] | None:
    """The run's last.pt when it resumes (None: a fresh run, or stopped before one was saved)."""
    last = job_dir() / "last.pt"
    return torch.load(last, weights_only=False) if cfg.resume and last.is_file() else None


def report_setup(cfg: DictConfig, run: Training, logger: ExperimentLogger) -> None:
    run.probe.spent = logger.summary.get("rank_probe_seconds", 0.0)  # a resumed run's goes on
    if cfg.rank_probe.enabled:
        run.probe.probe = encoder_rank_probe(cfg, run.model, run.val.images, run.device)
        logger.attach_rank_probe(run.probe.probe)
    n_train, n_val = len(run.train.images), len(run.val.images)
    logger.update_config(old_config_names(cfg, n_train, n_val, run.model))
    logger.log_summary(
        train_samples=n_train,
        val_samples=n_val,
        total_parameters=run.model.num_parameters,
        vocab_size_used=len(run.tokenizer),
        max_caption_len=run.max_len,
        steps_per_epoch=run.steps_per_epoch,
        device=str(run.device),
    )
    for name in ("epoch_train_loss_avg", "epoch_val_loss_avg", "val_train_loss_ratio"):
        logger.define_metric(name, step_metric="epoch")
    log.info(
        "%d train / %d val pairs, vocabulary %d, %d parameters, training to step %d%s",
        n_train, n_val, len(run.tokenizer), run.model.num_parameters, run.stop,
        f" (train.max_steps; the schedule has {run.total_steps})"
        if run.stop < run.total_steps else "",
    )  # fmt: skip


def train(run: Training, logger: ExperimentLogger) -> None:
    """Steps until run.stop: the per-batch log, media, checkpoints and epoch evaluations."""
    tc = run.cfg.train
    run.model.train()
    psutil.cpu_percent(interval=None)  # starts the cpu_percent interval
    bar = progress(total=run.stop, initial=run.step, desc="multimodal", unit="batch", leave=False)
    while run.step < run.stop:
        images, tokens = run.batch()
        metrics = run.train_step(images, tokens)
        bar.update(1)
        if metrics is not None:
            metrics.update(hardware_stats(run.device))
            run.probe.log(logger, metrics, step=run.step)
            bar.set_postfix(loss=f"{metrics['total_loss']:.3f}", refresh=False)
        run.log_media(logger, images)
        if run.epoch_ends():  # saves last.pt once the step's records are written: a resume
            run.evaluate_epoch(logger)  # from it never skips them
        elif tc.checkpoint_frequency and run.step % tc.checkpoint_frequency == 0:
            run.save(job_dir() / "last.pt")
    bar.close()


def multimodal_job(
    cfg: DictConfig, logger: ExperimentLogger, pairs: tuple[PairSet, PairSet]
) -> None:
    # data and model (a resumed run: as its last checkpoint left them)
    resume = load_resume_point(cfg)
    run = Training(cfg, pairs, resolve_device(cfg.runtime.device), resume)
    if cfg.resume:
        dropped = logger.rewind(run.step)  # the steps after the checkpoint are trained again
        log.info("resuming %s at step %d (epoch %d; %d records after it dropped)", job_dir(),
                 run.step, run.step // run.steps_per_epoch, dropped)  # fmt: skip
    report_setup(cfg, run, logger)

    # train
    first_step, started = run.step, time.perf_counter()
    train(run, logger)

    # report
    elapsed = time.perf_counter() - started
    train_time = elapsed - run.eval_time  # training steps with their logging, no evaluation
    done = run.step - first_step
    logger.log_summary(
        steps=run.step,
        wall_time_s=elapsed,
        train_time_s=train_time,
        step_time_s=train_time / max(1, done),
        samples_per_second=done * cfg.train.batch_size / train_time if train_time > 0 else math.nan,
        status="finished" if run.step >= run.total_steps else "stopped (max_steps)",
    )


@hydra.main(version_base="1.3", config_path="../conf", config_name="multimodal")
def main(cfg: DictConfig) -> None:
    run_job(cfg, multimodal_job, validate)


register_configs()

if __name__ == "__main__":
    check_override_keys(MultimodalConfig, sys.argv[1:], "conf/multimodal.yaml")
    main()
    exit_if_incomplete()  # a sweep with jobs that did not finish: reported above
