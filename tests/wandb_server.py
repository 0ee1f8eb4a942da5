"""A W&B backend on 127.0.0.1 for the real wandb client (0.31): GraphQL and file_stream over HTTP.

``WandbServer`` runs in a thread of the test process on a free port; point the client at it
with ``WANDB_BASE_URL=server.url`` and any 40-character ``WANDB_API_KEY`` (the ``wandb_server``
fixture does both). Everything between the project's code and this server is the real client:
``wandb.Api`` sends its GraphQL through wandb-core, which retries, times out and pages on its
own, and ``wandb.init`` resumes, streams history and uploads files through wandb-core too.

The requests below were captured from wandb 0.31.0 (operation name or path, variables), not
written from memory:

- ``wandb.Api()``: ``Viewer`` (login check); ``api.runs(path, filters, per_page)``:
  ``GetDefaultEntity``, then ``Runs`` per page (``$entity, $project, $cursor, $perPage,
  $order="+created_at", $filters`` as a JSON string; lazy runs: no config, summary).
- ``run.summary`` / ``run.config`` of a listed run: ``Run`` (the full fragment, one request).
- ``run.scan_history(keys=None, page_size, min_step)``: ``RunHistoryKeys`` (``lastStep``),
  ``RunParquetHistory`` (``$liveKeys=["_step"]``: parquet file URLs and the steps not exported
  yet), then ``HistoryPage`` per page (``$minStep`` inclusive, ``$maxStep`` exclusive,
  ``$pageSize``). With ``keys``: ``SampledHistoryPage`` per page instead (``$spec`` JSON:
  keys, minStep, maxStep, samples); rows lacking any key are dropped.
- ``wandb.init(id=..., resume="must"|"allow", mode="online")``: ``Viewer``,
  ``RunResumeStatus`` (the run's bucket, or null when it does not exist; a run exists for
  the client when ``wandbConfig`` holds ``"t"``), ``UpsertBucket`` (create or update: name,
  group, job type, config), POST ``/files/{entity}/{project}/{run}/file_stream`` (history
  lines at an offset, the full summary, ``complete``/``exitcode`` at the end),
  ``CreateRunFiles`` + a PUT per file (requirements.txt, config.yaml, wandb-summary.json, ...).
- Besides: POST ``/sdk/otel/v1/metrics`` (the client's telemetry; answered 200).

What this server does not do: parquet history. Every row is served as live data (a run whose
history W&B has not exported to parquet yet), so wandb-core's parquet download and reader are
not exercised here; ``history(samples=)`` is not sampled (the client asks for whole pages).

Faults: ``server.fail("HistoryPage", 429, 503, "hang")`` makes the next three requests of that
operation answer 429 (with ``RateLimit-Reset: server.rate_limit_reset``), 503, and hang
(``server.hang_seconds``, then the connection is closed unanswered); ``"file_stream"`` names
the file_stream path. ``server.count(op)`` counts requests; ``server.requests`` keeps them
all in order (operation, variables, time).
"""

from __future__ import annotations

import base64
import gzip
import json
import re
import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

API_KEY = "local" + "0" * 35  # any 40 characters: the server does not check it
FILE_STREAM = "file_stream"


@dataclass
class Request:
    op: str
    variables: dict[str, Any]
    at: float


@dataclass
class ServedRun:
    """One run as the server holds it; ``rows`` each carry ``_step``."""

    entity: str
    project: str
    id: str
    name: str
    state: str = "finished"
    group: str | None = None
    job_type: str | None = None
    config: dict[str, Any] = field(default_factory=dict)  # plain values
    summary: dict[str, Any] = field(default_factory=dict)
    rows: list[dict[str, Any]] = field(default_factory=list)
    storage_id: str = ""
    created: int = 0
    exit_codes: list[int] = field(default_factory=list)
    files: dict[str, bytes] = field(default_factory=dict)
    started: bool = True  # wandbConfig holds "t": what makes resume="must" accept it
    wandb_config: dict[str, Any] = field(default_factory=dict)  # config's _wandb: axes, ...

    @property
    def last_step(self) -> int:
        return max((int(r["_step"]) for r in self.rows), default=-1)

    def step_metrics(self) -> dict[str, str | None]:
        """{metric: its x axis} as ``define_metric`` declared them (config ``_wandb.m``:
        ``"1"`` the name, ``"5"`` the 1-based index of its step metric in that list)."""
        defined = self.wandb_config.get("m") or []
        names = [m.get("1") for m in defined]
        return {m.get("1"): names[m["5"] - 1] if m.get("5") else None for m in defined}

    def append(self, values: dict[str, Any]) -> None:
        """A row logged after the run's last step (what training does)."""
        self.rows.append({"_step": self.last_step + 1, **values})
        self.summary.update({k: v for k, v in values.items() if not k.startswith("_")})


def _wrapped_config(config: dict[str, Any]) -> str:
    return json.dumps({k: {"value": v, "desc": None} for k, v in config.items()})


def _match(run: ServedRun, filters: dict[str, Any]) -> bool:
    """W&B's run filters (MongoDB style) on the fields these tests use."""
    for key, want in filters.items():
        if key == "$and":
            if not all(_match(run, f) for f in want):
                return False
            continue
        if key == "$or":
            if not any(_match(run, f) for f in want):
                return False
            continue
        have = _field(run, key)
        if isinstance(want, dict) and want and all(k.startswith("$") for k in want):
            for op, arg in want.items():
                if not _compare(op, have, arg):
                    return False
        elif have != want:
            return False
    return True


def _field(run: ServedRun, key: str) -> Any:
    top = {"state": run.state, "jobType": run.job_type, "group": run.group,
           "displayName": run.name, "name": run.id}  # fmt: skip
    if key in top:
        return top[key]
    head, _, rest = key.partition(".")
    source = {"config": run.config, "summary_metrics": run.summary}.get(head)
    if source is None:
        raise GraphQLError(f"filter on unknown field {key!r}")
    parts = rest.split(".")
    if parts[-1] == "value" and head == "config":
        parts = parts[:-1]
    value: Any = source
    for part in parts:
        value = value.get(part) if isinstance(value, dict) else None
    return value


def _compare(op: str, have: Any, arg: Any) -> bool:
    if op == "$eq":
        return have == arg
    if op == "$ne":
        return have != arg
    if op == "$in":
        return have in arg
    if op == "$nin":
        return have not in arg
    if op == "$exists":
        return (have is not None) == bool(arg)
    if op in ("$gt", "$gte", "$lt", "$lte"):
        if have is None:
            return False
        return {"$gt": have > arg, "$gte": have >= arg, "$lt": have < arg, "$lte": have <= arg}[op]
    raise GraphQLError(f"unknown filter operator {op}")


class GraphQLError(Exception):
    """Answered as HTTP 200 with a GraphQL ``errors`` list, as W&B does for a bad query."""


class WandbServer:
    """See the module docstring."""

    def __init__(self, entity: str = "team", project: str = "proj"):
        self.entity, self.project = entity, project
        self.runs: dict[str, ServedRun] = {}
        self.requests: list[Request] = []
        self.faults: dict[tuple[str, str | None], list[int | str]] = {}
        self.rate_limit_reset = 1  # seconds, on a 429
        self.hang_seconds = 3.0  # longer than the tests' client timeout
        self.lock = threading.RLock()
        self._stop = threading.Event()
        self._connections: set[socket.socket] = set()
        self._created = 0
        server = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args: Any) -> None:
                pass

            def setup(self) -> None:
                super().setup()
                with server.lock:
                    server._connections.add(self.connection)

            def finish(self) -> None:
                with server.lock:
                    server._connections.discard(self.connection)
                super().finish()

            def do_POST(self) -> None:  # noqa: N802 - http.server's name
                server._handle(self, "POST")

            def do_PUT(self) -> None:  # noqa: N802
                server._handle(self, "PUT")

            def do_GET(self) -> None:  # noqa: N802
                server._handle(self, "GET")

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, name="wandb-server",
                                       daemon=True)  # fmt: skip
        self.thread.start()

    # -- what tests call ---------------------------------------------------------------------

    def add(self, run_id: str, rows: list[dict[str, Any]], **kwargs: Any) -> ServedRun:
        """A run holding ``rows`` (log calls: each gets the next ``_step``)."""
        with self.lock:
            run = ServedRun(self.entity, self.project, run_id, kwargs.pop("name", run_id),
                            **kwargs)  # fmt: skip
            run.storage_id = base64.b64encode(f"Run:v1:{run_id}".encode()).decode()
            run.created = self._created = self._created + 1
            for row in rows:
                run.append(row)
            self.runs[run_id] = run
            return run

    def fail(self, op: str, *kinds: int | str, run: str | None = None) -> None:
        """The next requests of ``op`` (about run ``run`` only, when given) answer these
        statuses, or hang (``"hang"``)."""
        with self.lock:
            self.faults.setdefault((op, run), []).extend(kinds)

    def count(self, op: str, run: str | None = None) -> int:
        with self.lock:
            return sum(r.op == op and run in (None, _run_of(r)) for r in self.requests)

    def ops(self) -> list[str]:
        with self.lock:
            return [r.op for r in self.requests]

    def close(self) -> None:
        if self._stop.is_set():
            return
        self._stop.set()  # hung answers end now
        self.httpd.shutdown()
        self.httpd.server_close()
        with self.lock:  # and the kept-alive connections: the client finds nobody there
            for connection in self._connections:
                with suppress(OSError):
                    connection.shutdown(socket.SHUT_RDWR)

    # -- HTTP ---------------------------------------------------------------------------------

    def _handle(self, handler: BaseHTTPRequestHandler, method: str) -> None:
        length = int(handler.headers.get("Content-Length") or 0)
        body = handler.rfile.read(length) if length else b""
        if handler.headers.get("Content-Encoding") == "gzip":
            body = gzip.decompress(body)
        path = handler.path.split("?")[0]
        if method == "PUT" and path.startswith("/upload/"):
            _, _, run_id, name = path.split("/", 3)
            with self.lock:
                if run_id in self.runs:
                    self.runs[run_id].files[name] = body
            return self._send(handler, 200, b"")
        if method != "POST":
            return self._send(handler, 404, b"")
        if path.startswith("/sdk/otel/"):
            return self._send(handler, 200, b"{}")
        data = json.loads(body or b"{}")
        if path == "/graphql":
            op = data.get("operationName") or _operation_name(data.get("query", ""))
            variables = data.get("variables") or {}
        elif path.endswith("/file_stream"):
            op, variables = FILE_STREAM, {"path": path, **data}
        else:
            return self._send(handler, 404, b"")
        with self.lock:
            request = Request(op, variables, time.monotonic())
            self.requests.append(request)
            fault = None
            for key in ((op, _run_of(request)), (op, None)):
                if self.faults.get(key):
                    fault = self.faults[key].pop(0)
                    break
        if fault == "hang":
            self._stop.wait(self.hang_seconds)
            handler.close_connection = True
            return None
        if fault is not None:
            headers = {"RateLimit-Reset": str(self.rate_limit_reset)} if fault == 429 else {}
            error = json.dumps({"errors": [{"message": f"injected HTTP {fault}"}]}).encode()
            return self._send(handler, int(fault), error, headers)
        try:
            with self.lock:
                if op == FILE_STREAM:
                    answer: Any = self._file_stream(path, data)
                else:
                    answer = {"data": self._graphql(op, variables)}
        except GraphQLError as exc:
            answer = {"data": None, "errors": [{"message": str(exc)}]}
        return self._send(handler, 200, json.dumps(answer).encode())

    @staticmethod
    def _send(handler: BaseHTTPRequestHandler, status: int, body: bytes,
              headers: dict[str, str] | None = None) -> None:  # fmt: skip
        try:
            handler.send_response(status)
            for name, value in (headers or {}).items():
                handler.send_header(name, value)
            handler.send_header("Content-Type", "application/json")
            handler.send_header("Content-Length", str(len(body)))
            handler.end_headers()
            handler.wfile.write(body)
        except (BrokenPipeError, ConnectionResetError):
            pass  # the client gave up on this request

    # -- GraphQL --------------------------------------------------------------------------------

    def _graphql(self, op: str, v: dict[str, Any]) -> dict[str, Any]:
        if op in ("Viewer", "GetDefaultEntity"):
            return {"viewer": {"id": "VXNlcjox", "entity": self.entity, "username": "tester",
                               "email": "tester@example.com", "flags": "{}",
                               "teams": {"edges": []}}}  # fmt: skip
        if op == "ServerFeaturesQuery":
            return {"serverInfo": {"features": []}}
        if op == "Runs":
            return {"project": self._runs_page(v)}
        if op in ("Run", "RunHistoryKeys", "RunState"):
            run = self._run(v, "name")
            if run is None:
                return {"project": None if not self._project_ok(v) else {"run": None}}
            return {"project": {"run": self._run_node(run, full=True)}}
        if op == "RunParquetHistory":
            run = self._run(v, "runName")
            live = [{"_step": r["_step"]} for r in run.rows] if run else None
            return {"project": {"run": run and {"parquetHistory": {"parquetUrls": [],
                                                                    "liveData": live}}}}  # fmt: skip
        if op == "HistoryPage":
            run = self._run(v, "run")
            if run is None:
                return {"project": {"run": None}}
            rows = [r for r in self._sorted_rows(run) if v["minStep"] <= r["_step"] < v["maxStep"]]
            return {"project": {"run": {"history": [json.dumps(r) for r in rows]}}}
        if op == "SampledHistoryPage":
            run = self._run(v, "run")
            if run is None:
                return {"project": {"run": None}}
            spec = json.loads(v["spec"])
            keys = list(dict.fromkeys(spec["keys"]))
            rows = [{k: r[k] for k in keys} for r in self._sorted_rows(run)
                    if spec["minStep"] <= r["_step"] < spec["maxStep"] and all(k in r for k in keys)]  # fmt: skip
            return {"project": {"run": {"sampledHistory": [rows]}}}
        if op == "RunResumeStatus":
            return {"model": self._resume_status(v)}
        if op == "UpsertBucket":
            return {"upsertBucket": self._upsert(v)}
        if op == "CreateRunFiles":
            run = self.runs.get(v["run"])
            return {"createRunFiles": {
                "runID": run.storage_id if run else "", "uploadHeaders": [],
                "files": [{"name": name, "uploadUrl": f"{self.url}/upload/{v['run']}/{name}"}
                          for name in v["files"]]}}  # fmt: skip
        raise GraphQLError(f"this test server does not answer {op}")

    def _project_ok(self, v: dict[str, Any]) -> bool:
        return v.get("entity") in (None, self.entity) and v.get("project") == self.project

    def _run(self, v: dict[str, Any], key: str) -> ServedRun | None:
        return self.runs.get(v.get(key, "")) if self._project_ok(v) else None

    @staticmethod
    def _sorted_rows(run: ServedRun) -> list[dict[str, Any]]:
        return sorted(run.rows, key=lambda r: r["_step"])

    def _runs_page(self, v: dict[str, Any]) -> dict[str, Any] | None:
        if not self._project_ok(v):
            return None  # what W&B answers for a project that does not exist
        filters = json.loads(v.get("filters") or "null") or {}
        runs = sorted((r for r in self.runs.values() if _match(r, filters)),
                      key=lambda r: r.created, reverse=v.get("order") == "-created_at")  # fmt: skip
        start = int(v.get("cursor") or 0)
        page = runs[start : start + int(v.get("perPage") or 50)]
        end = start + len(page)
        return {"internalId": "UHJvamVjdDox", "runCount": len(runs), "readOnly": False,
                "runs": {"edges": [{"node": self._run_node(r, full=False), "cursor": str(start + i + 1)}
                                   for i, r in enumerate(page)],
                         "pageInfo": {"endCursor": str(end), "hasNextPage": end < len(runs)}}}  # fmt: skip

    def _run_node(self, run: ServedRun, full: bool) -> dict[str, Any]:
        node = {"id": run.storage_id, "name": run.id, "displayName": run.name, "state": run.state,
                "group": run.group, "jobType": run.job_type, "tags": [], "sweepName": None,
                "commit": None, "readOnly": False, "createdAt": "2026-01-01T00:00:00",
                "heartbeatAt": "2026-01-01T00:00:00", "description": None, "notes": None,
                "historyLineCount": len(run.rows), "projectId": "1",
                "user": {"name": "tester", "username": "tester"}}  # fmt: skip
        if full:
            node.update(config=_wrapped_config(run.config), summaryMetrics=json.dumps(run.summary),
                        systemMetrics="{}", historyKeys=self._history_keys(run))  # fmt: skip
        return node

    @staticmethod
    def _history_keys(run: ServedRun) -> dict[str, Any]:
        keys: dict[str, int] = {}
        for row in run.rows:
            for key in row:
                keys[key] = keys.get(key, 0) + 1
        return {"lastStep": run.last_step,
                "keys": {k: {"typeCounts": [{"type": "number", "count": n}]} for k, n in keys.items()}}  # fmt: skip

    def _resume_status(self, v: dict[str, Any]) -> dict[str, Any] | None:
        if not self._project_ok(v):
            return None
        run = self.runs.get(v["name"])
        bucket = None
        if run is not None:
            tail = [json.dumps(self._sorted_rows(run)[-1])] if run.rows else []
            bucket = {"id": run.storage_id, "name": run.id, "displayName": run.name,
                      "summaryMetrics": json.dumps(run.summary), "logLineCount": 0,
                      "historyLineCount": len(run.rows), "eventsLineCount": 0,
                      "historyTail": json.dumps(tail), "eventsTail": "[]",
                      "config": _wrapped_config(run.config), "tags": [], "notes": None,
                      "wandbConfig": json.dumps({"t": 1} if run.started else {})}  # fmt: skip
        return {
            "id": "UHJvamVjdDox",
            "name": self.project,
            "entity": {"id": "RW50aXR5OjE=", "name": self.entity},
            "bucket": bucket,
        }

    def _upsert(self, v: dict[str, Any]) -> dict[str, Any]:
        if v.get("entity") not in (None, self.entity) or v.get("project") not in (
            None,
            self.project,
        ):
            raise GraphQLError(f"no project {v.get('entity')}/{v.get('project')}")
        run = self.runs.get(v.get("name") or "")
        inserted = run is None
        if run is None:
            run = self.add(v["name"], [], state="running")
        if v.get("displayName"):
            run.name = v["displayName"]
        if v.get("groupName"):
            run.group = v["groupName"]
        if v.get("jobType"):
            run.job_type = v["jobType"]
        if v.get("config"):
            config = json.loads(v["config"])
            run.config.update({k: c.get("value") if isinstance(c, dict) else c
                               for k, c in config.items() if k != "_wandb"})  # fmt: skip
            run.wandb_config = (config.get("_wandb") or {}).get("value") or run.wandb_config
        run.state, run.started = "running", True
        return {"bucket": {"id": run.storage_id, "name": run.id, "displayName": run.name,
                           "description": None, "config": _wrapped_config(run.config),
                           "sweepName": None, "historyLineCount": len(run.rows),
                           "project": {"id": "UHJvamVjdDox", "name": self.project,
                                       "entity": {"id": "RW50aXR5OjE=", "name": self.entity}}},
                "inserted": inserted}  # fmt: skip

    def _file_stream(self, path: str, data: dict[str, Any]) -> dict[str, Any]:
        _, _, entity, project, run_id, _ = path.split("/")
        run = self.runs.get(run_id)
        if run is None or entity != self.entity or project != self.project:
            return {}
        files = data.get("files") or {}
        history = files.get("wandb-history.jsonl")
        if history:
            # lines land at their offset: a chunk sent again replaces, never duplicates
            for i, line in enumerate(history["content"]):
                row, at = json.loads(line), history["offset"] + i
                if at < len(run.rows):
                    run.rows[at] = row
                else:
                    run.rows.append(row)
        summary = files.get("wandb-summary.json")
        if summary and summary["content"]:
            run.summary = json.loads(summary["content"][-1])
        if data.get("complete"):
            code = int(data.get("exitcode") or 0)
            run.exit_codes.append(code)
            run.state = "finished" if code == 0 else "failed"
        return {"exitcode": None, "limits": {}}


def _run_of(request: Request) -> str | None:
    """The run a request is about (each operation names it its own way)."""
    v = request.variables
    if request.op == FILE_STREAM:
        return v["path"].split("/")[-2]
    return v.get("run") or v.get("runName") or v.get("name")


def _operation_name(query: str) -> str:
    match = re.search(r"\b(?:query|mutation)\s+(\w+)", query)
    return match.group(1) if match else "anonymous"


@contextmanager
def serving(monkeypatch: Any, folder: Path, timeout: float = 1.0) -> Iterator[WandbServer]:
    """A server, with the real client pointed at it for one test (pytest's ``monkeypatch``):
    its URL and a key, online mode (``WANDB_MODE=disabled make test`` stays offline
    elsewhere), a ``timeout``-second HTTP timeout (``WANDB_HTTP_TIMEOUT``), and ``folder`` as
    working directory (where wandb.init keeps its run folders)."""
    server = WandbServer()
    env = {"WANDB_BASE_URL": server.url, "WANDB_API_KEY": API_KEY, "WANDB_MODE": "online",
           "WANDB_HTTP_TIMEOUT": f"{timeout:g}", "WANDB_SILENT": "true",
           "WANDB_CONFIG_DIR": str(folder / "wandb-config"),
           "WANDB_CACHE_DIR": str(folder / "wandb-cache")}  # fmt: skip
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    monkeypatch.chdir(folder)
    try:
        yield server
    finally:
        server.close()
