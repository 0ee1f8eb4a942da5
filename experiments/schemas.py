"""Structured-config schemas: a mistyped override key, a wrongly typed value or a choice
outside its Enum is an error when Hydra composes the config.

The defaults live here, once. Each primary config in ``conf/`` lists its schema first in its
defaults list and sets only what differs from it (tests/test_configs.py checks that no YAML
value repeats a default). Shared pieces (logger, runtime) are reused by every experiment.

Choices are ``StrEnum``s whose member names equal their values: OmegaConf reads a member from
its name, and a member is a ``str`` equal to its value, so ``cfg.model.structure == "butterfly"``
holds and the records (config.yaml, run.json, W&B) get the plain string
(``OmegaConf.to_container(..., enum_to_str=True)``).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path

from hydra.core.config_store import ConfigStore
from omegaconf import OmegaConf


class LoggerMode(StrEnum):
    offline = "offline"  # no network, no login; `wandb sync` later
    online = "online"
    disabled = "disabled"  # no W&B at all; the local run record is still written


class ProbeMode(StrEnum):  # how the rank-decay dynamics read the per-layer ranks
    difference = "difference"
    ratio = "ratio"


class WeightInit(StrEnum):  # experiments/weights.py draws each (normal: i.i.d. N(0, 1))
    xavier_uniform = "xavier_uniform"
    xavier_normal = "xavier_normal"
    kaiming_uniform = "kaiming_uniform"
    kaiming_normal = "kaiming_normal"
    orthogonal = "orthogonal"
    normal = "normal"
    hadamard = "hadamard"  # square power-of-two shapes; ignores the seed


class WeightDtype(StrEnum):
    float16 = "float16"
    float32 = "float32"
    bfloat16 = "bfloat16"
    float64 = "float64"


class Structure(StrEnum):
    butterfly = "butterfly"
    monarch = "monarch"
    lowrank = "lowrank"


class ChainInit(StrEnum):
    random = "random"  # variance preserving
    svd = "svd"  # oracle warm start


class DataMode(StrEnum):
    fresh = "fresh"
    fixed = "fixed"
    exact = "exact"


class Schedule(StrEnum):
    cosine = "cosine"
    constant = "constant"


class Precision(StrEnum):
    float32 = "float32"
    bfloat16 = "bfloat16"
    float16 = "float16"  # CUDA only


class Runner(StrEnum):
    cell = "cell"
    grid = "grid"


class Noise(StrEnum):  # label noise, all matched to variance noise_std^2
    gaussian = "gaussian"
    laplace = "laplace"
    student_t = "student_t"


class StudentKind(StrEnum):
    linear = "linear"
    mlp = "mlp"


class Optimizer(StrEnum):
    adam = "adam"
    sgd = "sgd"


class Protocol(StrEnum):  # docs/scaling_fit.md
    fixed_epochs = "fixed_epochs"
    fixed_steps = "fixed_steps"


class DataSource(StrEnum):
    synthetic = "synthetic"  # built-in line art
    folder = "folder"


class Alignment(StrEnum):
    infonce = "infonce"
    mse = "mse"
    cosine = "cosine"


@dataclass
class LoggerConfig:
    # conf/logger/wandb.yaml (the primary configs' default) reads $WANDB_MODE first.
    mode: LoggerMode = LoggerMode.offline
    project: str = "ks-experiments"
    entity: str | None = None
    # None: the sweep folder's name under a multirun, so the jobs of one launch group together.
    group: str | None = None
    tags: list[str] = field(default_factory=list)
    name: str | None = None
    job_type: str | None = None
    notes: str | None = None
    init_timeout: float = 60.0


@dataclass
class RuntimeConfig:
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    # None: torch's default, or cores / parallel jobs under the joblib and submitit launchers.
    num_threads: int | None = None


@dataclass
class RankProbeConfig:
    """The live rank probe (experiments/rank_probe.py), shared by every experiment."""

    enabled: bool = True
    every: int = 5  # in logged steps (epochs for the rank sweep)
    probe_size: int = 256  # fixed probe batch; ranks are capped at min(probe_size, width)
    mode: ProbeMode = ProbeMode.difference  # rank-decay dynamics
    prepend_input_rank: bool = False  # R_0 = the probe batch's rank in the dynamics
    prop: float = 0.99
    eps: float = 0.01


@dataclass
class WeightConfig:
    path: str | None = None  # a .pth holding a 2-D tensor or a one-weight state dict
    out_features: int = 1024
    in_features: int = 2048
    init: WeightInit = WeightInit.normal
    dtype: WeightDtype = WeightDtype.float32
    seed: int = 0


@dataclass
class ChainModelConfig:
    structure: Structure = Structure.butterfly
    nblocks: int | None = None  # monarch only; None picks the largest k with k*k <= min side
    init: ChainInit = ChainInit.random


@dataclass
class ChainDataConfig:
    # fresh: new x ~ N(0, s^2 I) every step, val = the exact expected loss;
    # fixed: num_samples drawn once, split train/val (to compare with fixed-sample results);
    # exact: train on the exact expected loss s^2 ||W - W_hat||^2 / M (no sampling noise).
    mode: DataMode = DataMode.fresh
    input_std: float = 1.0
    num_samples: int = 10000
    val_fraction: float = 0.2


@dataclass
class ChainTrainConfig:
    num_epochs: int = 50
    # None: num_samples * (1 - val_fraction) / batch_size, one pass over a fixed training set.
    steps_per_epoch: int | None = None
    batch_size: int = 32
    lr: float = 1e-2
    schedule: Schedule = Schedule.cosine
    warmup_steps: int = 0
    grad_clip: float | None = 1.0
    precision: Precision = Precision.float32
    save_checkpoint: bool = True


@dataclass
class ReportConfig:
    save_prefix: str = "rank_sweep"
    log_scale: bool = True


@dataclass
class RankSweepConfig:
    rank: int = 8
    max_rank: int | None = None  # jobs of a sweep with rank above it are skipped
    seed: int = 0
    # go on in the run folder (hydra.run.dir) from its last finished epoch (last.pt); a SLURM
    # requeue sets it
    resume: bool = False
    weight: WeightConfig = field(default_factory=WeightConfig)
    model: ChainModelConfig = field(default_factory=ChainModelConfig)
    data: ChainDataConfig = field(default_factory=ChainDataConfig)
    train: ChainTrainConfig = field(default_factory=ChainTrainConfig)
    report: ReportConfig = field(default_factory=ReportConfig)
    # each factor's output on a fixed probe batch, every 5 epochs (ranks/*, 12 dynamics)
    rank_probe: RankProbeConfig = field(default_factory=RankProbeConfig)
    logger: LoggerConfig = field(default_factory=LoggerConfig)
    runtime: RuntimeConfig = field(default_factory=RuntimeConfig)


@dataclass
class ScalingTaskConfig:
    n_features: int = 128
    n_train: int = 8192
    n_val: int = 2048
    noise: Noise = Noise.gaussian
    noise_std: float = 1.0
    student_t_df: float = 5.0


@dataclass
class ScalingModelConfig:
    kind: StudentKind = StudentKind.linear
    hidden: int = 64
    depth: int = 2  # hidden layers of the mlp


@dataclass
class ScalingOptimConfig:
    name: Optimizer = Optimizer.adam
    momentum: float = 0.9  # sgd only
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    eps: float = 1e-8
    weight_decay: float = 0.0  # AdamW-style decay scales with lr: keep 0 in an lr sweep


@dataclass
class ScalingTrainConfig:
    protocol: Protocol = Protocol.fixed_epochs
    epochs: int = 8
    steps: int = 2000  # fixed_steps only
    evals: int = 8  # evaluations per cell (fixed_steps); fixed_epochs evaluates every epoch


@dataclass
class ScalingGridConfig:
    batch_sizes: list[int] = field(default_factory=lambda: [8, 16, 32, 64, 128, 256, 512])
    lrs: list[float] = field(
        default_factory=lambda: [3.0e-5, 7.9e-5, 2.1e-4, 5.5e-4, 1.4e-3, 3.8e-3, 1.0e-2]
    )
    seeds: list[int] = field(default_factory=lambda: [0, 1, 2])
    noises: list[Noise] = field(default_factory=lambda: [Noise.gaussian])


@dataclass
class LaplaceScalingConfig:
    # cell: train one (batch_size, lr, seed) cell (a multirun sweeps them);
    # grid: one process trains the whole grid, the lrs of each (batch size, seed) stacked.
    runner: Runner = Runner.cell
    # go on in the run folder (hydra.run.dir): the grid runner from its finished groups of
    # cells, a cell from its start; a SLURM requeue sets it
    resume: bool = False
    batch_size: int = 64
    lr: float = 1e-3
    seed: int = 0
    task: ScalingTaskConfig = field(default_factory=ScalingTaskConfig)
    model: ScalingModelConfig = field(default_factory=ScalingModelConfig)
    optim: ScalingOptimConfig = field(default_factory=ScalingOptimConfig)
    train: ScalingTrainConfig = field(default_factory=ScalingTrainConfig)
    grid: ScalingGridConfig = field(default_factory=ScalingGridConfig)
    # the MLP student's hidden layers per cell ({cell}/ranks/*), every 4 evaluations (a linear
    # student has none)
    rank_probe: RankProbeConfig = field(default_factory=lambda: RankProbeConfig(every=4))
    logger: LoggerConfig = field(default_factory=LoggerConfig)
    runtime: RuntimeConfig = field(default_factory=RuntimeConfig)


@dataclass
class MultimodalDataConfig:
    source: DataSource = DataSource.synthetic
    num_train: int = 4627
    num_val: int = 514
    image_size: int = 48
    max_objects: int = 2  # synthetic: 1 to max_objects shapes per image
    folder: str | None = None  # folder: the images
    captions: str | None = None  # CSV (image,caption) or JSONL; None: captions.csv|jsonl in folder
    channels: int = 1  # 1 grayscale | 3 RGB
    val_fraction: float = 0.1  # folder only; the synthetic split is num_train / num_val
    vocab_size: int = 1266  # cap, special tokens included
    max_caption_len: int = 0  # tokens with bos/eos; 0: the longest training caption


@dataclass
class MultimodalModelConfig:
    image_encoder_layers: int = 5
    conv_width: int = 32
    latent_dim: int = 256
    embedding_dim: int = 128
    transformer_layers: int = 2
    caption_encoder_layers: int = 1
    num_heads: int = 4
    prefix_tokens: int = 4  # the image latent enters the caption decoder as this many tokens
    dropout: float = 0.0


@dataclass
class MultimodalLossConfig:
    alignment: Alignment = Alignment.infonce
    image_weight: float = 10.0
    caption_weight: float = 1.0
    alignment_weight: float = 0.1


@dataclass
class MultimodalTrainConfig:
    epochs: int = 16  # ~3.5 minutes on 2 CPU cores: benchmarks/bench_multimodal.py
    batch_size: int = 64
    lr: float = 2e-3
    min_lr: float = 1e-5
    weight_decay: float = 0.01
    grad_clip: float = 1.0
    warmup_steps: int = 50
    log_frequency: int = 10  # batches between metric logs; 0: epoch metrics only
    image_log_frequency: int = 500  # batches between reconstruction images; 0: never
    checkpoint_frequency: int = 0  # batches between last.pt saves; 0: at each epoch's end
    num_samples: int = 8  # sample captions in the table at each evaluation
    max_steps: int = 0  # stop after this many batches in all (0: no limit); resume goes on


@dataclass
class MultimodalConfig:
    seed: int = 0
    resume: bool = False
    run_dir: str | None = None  # resume: the run folder; None picks the newest one
    data: MultimodalDataConfig = field(default_factory=MultimodalDataConfig)
    model: MultimodalModelConfig = field(default_factory=MultimodalModelConfig)
    loss: MultimodalLossConfig = field(default_factory=MultimodalLossConfig)
    train: MultimodalTrainConfig = field(default_factory=MultimodalTrainConfig)
    # each image-encoder block and the latent projection on 256 fixed validation images, every
    # 200 steps (a multiple of train.log_frequency, so it lands on a logged step)
    rank_probe: RankProbeConfig = field(default_factory=lambda: RankProbeConfig(every=200))
    logger: LoggerConfig = field(default_factory=LoggerConfig)
    runtime: RuntimeConfig = field(default_factory=RuntimeConfig)


def multimodal_run_dir(resume: bool, run_dir: str | None, fresh: str) -> str:
    """The multimodal run folder: ``run_dir``, else with ``resume`` the newest one holding a
    last.pt under ``fresh``'s parent (the same folder and W&B run go on), else ``fresh``."""
    if run_dir:
        return run_dir
    if resume:
        runs = sorted(Path(fresh).parent.glob("*/last.pt"), key=lambda p: p.stat().st_mtime)
        if runs:
            return str(runs[-1].parent)
    return fresh


def multimodal_hydra_subdir(resume: bool, stamp: str) -> str:
    """Where Hydra writes its own files: ``.hydra``, or for a resume ``.hydra/resume-<time>``."""
    return f".hydra/resume-{stamp}" if resume else ".hydra"


def register_configs() -> None:
    """Put the schemas in Hydra's ConfigStore (called by each entry point before main)."""
    if not OmegaConf.has_resolver("multimodal_run_dir"):
        OmegaConf.register_new_resolver("multimodal_run_dir", multimodal_run_dir)
        OmegaConf.register_new_resolver("multimodal_hydra_subdir", multimodal_hydra_subdir)
    cs = ConfigStore.instance()
    cs.store(name="rank_sweep_schema", node=RankSweepConfig)
    cs.store(name="laplace_scaling_schema", node=LaplaceScalingConfig)
    cs.store(name="multimodal_schema", node=MultimodalConfig)
