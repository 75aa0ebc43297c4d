"""The Asterisk backend served in-process on a real socket, for tests that speak FastAGI
to it byte by byte: the production FastAgiServer, AsteriskBackend, AsyncDaemon's call
path and CallService over
the test's database (on PostgreSQL the event-loop path, PgCallStore), its log lines
rendered through the production scrubbing processor into `Daemon.log_text()`.

The daemon's event loop runs in a thread; tests talk to it with plain blocking sockets
(`Daemon.session`), so Hypothesis can drive it from an ordinary test function.
"""
from __future__ import annotations

import asyncio
import io
import logging
import socket
import threading
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from typing import Callable

import structlog

from types import SimpleNamespace

from callctl import daemon as daemon_module, logs, service as service_module
from callctl.asterisk import fastagi, server
from callctl.service import CallService
from callctl.store.callstore import ThreadedCallStore
from callctl.store.pgcalls import PgCallStore
from callctl.store.spool import CdrSpool
from tests import leaks

ACK = b"200 result=1\n"


def env_bytes(script: str, uniqueid: str | bytes, args=(), extra: dict | None = None) -> bytes:
    """An AGI environment as res_agi sends it (values as given, bytes allowed)."""
    lines = {"agi_network_script": script, "agi_request": f"agi://127.0.0.1/{script}",
             "agi_channel": "PJSIP/carrier-00000001", "agi_uniqueid": uniqueid, **(extra or {})}
    lines.update({f"agi_arg_{n}": arg for n, arg in enumerate(args, 1)})
    out = b""
    for key, value in lines.items():
        out += key.encode() + b": " + (value if isinstance(value, bytes) else value.encode()) + b"\n"
    return out + b"\n"


class Daemon:
    def __init__(self, port: int, spool: CdrSpool, buffer: io.StringIO):
        self.port = port
        self.spool = spool
        self._buffer = buffer

    def log_text(self) -> str:
        return self._buffer.getvalue()

    def session(self, data: bytes, answer: Callable[[bytes], bytes | None] = lambda line: ACK,
                timeout: float = 20.0, half_close: bool = False) -> list[bytes]:
        """Send `data` (an environment, or anything), then answer every command line with
        answer(line) (None: close the connection). Returns the command lines received.
        half_close: end the input after `data` (the daemon sees the peer's EOF)."""
        commands: list[bytes] = []
        with socket.create_connection(("127.0.0.1", self.port), timeout=timeout) as sock:
            try:
                sock.sendall(data)
                if half_close:
                    sock.shutdown(socket.SHUT_WR)
                pending = b""
                while True:
                    chunk = sock.recv(65536)
                    if not chunk:
                        break
                    pending += chunk
                    while b"\n" in pending:
                        line, pending = pending.split(b"\n", 1)
                        commands.append(line)
                        reply = answer(line)
                        if reply is None:
                            return commands
                        sock.sendall(reply)
            except (ConnectionResetError, BrokenPipeError):
                pass
        return commands


def set_variables(commands: list[bytes]) -> dict[str, str]:
    """The variables the daemon set (SET VARIABLE and EXEC MSet)."""
    found = {}
    for line in commands:
        text = line.decode(errors="replace")
        if text.startswith("SET VARIABLE "):
            name, _, value = text[13:].partition(" ")
            found[name] = value.strip('"')
        elif text.startswith("EXEC MSet "):
            for pair in text[10:].strip('"').split(","):
                name, _, value = pair.partition("=")
                found[name] = value
    return found


@contextmanager
def running(engine, pg_url: str | None, spool_dir, node: str = "lab"):
    """Serve the adapter for the test's database; yields a Daemon."""
    buffer = io.StringIO()
    logger = structlog.wrap_logger(
        structlog.PrintLogger(file=buffer),
        processors=[structlog.processors.add_log_level, structlog.processors.format_exc_info,
                    logs.scrub_numbers, structlog.processors.JSONRenderer()],
        wrapper_class=structlog.make_filtering_bound_logger(logging.DEBUG),
    )
    saved = (server.log, service_module.log, daemon_module.log)
    server.log = service_module.log = daemon_module.log = logger
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()

    def on_loop(coroutine):
        return asyncio.run_coroutine_threadsafe(coroutine, loop).result(60)

    executors = [ThreadPoolExecutor(2) for _ in range(3)]
    pg = None
    agi = None
    try:
        if engine.dialect.name == "postgresql":
            pg = on_loop(PgCallStore.open(pg_url, 2, 5.0))
        spool = CdrSpool(spool_dir)
        # The daemon's call store: asyncpg on PostgreSQL, the routing and CDR threads on SQLite.
        store = pg or ThreadedCallStore(engine, executors[0], executors[1])
        calls = CallService(engine, spool, node=node, store=store)
        daemon = daemon_module.AsyncDaemon(SimpleNamespace(db_timeout=9.0))  # bounds of 10 s
        daemon.service = calls
        daemon.route_executor, daemon.cdr_executor, daemon.spool_executor = executors
        agi = fastagi.FastAgiServer(server.AsteriskBackend(daemon).routes, "127.0.0.1", 0, log=logger)
        on_loop(agi.start())
        yield Daemon(agi.port, spool, buffer)
    finally:
        if agi is not None:
            on_loop(agi.close())
        if pg is not None:
            on_loop(pg.close())
        loop.call_soon_threadsafe(loop.stop)
        thread.join(10)
        loop.close()
        for executor in executors:
            executor.shutdown(wait=True)
        server.log, service_module.log, daemon_module.log = saved
        leaks.record("log", "agi-daemon", buffer.getvalue())
