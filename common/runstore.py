"""The local run store: one plain folder per run, written by the shared logger.

Every run folder holds

- ``run.json``      identity and state (W&B id/path/mode, running|finished|failed|interrupted,
                    start/end time, git commit, failure reason, pid and host)
- ``run.lock``      held (``flock``) by the one process writing the run, for the run's life: a
                    second writer is refused, and a reader tells a live run from a dead one
- ``config.yaml``   the resolved config
- ``metrics.jsonl`` one JSON object per log call: ``{"_step": s, "key": value, ...}``
- ``summary.json``  the run's summary values
- ``media/``        logged images as PNG, ``tables/`` logged tables as JSON

W&B's offline files are an internal format that changes between releases, so this folder is
what analysis reads back when there is no network. This module imports no Hydra and no W&B.
"""

from __future__ import annotations

import datetime as dt
import errno
import fcntl
import json
import math
import os
import socket
import tempfile
import time
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

RUN_FILE = "run.json"
CONFIG_FILE = "config.yaml"
METRICS_FILE = "metrics.jsonl"
SUMMARY_FILE = "summary.json"
MEDIA_DIR = "media"
TABLES_DIR = "tables"

LOCK_FILE = "run.lock"

_UMASK = os.umask(0)
os.umask(_UMASK)  # read once: the process's umask, for files made by mkstemp

# What a writer records. Readers add "killed": a record left "running" by a process that died
# without closing it (kill -9, out of memory, a node lost), see :func:`run_state`.
RUN_STATES = ("running", "finished", "failed", "interrupted")
# A cluster's word, written by the sweep master into the record of a job the cluster ended
# (hydra_plugins/ks_slurm_launcher/slurm_launcher.py): "timeout", and "killed" for a node or memory failure.
CLUSTER_STATES = ("timeout", "killed")
KILLED = "killed"


def to_jsonable(value: Any) -> Any:
    """Plain JSON types; NaN/Inf become None (JSON has no NaN), tensors/arrays become lists."""
    if value is None or isinstance(value, (bool, str)):
        return value
    if isinstance(value, int):
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {str(k): to_jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [to_jsonable(v) for v in value]
    if isinstance(value, Path):
        return str(value)
    if hasattr(value, "tolist"):  # numpy / torch scalars and arrays
        return to_jsonable(value.tolist())
    return str(value)


@contextmanager
def atomic_path(path: str | os.PathLike[str]) -> Iterator[Path]:
    """Yield a temp path in ``path``'s folder; on success rename it over ``path``.

    Readers never see half a file, and a failed or interrupted write leaves nothing behind.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.fchmod(fd, 0o666 & ~_UMASK)  # mkstemp's 0600 would make these files unlike the rest
    os.close(fd)
    try:
        yield Path(tmp)
        os.replace(tmp, path)
    except OSError as exc:
        Path(tmp).unlink(missing_ok=True)
        if exc.filename is None or exc.filename == tmp:  # name the file the user knows
            raise OSError(exc.errno, exc.strerror, str(path)) from None
        raise
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def save_figure(fig: Any, path: str | os.PathLike[str], dpi: int = 120) -> Path:
    """Save a matplotlib Figure atomically, in the format its suffix names (png by default)."""
    path = Path(path)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format=path.suffix.lstrip(".").lower() or "png", dpi=dpi,
                    bbox_inches="tight")  # fmt: skip
    return path


def write_text_atomic(path: Path, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text)


def write_json_atomic(path: Path, data: Any) -> None:
    write_text_atomic(path, json.dumps(to_jsonable(data), indent=2) + "\n")


def overwrite_json_in_place(path: Path, data: Any) -> None:
    """Rewrite ``path`` over its own blocks: the last resort when the disk is full and a new
    file cannot be made (a record of about the same size fits in the blocks it had)."""
    text = (json.dumps(to_jsonable(data), separators=(",", ":")) + "\n").encode()
    with open(path, "r+b") as f:
        f.write(text)
        f.truncate()
        f.flush()
        os.fsync(f.fileno())


class JsonlWriter:
    """Appends one JSON object per line and flushes it, so a killed job loses at most one line."""

    def __init__(self, path: Path):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._file = open(self.path, "a", buffering=1)  # noqa: SIM115 - kept open for the run

    def write(self, record: dict[str, Any]) -> None:
        try:
            self._file.write(json.dumps(to_jsonable(record)) + "\n")
            self._file.flush()
        except OSError as exc:  # name the file: a full disk is otherwise a pathless error
            raise OSError(exc.errno, exc.strerror, str(self.path)) from None

    def close(self) -> None:
        if not self._file.closed:
            self._file.flush()
            os.fsync(self._file.fileno())
            self._file.close()


def read_json(path: Path) -> dict[str, Any]:
    with open(path) as f:
        return json.load(f)


def iter_metrics(run_dir: Path) -> Iterator[dict[str, Any]]:
    """The records of ``metrics.jsonl``; a corrupt line is skipped with a warning naming it."""
    path = Path(run_dir) / METRICS_FILE
    if not path.exists():
        return
    with open(path) as f:
        for lineno, line in enumerate(f, 1):
            line = line.strip()
            if not line:
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                warnings.warn(f"{path}:{lineno}: corrupt line skipped", stacklevel=2)
                continue
            if isinstance(record, dict):
                yield record
            else:
                warnings.warn(f"{path}:{lineno}: not a JSON object, skipped", stacklevel=2)


def truncate_metrics(run_dir: Path, step: int) -> list[dict[str, Any]]:
    """Keep the records of ``metrics.jsonl`` up to ``step`` (and no torn line); return the
    records dropped. The file is replaced atomically."""
    path = Path(run_dir) / METRICS_FILE
    if not path.exists():
        return []
    kept, dropped = [], []
    with open(path) as f:
        for line in f:
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                continue  # a line torn by the kill
            if isinstance(record, dict) and record.get("_step", -1) > step:
                dropped.append(record)
            elif isinstance(record, dict):
                kept.append(line if line.endswith("\n") else line + "\n")
    write_text_atomic(path, "".join(kept))
    return dropped


def read_metrics(run_dir: Path, keys: list[str] | None = None):
    """``metrics.jsonl`` as a pandas DataFrame (one row per log call, ``_step`` first).

    pandas' C JSON reader does the work; a file it rejects (a corrupt line from a killed job)
    is read line by line instead, skipping the bad lines with a warning naming each.
    """
    import pandas as pd

    path = Path(run_dir) / METRICS_FILE
    frame = None
    if keys is None and path.exists():
        try:
            frame = pd.read_json(path, lines=True, dtype=False)
        except (ValueError, TypeError):
            frame = None  # corrupt or non-object lines: the careful reader names them
    if frame is None:
        records = list(iter_metrics(run_dir))
        if keys is not None:
            records = [
                {k: r[k] for k in ("_step", *keys) if k in r}
                for r in records
                if any(k in r for k in keys)
            ]
        frame = pd.DataFrame.from_records(records)
    if "_step" in frame.columns:
        frame = frame[["_step", *[c for c in frame.columns if c != "_step"]]]
    return frame


def find_runs(root: Path) -> list[Path]:
    """Every run folder (a folder holding ``run.json``) below ``root``, oldest first."""
    root = Path(root)
    runs = [p.parent for p in root.rglob(RUN_FILE)]
    return sorted(runs, key=lambda p: (p.stat().st_mtime, str(p)))


# -- one writer per run folder, and liveness ---------------------------------------------------


class RunFolderInUse(Exception):
    """Another live process holds the run folder's lock."""


_held_locks: dict[Path, RunLock] = {}  # this process's locks, by resolved folder


class RunLock:
    """An exclusive ``flock`` on ``run_dir/run.lock``, held for a run's life.

    The kernel drops it when the process dies however it dies (kill -9 included), so a held
    lock means a live writer and a free lock under a "running" record means a dead one. The
    file keeps the holder's pid, host and start time for the message a second writer gets.
    ``flock`` works across hosts on NFS (Linux emulates it with NFS locks), as clusters need.
    """

    def __init__(self, run_dir: str | os.PathLike[str]):
        self.run_dir = Path(run_dir)
        self._fd: int | None = None

    @property
    def held(self) -> bool:
        return self._fd is not None

    def acquire(self, retries: int = 20) -> RunLock:
        """Take the lock or raise :class:`RunFolderInUse` naming the holder. A reader's probe
        holds it for microseconds, so a few short retries tell a probe from a writer."""
        key = self.run_dir.resolve()
        if key in _held_locks:  # this process already writes here (a callback took it first)
            return _held_locks[key]
        self.run_dir.mkdir(parents=True, exist_ok=True)
        path = self.run_dir / LOCK_FILE
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        for attempt in range(retries + 1):
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if attempt == retries:
                    os.close(fd)
                    raise RunFolderInUse(
                        f"{self.run_dir} is in use by {describe_holder(self.run_dir)}"
                    ) from None
                time.sleep(0.05)
        holder = f"pid {os.getpid()} on {socket.gethostname()} since {_now_iso()}\n"
        os.ftruncate(fd, 0)
        os.pwrite(fd, holder.encode(), 0)
        self._fd = fd
        _held_locks[key] = self
        return self

    def release(self) -> None:
        if self._fd is None:
            return
        _held_locks.pop(self.run_dir.resolve(), None)
        fd, self._fd = self._fd, None
        os.close(fd)  # closing the only descriptor drops the flock


def claim_run_folder(run_dir: str | os.PathLike[str], resuming: bool = False) -> RunLock:
    """Make ``run_dir`` this process's: refused while another process holds its lock and,
    unless ``resuming``, when it already holds another run's record (a new run there would mix
    its curves and metrics with the old ones). Nothing is written before both checks pass."""
    held = held_lock(run_dir)
    if held is not None:
        return held
    record = Path(run_dir) / RUN_FILE
    if not resuming and record.is_file():
        try:
            old = read_json(record)
            state = run_state(run_dir, old)
            what = f"run {old.get('run_id')} ({state})"
        except (OSError, ValueError, AttributeError):
            state, what = None, "another run's record"
        if state == "running":
            raise RunFolderInUse(f"{run_dir} is in use by {describe_holder(run_dir)}")
        raise RunFolderInUse(f"{run_dir} already holds {what}: a new run there would mix with "
                             "it; choose another folder")  # fmt: skip
    return RunLock(run_dir).acquire()


def held_lock(run_dir: str | os.PathLike[str]) -> RunLock | None:
    """This process's lock on ``run_dir``, if it holds one."""
    return _held_locks.get(Path(run_dir).resolve())


def release_all_locks() -> None:
    for lock in list(_held_locks.values()):
        lock.release()


def describe_holder(run_dir: Path) -> str:
    try:
        text = (Path(run_dir) / LOCK_FILE).read_text().strip()
    except OSError:
        text = ""
    return text or "another process"


def lock_is_held(run_dir: str | os.PathLike[str]) -> bool | None:
    """True while a live process holds ``run_dir``'s lock, False when none does, None when the
    folder has no lock file (records from before locks, or never started)."""
    path = Path(run_dir) / LOCK_FILE
    if held_lock(run_dir) is not None:
        return True
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:  # no lock file (or none readable): cannot tell
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        return False  # closing fd below drops the shared lock at once
    except BlockingIOError:
        return True
    except OSError as exc:  # a filesystem without locks: cannot tell
        if exc.errno in (errno.ENOLCK, errno.EOPNOTSUPP, errno.EINVAL):
            return None
        raise
    finally:
        os.close(fd)


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # someone else's live process
    return True


def run_state(run_dir: str | os.PathLike[str], record: dict[str, Any] | None = None) -> str:
    """The state of a run as it is now: run.json's state, except that a "running" record whose
    process is gone reads ``killed`` (its lock is free, or, for a record without a lock file,
    its pid is gone on this host). Raises OSError/ValueError when run.json cannot be read."""
    run_dir = Path(run_dir)
    if record is None:
        record = read_json(run_dir / RUN_FILE)
    state = str(record.get("state") or "no state")
    if state != "running":
        return state
    held = lock_is_held(run_dir)
    if held is False:
        return KILLED
    if held is None and record.get("host") == socket.gethostname():
        pid = record.get("pid")
        if isinstance(pid, int) and not pid_alive(pid):
            return KILLED
    return state


def killed_reason(record: dict[str, Any]) -> str:
    pid, host = record.get("pid"), record.get("host") or "an unknown host"
    return (f"the process (pid {pid} on {host}) ended without closing its run record "
            "(killed, out of memory, or its node was lost)")  # fmt: skip


def _now_iso() -> str:
    return dt.datetime.now(dt.UTC).astimezone().isoformat(timespec="seconds")
