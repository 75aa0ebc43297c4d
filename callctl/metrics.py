"""Prometheus metrics and the health check, on their own listen address.

`metrics.listen` (default 127.0.0.1:9464, env CALLCTL_METRICS_LISTEN) serves:
- GET /metrics: the Prometheus text format (prometheus-client);
- GET /healthz: 200 when the process is ready (its database answers and, for the
  daemon, its CDR spool is writable), else 503; a small JSON body says which part failed.

Metric names and labels carry no numbers: tenants by id, reasons by name.
The listener is a few lines of asyncio (the daemon is one event loop; a thread of
prometheus-client's own server could not run the async health check).
"""
from __future__ import annotations

import asyncio
import json
import threading
from enum import StrEnum
from typing import Awaitable, Callable

import structlog
from prometheus_client import CONTENT_TYPE_LATEST, REGISTRY, Counter, Gauge, Histogram, generate_latest

log = structlog.get_logger("callctl.metrics")


class Protocol(StrEnum):
    AGI = "agi"
    ESL = "esl"


class CdrOutcome(StrEnum):
    WRITTEN = "written"
    DUPLICATE = "duplicate"
    SPOOLED = "spooled"
    LOST = "lost"  # neither the database nor the spool took it (the PBX keeps its copy)


# Decisions: outcome is the action (bridge, reject, collect_extension); reason is the
# reject reason, "" otherwise.
DECISIONS = Counter("callctl_decisions", "Routing decisions by outcome and reason", ["outcome", "reason"])
DECISION_SECONDS = Histogram(
    "callctl_decision_seconds", "Time from a routing request to its decision (database read included)",
    buckets=(0.0005, 0.001, 0.002, 0.003, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0))
SESSIONS = Counter("callctl_sessions", "PBX sessions accepted (FastAGI connections, ESL sockets)", ["protocol"])
SESSIONS_OPEN = Gauge("callctl_sessions_open", "PBX sessions being served now", ["protocol"])
CDRS = Counter("callctl_cdrs", "CDRs of finished calls by what became of them", ["outcome"])
CDR_BATCH_ROWS = Histogram(
    "callctl_cdr_batch_rows", "CDRs written together in one statement and one commit (group commit)",
    buckets=(1, 2, 3, 5, 10, 20, 50, 100))
SPOOL_DEPTH = Gauge("callctl_spool_depth", "CDRs waiting in the local spool for the database")
SPOOL_REPLAYED = Counter("callctl_spool_replayed", "Spooled CDRs replayed into the database")
DB_ERRORS = Counter("callctl_db_errors", "Database calls that failed (down, unreachable, too slow)", ["path"])
DB_RECONNECTS = Counter("callctl_db_reconnects", "Call-path database connections replaced after a lost one")
AMI_CONNECTED = Gauge("callctl_ami_connected", "1 while the AMI link to Asterisk is logged in and answers pings")
AMI_RECONNECTS = Counter("callctl_ami_reconnects", "AMI connections made again after a loss")
CALLS_CUT = Counter("callctl_calls_cut", "Live calls hung up because a block or suspension was placed")
OUTBOX_DEPTH = Gauge("callctl_webhook_outbox_depth", "Webhook deliveries not yet delivered (API process)")
RELOADS = Counter("callctl_reloads", "SIGHUP reloads of the configuration", ["result"])

for outcome in CdrOutcome:
    CDRS.labels(outcome.value)
for path in ("route", "cdr", "replay", "health"):
    DB_ERRORS.labels(path)

HealthCheck = Callable[[], Awaitable[dict[str, str]]]  # part -> "ok" or what is wrong


def count_decision(action: str, reason: str | None, seconds: float) -> None:
    DECISIONS.labels(action, reason or "").inc()
    DECISION_SECONDS.observe(seconds)


class MetricsServer:
    """GET /metrics and GET /healthz on one address, answered on the running loop."""

    def __init__(self, host: str, port: int, health: HealthCheck, health_timeout: float = 3.0):
        self.host, self.port = host, port
        self.health = health
        self.health_timeout = health_timeout
        self._server: asyncio.base_events.Server | None = None

    async def start(self) -> None:
        from callctl.config import ConfigError

        try:
            self._server = await asyncio.start_server(self._handle, self.host, self.port)
        except OSError as exc:  # a second daemon on the box with the same address, most often
            raise ConfigError(f"metrics listen address {self.host}:{self.port}: {exc.strerror or exc} (each "
                              "daemon and API process on a box needs its own metrics.listen / "
                              "api.metrics_listen)") from None
        self.port = self._server.sockets[0].getsockname()[1]

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
            self._server = None

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            async with asyncio.timeout(5):
                request = await reader.readline()
                while (await reader.readline()).strip():  # headers: not needed
                    pass
            method, _, rest = request.decode("latin-1").partition(" ")
            path = rest.split(" ", 1)[0].split("?", 1)[0]
            if method not in ("GET", "HEAD"):
                status, ctype, body = 405, "text/plain", b"GET only\n"
            elif path == "/metrics":
                status, ctype, body = 200, CONTENT_TYPE_LATEST, generate_latest(REGISTRY)
            elif path == "/healthz":
                parts = await self.check()
                ready = all(value == "ok" for value in parts.values())
                status, ctype = (200 if ready else 503), "application/json"
                body = json.dumps({"status": "ready" if ready else "not ready", **parts}).encode() + b"\n"
            else:
                status, ctype, body = 404, "text/plain", b"/metrics or /healthz\n"
            head = (f"HTTP/1.1 {status} {_REASON[status]}\r\nContent-Type: {ctype}\r\n"
                    f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n").encode()
            writer.write(head + (b"" if method == "HEAD" else body))
            await writer.drain()
        except (TimeoutError, ConnectionError, UnicodeError):
            pass
        finally:
            writer.close()

    async def check(self) -> dict[str, str]:
        try:
            async with asyncio.timeout(self.health_timeout):
                return await self.health()
        except TimeoutError:
            return {"database": "no answer within the health check's time"}


_REASON = {200: "OK", 404: "Not Found", 405: "Method Not Allowed", 503: "Service Unavailable"}


def serve_in_thread(host: str, port: int, health: HealthCheck) -> threading.Thread:
    """The same listener for a process whose main thread is not an asyncio loop of
    ours (the HTTP API under uvicorn): its own loop in a daemon thread."""
    started = threading.Event()
    failure: list[BaseException] = []

    async def main():
        server = MetricsServer(host, port, health)
        try:
            await server.start()
        except OSError as exc:
            failure.append(exc)
            started.set()
            return
        started.set()
        await asyncio.Event().wait()  # runs until the process exits

    thread = threading.Thread(target=asyncio.run, args=(main(),), name="callctl-metrics", daemon=True)
    thread.start()
    started.wait(10)
    if failure:
        raise failure[0]
    return thread
