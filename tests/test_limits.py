"""Limits checked before a job allocates or writes anything (experiments/resources.py): the
memory a job needs against what the machine has, and the numbers in its config.

The entry points run as a user runs them (subprocesses, their peak memory read with wait4); the
config matrix calls each entry point's own ``validate`` on configs composed as Hydra composes
them, which is what runs before a job writes anything.
"""

from __future__ import annotations

import copy
import functools
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.core.override_parser.overrides_parser import OverridesParser
from omegaconf import DictConfig, OmegaConf

from common.cli import UserError
from experiments import laplace_scaling, multimodal, rank_sweep, resources
from experiments.weights import DTYPES

REPO = Path(__file__).resolve().parents[1]
CONF = REPO / "conf"
MiB = 2**20


def run_measured(script: str, args: list[str], cwd: Path) -> tuple[int, str, float, int]:
    """(exit code, stderr, seconds, peak resident bytes) of one entry point run as a user runs
    it; the peak is this child's own (wait4), not the largest of every child so far."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "WANDB_SILENT": "true", "WANDB_MODE": "disabled"}
    err = cwd / f"stderr-{time.monotonic_ns()}"
    started = time.perf_counter()
    with open(err, "w") as stderr:
        proc = subprocess.Popen([sys.executable, str(REPO / "experiments" / script), *args],
                                cwd=cwd, env=env, stdout=subprocess.DEVNULL, stderr=stderr)  # fmt: skip
        _, status, usage = os.wait4(proc.pid, 0)
    elapsed = time.perf_counter() - started
    text = err.read_text()
    err.unlink()
    return os.waitstatus_to_exitcode(status), text, elapsed, usage.ru_maxrss * 1024


def huge_weight_file(path: Path) -> Path:
    """A 1,000,000 x 1,000,000 float32 weight in a file of a few KB: one value, expanded (the
    file holds its storage and its shape; read densely it would take 3.6 TiB)."""
    torch.save(torch.ones(1).expand(10**6, 10**6), path)
    return path


HUGE = {
    "rank sweep weight": (
        "rank_sweep.py",
        ["weight.out_features=1000000", "weight.in_features=1000000"],
        ["the 1000000x1000000 weight", "use smaller weight.out_features/weight.in_features"],
    ),
    "rank sweep weight file": (
        "rank_sweep.py",
        ["weight.path={huge}"],
        ["the 1000000x1000000 weight", "use a smaller weight than"],
    ),
    "scaling task": (
        "laplace_scaling.py",
        ["task.n_features=1000000", "task.n_train=1000000"],
        ["features", "use smaller task.n_features/task.n_train/task.n_val"],
    ),
    "multimodal image size": (
        "multimodal.py",
        ["data.image_size=1000000", "data.num_train=64", "data.num_val=16"],
        ["data.image_size"],
    ),
    "multimodal data set": (
        "multimodal.py",
        [
            "data.image_size=4096",
            "data.num_train=5000",
            "data.num_val=100",
            "rank_probe.enabled=false",
            "train.batch_size=2",
        ],  # fmt: skip
        ["5100 1x4096x4096 images", "data.num_train"],
    ),
}


@pytest.mark.parametrize("case", list(HUGE))
def test_huge_sizes_are_refused_before_anything_is_allocated(tmp_path, case):
    script, args, parts = HUGE[case]
    args = [a.format(huge=huge_weight_file(tmp_path / "huge.pth")) for a in args]
    out = tmp_path / "job"
    code, stderr, elapsed, peak = run_measured(
        script, [*args, "logger=disabled", f"hydra.run.dir={out}"], tmp_path
    )
    lines = stderr.strip().splitlines()
    assert code == 2, stderr[-2000:]
    assert len(lines) == 1 and lines[0].startswith("error: "), lines
    for part in (*parts, "would need ~", "available: "):
        assert part in lines[0], lines[0]
    assert not out.exists() and not (tmp_path / "outputs").exists()
    # refused from the config and the file's shape alone: nothing big was ever allocated
    assert peak < 1024 * MiB and elapsed < 60, (peak / MiB, elapsed)


def test_generate_test_weight_refuses_a_huge_weight(tmp_path):
    out = tmp_path / "w.pth"
    code, stderr, _, peak = run_measured(
        "generate_test_weight.py",
        ["--output_features", "1000000", "--input_features", "1000000", "--output_path", str(out)],
        tmp_path,
    )
    lines = stderr.strip().splitlines()
    assert code == 2 and len(lines) == 1, stderr[-2000:]
    assert "the 1000000x1000000 float32 weight would need ~" in lines[0]
    assert "use smaller --output_features/--input_features" in lines[0]
    assert not out.exists() and peak < 1024 * MiB


def test_memory_check_message_and_switch(monkeypatch):
    free = resources.available_memory("cpu")
    with pytest.raises(UserError) as info:
        resources.check_memory(4 * free, "the thing", "use a smaller thing.size")
    message = str(info.value)
    assert message.startswith("the thing would need ~") and "\n" not in message
    assert "available: use a smaller thing.size (KS_MEMORY_CHECK=off skips this check)" in message
    resources.check_memory(free // 4, "the thing", "hint")  # fits: no error
    monkeypatch.setenv("KS_MEMORY_CHECK", "off")
    resources.check_memory(4 * free, "the thing", "hint")  # switched off


def test_the_peak_phase_names_its_largest_parts():
    P = resources.Part
    need = resources.Need(
        {
            "small": [P(10 * MiB, "a", "hint a")],
            "big": [
                P(2**50, "the weight", "smaller weight"),
                P(2**48, "its copy", "smaller"),
                P(1, "a crumb", "never named"),
            ],
        }  # fmt: skip
    )
    with pytest.raises(UserError) as info:
        need.check("cpu")
    message = str(info.value)
    assert message.startswith("the weight and its copy would need ~")
    assert "smaller weight; or smaller" in message and "crumb" not in message


# -- the estimates against real runs ----------------------------------------------------------


@functools.cache
def _composed(config: str, base: tuple[str, ...]) -> DictConfig:
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        return compose(config_name=config, overrides=list(base))


def compose_cfg(config: str, overrides: list[str], base: tuple[str, ...] = ()) -> DictConfig:
    """``config`` composed by Hydra with ``base`` (once), then ``overrides`` parsed by Hydra's
    override parser and set on a copy (typed by the schema, as compose would; ~100x faster)."""
    cfg = copy.deepcopy(_composed(config, tuple(base)))
    for override in OverridesParser.create().parse_overrides(overrides):
        OmegaConf.update(cfg, override.key_or_group, override.value(), merge=False)
    return cfg


def estimated_peak(config: str, overrides: list[str]) -> int:
    cfg = compose_cfg(config, overrides)
    cpu = torch.device("cpu")
    if config == "rank_sweep":
        w = cfg.weight
        need = resources.rank_sweep_memory(cfg, (w.out_features, w.in_features), cpu,
                                           init=w.init, dtype_bytes=DTYPES[w.dtype].itemsize)["cpu"]  # fmt: skip
    else:
        need = resources.scaling_memory(cfg, 1, [cfg.batch_size])
    return need.peak[1] + resources.JOB_OVERHEAD


ESTIMATED = {
    # the fixed data set dominates: 100,000 samples of 1024 inputs
    "rank_sweep": [
        "weight.out_features=256",
        "weight.in_features=1024",
        "data.mode=fixed",
        "data.num_samples=100000",
        "train.num_epochs=1",
        "train.steps_per_epoch=2",
        "rank_probe.enabled=false",
    ],  # fmt: skip
    # the task's features dominate: 120,000 x 1000 (458 MiB: well above the idle process's own
    # spread, which read 115 MiB higher in one CI flow)
    "laplace_scaling": [
        "task.n_features=1000",
        "task.n_train=100000",
        "task.n_val=20000",
        "train.epochs=1",
        "batch_size=512",
    ],  # fmt: skip
}
BASELINE = {"rank_sweep": "rank=0", "laplace_scaling": "lr=-1"}  # refused after every import


@pytest.mark.slow  # resident memory of real jobs: other processes on the machine move it
@pytest.mark.parametrize("config", list(ESTIMATED))
def test_the_estimate_bounds_the_real_peak(tmp_path, config):
    """The estimate is conservative: a real job's peak resident memory, above the same
    process refusing bad input (interpreter, torch and the entry point imported), stays under
    it, and not by an absurd margin."""
    script = f"{config}.py"
    idles, peaks = [], []
    for attempt in range(2):  # each twice: the lower idle, the higher peak (CI once read 128 MiB
        # less used than every other run, with the same code)
        base = [f"hydra.run.dir={tmp_path / f'base{attempt}'}", "logger=disabled"]
        code, stderr, _, idle = run_measured(script, [*base, BASELINE[config]], tmp_path)
        assert code == 2, stderr[-2000:]
        args = [
            *ESTIMATED[config],
            "logger=disabled",
            f"hydra.run.dir={tmp_path / f'job{attempt}'}",
        ]
        code, stderr, _, peak = run_measured(script, args, tmp_path)
        assert code == 0, stderr[-2000:]
        idles.append(idle / MiB)
        peaks.append(peak / MiB)
    used, estimate = max(peaks) - min(idles), estimated_peak(config, ESTIMATED[config]) / MiB
    assert used > 200, (idles, peaks)  # the case measures tensors, not noise
    assert used <= estimate <= 4 * used, (used, estimate, idles, peaks)


WEIGHT = "the 64x128 weight"
PARAMS = "the chain's 3,328 parameters"
SAMPLES = "data.num_samples=1000 samples of 128 inputs"
FLOOR = [WEIGHT, f"{WEIGHT} and its SVD (the loss floor)"]
BUILD = {"build": (32768, [WEIGHT])}
# (device, overrides, keywords) -> {kind: {phase: (bytes, what each part is)}}, and the hint of
# the train phase's busiest part: the rank sweep's estimate on a 64x128 weight, pinned, so that
# a change to any phase (on purpose or not) shows here.
RANK_SWEEP_NEEDS = {
    "cpu, fresh, probe": (
        "cpu", [], {"init": "normal"},
        {"cpu": {**BUILD, "floor": (307200, FLOOR),
                 "train": (1732608, [WEIGHT, PARAMS, "the rank probe on 256 inputs"])}},
        "use a smaller rank_probe.probe_size",
    ),
    "cpu, fresh, dense evaluation": (
        "cpu", ["train.batch_size=1", "rank_probe.enabled=false"],
        {"init": "hadamard", "dtype_bytes": 8},
        {"cpu": {"build": (229376, [WEIGHT]), "floor": (307200, FLOOR),
                 "train": (380928, [WEIGHT, PARAMS,
                                    "the chain's dense 64x128 product (data.mode=fresh)"])}},
        "use smaller weight.out_features/weight.in_features, or data.mode=fixed "
        "(no dense evaluation)",
    ),
    "cpu, fixed, step": (
        "cpu", ["data.mode=fixed", "rank_probe.enabled=false"],
        {"init": "orthogonal", "dtype_bytes": 2},
        {"cpu": {"build": (180224, [WEIGHT]), "floor": (307200, FLOOR),
                 "train": (1811456, [WEIGHT, PARAMS, SAMPLES,
                                     "a batch of 32 through the chain"])}},
        "use a smaller train.batch_size",
    ),
    "cpu, fixed, validation": (
        "cpu", ["data.mode=fixed", "train.batch_size=1", "rank_probe.enabled=false"],
        {"init": "normal"},
        {"cpu": {**BUILD, "floor": (307200, FLOOR),
                 "train": (1673216, [WEIGHT, PARAMS, SAMPLES, "200 validation samples"])}},
        "use a smaller data.num_samples",
    ),
    "cpu, exact, svd init, loaded": (
        "cpu", ["data.mode=exact", "model.init=svd", "rank_probe.enabled=false"],
        {"source_bytes": 1000},
        {"cpu": {"build": (50152, [WEIGHT]),
                 "floor": (471040, [WEIGHT, f"{WEIGHT} and its SVD (model.init=svd)"]),
                 "train": (1470464, [WEIGHT, PARAMS,
                                     "the chain's dense 64x128 product (data.mode=exact)"])}},
        "use smaller weight.out_features/weight.in_features, or data.mode=fixed "
        "(no dense evaluation)",
    ),
    "cuda, fixed, probe": (
        "cuda", ["data.mode=fixed"], {"init": "normal"},
        {"cpu": {**BUILD, "data": (1312768, [WEIGHT, SAMPLES])},
         "cuda": {"floor": (307200, FLOOR),
                  "train": (3012608, [WEIGHT, PARAMS, SAMPLES, "the rank probe on 256 inputs"])}},
        "use a smaller rank_probe.probe_size",
    ),
    "cuda, fresh": (
        "cuda", ["rank_probe.enabled=false"], {"init": "normal"},
        {"cpu": BUILD,
         "cuda": {"floor": (307200, FLOOR),
                  "train": (531456, [WEIGHT, PARAMS, "a batch of 32 through the chain"])}},
        "use a smaller train.batch_size",
    ),
    "cpu, weight only": (
        "cpu", [], {"init": "normal", "weight_only": True},
        {"cpu": {**BUILD, "floor": (307200, FLOOR)}}, None,
    ),
    "cuda, weight only": (
        "cuda", [], {"init": "normal", "weight_only": True},
        {"cpu": BUILD, "cuda": {"floor": (307200, FLOOR)}}, None,
    ),
}  # fmt: skip


@pytest.mark.parametrize("case", list(RANK_SWEEP_NEEDS))
def test_the_rank_sweep_estimate_per_phase_and_device(case):
    device, overrides, keywords, expected, busiest_hint = RANK_SWEEP_NEEDS[case]
    base = ["weight.out_features=64", "weight.in_features=128", "train.batch_size=32",
            "data.num_samples=1000"]  # fmt: skip
    cfg = compose_cfg("rank_sweep", [*base, *overrides])
    needs = resources.rank_sweep_memory(cfg, (64, 128), torch.device(device), **keywords)
    got = {
        kind: {phase: (sum(p.nbytes for p in parts), [p.what for p in parts])
               for phase, parts in need.phases.items()}
        for kind, need in needs.items()
    }  # fmt: skip
    assert got == expected
    if busiest_hint is not None:
        train = next(need.phases["train"] for need in needs.values() if "train" in need.phases)
        assert train[-1].hint == busiest_hint


# -- numbers in the config ----------------------------------------------------------------------

RANK_SWEEP_BASE = ["weight.out_features=16", "weight.in_features=32", "rank=4", "logger=disabled"]
RANK_SWEEP_BAD = [
    ("rank=-1", "rank must be a positive integer, got -1"),
    ("max_rank=0", "max_rank must be a positive integer, got 0"),
    ("seed=-1", "seed must be an integer in [0, 2**40), got -1"),
    ("weight.out_features=0", "weight.out_features must be a positive integer, got 0"),
    ("weight.out_features=-5", "weight.out_features must be a positive integer, got -5"),
    ("weight.in_features=0", "weight.in_features must be a positive integer, got 0"),
    ("weight.seed=-3", "weight.seed must be an integer in [0, 2**40), got -3"),
    ("model.structure=monarch model.nblocks=0", "model.nblocks must be a positive integer"),
    ("model.structure=monarch model.nblocks=-2", "model.nblocks must be a positive integer"),
    ("data.input_std=0", "data.input_std must be positive, got 0"),
    ("data.input_std=-1", "data.input_std must be positive, got -1"),
    ("data.input_std=nan", "data.input_std must be a finite number, got nan"),
    ("data.input_std=inf", "data.input_std must be a finite number, got inf"),
    ("data.input_std=1e20", "outside float32's safe range"),
    ("data.input_std=1e-20", "outside float32's safe range"),
    ("data.num_samples=0", "data.num_samples must be a positive integer, got 0"),
    ("data.num_samples=-10", "data.num_samples must be a positive integer, got -10"),
    ("data.mode=fixed data.num_samples=1", "data.num_samples=1 leaves no training samples"),
    ("data.mode=fixed data.val_fraction=1e-17 data.num_samples=3", "leaves no validation samples"),
    ("data.val_fraction=0", "data.val_fraction must be in (0, 1), got 0"),
    ("data.val_fraction=1", "data.val_fraction must be in (0, 1), got 1"),
    ("data.val_fraction=nan", "data.val_fraction must be a finite number, got nan"),
    ("train.num_epochs=0", "train.num_epochs must be a positive integer, got 0"),
    ("train.steps_per_epoch=0", "train.steps_per_epoch must be a positive integer, got 0"),
    ("train.steps_per_epoch=-3", "train.steps_per_epoch must be a positive integer, got -3"),
    ("train.batch_size=-1", "train.batch_size must be a positive integer, got -1"),
    ("train.lr=0", "train.lr must be positive, got 0"),
    ("train.lr=nan", "train.lr must be a finite number, got nan"),
    ("train.lr=inf", "train.lr must be a finite number, got inf"),
    ("train.lr=-inf", "train.lr must be a finite number, got -inf"),
    ("train.warmup_steps=-1", "train.warmup_steps must be >= 0, got -1"),
    ("train.grad_clip=-1", "train.grad_clip must be >= 0, got -1"),
    ("train.grad_clip=nan", "train.grad_clip must be a finite number, got nan"),
    ("train.grad_clip=inf", "train.grad_clip must be a finite number, got inf"),
    ("rank_probe.every=-1", "rank_probe.every must be >= 0"),
    ("rank_probe.probe_size=0", "rank_probe.probe_size must be a positive integer, got 0"),
    ("rank_probe.prop=0", "rank_probe.prop must be in (0, 1], got 0"),
    ("rank_probe.prop=1.5", "rank_probe.prop must be in (0, 1], got 1.5"),
    ("rank_probe.prop=nan", "rank_probe.prop must be a finite number, got nan"),
    ("rank_probe.eps=-0.1", "rank_probe.eps must be in [0, 1), got -0.1"),
    ("rank_probe.eps=1", "rank_probe.eps must be in [0, 1), got 1"),
    ("logger.init_timeout=0", "logger.init_timeout must be positive, got 0"),
    ("logger.init_timeout=nan", "logger.init_timeout must be a finite number, got nan"),
    ("runtime.num_threads=0", "runtime.num_threads must be a positive integer, got 0"),
]

SCALING_BASE = ["task.n_features=8", "task.n_train=256", "task.n_val=64", "grid.batch_sizes=[8,64]",
                "logger=disabled"]  # fmt: skip
SCALING_BAD = [
    ("task.n_val=0", "task.n_val=0 leaves the validation set empty"),
    ("task.n_val=-1", "task.n_val=-1 leaves the validation set empty"),
    ("task.n_train=0", "task.n_train must be a positive integer, got 0"),
    ("task.n_train=-5", "task.n_train must be a positive integer, got -5"),
    ("task.n_features=0", "task.n_features must be a positive integer, got 0"),
    ("task.n_features=-1", "task.n_features must be a positive integer, got -1"),
    ("task.noise_std=inf", "task.noise_std must be a finite number, got inf"),
    ("task.noise_std=nan", "task.noise_std must be a finite number, got nan"),
    ("task.noise_std=0", "task.noise_std must be positive, got 0"),
    ("task.noise_std=-1", "task.noise_std must be positive, got -1"),
    ("task.noise_std=1e20", "task.noise_std=1e+20 is too large"),
    ("task.student_t_df=inf", "task.student_t_df must be a finite number, got inf"),
    ("task.noise=student_t task.student_t_df=1", "task.student_t_df must be > 2"),
    ("lr=0", "learning rates (lr) must be positive, got [0.0]"),
    ("lr=-1", "learning rates (lr) must be positive"),
    ("lr=nan", "lr must be a finite number, got nan"),
    ("lr=inf", "lr must be a finite number, got inf"),
    ("lr=1e-50", "learning rate 1e-50 is 0 in float32"),
    ("batch_size=0", "batch sizes (batch_size) must be in 1..task.n_train=256"),
    ("batch_size=-1", "batch sizes (batch_size) must be in"),
    ("batch_size=100000", "batch sizes (batch_size) must be in 1..task.n_train=256"),
    ("seed=-1", "seed must be an integer in [0, 2**40), got -1"),
    ("model.kind=mlp model.hidden=0", "model.hidden must be a positive integer, got 0"),
    ("model.kind=mlp model.depth=0", "model.depth must be a positive integer, got 0"),
    ("model.depth=-1", "model.depth must be a positive integer, got -1"),
    ("optim.momentum=1", "optim.momentum must be in [0, 1), got 1"),
    ("optim.momentum=-0.1", "optim.momentum must be in [0, 1), got -0.1"),
    ("optim.momentum=nan", "optim.momentum must be a finite number, got nan"),
    ("optim.betas=[0.9,1.0]", "optim.betas[1] must be in [0, 1), got 1.0"),
    ("optim.betas=[0.9]", "optim.betas must hold two values"),
    ("optim.betas=[nan,0.9]", "optim.betas[0] must be a finite number, got nan"),
    ("optim.eps=0", "optim.eps must be positive, got 0"),
    ("optim.eps=-1e-8", "optim.eps must be positive"),
    ("optim.weight_decay=-1", "optim.weight_decay must be >= 0, got -1"),
    ("optim.weight_decay=nan", "optim.weight_decay must be a finite number, got nan"),
    ("train.epochs=0", "train.epochs must be a positive integer, got 0"),
    ("train.epochs=-1", "train.epochs must be a positive integer, got -1"),
    ("train.steps=0", "train.steps must be a positive integer, got 0"),
    ("train.evals=0", "train.evals must be a positive integer, got 0"),
    ("grid.lrs=[]", "grid.lrs is empty"),
    ("runner=grid grid.lrs=[]", "grid.lrs is empty"),
    ("runner=grid grid.batch_sizes=[]", "grid.batch_sizes is empty"),
    ("runner=grid grid.seeds=[]", "grid.seeds is empty"),
    ("runner=grid grid.noises=[]", "grid.noises is empty"),
    ("runner=grid grid.lrs=[1e-3,nan]", "grid.lrs[1] must be a finite number, got nan"),
    ("runner=grid grid.lrs=[1e-3,-1e-3]", "learning rates (grid.lrs) must be positive"),
    ("runner=grid grid.batch_sizes=[0,8]", "batch sizes (grid.batch_sizes) must be in"),
    ("runner=grid grid.batch_sizes=[8,100000]", "batch sizes (grid.batch_sizes) must be in"),
    ("runner=grid grid.seeds=[-1]", "grid.seeds[0] must be an integer in [0, 2**40), got -1"),
    ("runner=grid grid.lrs=[1e-3,1e-3]", "grid.lrs lists 0.001 twice"),
    ("runner=grid grid.batch_sizes=[8,8]", "grid.batch_sizes lists 8 twice"),
    ("runner=grid grid.lrs=[1e-7,2e-7]", "share the W&B name B8_LR0.000000"),
    ("rank_probe.probe_size=0", "rank_probe.probe_size must be a positive integer, got 0"),
    ("rank_probe.every=-1", "rank_probe.every must be >= 0, got -1"),
]

MULTIMODAL_BASE = ["data.num_train=16", "data.num_val=8", "data.image_size=16",
                   "model.image_encoder_layers=2", "model.conv_width=8", "model.latent_dim=16",
                   "model.embedding_dim=16", "model.transformer_layers=1", "model.num_heads=2",
                   "train.batch_size=8", "logger=disabled"]  # fmt: skip
MULTIMODAL_BAD = [
    ("seed=-1", "seed must be an integer in [0, 2**40), got -1"),
    ("data.num_train=1", "data.num_train and data.num_val must be at least 2"),
    ("data.num_train=-1", "data.num_train and data.num_val must be at least 2"),
    ("data.num_val=0", "data.num_train and data.num_val must be at least 2"),
    ("data.image_size=0", "data.image_size must be positive, got 0"),
    ("data.image_size=-16", "data.image_size must be positive, got -16"),
    ("data.max_objects=0", "data.max_objects must be positive, got 0"),
    ("data.max_objects=10", "data.max_objects must be at most 9"),
    ("data.channels=2", "data.channels must be 1 (grayscale) or 3 (RGB), got 2"),
    ("data.val_fraction=0", "data.val_fraction must be in (0, 1), got 0"),
    ("data.val_fraction=nan", "data.val_fraction must be a finite number, got nan"),
    ("data.vocab_size=4", "data.vocab_size=4 is too small"),
    ("data.max_caption_len=-1", "data.max_caption_len must be >= 0, got -1"),
    ("data.max_caption_len=2", "data.max_caption_len=2 leaves no room"),
    ("model.image_encoder_layers=0", "model.image_encoder_layers must be positive, got 0"),
    ("model.conv_width=0", "model.conv_width must be positive, got 0"),
    ("model.conv_width=12", "model.conv_width must be a multiple of 8, got 12"),
    ("model.latent_dim=0", "model.latent_dim must be positive, got 0"),
    ("model.embedding_dim=0", "model.embedding_dim must be positive, got 0"),
    ("model.embedding_dim=15", "model.embedding_dim=15 must be divisible by model.num_heads=2"),
    ("model.num_heads=0", "model.num_heads must be positive, got 0"),
    ("model.transformer_layers=0", "model.transformer_layers must be positive, got 0"),
    ("model.caption_encoder_layers=-1", "model.caption_encoder_layers must be >= 0, got -1"),
    ("model.prefix_tokens=0", "model.prefix_tokens must be positive, got 0"),
    ("model.dropout=1", "model.dropout must be in [0, 1), got 1"),
    ("model.dropout=-0.1", "model.dropout must be in [0, 1), got -0.1"),
    ("model.dropout=nan", "model.dropout must be a finite number, got nan"),
    ("loss.image_weight=-1", "loss.image_weight must be >= 0, got -1"),
    ("loss.image_weight=nan", "loss.image_weight must be a finite number, got nan"),
    ("loss.caption_weight=inf", "loss.caption_weight must be a finite number, got inf"),
    ("loss.image_weight=0 loss.caption_weight=0 loss.alignment_weight=0", "are all 0"),
    ("train.epochs=0", "train.epochs must be positive, got 0"),
    ("train.batch_size=0", "train.batch_size must be positive, got 0"),
    ("train.lr=0", "train.lr must be positive, got 0"),
    ("train.lr=nan", "train.lr must be a finite number, got nan"),
    ("train.lr=-inf", "train.lr must be a finite number, got -inf"),
    ("train.min_lr=-1", "train.min_lr must be >= 0, got -1"),
    ("train.min_lr=0.5", "train.min_lr=0.5 is above train.lr=0.002"),
    ("train.weight_decay=-1", "train.weight_decay must be >= 0, got -1"),
    ("train.grad_clip=-1", "train.grad_clip must be >= 0, got -1"),
    ("train.grad_clip=nan", "train.grad_clip must be a finite number, got nan"),
    ("train.warmup_steps=-1", "train.warmup_steps must be >= 0, got -1"),
    ("train.log_frequency=-1", "train.log_frequency must be >= 0, got -1"),
    ("train.image_log_frequency=-1", "train.image_log_frequency must be >= 0, got -1"),
    ("train.checkpoint_frequency=-1", "train.checkpoint_frequency must be >= 0, got -1"),
    ("train.num_samples=-1", "train.num_samples must be >= 0, got -1"),
    ("train.max_steps=-1", "train.max_steps must be >= 0, got -1"),
    ("rank_probe.probe_size=0", "rank_probe.probe_size must be a positive integer, got 0"),
    ("rank_probe.eps=nan", "rank_probe.eps must be a finite number, got nan"),
]

ENTRY_POINTS = {
    "rank_sweep": (rank_sweep.validate, RANK_SWEEP_BASE, RANK_SWEEP_BAD),
    "laplace_scaling": (laplace_scaling.validate, SCALING_BASE, SCALING_BAD),
    "multimodal": (multimodal.validate, MULTIMODAL_BASE, MULTIMODAL_BAD),
}
BAD = [(name, o, m) for name, (_, _, cases) in ENTRY_POINTS.items() for o, m in cases]


@pytest.mark.parametrize("config", list(ENTRY_POINTS))
def test_the_base_configs_are_valid(config):
    validate, base, _ = ENTRY_POINTS[config]
    validate(compose_cfg(config, [], tuple(base)))


@pytest.mark.parametrize(("config", "override", "message"), BAD)
def test_bad_numbers_are_one_line_errors_that_name_the_key(config, override, message):
    validate, base, _ = ENTRY_POINTS[config]
    with pytest.raises(UserError) as info:
        validate(compose_cfg(config, override.split(), tuple(base)))
    assert message in str(info.value) and "\n" not in str(info.value), str(info.value)


@pytest.mark.parametrize(
    ("script", "args", "message"),
    [
        ("rank_sweep.py", [*RANK_SWEEP_BASE, "train.lr=nan"], "train.lr must be a finite"),
        ("laplace_scaling.py", [*SCALING_BASE, "runner=grid", "grid.lrs=[]"], "grid.lrs is empty"),
        ("multimodal.py", [*MULTIMODAL_BASE, "model.num_heads=0"], "model.num_heads must be"),
    ],
)
def test_bad_numbers_end_to_end(tmp_path, script, args, message):
    """As a user sees it: one line, exit 2, nothing written."""
    out = tmp_path / "job"
    code, stderr, _, _ = run_measured(script, [*args, f"hydra.run.dir={out}"], tmp_path)
    lines = stderr.strip().splitlines()
    assert code == 2 and len(lines) == 1 and message in lines[0], stderr[-2000:]
    assert not out.exists()
