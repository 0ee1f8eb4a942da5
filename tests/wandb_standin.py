"""A stand-in for the W&B server, with the public API's method signatures (wandb 0.31).

``StandInServer`` holds runs; ``server.api()`` is what ``wandb.Api()`` returns and
``server.init`` is what ``wandb.init`` is. Rows get ``_step`` the way W&B assigns it (one more
than the run's last step), so resumed writes land after the run's own history. Failures can be
queued per run (``run.fail_scans = [429, 200]``) to test retries.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any


class Response:
    def __init__(self, status_code: int, headers: dict[str, str] | None = None):
        self.status_code, self.headers = status_code, headers or {}


class HTTPError(Exception):
    """Like requests.HTTPError: carries the response."""

    def __init__(self, status_code: int, headers: dict[str, str] | None = None):
        super().__init__(f"{status_code} Server Error")
        self.response = Response(status_code, headers)


class CommError(Exception):
    """Like wandb.errors.CommError: wraps the HTTP error in ``.exc``."""

    def __init__(self, msg: str, exc: Exception):
        super().__init__(msg)
        self.exc = exc


class Summary(dict):
    pass


@dataclass
class StandInRun:
    entity: str
    project: str
    id: str
    name: str
    state: str = "finished"
    group: str | None = None
    job_type: str | None = None
    config: dict[str, Any] = field(default_factory=dict)
    rows: list[dict[str, Any]] = field(default_factory=list)
    summary: Summary = field(default_factory=Summary)
    fail_scans: list[int] = field(default_factory=list)  # HTTP statuses raised, one per scan
    scans: int = 0
    defined: dict[str, str | None] = field(default_factory=dict)
    exit_codes: list[int] = field(default_factory=list)

    @property
    def path(self) -> list[str]:
        return [self.entity, self.project, self.id]

    @property
    def lastHistoryStep(self) -> int:  # noqa: N802 - the public API's name
        return self.rows[-1]["_step"] if self.rows else -1

    def append(self, values: dict[str, Any]) -> None:
        self.rows.append({"_step": self.lastHistoryStep + 1, **values})
        self.summary.update(values)

    def scan_history(
        self,
        keys: list[str] | None = None,
        page_size: int = 1000,
        min_step: int = 0,
        max_step: int | None = None,
        use_cache: bool = True,
    ) -> Iterator[dict[str, Any]]:
        self.scans += 1
        if self.fail_scans:
            status = self.fail_scans.pop(0)
            if status != 200:
                raise CommError("rate limited", HTTPError(status, {"RateLimit-Reset": "3"}))
        for row in list(self.rows):
            if row["_step"] < min_step or (max_step is not None and row["_step"] >= max_step):
                continue
            if keys is not None:
                if not all(k in row for k in keys):
                    continue  # what W&B does: rows lacking any key are dropped
                row = {k: row[k] for k in ("_step", *keys)}
            yield dict(row)

    def history(self, *args: Any, **kwargs: Any) -> Any:
        raise AssertionError("history() is sampled: the uploader must use scan_history()")


class StandInApi:
    def __init__(self, server: StandInServer):
        self.server = server

    def runs(
        self,
        path: str | None = None,
        filters: dict[str, Any] | None = None,
        order: str = "+created_at",
        per_page: int = 50,
        include_sweeps: bool = False,
        lazy: bool = True,
    ) -> list[StandInRun]:
        self.server.listings += 1
        if self.server.fail_listings:
            raise CommError("listing failed", HTTPError(self.server.fail_listings.pop(0)))
        out = []
        for run in self.server.runs.values():
            if f"{run.entity}/{run.project}" != path:
                continue
            fields = {"state": run.state, "jobType": run.job_type, "group": run.group}
            if all(fields.get(k, run.config.get(k)) == v for k, v in (filters or {}).items()):
                out.append(run)
        return out

    def run(self, path: str = "") -> StandInRun:
        run_id = path.rsplit("/", 1)[-1]
        if run_id not in self.server.runs:
            raise ValueError(f"Could not find run {path}")
        return self.server.runs[run_id]


class Writer:
    """What ``wandb.init`` returns: writes rows into the server's run."""

    def __init__(self, server: StandInServer, run: StandInRun):
        self.server, self.run = server, run
        self.summary = run.summary

    def define_metric(self, name: str, step_metric: str | None = None, **kwargs: Any) -> None:
        self.run.defined[name] = step_metric

    def log(self, values: dict[str, Any]) -> None:
        if self.server.fail_logs_after is not None:
            if self.server.fail_logs_after <= 0:
                raise ConnectionError("connection dropped")
            self.server.fail_logs_after -= 1
        self.run.append(values)

    def finish(self, exit_code: int | None = None, quiet: bool | None = None) -> None:
        self.run.exit_codes.append(exit_code or 0)
        self.run.state = "finished" if not exit_code else "failed"
        self.server.open_writers.discard(self.run.id)


class StandInServer:
    def __init__(self, entity: str = "team", project: str = "proj"):
        self.entity, self.project = entity, project
        self.runs: dict[str, StandInRun] = {}
        self.inits: list[dict[str, Any]] = []
        self.listings = 0
        self.fail_listings: list[int] = []
        self.fail_logs_after: int | None = None
        self.open_writers: set[str] = set()

    def add(self, run_id: str, rows: list[dict[str, Any]], **kwargs: Any) -> StandInRun:
        run = StandInRun(self.entity, self.project, run_id, kwargs.pop("name", run_id), **kwargs)
        for row in rows:
            run.append(row)
        self.runs[run_id] = run
        return run

    def api(self) -> StandInApi:
        return StandInApi(self)

    def init(self, **kwargs: Any) -> Writer:
        self.inits.append(kwargs)
        run_id, resume = kwargs["id"], kwargs.get("resume")
        if run_id in self.open_writers:
            raise AssertionError(f"two processes would write run {run_id}")
        if run_id in self.runs:
            run = self.runs[run_id]
            if run.state == "running" and run_id not in self.open_writers:
                raise AssertionError(f"resumed run {run_id} while its own process writes it")
            run.state = "running"
        elif resume == "must":
            raise ValueError(f"resume='must' but run {run_id} does not exist")
        else:
            run = self.add(
                run_id,
                [],
                name=kwargs.get("name") or run_id,
                group=kwargs.get("group"),
                job_type=kwargs.get("job_type"),
                config=dict(kwargs.get("config") or {}),
                state="running",
            )
        self.open_writers.add(run_id)
        return Writer(self, run)
