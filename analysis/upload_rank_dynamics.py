"""Write the 12 rank-decay dynamics metrics into runs that logged per-layer ranks.

    python analysis/upload_rank_dynamics.py --runs-dir multirun/rank_sweep --dry-run
    python analysis/upload_rank_dynamics.py --runs-dir multirun/rank_sweep --yes
    python analysis/upload_rank_dynamics.py --entity ENTITY --project PROJECT --dry-run
    python analysis/upload_rank_dynamics.py --entity ENTITY --project PROJECT --max-runs 3

For each run: read its per-layer ranks (both key styles, see ``analysis/rank_history.py``), put
the layers in forward order (``--layer-order``, else the order the run recorded, else for an
older run of the suite's probe the order it logged them in, else indexed names; a run whose
order cannot be known is skipped with its layer names), compute
per rank measure T ``T_rank_drop_gini``, ``T_rank_decay_centroid``, ``T_normalized_aurc`` at every
step that holds all layers, and write the steps not written before:

- local run store (``--runs-dir``): ``rank_dynamics.csv`` (one row per step, scope and rank
  type; replaced whole, a torn row in it is dropped with a warning and its step recomputed)
  and the marker ``rank_dynamics.json`` in the run folder. The training process never writes
  these two files, so a run still running (its ``run.lock`` held) is written the same way; one
  whose process died (run.json still "running", the lock free) has ended: state ``killed``
  (``runstore.run_state``) in the plan, in ``--filters`` and in the marker.
- W&B: a finished, crashed or failed run gets them in place (resumed, on its own
  ``rank_dynamics/step`` axis tied to the original step, summary marker ``rank_dynamics``); a
  run still running gets them in a companion run (job_type rank_dynamics, same group, id
  ``<run id>-rank-dynamics``), so that no two processes ever write one run.

What was written before is read back (the CSV rows; the runs' ``rank_dynamics/step`` rows), so a
second pass adds nothing and a pass interrupted half-way, run again, ends with every step
present exactly once. Steps whose dynamics the live rank probe already logged count as written.

W&B is read through wandb's public API, every request retried on 429, 5xx and timeouts (see
"How the W&B reads retry" below); a run whose reads still fail is one error line, and the batch
goes on. The writes go to the same server, online: with W&B in offline or disabled mode
(WANDB_MODE, `wandb offline`) nothing would reach the runs, so the uploader refuses to write
(a --dry-run still reads).

Ctrl-C or SIGTERM stops a batch at once (a run whose files are being written is finished
first), prints the summary of what was written and exits 130. The worker processes die with
the uploader however it ends, kill -9 included.
"""

from __future__ import annotations

import ctypes
import functools
import io
import json
import math
import multiprocessing
import multiprocessing.connection
import os
import re
import signal
import sys
import threading
import time
import warnings
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ProcessPoolExecutor, as_completed
from contextlib import contextmanager
from csv import reader as csv_reader
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # run as a plain script: make the repo importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import pandas as pd
import yaml
from tqdm import tqdm

from analysis.rank_history import (
    STEP,
    dynamics_key,
    dynamics_rows,
    input_rank_column,
    logged_in_forward_order,
    rank_columns,
    recorded_layer_order,
    resolve_layer_order,
)
from common import runstore
from common.cli import ArgumentParser, UserError, run_cli
from common.ranks import DYNAMICS_METRICS, MODES, RANK_MEASURES

VERSION = 1
CSV_FILE = "rank_dynamics.csv"
MARKER_FILE = "rank_dynamics.json"
MARKER_KEY = "rank_dynamics"  # the W&B summary key of the marker
STEP_AXIS = "rank_dynamics/step"
COMPANION_JOB_TYPE = "rank_dynamics"
CONFIRM_ABOVE = 10  # ask before writing to more runs than this (unless --yes)
TRIAL_RUNS = 3  # --trial: three runs, kept compatible with the test_uploader.py workflow
RETRIES = 6
# W&B states after which nobody writes the run any more
ENDED_STATES = ("finished", "crashed", "failed", "killed", "interrupted", "preempted")


@dataclass(frozen=True)
class Settings:
    measures: tuple[str, ...]
    mode: str
    prepend_input_rank: bool
    layer_order: tuple[str, ...] | None

    def marker(self, last_step: int | None, **extra: Any) -> dict[str, Any]:
        return {
            "version": VERSION,
            "mode": self.mode,
            "prepend_input_rank": self.prepend_input_rank,
            "rank_types": list(self.measures),
            "last_step": last_step,
            "updated_at": datetime.now(UTC).isoformat(timespec="seconds"),
            **extra,
        }


@dataclass
class RunData:
    """What a source read of one run: its history since the marker, what was written before."""

    history: pd.DataFrame
    written: set[tuple[int, str, str]]  # (step, scope, rank type) already present
    config: dict[str, Any]
    probe_mode: tuple[str, bool] | None  # the live probe's (mode, prepend_input_rank)
    extra: dict[str, Any] = field(default_factory=dict)  # the source's facts at read time
    record: dict[str, Any] = field(default_factory=dict)  # run.json (a W&B run has none)


@dataclass
class Plan:
    run: Any  # the source's run handle
    label: str
    action: str  # process | skip | error
    reason: str = ""
    rows: pd.DataFrame | None = None  # tidy dynamics rows to write
    orders: dict[str, list[str]] = field(default_factory=dict)  # scope -> layers
    order_source: str = ""
    target: str = ""
    extra: dict[str, Any] = field(default_factory=dict)  # RunData.extra, for the write

    @property
    def steps(self) -> int:
        return 0 if self.rows is None else int(self.rows["step"].nunique())


# -- what to add: shared by both sources ---------------------------------------------------------


def plan_run(run: Any, label: str, read: Callable[[], RunData], settings: Settings) -> Plan:
    """Read one run and decide what to write; never writes."""
    data = read()
    if data.probe_mode is not None and data.probe_mode != (settings.mode,
                                                            settings.prepend_input_rank):  # fmt: skip
        mode, prepend = data.probe_mode
        return Plan(run, label, "skip", f"its probe logged {mode}-mode dynamics"
                    f"{' with the input rank' if prepend else ''}: use --analysis-mode {mode}")  # fmt: skip
    groups = rank_columns(data.history.columns, settings.measures)
    if not groups:
        return Plan(run, label, "skip", "no rank metrics")
    recorded = recorded_layer_order(data.record, data.config)
    logged = logged_in_forward_order(data.config)
    frames, orders, sources = [], {}, set()
    for scope, by_measure in sorted(groups.items()):
        # in the order they first appear in the history (the logged order)
        layers = list(dict.fromkeys(layer for cols in by_measure.values() for layer in cols))
        order, source = resolve_layer_order(layers, recorded, settings.layer_order, logged)
        if order is None:
            where = f" in {scope}" if scope else ""
            return Plan(run, label, "skip", source.replace("unknown", f"unknown{where}", 1))
        orders[scope], sources = order, sources | {source}
        r0 = input_rank_column(scope) if settings.prepend_input_rank else None
        if r0 is not None and r0 not in data.history.columns:
            return Plan(run, label, "skip", f"no {r0} to prepend (--prepend-input-rank)")
        for measure, cols in by_measure.items():
            present = [cols[layer] for layer in order if layer in cols]
            if len(present) < 2:
                continue  # one layer has no transition: nothing to measure
            frames.append(dynamics_rows(data.history, scope, measure, present, settings.mode, r0))
    if not frames:
        return Plan(run, label, "skip", "fewer than two probed layers: no layer-to-layer decay")
    rows = pd.concat(frames, ignore_index=True)
    computable = rows["step"].nunique()
    if data.written:
        keys = zip(rows["step"], rows["scope"], rows["rank_type"], strict=True)
        rows = rows[[k not in data.written for k in keys]]
    plan = Plan(run, label, "process", rows=rows.reset_index(drop=True), orders=orders,
                order_source=", ".join(sorted(sources)), extra=data.extra)  # fmt: skip
    if rows.empty:
        plan.action = "skip"
        plan.reason = f"up to date (all {computable:,} steps written before or logged live)"
    return plan


def live_written(history: pd.DataFrame, measures: Sequence[str]) -> set[tuple[int, str, str]]:
    """(step, scope, rank type) whose dynamics are in the history already (live probe or an
    earlier in-place upload): normalized_aurc is finite whenever the ranks are, so its presence
    marks a written step."""
    written: set[tuple[int, str, str]] = set()
    step_col = STEP_AXIS if STEP_AXIS in history.columns else None
    for col in history.columns:
        scope, _, name = str(col).rpartition("/")
        for measure in measures:
            if name != f"{measure}_normalized_aurc":
                continue
            present = pd.to_numeric(history[col], errors="coerce").notna()
            steps = history.loc[present, STEP]
            if step_col is not None:  # uploaded rows: the original step is on the axis
                uploaded = pd.to_numeric(history.loc[present, step_col], errors="coerce")
                steps = uploaded.where(uploaded.notna(), steps)
            written.update((int(s), scope, measure) for s in steps)
    return written


def live_probe_mode(config: dict[str, Any], record: dict[str, Any], history: pd.DataFrame,
                    measures: Sequence[str]) -> tuple[str, bool] | None:  # fmt: skip
    """(mode, prepend_input_rank) of dynamics the live probe logged into ``history``; None
    when it logged none. The run's config says how the probe was set (run.json as fallback)."""
    probe = config.get("rank_probe") or record.get("rank_probe")
    if not isinstance(probe, dict) or not live_written(history, measures):
        return None
    return probe.get("mode", "difference"), bool(probe.get("prepend_input_rank", False))


# -- the local run store ------------------------------------------------------------------------


class LocalStore:
    """Run folders below ``root`` (each holds run.json), as the shared logger writes them."""

    def __init__(self, root: Path, settings: Settings):
        if not root.is_dir():
            raise UserError(f"--runs-dir {root} is not a folder")
        self.root, self.settings = root, settings

    def runs(self) -> list[Path]:
        return runstore.find_runs(self.root)

    def label(self, run: Path) -> str:
        return str(run)

    def ids(self, run: Path) -> set[str]:
        try:
            return {run.name, str(self.record(run).get("run_id"))}
        except RunError:
            return {run.name}  # reported when the run is read

    def target(self, plan: Plan) -> str:
        return f"local run folder ({plan.extra.get('state', 'state unknown')})"

    def state(self, run: Path, record: dict[str, Any]) -> str:
        """run.json's state as it is now: a "running" record whose process is gone (its
        run.lock free, or its pid gone on this host) is an ended run, killed."""
        try:
            return runstore.run_state(run, record)
        except OSError as exc:
            raise RunError(f"unreadable run folder {run}: {runstore.LOCK_FILE}: {exc}") from None

    def workers(self, runs: int) -> int:
        """Forked workers for many runs on Linux (fork is unsafe on macOS, spawn is slow)."""
        if sys.platform != "linux" or runs < 16:
            return 1
        return min(len(os.sched_getaffinity(0)), 8, runs // 8)

    def record(self, run: Path) -> dict[str, Any]:
        try:
            record = runstore.read_json(run / runstore.RUN_FILE)
        except (OSError, ValueError) as exc:
            raise RunError(f"unreadable run folder {run}: {runstore.RUN_FILE}: {exc}") from None
        if not isinstance(record, dict):
            raise RunError(f"unreadable run folder {run}: {runstore.RUN_FILE} is not an object")
        return record

    def matches(self, run: Path, filters: dict[str, Any]) -> bool:
        record = self.record(run)
        config = None
        for key, want in filters.items():
            if key.startswith("config."):
                config = config if config is not None else self.config(run)
                have: Any = config
                for part in key.split(".")[1:]:
                    have = have.get(part) if isinstance(have, dict) else None
            else:
                have = self.state(run, record) if key == "state" else record.get(key)
            if have != want:
                return False
        return True

    def config(self, run: Path) -> dict[str, Any]:
        path = run / runstore.CONFIG_FILE
        try:
            config = yaml.safe_load(path.read_text()) if path.exists() else {}
        except (OSError, yaml.YAMLError) as exc:
            raise RunError(f"unreadable run folder {run}: {runstore.CONFIG_FILE}: {exc}") from None
        return config if isinstance(config, dict) else {}

    def marker(self, run: Path) -> dict[str, Any] | None:
        path = run / MARKER_FILE
        if not path.exists():
            return None
        try:
            return runstore.read_json(path)
        except (OSError, ValueError):
            return None  # a marker we cannot read is rebuilt from the CSV

    def fast_skip(self, run: Path) -> str | None:
        """'up to date' without reading metrics.jsonl: same settings, and neither
        metrics.jsonl nor rank_dynamics.csv changed (a deleted or replaced CSV is rebuilt)."""
        marker = self.marker(run)
        metrics = run / runstore.METRICS_FILE
        if (marker and metrics.exists() and self._same_settings(marker)
                and marker.get("metrics_bytes") == metrics.stat().st_size
                and marker.get("csv_bytes") == _size(run / CSV_FILE)):  # fmt: skip
            return f"up to date (marker at step {marker.get('last_step')})"
        return None

    def _same_settings(self, marker: dict[str, Any]) -> bool:
        s = self.settings
        return (marker.get("mode"), marker.get("prepend_input_rank")) == (
            s.mode, s.prepend_input_rank) and set(s.measures) <= set(marker.get("rank_types", []))  # fmt: skip

    def read(self, run: Path) -> RunData:
        record, config = self.record(run), self.config(run)
        marker = self.marker(run)
        if marker and (why := settings_mismatch(marker, self.settings)):
            raise SkipRun(f"{why} (rank_dynamics.json)")
        metrics = run / runstore.METRICS_FILE
        if not metrics.exists():
            raise SkipRun("no rank metrics (no metrics.jsonl)")
        # state and size before reading: a run that grows or ends meanwhile is read again
        # next pass (the marker's metrics_bytes must not cover lines this read did not see)
        extra = {"state": self.state(run, record), "metrics_bytes": _size(metrics)}
        try:
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                history = runstore.read_metrics(run)
        except OSError as exc:
            raise RunError(f"unreadable run folder {run}: {runstore.METRICS_FILE}: {exc}") from None
        for w in caught:
            tqdm.write(f"warning: {w.message}", file=sys.stderr)
        if STEP not in history.columns:
            raise SkipRun("no rank metrics")
        written = live_written(history, self.settings.measures)
        csv = run / CSV_FILE
        if csv.exists():
            try:
                done = read_dynamics_csv(csv)
                written |= set(zip(done["step"].astype(int), done["scope"], done["rank_type"],
                                   strict=True))  # fmt: skip
            except (OSError, ValueError, KeyError, pd.errors.ParserError) as exc:
                raise RunError(f"unreadable {csv}: {exc} (remove it to recompute)") from None
        probe_mode = live_probe_mode(config, record, history, self.settings.measures)
        return RunData(history, written, config, probe_mode, extra, record)

    def write(self, plan: Plan) -> int:
        run: Path = plan.run
        csv = run / CSV_FILE
        rows = plan.rows
        if csv.exists():
            old = read_dynamics_csv(csv, warn=False)  # read() warned about its torn rows
            if not old.empty:
                rows = pd.concat([old, rows], ignore_index=True)
        rows = rows.sort_values(["scope", "rank_type", "step"], kind="stable")
        commit_point()  # a stop waits for both files: the summary counts what is on disk
        with runstore.atomic_path(csv) as tmp:  # replaced whole, never appended: no tear
            rows.to_csv(tmp, index=False)
        self.write_marker(plan, int(rows["step"].max()))
        return plan.steps

    def write_marker(self, plan: Plan, last_step: int | None) -> None:
        state = plan.extra.get("state")
        marker = self.settings.marker(last_step, metrics_bytes=plan.extra.get("metrics_bytes"),
                                      csv_bytes=_size(plan.run / CSV_FILE),
                                      layers=layer_record(plan.orders), order_source=plan.order_source,
                                      run_state=state, complete=state in ENDED_STATES)  # fmt: skip
        runstore.write_json_atomic(plan.run / MARKER_FILE, marker)


def read_dynamics_csv(path: Path, warn: bool = True) -> pd.DataFrame:
    """``rank_dynamics.csv`` without torn rows. This tool replaces it whole, but a file cut short
    (a killed copy, a full disk, an older appending writer) ends mid-row: a row without its
    newline or with too few fields is dropped, with one warning naming the file, so that its
    step counts as not written and is computed again."""
    text = path.read_text()
    end = text.rfind("\n") + 1
    torn = int(end < len(text))  # the last line lost its newline: cut mid-row
    lines = text[:end].splitlines(keepends=True)
    if lines:
        width = _fields(lines[0])
        rows = [line for line in lines[1:] if _fields(line) == width]
        torn += len(lines) - 1 - len(rows)
        frame = pd.read_csv(io.StringIO(lines[0] + "".join(rows)), keep_default_na=False,
                            na_values=[""], dtype={"scope": str})  # fmt: skip
    else:  # cut inside the header: every step is computed again
        frame = pd.DataFrame(columns=["step", "scope", "rank_type", *DYNAMICS_METRICS])
    if torn and warn:
        tqdm.write(f"warning: {path}: {torn} torn row{'s' if torn > 1 else ''} dropped (the file "
                   "was cut mid-row); computing those steps again", file=sys.stderr)  # fmt: skip
    return frame.fillna({"scope": ""})


def _fields(line: str) -> int:
    if '"' in line:  # a quoted field may hold commas
        return len(next(csv_reader([line]), []))
    return line.count(",") + 1


class RunError(Exception):
    """One run cannot be processed; the batch goes on and the exit code says so."""


class SkipRun(Exception):
    """One run has nothing to process, for the reason given."""


# -- W&B ---------------------------------------------------------------------------------------


# How the W&B reads retry. wandb 0.31's public API sends its GraphQL through wandb-core, which
# retries 429, 5xx and timeouts on its own: 20 times by default, backing off up to 60 s, so a
# server that keeps failing held one request for ~16 minutes before the uploader saw anything
# (measured). The uploader's Api asks wandb-core for one retry (CLIENT_RETRIES; 0 would mean
# "default") after a 1-2 s wait, and an HTTP timeout of WANDB_HTTP_TIMEOUT seconds (default
# REQUEST_TIMEOUT); the uploader's own retries (RETRIES tries, backoff 1, 2, 4, ... s, at most
# RETRY_SECONDS of failing in a row) come on top and say what they do. Worst case per read:
# a 429/5xx that does not end ~20 s, a server that hangs ~3 min; then that run is reported
# failed and the batch goes on. The writes (wandb.init, log, finish) keep wandb's own retries:
# wandb.init gives up after its 90 s init timeout.
CLIENT_RETRIES = 1
REQUEST_TIMEOUT = 20.0  # seconds per request (WANDB_HTTP_TIMEOUT overrides)
RETRIES = 5
RETRY_SECONDS = 120.0
LIST_PAGE = 100  # runs per listing request
HISTORY_PAGE = 1000  # history rows per request
# what wandb-core says when it gave up on a request (its message is all the error carries)
_TIMED_OUT = ("deadline exceeded", "Client.Timeout", "did not respond in time")
_GAVE_UP = "giving up after"


def request_timeout() -> float:
    try:
        return float(os.environ.get("WANDB_HTTP_TIMEOUT") or REQUEST_TIMEOUT)
    except ValueError:
        raise UserError(f"WANDB_HTTP_TIMEOUT={os.environ['WANDB_HTTP_TIMEOUT']!r} is not a "
                        "number of seconds") from None  # fmt: skip


def public_api() -> Any:
    """``wandb.Api`` with the retry settings above. wandb.Api takes its settings from wandb's
    global ones when it is made (its copy is what its requests use): they are set for that
    moment and put back, so that nothing else in this process changes."""
    import wandb

    timeout = request_timeout()
    client = {"x_graphql_retry_max": CLIENT_RETRIES, "x_graphql_retry_wait_min_seconds": 1.0,
              "x_graphql_retry_wait_max_seconds": 2.0, "x_graphql_timeout_seconds": timeout}  # fmt: skip
    settings = wandb.setup().settings
    before = {name: getattr(settings, name) for name in client}
    try:
        for name, value in client.items():
            setattr(settings, name, value)
        # the Python side waits for wandb-core longer than wandb-core's tries take
        return wandb.Api(timeout=math.ceil((CLIENT_RETRIES + 1) * (timeout + 2) + 5))
    finally:
        for name, value in before.items():
            setattr(settings, name, value)


def _causes(exc: BaseException) -> Iterator[BaseException]:
    """``exc`` and what it wraps (CommError.exc, __cause__, __context__)."""
    seen: set[int] = set()
    todo: list[BaseException | None] = [exc]
    while todo:
        e = todo.pop()
        if e is None or id(e) in seen:
            continue
        seen.add(id(e))
        yield e
        todo += [getattr(e, "exc", None), e.__cause__, e.__context__]


def http_status(exc: BaseException) -> int | None:
    """The HTTP status of a failed W&B request. wandb 0.31 raises WandbApiFailedError (public
    API calls, history scans) or CommError wrapping it, with no headers; the status is in
    ``response.http_status`` when wandb-core did not retry a GraphQL call, and only in the
    message when it retried and gave up ("... giving up after 2 attempt(s) while retrying:
    HTTP 429: ...") or when a history scan failed ("returned error 404: ...")."""
    for e in _causes(exc):
        status = getattr(getattr(e, "response", None), "http_status", None)
        if isinstance(status, int) and status:
            return status
        # a history scan's errors carry no status at all: "returned error 404: ..."
        if type(e).__name__ == "WandbApiFailedError" and (
            found := re.search(r"\b(?:HTTP|returned error) (\d{3})\b", str(e))
        ):
            return int(found.group(1))
    return None


def transient(exc: BaseException) -> str | None:
    """What went wrong, when trying again may help ("HTTP 429", "HTTP 503", "timed out", "no
    connection"); None when it will not (a 404, a bad query, a bug)."""
    status = http_status(exc)
    if status is not None:
        return f"HTTP {status}" if status == 429 or 500 <= status < 600 else None
    for e in _causes(exc):
        text = str(e)
        if any(mark in text for mark in _TIMED_OUT):
            return "timed out"
        if _GAVE_UP in text:  # wandb-core retries only what may pass: a refused connection
            return "no connection"
    return None


def retry_delay(attempt: int) -> float:
    """Seconds to wait before the next try: 1, 2, 4, ... (at most 30). W&B's 429 carries
    RateLimit-Reset, but wandb 0.31's errors carry no headers (WandbApiFailedError has a
    message and a status), and wandb-core does not wait for that header itself (it honours
    Retry-After only; checked): the uploader cannot see it, so it backs off."""
    return min(2.0**attempt, 30.0)


sleep = time.sleep  # tests replace it


def with_retries(
    what: str, fn: Callable[[], Any], progress: Callable[[], Any] | None = None
) -> Any:
    """Call ``fn``; on a 429, a 5xx, a timeout or a refused connection wait and try again, up
    to RETRIES tries in a row or RETRY_SECONDS of failing. ``progress`` (e.g. rows read so
    far) changing between tries starts the count again."""
    attempt, first_failure, mark = 0, None, progress() if progress else None
    while True:
        try:
            return fn()
        except Exception as exc:
            why = transient(exc)
            if why is None:
                raise
            now = time.monotonic()
            if progress is not None and progress() != mark:
                attempt, first_failure, mark = 0, None, progress()
            first_failure = now if first_failure is None else first_failure
            attempt += 1
            if attempt >= RETRIES or now - first_failure > RETRY_SECONDS:
                detail = (f" (no answer within {request_timeout():g} s)"
                          if why == "timed out" else "")  # fmt: skip
                raise RunError(f"{what}: {why} after {attempt} attempts{detail}") from None
            delay = retry_delay(attempt - 1)
            tqdm.write(f"{what}: {why}, retrying in {delay:.0f} s", file=sys.stderr)
            sleep(delay)


def scan(run: Any, what: str, min_step: int = 0, keys: list[str] | None = None) -> pd.DataFrame:
    """Every history row from ``min_step`` (``scan_history``, never the sampled ``history``).
    A retry goes on after the last row received instead of starting over."""
    rows: list[dict[str, Any]] = []

    def fetch() -> None:
        start = int(rows[-1][STEP]) + 1 if rows else min_step
        for row in run.scan_history(keys=keys, page_size=HISTORY_PAGE, min_step=start):
            rows.append(dict(row))

    with_retries(what, fetch, progress=lambda: len(rows))
    return pd.DataFrame.from_records(rows)


def run_config(run: Any) -> dict[str, Any]:
    """A listed run's config: a request of its own (the listing is lazy), with retries."""
    return with_retries(f"reading {run.id} config", lambda: dict(run.config or {}))


def companion_id(run_id: str) -> str:
    return f"{run_id}-rank-dynamics"


def summary_marker(run: Any) -> dict[str, Any] | None:
    """The run's marker; reading a listed run's summary is a request of its own (the listing
    is lazy), with retries."""
    if run is None:
        return None
    marker = with_retries(f"reading {run.id} summary", lambda: run.summary.get(MARKER_KEY))
    return dict(marker) if marker else None


def wandb_mode() -> str:
    """The mode wandb.init runs in when not told: WANDB_MODE as it is now, else wandb's
    settings (a settings file written by `wandb offline`)."""
    mode = os.environ.get("WANDB_MODE")
    if not mode:
        import wandb

        mode = wandb.setup().settings.mode
    return {"dryrun": "offline", "run": "online"}.get(mode, mode)


def writer_settings(base_url: str) -> Any:
    """wandb.init settings for writing into a run on the server at ``base_url`` (the one the
    runs were read from): no console capture, and nothing of the uploader's machine (system
    metrics, metadata, requirements, git commit) in the run."""
    import wandb

    return wandb.Settings(base_url=base_url, console="off", quiet=True, x_disable_stats=True,
                          x_disable_meta=True, x_save_requirements=False, disable_git=True,
                          save_code=False)  # fmt: skip


class WandbProject:
    """Runs of one W&B project through the public API; writes through ``wandb.init``."""

    def __init__(self, entity: str | None, project: str, settings: Settings):
        import wandb  # only the W&B source needs it

        try:
            self.api = public_api()
        except UserError:
            raise
        except Exception as exc:  # no API key, no network: say so in one line
            raise UserError(f"W&B API unavailable ({describe(exc)}); run `wandb login`, "
                            "or use --runs-dir for the local run store") from None  # fmt: skip
        # online, said explicitly: WANDB_MODE=offline would write a local folder instead of
        # the run (main refuses that mode before anything is written)
        self.init = functools.partial(wandb.init, mode="online", dir=os.getcwd(),
                                      settings=writer_settings(self.api.settings["base_url"]))  # fmt: skip
        self.settings = settings
        self.path = f"{entity}/{project}" if entity else project
        self.entity, self.project = entity, project
        self.companions: dict[str, Any] = {}

    def runs(self, filters: dict[str, Any] | None) -> list[Any]:
        def listing(f: dict[str, Any] | None) -> list[Any]:
            return list(self.api.runs(self.path, filters=f, per_page=LIST_PAGE))

        runs = with_retries(f"listing {self.path}", lambda: listing(filters))
        companions = with_retries(f"listing {self.path}",
                                  lambda: listing({"jobType": COMPANION_JOB_TYPE}))  # fmt: skip
        self.companions = {r.id: r for r in companions}
        return [r for r in runs if getattr(r, "job_type", None) != COMPANION_JOB_TYPE]

    def label(self, run: Any) -> str:
        return f"{self.path}/{run.id} ({run.name}, {run.state})"

    def ids(self, run: Any) -> set[str]:
        return {run.id, run.name}

    def workers(self, runs: int) -> int:
        return 1  # one process: retries and rate limits stay simple

    def matches(self, run: Any, filters: dict[str, Any]) -> bool:
        return True  # the server applied the filters

    def fast_skip(self, run: Any) -> str | None:
        """An ended run whose in-place marker covers these settings gets nothing new."""
        marker = summary_marker(run)
        s = self.settings
        if (run.state in ENDED_STATES and marker and marker.get("complete")
                and (marker.get("mode"), marker.get("prepend_input_rank")) == (s.mode, s.prepend_input_rank)
                and set(s.measures) <= set(marker.get("rank_types", []))):  # fmt: skip
            return f"up to date (marker at step {marker.get('last_step')})"
        return None

    def read(self, run: Any) -> RunData:
        s = self.settings
        companion = self.companions.get(companion_id(run.id))
        markers = [m for m in (summary_marker(run), summary_marker(companion)) if m]
        for marker in markers:
            if why := settings_mismatch(marker, s):
                raise SkipRun(f"{why} (summary {MARKER_KEY})")
        # steps up to a marker's last_step were all processed before; rows written since
        # (in place) sit after the run's own rows, so scanning from there sees them too
        done = [m["last_step"] for m in markers if isinstance(m.get("last_step"), int)]
        min_step = max(done) + 1 if done else 0
        history = scan(run, f"reading {run.id}", min_step)
        if history.empty or STEP not in history.columns:
            if min_step:
                raise SkipRun(f"up to date (no rows after step {min_step - 1})")
            raise SkipRun("no rank metrics")
        original = history[history[STEP_AXIS].isna()] if STEP_AXIS in history.columns else history
        written = live_written(history, s.measures)
        if companion is not None:
            written |= live_written(scan(companion, f"reading {companion.id}"), s.measures)
        config = run_config(run)
        probe_mode = live_probe_mode(config, {}, original, s.measures)
        return RunData(original, written, config, probe_mode)

    def target(self, plan: Plan) -> str:
        return "in place" if plan.run.state in ENDED_STATES else "companion run"

    def write(self, plan: Plan) -> int:
        run, s = plan.run, self.settings
        state = run.state  # as listed: resuming the run changes it
        in_place = state in ENDED_STATES
        kwargs: dict[str, Any] = {"entity": run.entity, "project": run.project}
        if in_place:
            kwargs.update(id=run.id, resume="must")
        else:
            kwargs.update(id=companion_id(run.id), resume="allow", job_type=COMPANION_JOB_TYPE,
                          group=getattr(run, "group", None) or run.id,
                          name=f"{run.name}-rank-dynamics",
                          config={**run_config(run), "rank_dynamics_source": run.id})  # fmt: skip
        writer = self.init(reinit="create_new", **kwargs)
        try:
            writer.define_metric(STEP_AXIS)
            wide = plan.rows.assign(
                key_prefix=[dynamics_key(sc, m, "") for sc, m in
                            zip(plan.rows["scope"], plan.rows["rank_type"], strict=True)]
            )  # fmt: skip
            for prefix in wide["key_prefix"].unique():
                for metric in DYNAMICS_METRICS:
                    writer.define_metric(f"{prefix}{metric}", step_metric=STEP_AXIS)
            for step, group in wide.groupby("step", sort=True):
                payload: dict[str, Any] = {STEP_AXIS: int(step)}
                for row in group.itertuples(index=False):
                    for metric in DYNAMICS_METRICS:
                        value = getattr(row, metric)
                        payload[f"{row.key_prefix}{metric}"] = None if _nan(value) else value
                writer.log(payload)
            last = int(plan.rows["step"].max())
            previous = summary_marker(
                run if in_place else self.companions.get(companion_id(run.id))
            )
            if previous and isinstance(previous.get("last_step"), int):
                last = max(last, previous["last_step"])
            writer.summary[MARKER_KEY] = s.marker(last, complete=in_place, layers=layer_record(plan.orders),
                                                  order_source=plan.order_source)  # fmt: skip
        except BaseException:
            writer.finish(exit_code=1)
            raise
        # keep a failed or crashed run marked as such: a non-zero exit code
        writer.finish(exit_code=0 if not in_place or state == "finished" else 1)
        return plan.steps


def layer_record(orders: dict[str, list[str]]) -> list[dict[str, Any]]:
    """The layer order used, per scope, for the marker (a list: W&B keys must not be empty)."""
    return [{"scope": scope, "layers": layers} for scope, layers in orders.items()]


def _nan(value: Any) -> bool:
    return isinstance(value, float) and math.isnan(value)


# -- the CLI -------------------------------------------------------------------------------------


def parse_list(values: Sequence[str] | None) -> list[str]:
    """``a b``, ``a,b`` and ``a, b`` all give [a, b]."""
    return [v.strip() for value in values or [] for v in value.split(",") if v.strip()]


def parse_settings(args: Any) -> Settings:
    measures = parse_list(args.rank_types) or list(RANK_MEASURES)
    unknown = [m for m in measures if m not in RANK_MEASURES]
    if unknown:
        raise UserError(f"unknown rank type {', '.join(unknown)}: choose from "
                        f"{', '.join(RANK_MEASURES)}")  # fmt: skip
    if args.analysis_mode not in MODES:
        raise UserError(f"unknown analysis mode {args.analysis_mode!r}: choose difference or ratio")
    if args.max_runs is not None and args.max_runs < 1:
        raise UserError(f"--max-runs must be a positive integer, got {args.max_runs}")
    order = parse_list([args.layer_order]) if args.layer_order else None
    if order is not None and len(set(order)) != len(order):
        raise UserError(f"--layer-order names a layer twice: {args.layer_order}")
    return Settings(tuple(dict.fromkeys(measures)), args.analysis_mode, args.prepend_input_rank,
                    tuple(order) if order else None)  # fmt: skip


def parse_filters(text: str | None) -> dict[str, Any] | None:
    if text is None:
        return None
    try:
        filters = json.loads(text)
    except json.JSONDecodeError as exc:
        raise UserError(f"--filters is not valid JSON ({exc.msg} at character {exc.pos})") from None
    if not isinstance(filters, dict):
        raise UserError('--filters must be a JSON object, e.g. \'{"state": "finished"}\'')
    return filters


def build_parser() -> ArgumentParser:
    p = ArgumentParser(
        description="Compute rank-decay dynamics from logged per-layer ranks and write them "
        "into the runs (W&B or the local run store).",
    )
    p.add_argument("--entity", help="W&B entity (default: your default entity)")
    p.add_argument("--project", help="W&B project (needed unless --runs-dir)")
    p.add_argument("--runs-dir", type=Path, help="read and write the local run store instead")
    p.add_argument("--rank-types", nargs="+", metavar="T",
                   help=f"rank measures (default: all four: {' '.join(RANK_MEASURES)})")  # fmt: skip
    p.add_argument("--analysis-mode", default="difference", help="difference (default) | ratio")
    p.add_argument("--prepend-input-rank", action="store_true",
                   help="use the logged ranks/input_rank as R_0 (the old uploader did; recorded "
                   "in the marker)")  # fmt: skip
    p.add_argument("--layer-order", metavar="A,B,C",
                   help="forward order for runs whose layer names carry none")  # fmt: skip
    p.add_argument("--run-ids", nargs="+", metavar="ID",
                   help="only these runs (W&B ids; local run ids or folder names)")  # fmt: skip
    p.add_argument("--filters", metavar="JSON",
                   help='W&B filter, e.g. \'{"state": "finished", "config.rank": 8}\' (local: '
                   "plain equality on run.json fields and config.*)")  # fmt: skip
    p.add_argument("--max-runs", type=int, help="at most this many runs (after filtering)")
    p.add_argument("--dry-run", action="store_true", help="print the plan, write nothing")
    p.add_argument("--yes", action="store_true", help="do not ask before writing to many runs")
    p.add_argument("--trial", action="store_true",
                   help="the old test_uploader.py: plan 3 runs, then write one of them (asks "
                   "first, unless --yes)")  # fmt: skip
    return p


def select_runs(source: Any, args: Any, filters: dict[str, Any] | None) -> list[Any]:
    if isinstance(source, LocalStore):
        if filters and any(k.startswith("$") or isinstance(v, dict) for k, v in filters.items()):
            raise UserError("--filters with --runs-dir takes plain equality only, e.g. "
                            '\'{"state": "finished", "config.rank": 8}\'')  # fmt: skip
        runs = source.runs()
        if not runs:
            raise UserError(f"no runs in {args.runs_dir} (a run folder holds run.json)")
    else:
        runs = source.runs(filters)
    ids = set(parse_list(args.run_ids))
    if not ids:
        return runs
    chosen = [run for run in runs if source.ids(run) & ids]
    missing = ids - set().union(*(source.ids(run) for run in chosen))
    if missing:
        raise UserError(f"--run-ids matched no run for: {', '.join(sorted(missing))}")
    return chosen


def confirm(count: int, where: str, yes: bool) -> None:
    if yes or count <= CONFIRM_ABOVE:
        return
    question = f"Write rank dynamics to {count} runs in {where}? [y/N] "
    if not sys.stdin.isatty():
        raise UserError(f"about to write to {count} runs in {where} and there is no terminal "
                        "to confirm: pass --yes (or --dry-run to see the plan)")  # fmt: skip
    if input(question).strip().lower() not in ("y", "yes"):
        raise UserError("cancelled: nothing was written")


def trial_confirmed(label: str, yes: bool) -> bool:
    if yes:
        return True
    if not sys.stdin.isatty():
        print("Trial: pass --yes to write one run for real")
        return False
    return input(f"Write rank dynamics to one run, {label}, for real? [y/N] ").strip().lower() in (
        "y", "yes")  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    settings = parse_settings(args)
    filters = parse_filters(args.filters)
    if args.runs_dir is not None:
        source: Any = LocalStore(args.runs_dir, settings)
        where = str(args.runs_dir)
    elif args.project:
        mode = wandb_mode()
        if mode in ("offline", "disabled") and not args.dry_run:
            how, undo = ((f"WANDB_MODE={os.environ['WANDB_MODE']}", "unset WANDB_MODE")
                         if os.environ.get("WANDB_MODE")
                         else ("wandb's settings", "run `wandb online`"))  # fmt: skip
            raise UserError(f"W&B is in {mode} mode here ({how}): the dynamics go into the runs on "
                            f"the W&B server, and nothing would reach them. To write them, {undo}; "
                            "--dry-run only reads, and --runs-dir writes the local run store")  # fmt: skip
        source = WandbProject(args.entity, args.project, settings)
        where = source.path
    else:
        raise UserError("say where the runs are: --project (and --entity) for W&B, or --runs-dir")

    print("Rank dynamics analysis")
    print(f"  Source: {where}")
    print(f"  Rank types: {', '.join(settings.measures)}")
    print(f"  Analysis mode: {settings.mode}"
          f"{' (input rank prepended)' if settings.prepend_input_rank else ''}")  # fmt: skip
    try:
        runs = select_runs(source, args, filters)
    except (UserError, KeyboardInterrupt):
        raise
    except Exception as exc:  # a wrong project, no network, rate limits that did not end
        raise UserError(f"cannot list the runs of {where}: {describe(exc)}") from None
    if isinstance(source, LocalStore) and filters:
        runs = [r for r in runs if _safe_match(source, r, filters)]
    if args.max_runs is not None or args.trial:
        runs = runs[: min(args.max_runs or TRIAL_RUNS, TRIAL_RUNS) if args.trial else args.max_runs]
    print(f"Found {len(runs)} runs in {where}")
    with stop_signals():
        return run_batch(source, args, settings, runs, where)


def run_batch(source: Any, args: Any, settings: Settings, runs: list[Any], where: str) -> int:
    """Plan every run, print the plan, write (unless a dry run) and print the summary."""
    workers = source.workers(len(runs))
    try:
        plans = in_workers(functools.partial(plan_one, source, settings=settings), runs, workers,
                           "Reading runs")  # fmt: skip
    except Interrupted as stop:
        planned = list(stop.done.values())
        return print_summary(len(runs), [], [p for p in planned if p.action == "skip"],
                             [p for p in planned if p.action == "error"], 0, "interrupted")  # fmt: skip
    to_write = [p for p in plans if p.action == "process"]
    skipped = [p for p in plans if p.action == "skip"]
    errors = [p for p in plans if p.action == "error"]

    print("Plan:" if args.dry_run else "Summary:")
    print(f"  Runs that will be processed: {len(to_write)} "
          f"({sum(p.steps for p in to_write):,} new steps)")  # fmt: skip
    print(f"  Runs that will be skipped: {len(skipped)}")
    for plan in to_write if args.dry_run or args.trial else []:
        print(f"  process {plan.label}: {plan.steps:,} new steps -> {plan.target} "
              f"(layer order from {plan.order_source})")  # fmt: skip
    for plan in skipped:
        print(f"  skip    {plan.label}: {plan.reason}")
    for plan in errors:
        print(f"error: {plan.label}: {plan.reason}", file=sys.stderr)

    if args.trial and not args.dry_run and to_write:
        to_write = to_write[:1]
        args.dry_run = not trial_confirmed(to_write[0].label, args.yes)
    if args.dry_run:
        print("Dry run: nothing was written.")
        return print_summary(len(plans), [], skipped, errors, 0, "dry run")
    added, outcome = 0, "complete"
    if to_write:
        confirm(len(to_write), where, args.yes)
        added, outcome = write_all(source, to_write, workers, errors)
    processed = [p for p in to_write if p.action == "process"]
    return print_summary(len(plans), processed, skipped, errors, added, outcome)


def write_all(source: Any, plans: list[Plan], workers: int, errors: list[Plan]) -> tuple[int, str]:
    """Write the planned runs; returns (steps added, "complete" | "interrupted"). A run not
    written because of a stop is marked so; a failing one joins ``errors``."""
    try:
        results, outcome = in_workers(functools.partial(write_one, source), plans, workers,
                                      "Processing runs"), "complete"  # fmt: skip
    except Interrupted as stop:
        results, outcome = [stop.done.get(i) for i in range(len(plans))], "interrupted"
    added = 0
    for plan, result in zip(plans, results, strict=True):
        if result is None:
            plan.action = "stopped"  # not written: the next pass does it
            continue
        steps, error = result
        added += steps
        if error is not None:  # one failing run never stops the batch
            plan.action, plan.reason = "error", error
            errors.append(plan)
            print(f"error: {plan.label}: {plan.reason}", file=sys.stderr)
    return added, outcome


def print_summary(total: int, processed: list[Plan], skipped: list[Plan], errors: list[Plan],
                  added: int, outcome: str) -> int:  # fmt: skip
    """The closing summary every call ends with; returns the exit code (130 after a stop, 1
    when a run failed)."""
    print()
    print({"complete": "Processing complete!", "dry run": "Dry run complete (nothing written)",
           "interrupted": "Interrupted: run it again to finish (each step is written once)"}[outcome])  # fmt: skip
    print(f"  Total runs: {total}")
    print(f"  Processed: {len(processed)}")
    print(f"  Skipped: {len(skipped)}")
    print(f"  Errors: {len(errors)}")
    print(f"  New steps added: {added:,}")
    if outcome == "interrupted":
        return 130
    return 1 if errors else 0


def _safe_match(source: LocalStore, run: Path, filters: dict[str, Any]) -> bool:
    try:
        return source.matches(run, filters)
    except RunError:
        return True  # kept, so that reading it reports the problem


def _size(path: Path) -> int | None:
    return path.stat().st_size if path.exists() else None


def settings_mismatch(marker: dict[str, Any], settings) -> str | None:
    """Why a run processed earlier with other settings is skipped (None when they match)."""
    mode, prepend = marker.get("mode"), bool(marker.get("prepend_input_rank"))
    if mode != settings.mode:
        return f"processed earlier in {mode} mode: use --analysis-mode {mode}"
    if prepend != bool(settings.prepend_input_rank):
        flag = "with" if prepend else "without"
        return f"processed earlier {flag} --prepend-input-rank: run it {flag} that flag"
    return None


def describe(exc: BaseException) -> str:
    if isinstance(exc, RunError):
        return " ".join(str(exc).split())  # one line, even for a parser's multi-line message
    status = http_status(exc)
    text = " ".join(str(exc).split()) or type(exc).__name__
    return f"HTTP {status}: {text}" if status else f"{type(exc).__name__}: {text}"


def write_one(source: Any, plan: Plan) -> tuple[int, str | None]:
    try:
        return source.write(plan), None
    except Exception as exc:
        return 0, describe(exc)


def plan_one(source: Any, run: Any, settings: Settings) -> Plan:
    label = source.label(run)
    try:
        reason = source.fast_skip(run)
        if reason is not None:
            return Plan(run, label, "skip", reason)
        plan = plan_run(run, label, lambda: source.read(run), settings)
        if plan.action == "process":
            plan.target = source.target(plan)
        return plan
    except SkipRun as exc:
        return Plan(run, label, "skip", str(exc))
    except Exception as exc:  # one failing run never stops the batch
        return Plan(run, label, "error", describe(exc))


# -- workers, and stopping them: Ctrl-C, SIGTERM, and an uploader killed outright ---------------


class Interrupted(Exception):
    """A batch stopped by Ctrl-C or SIGTERM; ``done`` maps an item's index to its result, for
    the items that completed."""

    def __init__(self, done: dict[int, Any]):
        super().__init__(f"interrupted after {len(done)} items")
        self.done = done


class WorkerStopped(Exception):
    """A worker's answer for an item it abandoned or refused because it was asked to stop."""


@dataclass
class _StopState:
    requested: bool = False  # Ctrl-C or SIGTERM arrived
    abortable: bool = True  # a stop may abandon what this process does now
    busy: bool = False  # a worker is on an item
    parent: int | None = None  # in a worker: the uploader's pid


_STOP = _StopState()
PR_SET_PDEATHSIG = 1  # linux/prctl.h


def commit_point() -> None:
    """From here on the current item is finished, not abandoned: a stop arriving meanwhile
    takes effect after it, so an interrupted batch counts exactly the runs on disk."""
    _STOP.abortable = False


def _on_stop_signal(signum: int, frame: Any) -> None:
    """In the uploader: Ctrl-C and SIGTERM raise KeyboardInterrupt, except after an item's
    commit point (the sequential loop stops after the item)."""
    _STOP.requested = True
    if _STOP.abortable:
        raise KeyboardInterrupt


@contextmanager
def stop_signals() -> Iterator[None]:
    """SIGTERM (kill PID, a scheduler) stops a batch the way Ctrl-C does: the workers are
    stopped, and the summary is printed. Only the main thread can take signals."""
    _STOP.requested, _STOP.abortable = False, True
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    old = {sig: signal.signal(sig, _on_stop_signal) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for sig, handler in old.items():
            signal.signal(sig, handler)


def _worker_on_sigterm(signum: int, frame: Any) -> None:
    """In a worker (SIGTERM from the uploader stopping it, or the death signal when the
    uploader died): a write finishes, a read is abandoned; an idle worker whose uploader is
    gone exits, one whose uploader lives waits for the pool's shutdown (exiting now would
    break the pool and lose the other workers' answers)."""
    _STOP.requested = True
    if _STOP.abortable:
        raise KeyboardInterrupt  # unwinds the read; a temp file in flight is removed
    if not _STOP.busy and os.getppid() != _STOP.parent:
        os._exit(128 + signum)


def _worker_init(parent: int) -> None:
    """Each worker dies with the uploader however it ends, kill -9 included: the kernel sends
    it SIGTERM when the uploader dies (Linux PR_SET_PDEATHSIG), and a thread checks the parent
    pid as a fallback. Ctrl-C reaches the whole process group: the uploader decides."""
    global _STOP
    _STOP = _StopState(abortable=False, parent=parent)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, _worker_on_sigterm)
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(PR_SET_PDEATHSIG, int(signal.SIGTERM), 0, 0, 0)
    except (OSError, AttributeError):
        pass  # not Linux: the watcher thread alone
    if os.getppid() != parent:  # the uploader died before the death signal was set
        os._exit(1)
    threading.Thread(target=_watch_parent, name="watch-uploader", daemon=True).start()


def _watch_parent() -> None:
    while os.getppid() == _STOP.parent:
        time.sleep(0.2)
    deadline = time.monotonic() + 10  # let a write past its commit point finish
    while _STOP.busy and not _STOP.abortable and time.monotonic() < deadline:
        time.sleep(0.05)
    os._exit(1)


def _run_task(fn: Callable[[Any], Any], item: Any) -> Any:
    """One item in a worker; refused once a stop was asked (the queued rest drains at once)."""
    if _STOP.requested:
        raise WorkerStopped("stopped before it started")
    try:
        _STOP.busy = _STOP.abortable = True
        return fn(item)
    except KeyboardInterrupt:
        raise WorkerStopped("stopped") from None
    finally:
        _STOP.busy = _STOP.abortable = False


def in_workers(fn: Callable[[Any], Any], items: Sequence[Any], workers: int, desc: str) -> list:
    """``[fn(x) for x in items]`` with a progress bar, in ``workers`` forked processes when
    more than one (reading and writing run folders is CPU-bound JSON and CSV work). Ctrl-C or
    SIGTERM raises :class:`Interrupted` with the results of the items done."""
    bar = tqdm(total=len(items), desc=desc, unit="run", file=sys.stderr, disable=None)
    with bar:
        if workers > 1:
            return _in_pool(fn, items, workers, bar)
        results: list[Any] = []
        try:
            for item in items:
                _STOP.abortable = True
                if _STOP.requested:  # arrived after the last item's commit point
                    raise KeyboardInterrupt
                results.append(fn(item))
                bar.update()
        except KeyboardInterrupt:
            raise Interrupted(dict(enumerate(results))) from None
        finally:
            _STOP.abortable = True
        return results


def _in_pool(fn: Callable[[Any], Any], items: Sequence[Any], workers: int, bar: tqdm) -> list:
    before = {p.pid for p in multiprocessing.active_children()}
    pool = ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("fork"),
                               initializer=_worker_init, initargs=(os.getpid(),))  # fmt: skip
    futures: list[Any] = []
    try:
        futures = [pool.submit(_run_task, fn, item) for item in items]
        for future in as_completed(futures):
            if isinstance(future.exception(), WorkerStopped):  # someone stopped a worker
                raise KeyboardInterrupt
            bar.update()
        return [future.result() for future in futures]
    except KeyboardInterrupt:
        commit_point()  # a second Ctrl-C does not cut the stop short
        _stop_pool(pool, [p for p in multiprocessing.active_children() if p.pid not in before])
        done = {i: f.result() for i, f in enumerate(futures)
                if f.done() and not f.cancelled() and f.exception() is None}  # fmt: skip
        raise Interrupted(done) from None
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


def _stop_pool(pool: ProcessPoolExecutor, procs: list[Any], grace: float = 10.0) -> None:
    """Cancel the items not started, ask each worker to stop (SIGTERM: a write finishes, a read
    is abandoned), wait for them to end, kill the ones that do not, and collect the answers."""
    pool.shutdown(wait=False, cancel_futures=True)
    for proc in procs:
        proc.terminate()
    deadline = time.monotonic() + grace
    waiting = [proc.sentinel for proc in procs]
    while waiting and time.monotonic() < deadline:  # wait without reaping: the pool reaps
        ready = multiprocessing.connection.wait(waiting, deadline - time.monotonic())
        waiting = [s for s in waiting if s not in ready]
    for proc in procs:
        if proc.sentinel in waiting:
            proc.kill()
    pool.shutdown(wait=True)  # the answers that arrived are set on their futures


if __name__ == "__main__":
    os.environ.setdefault("WANDB_SILENT", "true")
    run_cli(main)
