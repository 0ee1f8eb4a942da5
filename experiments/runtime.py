"""What every Hydra entry point does around its body: threads, seed, device, logger, errors.

An entry point calls :func:`run_job` with its body ``body(cfg, logger, inputs)`` and an optional
``validate(cfg)`` that checks the input before anything is written and returns what it loaded.

- Bad input (:class:`common.cli.UserError`) in a single run: one ``error:`` line, exit 2,
  and the job folder Hydra made is removed, so nothing half-written stays behind.
- Under a multirun a failing job is recorded as ``failed`` with its reason and the sweep goes
  on (Hydra 1.3's basic launcher would otherwise stop at the first failure).
- Ctrl-C / SIGTERM: the run record says ``interrupted``; exit 130.
- A folder another process writes, or that holds another run: one ``error:`` line, exit 2.
- A file-system error (disk full, a folder that cannot be written): the run record says
  ``failed`` with the path; one ``error:`` line, exit 1.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import math
import os
import random
import shutil
import signal
import sys
from collections.abc import Callable
from enum import Enum
from pathlib import Path
from typing import Any, NoReturn

import numpy as np
import pandas as pd
import torch
import yaml
from hydra._internal.utils import get_args_parser
from hydra.core.hydra_config import HydraConfig
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.errors import OverrideParseException
from hydra.types import RunMode
from omegaconf import DictConfig, ListConfig, OmegaConf

from common import runstore
from common.cli import UserError, describe_os_error, one_line_warnings
from experiments.logger import SECRET_KEY, ExperimentLogger, describe_error

log = logging.getLogger(__name__)


class TrainingFailed(UserError):
    """The job ran but training could not go on (e.g. the loss diverged)."""


def seed_everything(seed: int) -> None:
    """Seed python, numpy and torch (CPU and CUDA). 0 is a valid seed."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UserError(f"runtime.device={name} but no CUDA device is available")
    return device


def lr_factor(
    step: int, total: int, warmup: int = 0, schedule: str = "cosine", floor: float = 0.0
) -> float:
    """LR multiplier: linear warmup, then cosine annealing to ``floor`` (or constant)."""
    if warmup and step < warmup:
        return (step + 1) / warmup
    if schedule == "constant":
        return 1.0
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress))


def job_dir() -> Path:
    return Path(HydraConfig.get().runtime.output_dir)


def is_multirun() -> bool:
    return HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN


def available_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def parallel_jobs() -> int:
    """How many jobs the launcher runs at once on this machine (1 for the basic launcher)."""
    if not HydraConfig.initialized():
        return 1
    launcher = HydraConfig.get().launcher
    n_jobs = launcher.get("n_jobs")  # joblib
    if n_jobs is not None:
        return available_cores() if n_jobs < 0 else max(1, int(n_jobs))
    if "cpus_per_task" in launcher:  # submitit's launchers, ours over them included
        # each job owns cpus_per_task cores
        return max(1, available_cores() // max(1, int(launcher.cpus_per_task or 1)))
    return 1


def configure_threads(num_threads: int | None) -> int:
    """Set torch's threads: explicit, or cores / parallel jobs so jobs do not oversubscribe."""
    if num_threads is None:
        jobs = parallel_jobs()
        if jobs == 1:
            return torch.get_num_threads()
        num_threads = max(1, available_cores() // jobs)
    torch.set_num_threads(int(num_threads))
    return int(num_threads)


def start_logger(
    cfg: DictConfig, run_dir: Path | None = None, run_id: str | None = None
) -> ExperimentLogger:
    """The shared logger for this job, built from ``cfg.logger``.

    ``run_id`` (or ``cfg.resume`` with a run record already in ``run_dir``) continues that run:
    the same W&B run id, the local metrics appended to.
    """
    lc = cfg.logger
    run_dir = run_dir or job_dir()
    record = run_dir / "run.json"
    if run_id is None and cfg.get("resume") and record.is_file():
        run_id = json.loads(record.read_text()).get("run_id")
    group = lc.group
    if group is None and is_multirun():
        group = Path(HydraConfig.get().sweep.dir).name
    try:
        return _new_logger(cfg, run_dir, run_id, group)
    except runstore.RunFolderInUse as exc:
        raise UserError(str(exc)) from None


def _new_logger(cfg: DictConfig, run_dir: Path, run_id: str | None, group: str | None):
    lc = cfg.logger
    return ExperimentLogger(
        run_dir,
        # plain strings for the Enums' choices: config.yaml, run.json and W&B's config
        OmegaConf.to_container(cfg, resolve=True, enum_to_str=True),
        mode=str(lc.mode),
        project=lc.project,
        entity=lc.entity,
        group=group,
        tags=list(lc.tags),
        name=lc.name,
        job_type=lc.job_type,
        notes=lc.notes,
        init_timeout=lc.init_timeout,
        run_id=run_id,
    )


def remove_job_folder(path: Path) -> None:
    """Remove a job folder that holds only Hydra's own files (nothing of ours was written) and
    that no other process is writing."""
    hydras = (".hydra", runstore.LOCK_FILE)
    if any(p.name not in hydras and p.suffix != ".log" for p in path.iterdir()):
        return
    held = runstore.held_lock(path)
    if held is None and runstore.lock_is_held(path):
        return  # another process's folder
    if held is not None:
        held.release()
    shutil.rmtree(path, ignore_errors=True)
    # and the parents Hydra made for it (outputs/<experiment>/), while empty and below cwd
    cwd, parent = Path.cwd().resolve(), path.resolve().parent
    while parent != cwd and cwd in parent.parents and not any(parent.iterdir()):
        parent.rmdir()
        parent = parent.parent


def run_job(
    cfg: DictConfig,
    body: Callable[[DictConfig, ExperimentLogger, Any], None],
    validate: Callable[[DictConfig], Any] | None = None,
) -> None:
    """Run ``body(cfg, logger, inputs)``; ``inputs`` is what ``validate(cfg)`` returned (the
    weight, the data set, ... it had to load to check them), so nothing is loaded twice."""
    # A full disk under Hydra's job log must not print a traceback per log line: the run
    # record and one error line say what failed.
    logging.raiseExceptions = False
    one_line_warnings()
    started = _start_job(cfg, validate)
    if started is None:
        return  # a job of a sweep that could not start: recorded as failed
    logger, inputs, threads = started
    out = job_dir()
    try:
        with logger:
            logger.log_summary(torch_threads=threads)
            body(cfg, logger, inputs)
    except KeyboardInterrupt:
        print(f"interrupted: the run record in {out} says so", file=sys.stderr)
        _exit_interrupted()
    except (UserError, OSError) as exc:
        message = describe_os_error(exc) if isinstance(exc, OSError) else str(exc)
        log.error("job failed: %s", message)
        if not is_multirun():
            print(f"error: {message} (run record: {out})", file=sys.stderr)
            sys.exit(1)
    except Exception as exc:
        if not is_multirun():
            raise
        log.exception("job failed: %s", describe_error(exc))


def _start_job(cfg: DictConfig, validate) -> tuple[ExperimentLogger, Any, int] | None:
    """Validate, set threads and seed, start the logger. Bad input alone is one line and exit 2
    with nothing left; in a sweep the job is recorded as failed and None returned."""
    multirun, out = is_multirun(), job_dir()
    try:
        with sigterm_interrupts():
            # validation first: it checks the thread count and the seed used next
            inputs = validate(cfg) if validate is not None else None
        threads = configure_threads(cfg.runtime.num_threads)
        seed_everything(cfg.seed)
        return start_logger(cfg, out), inputs, threads
    except KeyboardInterrupt:
        print("interrupted before the run started: nothing was kept", file=sys.stderr)
        remove_job_folder(out)
        _exit_interrupted()
    except Exception as exc:
        bad_input = isinstance(exc, (UserError, OSError))
        if not bad_input and not multirun:
            raise  # a bug: its traceback
        message = describe_os_error(exc) if isinstance(exc, OSError) else str(exc)
        if not multirun:
            print(f"error: {message}", file=sys.stderr)
            remove_job_folder(out)
            sys.exit(2)
        if bad_input:
            log.error("job failed: %s", message)
        else:  # a bug in one job of a sweep: its traceback in the job's log
            message = describe_error(exc)
            log.exception("job failed: %s", describe_error(exc))
        # Record the failure (locally and in the sweep's W&B group, like any failed job) so
        # the sweep's report lists it, then let the sweep go on.
        with contextlib.suppress(UserError, OSError):  # a folder that is not ours stays so
            start_logger(cfg, out).finish("failed", reason=message)
        return None


@contextlib.contextmanager
def sigterm_interrupts():
    """SIGTERM unwinds like Ctrl-C here (Python's default dies on the spot, leaving the job
    folder Hydra made behind). The logger takes over the signals once the run starts."""

    def interrupt(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt(f"signal {signum}")

    try:
        previous = signal.signal(signal.SIGTERM, interrupt)
    except ValueError:  # not the main thread: the host handles signals
        yield
        return
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def _exit_interrupted() -> NoReturn:
    # a late repeat of the signal (slurmstepd sends two) must not turn exit 130 into a death
    # by signal once the interpreter's shutdown has reset the handlers
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, signal.SIG_IGN)
    sys.exit(130)


CONF_DIR = Path(__file__).resolve().parents[1] / "conf"
CONFIG_GROUPS = ("experiment", "logger")


def check_preset(config, choice: str, where: str) -> None:
    """A preset written for another entry point: its first key this schema lacks is an error
    (a sweep preset's keys are the names under hydra.sweeper.params)."""
    preset = yaml.safe_load((CONF_DIR / "experiment" / f"{choice}.yaml").read_text()) or {}
    for name in pd.json_normalize(preset).columns:
        name = name.removeprefix("hydra.sweeper.params.")
        if name.startswith(("hydra", "defaults")):
            continue
        if OmegaConf.select(config, name, default="<missing>") == "<missing>":
            raise UserError(f"experiment '{choice}' is for another entry point: its key "
                            f"'{name}' is not in {where}")  # fmt: skip


def check_override_keys(schema: type, argv: list[str], where: str) -> None:
    """An override Hydra cannot parse, a mistyped key (also with ``+``), an unknown preset, a
    value of the wrong type or outside its choices, or a sweep without ``-m``: one ``error:``
    line and exit 2, before Hydra starts (Hydra's own messages span several lines). The command
    line is read by Hydra's own argument parser; Hydra's own keys and flags are left to it."""
    parser = get_args_parser()
    parser.exit_on_error = False
    try:
        args, _ = parser.parse_known_args(argv)
    except argparse.ArgumentError:
        return  # a bad flag: Hydra's parser says so itself when it runs
    multirun = args.multirun or "hydra.mode=MULTIRUN" in args.overrides
    config = OmegaConf.structured(schema)
    try:
        for arg in args.overrides:
            _check_override(config, arg, where, sweep_ok=multirun)
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(2)


def _check_override(config, arg: str, where: str, sweep_ok: bool = True) -> None:
    """One override: a UserError if Hydra cannot parse it, or it names a secret, an unknown
    preset or key, or a value of the wrong type or outside its choices."""
    if arg.startswith("-") or "=" not in arg:
        return
    try:
        (override,) = OverridesParser.create().parse_overrides([arg])
    except OverrideParseException as exc:
        detail = str(exc).splitlines()[0]
        detail = "" if detail.startswith("LexerNoViableAlt") else f": {detail}"
        raise UserError(f"cannot parse '{arg}'{detail} (quote a value with special "
                        "characters, e.g. key='~/a=b.pth')") from None  # fmt: skip
    key = override.key_or_group
    if key.startswith("hydra"):
        return
    if SECRET_KEY.search(key.rsplit(".", 1)[-1]):
        # Hydra would write it into .hydra/ before any code of ours could mask it
        raise UserError(f"'{key}' looks like a secret: keep API keys out of the config "
                        "(`wandb login`, or the WANDB_API_KEY environment variable)")  # fmt: skip
    if override.is_delete():
        return  # deletions: Hydra checks them against the schema
    if key in CONFIG_GROUPS:
        value = arg.split("=", 1)[1]
        options = sorted(p.stem for p in (CONF_DIR / key).glob("*.yaml"))
        for choice in value.split(","):
            if choice not in (*options, "null"):
                raise UserError(f"unknown {key} '{choice}' (one of: {', '.join(options)})")
            if key == "experiment" and choice != "null":
                check_preset(config, choice, where)
        return
    if "/" in key:
        return  # other config groups (hydra/launcher=...)
    if OmegaConf.select(config, key, default="<missing>") == "<missing>":
        raise UserError(f"unknown config key '{key}' (see {where})")
    if override.is_sweep_override():
        if not sweep_ok:
            raise UserError(f"'{arg}' sweeps over several values: add -m (--multirun)")
        try:
            values = list(override.sweep_iterator())
        except Exception:  # a sweep only a sweeper plugin expands (interval, ...): left to it
            return
    else:
        values = [override.value()]
    for value in values:  # each value of a sweep: a bad one would otherwise fail its job late
        _check_value(config, arg, key, value)


def _check_value(config, arg: str, key: str, value: Any) -> None:
    """A value of the wrong type, or a choice outside the key's Enum: a UserError."""
    if isinstance(value, str) and "${" in value:
        return  # an interpolation: resolved later
    try:
        OmegaConf.update(config.copy(), key, value, merge=True)
    except Exception as exc:  # OmegaConf's ValidationError and friends: one line
        choices = _enum_of(config, key)
        if choices is not None:
            allowed = ", ".join(c.value for c in choices)
            raise UserError(f"{key} must be one of {allowed}, got {value!r}") from None
        raise UserError(f"{arg}: {str(exc).splitlines()[0]}") from None


def _enum_of(config, key: str) -> type[Enum] | None:
    """The Enum ``key`` (a field, or a list's elements) must hold in the schema, if any."""
    node = config
    for part in key.split("."):
        node = node._get_node(part) if isinstance(node, DictConfig) else None
        if node is None:
            return None
    kind = node._metadata.element_type if isinstance(node, ListConfig) else node._metadata.ref_type
    return kind if isinstance(kind, type) and issubclass(kind, Enum) else None
