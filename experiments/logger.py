"""The shared experiment logger: W&B (offline by default) plus a plain local run record.

Every experiment logs through :class:`ExperimentLogger` and only through it. Whatever the W&B
mode, the run folder gets ``config.yaml``, ``metrics.jsonl``, ``summary.json`` and ``run.json``
(see :mod:`common.runstore`), so nothing depends on W&B's internal offline format. A W&B
failure never stops training: one warning, then the run goes on local-only.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import os
import re
import secrets
import signal
import socket
import string
import subprocess
import sys
import time
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, ClassVar

import yaml

from common import runstore
from experiments.schemas import LoggerMode

WANDB_MODES = tuple(m.value for m in LoggerMode)
# Config keys whose values must never reach a log, a file or W&B: whole words of the key
# (api_key, wandb_api_key, hf_token, client_secret, aws_secret_access_key, private_key,
# credentials), not model.prefix_tokens
SECRET_KEY = re.compile(
    r"(^|_)(api_?key|token|secret|access_key|password|passwd|private_key|credentials?)$"
    r"|(^|_)secret_",
    re.IGNORECASE,
)
# a password inside a value: scheme://user:password@host
URL_PASSWORD = re.compile(r"(?P<head>[A-Za-z][A-Za-z0-9+.-]*://[^/:@\s]*:)[^@\s/]+@")


_USER_WANDB_DATA_DIR = os.environ.get("WANDB_DATA_DIR")


class RunClosed(RuntimeError):
    """A log call after ``finish()``."""


class Interrupted(KeyboardInterrupt):
    """Raised in the main thread on SIGTERM or SIGINT, so a terminated job unwinds like Ctrl-C."""


# A repeat of the signal within this many seconds is the same request (slurmstepd sends SIGTERM
# twice ~10 ms apart; a user presses Ctrl-C twice): it must not cut the run record short.
SIGNAL_REPEAT_S = 2.0


def redact(config: Any) -> Any:
    """The config with secret-named keys masked and passwords in URL values cut out."""
    if isinstance(config, Mapping):
        return {k: "***" if SECRET_KEY.search(str(k)) else redact(v) for k, v in config.items()}
    if isinstance(config, (list, tuple)):
        return [redact(v) for v in config]
    if isinstance(config, str):
        return redact_text(config)
    return config


def redact_text(text: str) -> str:
    """``key=value`` with a secret-named key masked, and a URL's password cut out."""
    key, sep, _ = text.partition("=")
    if sep and SECRET_KEY.search(key.lstrip("+~").rsplit(".", 1)[-1]):
        return f"{key}=***"
    return URL_PASSWORD.sub(r"\g<head>***@", text)


@contextlib.contextmanager
def _redacted_argv():
    """W&B records the command line in the run's metadata: let it see a masked copy."""
    argv = sys.argv
    sys.argv = [argv[0], *(redact_text(a) for a in argv[1:])]
    try:
        yield
    finally:
        sys.argv = argv


def new_run_id(length: int = 8) -> str:
    alphabet = string.ascii_lowercase + string.digits
    return "".join(secrets.choice(alphabet) for _ in range(length))


def git_commit(path: Path | None = None) -> str | None:
    """The code's commit (with ``-dirty`` when the tree has changes), or None when unknown."""
    cwd = Path(path or Path(__file__).resolve().parent)
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=cwd, capture_output=True, text=True, timeout=5
        )
        if commit.returncode != 0:
            return None
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            cwd=cwd,
            capture_output=True,
            text=True,
            timeout=5,
        )
        return commit.stdout.strip() + ("-dirty" if dirty.stdout.strip() else "")
    except (OSError, subprocess.SubprocessError):
        return None


def slurm_ids() -> dict[str, str] | None:
    """The SLURM job this process runs in (job id, array job and task ids, node), if any."""
    names = {"job_id": "SLURM_JOB_ID", "array_job_id": "SLURM_ARRAY_JOB_ID",
             "array_task_id": "SLURM_ARRAY_TASK_ID", "job_name": "SLURM_JOB_NAME",
             "node": "SLURMD_NODENAME", "restart_count": "SLURM_RESTART_COUNT"}  # fmt: skip
    ids = {key: os.environ[var] for key, var in names.items() if os.environ.get(var)}
    return ids or None


def _now() -> str:
    return dt.datetime.now(dt.UTC).astimezone().isoformat(timespec="seconds")


def _safe_name(key: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", key).strip("_") or "item"


class ExperimentLogger:
    """Logs scalars, summaries, images and tables to W&B and to the local run folder.

    Use it as a context manager: leaving the block normally marks the run ``finished``, an
    exception marks it ``failed`` (with the reason), Ctrl-C or SIGTERM marks it ``interrupted``.
    """

    # The run this process has open, for a host that stops it on a signal of its own (the
    # SLURM launcher on the time-limit warning, hydra_plugins/ks_slurm_launcher).
    active: ClassVar[ExperimentLogger | None] = None
    closed_in_process: ClassVar[bool] = False  # a run of this process has ended

    def __init__(
        self,
        run_dir: str | Path,
        config: Mapping[str, Any] | None = None,
        *,
        mode: str = "offline",
        project: str = "ks-experiments",
        entity: str | None = None,
        group: str | None = None,
        tags: Sequence[str] = (),
        name: str | None = None,
        job_type: str | None = None,
        notes: str | None = None,
        run_id: str | None = None,
        init_timeout: float = 60.0,
    ):
        if mode not in WANDB_MODES:
            raise ValueError(f"logger mode must be one of {WANDB_MODES}, got {mode!r}")
        self.run_dir = Path(run_dir)
        resuming = run_id is not None
        # first, before anything is written: one writer per folder, never two runs mixed
        self._lock = runstore.claim_run_folder(self.run_dir, resuming)
        identity = {"project": project, "entity": entity, "group": group, "tags": list(tags),
                    "job_type": job_type, "notes": notes}  # fmt: skip
        try:
            self._open(config, mode, name, run_id, init_timeout, identity)
        except BaseException:
            self._lock.release()  # a folder this process could not start in is nobody's
            raise

    def _open(self, config, mode: str, name, run_id, init_timeout: float, identity) -> None:
        resuming = run_id is not None
        self.config = redact(dict(config or {}))
        if slurm_ids():  # which cluster job wrote the run, findable from W&B too
            self.config["slurm"] = slurm_ids()
        self.mode = mode
        self.run_id = run_id or new_run_id()
        self.name = name or self.run_dir.name
        self.summary: dict[str, Any] = {}
        self.step = -1  # last step logged
        self._warned: set[str] = set()
        self._finished = False
        self._wandb = None  # the wandb module while W&B is live
        self._run = None
        self._wandb_from_step = 0  # steps below it are W&B's already (see rewind)

        summary_path = self.run_dir / runstore.SUMMARY_FILE
        if resuming and summary_path.exists():
            self.summary = runstore.read_json(summary_path)
        if resuming:
            steps = [r["_step"] for r in runstore.iter_metrics(self.run_dir) if "_step" in r]
            self.step = max(steps, default=-1)

        earlier = self._earlier_record() if resuming else {}
        self._write_config()
        self._record: dict[str, Any] = {
            "run_id": self.run_id,
            "name": self.name,
            **{k: v for k, v in identity.items() if k != "notes"},
            "mode": mode,
            "wandb_path": None,
            "wandb_dir": None,
            "state": "running",
            "reason": None,
            "started_at": earlier.get("started_at") or _now(),
            "ended_at": None,
            "git_commit": git_commit(),
            "pid": os.getpid(),
            "host": socket.gethostname(),
            "slurm": slurm_ids(),
            "defined_metrics": {},
        }
        if resuming:  # the first launch's start stays; each launch that went on is listed
            self._record["resumed_at"] = [*earlier.get("resumed_at", []), _now()]
        if mode != "disabled":
            self._start_wandb(resuming=resuming, init_timeout=init_timeout, **identity)
        self._write_record()
        self._metrics = runstore.JsonlWriter(self.run_dir / runstore.METRICS_FILE)
        self._signalled_at: float | None = None
        self._stop_reason: str | None = None
        self._previous_handlers: dict[int, Any] = {}
        self._install_signal_handlers()
        ExperimentLogger.active = self

    def _earlier_record(self) -> dict[str, Any]:
        try:
            return runstore.read_json(self.run_dir / runstore.RUN_FILE)
        except (OSError, ValueError):
            return {}

    # -- W&B plumbing -------------------------------------------------------------------------

    def _start_wandb(self, *, resuming: bool, init_timeout: float, **kwargs: Any) -> None:
        # The environment variable, not only the argument, keeps offline runs off the network.
        os.environ["WANDB_MODE"] = self.mode
        # W&B stages a logged table's file under its data folder before the run refers to it:
        # inside the run folder, a copied run folder syncs with its tables (the user's own
        # WANDB_DATA_DIR wins)
        os.environ["WANDB_DATA_DIR"] = _USER_WANDB_DATA_DIR or str(self.run_dir / "wandb" / "data")
        try:
            import wandb

            with _redacted_argv():
                self._run = wandb.init(
                    dir=str(self.run_dir),
                    id=self.run_id,
                    name=self.name,
                    config=self.config,
                    mode=self.mode,
                    resume="allow" if resuming else None,
                    reinit="finish_previous",
                    settings=wandb.Settings(console="off", quiet=True, init_timeout=init_timeout),
                    **kwargs,
                )
            self._wandb = wandb
            entity = getattr(self._run, "entity", None) or kwargs.get("entity")
            project = getattr(self._run, "project", None) or kwargs.get("project")
            self._record["wandb_path"] = "/".join(
                str(p) for p in (entity, project, self.run_id) if p
            )
            self._record["wandb_dir"] = getattr(self._run, "dir", None)
        except Exception as exc:  # any W&B failure degrades to local-only
            self._wandb_failed("init", exc)

    def _wandb_failed(self, what: str, exc: BaseException) -> None:
        first_line = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        warnings.warn(
            f"W&B {what} failed ({first_line}); continuing with the local run record only "
            f"in {self.run_dir}",
            RuntimeWarning,
            stacklevel=3,
        )
        self._record["mode"] = f"{self.mode} (failed: local only)"
        run, self._run, self._wandb = self._run, None, None
        if run is not None:
            # already degraded: a second failure has nothing more to report
            with contextlib.suppress(Exception):
                run.finish(exit_code=1)  # W&B's copy is cut short: say so, do not leave it open

    def _to_wandb(self, what: str, fn) -> None:
        if self._run is None:
            return
        try:
            fn(self._run)
        except Exception as exc:
            self._wandb_failed(what, exc)

    def _log_to_wandb(self, step: int, values) -> None:
        """``values()`` to W&B at ``step``, unless W&B holds that step already (see rewind)."""
        if step >= self._wandb_from_step:
            self._to_wandb("log", lambda run: run.log(values(), step=step))

    # -- local record --------------------------------------------------------------------------

    def _write_config(self) -> None:
        runstore.write_text_atomic(
            self.run_dir / runstore.CONFIG_FILE,
            yaml.safe_dump(runstore.to_jsonable(self.config), sort_keys=False),
        )

    def _write_record(self) -> None:
        path = self.run_dir / runstore.RUN_FILE
        try:
            runstore.write_json_atomic(path, self._record)
        except OSError:
            if self._record["state"] == "running" or not path.is_file():
                raise
            # disk full: the final state still fits over the old record's own blocks
            runstore.overwrite_json_in_place(path, self._record)

    def _write_summary(self) -> None:
        runstore.write_json_atomic(self.run_dir / runstore.SUMMARY_FILE, self.summary)

    def _next_step(self, step: int | None) -> int:
        if self._finished:
            # as W&B does after finish(): nothing more reaches either record
            raise RunClosed(f"the run in {self.run_dir} is closed: nothing more can be logged")
        if step is None:
            return self.step + 1
        step = int(step)
        if step < self.step and "step" not in self._warned:
            self._warned.add("step")
            warnings.warn(
                f"logging step {step} after step {self.step}: W&B drops steps that go back; "
                "the local record keeps them",
                RuntimeWarning,
                stacklevel=3,
            )
        return step

    # -- public API ----------------------------------------------------------------------------

    @property
    def record(self) -> dict[str, Any]:
        """A copy of what ``run.json`` holds."""
        return dict(self._record)

    def attach_rank_probe(self, probe) -> None:
        """Record the settings of ``probe`` (an :class:`experiments.rank_probe.RankProbe`) in
        run.json. The training loop runs it and logs its metrics (rank_probe.ProbeSchedule)."""
        layers = list(probe.layers)  # forward order: readers order the ranks by it
        self._record["rank_probe"] = {
            "every": probe.every,
            "mode": probe.mode,
            "prepend_input_rank": probe.prepend_input_rank,
            "input_rank": probe.input_rank,
            "layers": layers,
        }
        self._write_record()
        # a W&B run has no run.json: the order goes into its config, for readers of W&B runs
        self._to_wandb(
            "config",
            lambda run: run.config.update({"rank_probe_layers": layers}, allow_val_change=True),
        )

    def log(self, metrics: Mapping[str, Any], step: int | None = None) -> int:
        """Log scalars at ``step`` (default: the next step). Returns the step used."""
        if self._stop_reason is not None and not self._finishing:
            raise Interrupted(self._stop_reason)  # a stop request a library call swallowed
        step = self._next_step(step)
        self.step = max(self.step, step)
        values = dict(metrics)
        self._metrics.write({"_step": step, **values})
        self._log_to_wandb(step, lambda: values)
        return step

    def scoped(self, prefix: str) -> ScopedLogger:
        """A view that logs every key as ``{prefix}/{key}`` (per-cell namespaces in a sweep)."""
        return ScopedLogger(self, prefix)

    def update_config(self, values: Mapping[str, Any]) -> None:
        """Add config values known only once the job has started (sample counts, parameter
        count), to config.yaml and to the W&B run's config."""
        values = redact(dict(values))
        self.config.update(values)
        self._write_config()
        self._to_wandb("config", lambda run: run.config.update(values, allow_val_change=True))

    def log_summary(self, values: Mapping[str, Any] | None = None, **kwargs: Any) -> None:
        """Set summary values (last write wins), locally and in W&B."""
        values = {**(values or {}), **kwargs}
        self.summary.update(runstore.to_jsonable(values))
        self._write_summary()
        self._to_wandb("summary", lambda run: run.summary.update(dict(values)))

    def define_metric(
        self, name: str, step_metric: str | None = None, summary: str | None = None
    ) -> None:
        """Declare a metric's x axis (``step_metric``) and summary (min, max, mean, last)."""
        self._record["defined_metrics"][name] = {"step_metric": step_metric, "summary": summary}
        self._write_record()
        # W&B reads a dot in a defined name as nesting ("B32_LR0.001000/step" would be the key
        # path ["B32_LR0", "001000/step"]); a literal dot is escaped
        kwargs = {"step_metric": _escape_dots(step_metric)} if step_metric else {}
        kwargs.update({"summary": summary} if summary else {})
        self._to_wandb("define_metric", lambda run: run.define_metric(_escape_dots(name), **kwargs))

    def log_image(
        self, key: str, image: Any, step: int | None = None, caption: str | None = None
    ) -> Path:
        """Save an image as PNG in ``media/`` and log it to W&B.

        ``image``: a matplotlib Figure, a PIL image, or an array/tensor (H, W), (H, W, C) or
        (C, H, W), floats in [0, 1] or uint8.
        """
        step = self._next_step(step)
        self.step = max(self.step, step)
        path = self.run_dir / runstore.MEDIA_DIR / f"{_safe_name(key)}_{step:07d}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        _save_png(image, path)
        self._metrics.write(
            {"_step": step, key: {"_type": "image", "path": str(path.relative_to(self.run_dir))}}
        )
        self._log_to_wandb(step, lambda: {key: self._wandb.Image(str(path), caption=caption)})
        return path

    def log_table(
        self,
        key: str,
        columns: Sequence[str],
        rows: Sequence[Sequence[Any]],
        step: int | None = None,
    ) -> Path:
        """Save a text table as JSON in ``tables/`` and log it to W&B as a Table."""
        step = self._next_step(step)
        self.step = max(self.step, step)
        columns, rows = list(columns), [list(r) for r in rows]
        path = self.run_dir / runstore.TABLES_DIR / f"{_safe_name(key)}_{step:07d}.json"
        runstore.write_json_atomic(path, {"columns": columns, "data": rows})
        self._metrics.write(
            {"_step": step, key: {"_type": "table", "path": str(path.relative_to(self.run_dir))}}
        )
        self._log_to_wandb(step, lambda: {key: self._wandb.Table(columns=columns, data=rows)})
        return path

    def rewind(self, step: int) -> int:
        """Cut the local record back to ``step``, where a resumed run's checkpoint was taken:
        what was logged after it (metrics, their images and tables) goes, so the steps the
        resumed run logs again are recorded once. Returns how many records were dropped."""
        self._metrics.close()
        dropped = runstore.truncate_metrics(self.run_dir, step)
        for record in dropped:
            for value in record.values():
                if isinstance(value, dict) and "path" in value:
                    (self.run_dir / value["path"]).unlink(missing_ok=True)
        self._metrics = runstore.JsonlWriter(self.run_dir / runstore.METRICS_FILE)
        # W&B already holds the steps up to the old last one (the first launch sent them): it
        # gets each step once, from the step after it
        self._wandb_from_step = max(self._wandb_from_step, self.step + 1)
        self.step = step
        return len(dropped)

    def finish(self, state: str = "finished", reason: str | None = None) -> None:
        """Record the final state first, then flush everything and end the W&B run. Safe to
        call twice. A failure after the record is written (disk full, W&B) is a warning."""
        if self._finished:
            return
        if state not in runstore.RUN_STATES:
            raise ValueError(f"state must be one of {runstore.RUN_STATES}, got {state!r}")
        self._finished = True
        if ExperimentLogger.active is self:
            ExperimentLogger.active = None
        ExperimentLogger.closed_in_process = True
        self._record.update(state=state, reason=reason, ended_at=_now())
        try:
            self._write_record()
            for what, step in (("metrics", self._metrics.close), ("summary", self._write_summary)):
                try:
                    step()
                except OSError as exc:
                    warnings.warn(f"could not write the run's {what}: {describe_error(exc)}",
                                  RuntimeWarning, stacklevel=2)  # fmt: skip
            # W&B's own codes: 255 for an interrupt (as its Ctrl-C hook), 1 for a failure
            exit_code = {"finished": 0, "interrupted": 255}.get(state, 1)
            self._to_wandb("finish", lambda run: run.finish(exit_code=exit_code))
            self._run = self._wandb = None
        finally:
            self._finishing = False
            self._lock.release()
            if self._signalled_at is None:  # else keep ignoring the signal's late repeats
                self._restore_signal_handlers()

    def __enter__(self) -> ExperimentLogger:
        return self

    def __exit__(self, exc_type, exc, tb) -> bool:
        self._finishing = True  # a late repeat of the signal is ignored from here on
        if exc_type is None:
            self.finish("finished")
        elif issubclass(exc_type, KeyboardInterrupt):
            self.finish("interrupted", reason=self._stop_reason or "interrupted by signal")
        else:
            self.finish("failed", reason=describe_error(exc))
        return False

    # -- signals -------------------------------------------------------------------------------

    def _on_signal(self, signum: int, frame: Any) -> None:
        now = time.monotonic()
        repeat = self._signalled_at is not None and now - self._signalled_at < SIGNAL_REPEAT_S
        if repeat or self._finishing:
            return  # the same request again, or the record is being closed: let it close
        if self._finished:  # a new request once the record is closed: what the host would do
            self._restore_signal_handlers()
            os.kill(os.getpid(), signum)
            return
        self._signalled_at = now
        self.request_stop(f"interrupted by {signal.Signals(signum).name}")

    def request_stop(self, reason: str) -> None:
        """Stop the run now, from a signal handler: raises ``Interrupted`` in the main thread and
        the record says ``interrupted`` with ``reason``. A request some library call swallows on
        its way up (wandb.init catches broadly) is raised again by the next ``log``."""
        if self._finished or self._finishing:
            return
        self._stop_reason = reason
        raise Interrupted(reason)

    def _install_signal_handlers(self) -> None:
        self._finishing = False
        for signum in (signal.SIGTERM, signal.SIGINT):
            try:
                self._previous_handlers[signum] = signal.signal(signum, self._on_signal)
            except ValueError:  # not the main thread: leave signals to the host
                return

    def _restore_signal_handlers(self) -> None:
        for signum, handler in self._previous_handlers.items():
            with contextlib.suppress(ValueError, TypeError):
                signal.signal(signum, handler)
        self._previous_handlers = {}


class ScopedLogger:
    """Prefixes keys with ``{prefix}/``; everything else goes to the parent logger."""

    def __init__(self, parent: ExperimentLogger, prefix: str):
        self.parent = parent
        self.prefix = prefix.rstrip("/")

    def key(self, name: str) -> str:
        return f"{self.prefix}/{name}"

    def log(self, metrics: Mapping[str, Any], step: int | None = None) -> int:
        return self.parent.log({self.key(k): v for k, v in metrics.items()}, step=step)

    def log_summary(self, values: Mapping[str, Any] | None = None, **kwargs: Any) -> None:
        values = {**(values or {}), **kwargs}
        self.parent.log_summary({self.key(k): v for k, v in values.items()})


def _escape_dots(name: str) -> str:
    return name.replace(".", "\\.")


def describe_error(exc: BaseException | None) -> str:
    if exc is None:
        return "unknown error"
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0]}" if text else type(exc).__name__


def _save_png(image: Any, path: Path) -> None:
    import numpy as np
    from PIL import Image

    if hasattr(image, "savefig"):  # a matplotlib Figure
        image.savefig(path, dpi=100, bbox_inches="tight")
        return
    if isinstance(image, Image.Image):
        image.save(path)
        return
    if hasattr(image, "detach"):
        image = image.detach().float().cpu().numpy()
    array = np.asarray(image)
    if array.ndim == 3 and array.shape[0] in (1, 3, 4) and array.shape[-1] not in (1, 3, 4):
        array = np.moveaxis(array, 0, -1)  # (C, H, W) -> (H, W, C)
    if array.ndim == 3 and array.shape[-1] == 1:
        array = array[..., 0]
    if array.dtype != np.uint8:
        array = (np.clip(np.nan_to_num(array.astype(np.float64)), 0.0, 1.0) * 255).round()
        array = array.astype(np.uint8)
    Image.fromarray(array).save(path)
