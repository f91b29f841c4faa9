"""The agent's admin API: HTTP/1.1 over a root-only Unix socket, JSON bodies, NDJSON streams.

Routes (all GET): `/v1/status`, `/v1/workloads`, `/v1/services`, `/v1/policies`, `/v1/certs`,
`/v1/connections`, `/v1/flows` (`?pod=&namespace=&verdict=&since=&last=`, `&follow=1` streams
newline-delimited JSON with chunked encoding until the client hangs up), `/v1/policy/explain`
(`?from=&to=&port=`), `/metrics` (Prometheus text, generated on a thread) and `/healthz`. The
socket's directory is 0700 and the socket 0600: the file mode is the authentication, as for the
Docker and containerd sockets. The data comes from an `AdminSources` the agent implements and from
the node's `FlowRing`. With proxy workers, the main process's server also asks the workers
(`WorkerPeers`): `/v1/connections` lists theirs too and `/v1/status` has a `workers` list; its flow
ring is fed by `WorkerFlowFeed` and its metrics are the merged ones (agent/telemetry.py).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import stat
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs

import httptools
from prometheus_client import generate_latest
from prometheus_client.registry import Collector

from agent.admin import views
from agent.admin.explain import ExplainError, explain
from agent.admin.flows import Dropped, FlowFilter, FlowRecord, FlowRing, Verdict
from agent.admin.paths import answers
from agent.admin.peers import WorkerPeers
from agent.admin.sources import AdminSources

log = logging.getLogger("nodemesh.agent.admin")

MAX_REQUEST_BYTES = 16 * 1024
REQUEST_TIMEOUT = 10.0
CLOSE_TIMEOUT = 1.0  # seconds a connection's last answer gets to reach the client once served
MAX_INT_DIGITS = 9  # `last`, `port`: more is a typo or an attack, not a request
STREAM_BATCH = 512  # records per chunk when a follower is behind
FOLLOW_COALESCE = 0.02  # seconds a follower waits after a record for more to send with it

_REASONS = {200: "OK", 400: "Bad Request", 404: "Not Found", 405: "Method Not Allowed",
            413: "Content Too Large", 500: "Internal Server Error"}


class AdminError(Exception):
    """The admin socket cannot be set up (path in use, bad permissions); says which path and why."""


class HttpError(Exception):
    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


@dataclass(slots=True)
class _Request:
    method: str = ""
    url: bytes = b""
    headers: dict[str, str] = field(default_factory=dict)
    keep_alive: bool = True


class _RequestCollector:
    """httptools callbacks: gathers complete requests (bodies are ignored: every route is a GET)."""

    def __init__(self) -> None:
        self.current = _Request()
        self.done: list[_Request] = []
        self.parser = httptools.HttpRequestParser(self)

    def on_message_begin(self) -> None:
        self.current = _Request()

    def on_url(self, url: bytes) -> None:
        self.current.url += url

    def on_header(self, name: bytes, value: bytes) -> None:
        self.current.headers[name.decode("latin-1").lower()] = value.decode("latin-1")

    def on_message_complete(self) -> None:
        self.current.method = self.parser.get_method().decode("ascii", "replace")
        self.current.keep_alive = bool(self.parser.should_keep_alive())
        self.done.append(self.current)


def _head(status: int, content_type: str, length: int | None, keep_alive: bool) -> bytes:
    lines = [f"HTTP/1.1 {status} {_REASONS.get(status, 'Unknown')}", f"Content-Type: {content_type}"]
    lines.append(f"Content-Length: {length}" if length is not None else "Transfer-Encoding: chunked")
    lines.append("Connection: keep-alive" if keep_alive else "Connection: close")
    return ("\r\n".join(lines) + "\r\n\r\n").encode("ascii")


def _chunk(data: bytes) -> bytes:
    return b"%x\r\n%s\r\n" % (len(data), data)


def _json_bytes(doc: Any) -> bytes:
    return json.dumps(doc, separators=(",", ":"), default=str).encode()


def _one(query: dict[str, list[str]], key: str) -> str:
    values = query.get(key)
    return values[-1] if values else ""


def _int_param(query: dict[str, list[str]], key: str) -> int | None:
    raw = _one(query, key)
    if not raw:
        return None
    # ASCII digits only: str.isdigit() also takes '²', which int() refuses; and a bounded length,
    # as int() refuses more than 4300 digits (a 500, not the client's 400, either way)
    if not (raw.isascii() and raw.isdigit() and len(raw) <= MAX_INT_DIGITS):
        raise HttpError(400, f"{key} must be a non-negative integer of at most {MAX_INT_DIGITS} digits, "
                             f"got {raw[:20]!r}")
    return int(raw)


def flow_filter(query: dict[str, list[str]]) -> FlowFilter:
    verdict_raw = _one(query, "verdict")
    try:
        verdict = Verdict(verdict_raw.lower()) if verdict_raw else None
    except ValueError:
        raise HttpError(400, f"verdict must be allowed or denied, got {verdict_raw!r}") from None
    since_raw = _one(query, "since")
    try:
        since = float(since_raw) if since_raw else None
    except ValueError:
        raise HttpError(400, f"since must be a Unix time, got {since_raw!r}") from None
    pod, namespace = _one(query, "pod"), _one(query, "namespace")
    return FlowFilter(pod=pod, namespace=namespace, verdict=verdict, since=since)


def prepare_socket_path(path: Path) -> None:
    """Create the socket's directory 0700 (owned by us), and clear a stale socket left by a crash.

    A live socket (another agent answers) is an error, never stolen.
    """
    directory = path.parent
    directory.mkdir(mode=0o700, parents=True, exist_ok=True)
    st = os.lstat(directory)
    if not stat.S_ISDIR(st.st_mode):
        raise AdminError(f"{directory} is not a directory")
    if st.st_uid != os.geteuid():
        raise AdminError(f"{directory} is owned by uid {st.st_uid}, not by this agent (uid {os.geteuid()})")
    os.chmod(directory, 0o700)
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(st.st_mode):
        raise AdminError(f"{path} exists and is not a socket; remove it")
    try:
        live = answers(path)
    except OSError as exc:
        raise AdminError(f"cannot probe {path}: {exc}") from exc
    if live:
        raise AdminError(f"{path} is in use: another agent for this node is running")
    log.info("event=admin_stale_socket_removed path=%s", path)
    path.unlink(missing_ok=True)


class AdminServer:
    """Serves `sources` and `ring` on `socket_path` until `close()`.

    `worker_index` is this process's proxy worker index (0: the main process), given in each of its
    connections. The main process passes `peers` (its workers' admin APIs, merged into
    `/v1/connections` and `/v1/status`) and `metrics` (the merged registry `/metrics` serves instead
    of `sources.metrics_text()`).
    """

    def __init__(
        self,
        sources: AdminSources,
        ring: FlowRing,
        socket_path: Path,
        *,
        clock: Callable[[], float] = time.time,
        worker_index: int = 0,
        peers: WorkerPeers | None = None,
        metrics: Collector | None = None,
    ) -> None:
        self.sources = sources
        self.ring = ring
        self.path = socket_path
        self._clock = clock
        self.worker_index = worker_index
        self.peers = peers
        self.metrics = metrics
        self._server: asyncio.AbstractServer | None = None
        self._handlers: set[asyncio.Task[None]] = set()
        self.requests = 0
        self.errors = 0  # requests answered 500

    async def start(self) -> None:
        prepare_socket_path(self.path)
        self._server = await asyncio.start_unix_server(self._handle, path=str(self.path))
        # The directory is already 0700, so there is no window in which anyone else can connect.
        os.chmod(self.path, 0o600)
        log.info("event=admin_listening path=%s", self.path)

    async def close(self) -> None:
        if self._server is None:
            return
        self._server.close()
        for task in list(self._handlers):
            task.cancel()
        if self._handlers:
            await asyncio.gather(*self._handlers, return_exceptions=True)
        await self._server.wait_closed()
        self._server = None
        with contextlib.suppress(FileNotFoundError):
            self.path.unlink()
        log.info("event=admin_closed path=%s", self.path)

    async def __aenter__(self) -> AdminServer:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        if task is not None:
            self._handlers.add(task)
        try:
            await self._serve_connection(reader, writer)
            writer.close()
            async with asyncio.timeout(CLOSE_TIMEOUT):
                await writer.wait_closed()  # the answer's last bytes reach a client that reads
        except (ConnectionError, asyncio.IncompleteReadError, TimeoutError):
            pass  # the client went away, or does not read: nothing more to send
        except asyncio.CancelledError:
            pass  # close()
        finally:
            # Unsent bytes are dropped (a no-op after a clean close). Closing gracefully would wait
            # for a client that never reads (`nodemesh flows -f | less`, paused) to read them: this
            # task, close() and the agent's SIGTERM path with it, for as long as it does not.
            writer.transport.abort()
            with contextlib.suppress(Exception):
                await writer.wait_closed()  # after abort(): at the loop's next iteration
            if task is not None:
                self._handlers.discard(task)

    async def _serve_connection(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        collector = _RequestCollector()
        received = 0
        while True:
            while not collector.done:
                data = await asyncio.wait_for(reader.read(65536), REQUEST_TIMEOUT)
                if not data:
                    return
                received += len(data)
                if received > MAX_REQUEST_BYTES:
                    await self._send_error(writer, HttpError(413, "request too large"), keep_alive=False)
                    return
                try:
                    collector.parser.feed_data(data)
                except httptools.HttpParserError as exc:
                    await self._send_error(writer, HttpError(400, f"bad request: {exc}"), keep_alive=False)
                    return
                except httptools.HttpParserUpgrade:  # not an HttpParserError: Upgrade or CONNECT
                    await self._send_error(writer, HttpError(400, "bad request: the admin API does not "
                                                             "switch protocols or CONNECT"), keep_alive=False)
                    return
            request = collector.done.pop(0)
            received = 0
            self.requests += 1
            keep_alive = await self._dispatch(request, reader, writer)
            if not keep_alive:
                return

    async def _send_error(self, writer: asyncio.StreamWriter, err: HttpError, keep_alive: bool) -> None:
        body = _json_bytes({"error": err.message})
        writer.write(_head(err.status, "application/json", len(body), keep_alive) + body)
        await writer.drain()

    async def _dispatch(
        self, req: _Request, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> bool:
        url = httptools.parse_url(req.url)
        path = url.path.decode("utf-8", "replace")
        query = parse_qs((url.query or b"").decode("utf-8", "replace"))
        try:
            if req.method != "GET":
                raise HttpError(405, f"{req.method} not allowed: the admin API is read-only")
            if path == "/v1/flows" and _one(query, "follow") in ("1", "true"):
                await self._follow(query, reader, writer)
                return False
            content_type, body = await self._route(path, query)
        except HttpError as err:
            await self._send_error(writer, err, req.keep_alive)
            return req.keep_alive
        except Exception as exc:  # a bug in a source: answer 500, log it, count it, keep serving
            self.errors += 1
            log.exception("event=admin_request_failed path=%s error=%r", path, str(exc))
            await self._send_error(writer, HttpError(500, f"internal error: {exc}"), req.keep_alive)
            return req.keep_alive
        writer.write(_head(200, content_type, len(body), req.keep_alive) + body)
        await writer.drain()
        return req.keep_alive

    async def _route(self, path: str, query: dict[str, list[str]]) -> tuple[str, bytes]:
        src = self.sources
        doc: Any
        if path == "/metrics":
            # a collection reads the workers' /metrics (blocking, up to a timeout each): never on the loop
            return "text/plain; version=0.0.4; charset=utf-8", await asyncio.to_thread(self._metrics_text)
        if path == "/v1/connections":
            return "application/json", _json_bytes(await self._connections())
        if path == "/v1/certs":
            return "application/json", _json_bytes(await self._certs())
        if path == "/v1/status":
            workers = await self.peers.proxy_counts() if self.peers is not None else []
            now = self._clock()
            return "application/json", _json_bytes(
                views.status_dict(src.status(), src.certs(), self.ring, now, workers)
            )
        now = self._clock()
        if path == "/healthz":
            doc = {"ok": True}
        elif path == "/v1/workloads":
            doc = {"workloads": [views.workload_dict(w) for w in
                                 sorted(src.workloads(), key=lambda w: (w.namespace, w.name))]}
        elif path == "/v1/services":
            doc = {"services": [views.service_dict(s) for s in
                                sorted(src.services(), key=lambda s: (s.namespace, s.name))]}
        elif path == "/v1/policies":
            doc = {"policies": views.policies_list(src.policies(), src.mesh().root_namespace)}
        elif path == "/v1/flows":
            records = self.ring.snapshot(flow_filter(query), _int_param(query, "last"))
            doc = {"flows": [r.to_dict() for r in records], "ring": self.ring.stats()}
        elif path == "/v1/policy/explain":
            doc = self._explain(query)
        else:
            raise HttpError(404, f"no such endpoint {path}")
        return "application/json", _json_bytes(doc)

    def _metrics_text(self) -> bytes:
        if self.metrics is not None:
            return generate_latest(self.metrics)
        return self.sources.metrics_text().encode()

    async def _connections(self) -> dict[str, Any]:
        """This process's connections and, in the main process, the up workers' (oldest first)."""
        theirs, unreachable = await self.peers.connections() if self.peers is not None else ([], [])
        rows = views.connections_list(self.sources, self._clock(), self.worker_index) + theirs
        rows.sort(key=lambda row: row["opened_at"])
        return {"connections": rows, "workers_unreachable": unreachable}

    async def _certs(self) -> dict[str, Any]:
        """This process's certificates and, in the main process, the up workers' (by identity)."""
        theirs, unreachable = await self.peers.certs() if self.peers is not None else ([], [])
        now = self._clock()
        own = [{**views.cert_dict(c, now), "worker": self.worker_index} for c in self.sources.certs()]
        rows = own + theirs
        rows.sort(key=lambda row: (row["identity"], row["worker"]))
        return {"certs": rows, "workers_unreachable": unreachable}

    def _explain(self, query: dict[str, list[str]]) -> dict[str, Any]:
        from_pod, to = _one(query, "from"), _one(query, "to")
        if not from_pod or not to:
            raise HttpError(400, "from and to are required")
        src = self.sources
        try:
            result = explain(
                src.workloads(), src.services(), src.policies(), src.mesh(), from_pod, to,
                _int_param(query, "port"),
            )
        except ExplainError as exc:
            raise HttpError(404, str(exc)) from exc
        return result.to_dict()

    async def _follow(
        self, query: dict[str, list[str]], reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        flt = flow_filter(query)
        last = _int_param(query, "last")
        # Subscribe, then take the history, with no await in between: no gap, no duplicate.
        with self.ring.subscribe(flt) as sub:
            history = self.ring.snapshot(flt, last)
            writer.write(_head(200, "application/x-ndjson", None, keep_alive=False))
            # `ring_id` and the ring's `added` count let a reconnecting follower skip what it has seen
            lines = [_json_bytes({"kind": "start", "ring": self.ring.stats(), "ring_id": self.ring.id})]
            lines += (_json_bytes({"kind": "flow", "flow": r.to_dict()}) for r in history)
            writer.write(_chunk(b"\n".join(lines) + b"\n"))
            await writer.drain()
            hangup = asyncio.ensure_future(reader.read(1))  # EOF (or anything) ends the stream
            nxt: asyncio.Future[FlowRecord | Dropped] | None = None
            try:
                while True:
                    nxt = asyncio.ensure_future(sub.next())
                    done, _ = await asyncio.wait({nxt, hangup}, return_when=asyncio.FIRST_COMPLETED)
                    if hangup in done:
                        nxt.cancel()
                        break
                    batch = [nxt.result()]
                    # let a burst gather: one chunk, one wake-up per FOLLOW_COALESCE instead of per record
                    await asyncio.sleep(FOLLOW_COALESCE)
                    while len(batch) < STREAM_BATCH:
                        item = sub.get_nowait()
                        if item is None:
                            break
                        batch.append(item)
                    writer.write(_chunk(b"".join(_stream_line(i) for i in batch)))
                    await writer.drain()
            finally:
                hangup.cancel()
                if nxt is not None:
                    nxt.cancel()
        with contextlib.suppress(ConnectionError):
            writer.write(b"0\r\n\r\n")
            await writer.drain()


def _stream_line(item: FlowRecord | Dropped) -> bytes:
    if isinstance(item, Dropped):
        return _json_bytes({"kind": "dropped", "count": item.count, "total": item.total}) + b"\n"
    return _json_bytes({"kind": "flow", "flow": item.to_dict()}) + b"\n"
