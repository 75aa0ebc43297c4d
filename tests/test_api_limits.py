"""The API refuses what it should not read: a request body is read only after its token
checks out, never beyond api.max_body_bytes (413), and never slower than
api.body_timeout allows (408). A real `callctl serve api` (uvicorn) over real sockets
(issue #15, item 9)."""
from __future__ import annotations

import json
import select
import socket
import time
from pathlib import Path

import pytest

from callctl.store import tenants
from callctl.store.db import make_engine, upgrade
from callctl.store.tokens import create_token
from lab.harness import ApiServer
from tests import realnumbers

HOTLINE = realnumbers.tenant_line("+861058000000")


@pytest.fixture(scope="module")
def api(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("limits")
    url = f"sqlite:///{workdir}/callctl.db"
    engine = make_engine(url)
    upgrade(engine)
    tenants.add_tenant(engine, "acme", HOTLINE)
    token = create_token(engine, tenant_name="acme")["token"]
    engine.dispose()
    with ApiServer(url, workdir, extra_env={"CALLCTL_API_BODY_TIMEOUT": "1"}) as server:
        yield server, token


def rss_kb(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise AssertionError("no VmRSS")


def head(port: int, length: int | None, token: str | None = None, chunked: bool = False,
         keep_alive: bool = True) -> socket.socket:
    """A request's head; the client asks to keep the connection, so a close is the server's doing."""
    sock = socket.create_connection(("127.0.0.1", port), timeout=30)
    lines = ["POST /v1/bindings HTTP/1.1", "Host: callctl", "Content-Type: application/json"]
    lines += [] if keep_alive else ["Connection: close"]
    lines += [f"Content-Length: {length}"] if length is not None else []
    lines += ["Transfer-Encoding: chunked"] if chunked else []
    lines += [f"Authorization: Bearer {token}"] if token else []
    sock.sendall(("\r\n".join(lines) + "\r\n\r\n").encode())
    return sock


def answer(sock: socket.socket) -> tuple[int, dict, bool]:
    """The status, the JSON error and whether the server then closed the connection."""
    data = b""
    try:
        while b"\r\n\r\n" not in data or len(data.partition(b"\r\n\r\n")[2]) < _length(data):
            chunk = sock.recv(65536)
            if not chunk:
                break
            data += chunk
        closed = sock.recv(1) == b""
    except ConnectionResetError:
        closed = True
    status = int(data.split(b" ", 2)[1])
    return status, json.loads(data.partition(b"\r\n\r\n")[2] or b"{}"), closed


def _length(data: bytes) -> int:
    for line in data.partition(b"\r\n\r\n")[0].split(b"\r\n"):
        if line.lower().startswith(b"content-length:"):
            return int(line.split(b":")[1])
    return 0


def send_all(sock: socket.socket, total: int, chunk: bytes) -> int:
    """Send up to `total` bytes; stop when the server stops taking them. Returns bytes sent."""
    sent = 0
    try:
        while sent < total:
            piece = chunk[: total - sent]
            sock.sendall(piece)
            sent += len(piece)
    except (BrokenPipeError, ConnectionResetError):
        pass
    return sent


def test_unauthenticated_100_mb_body_is_refused_unread(api):
    server, _token = api
    before = rss_kb(server.proc.pid)
    sock = head(server.port, 100 * 1024 * 1024)
    sent = send_all(sock, 100 * 1024 * 1024, b"{" * (1024 * 1024))
    status, body, closed = answer(sock)
    sock.close()
    grown_mb = (rss_kb(server.proc.pid) - before) / 1024
    assert status == 401 and body["error"]["code"] == "unauthorized" and closed
    assert grown_mb < 20, f"the server grew {grown_mb:.0f} MB on a refused body ({sent} bytes sent)"


def test_a_body_over_the_cap_is_413_announced_or_not(api):
    server, token = api
    sock = head(server.port, 2 * 1024 * 1024, token)  # announced: refused before reading it
    status, body, closed = answer(sock)
    assert (status, body["error"]["code"], closed) == (413, "body_too_large", True)
    sock.close()
    sock = head(server.port, None, token, chunked=True)  # not announced: cut once past the cap
    piece = b"100000\r\n" + b" " * 0x100000 + b"\r\n"
    send_all(sock, 3 * len(piece), piece * 3)
    status, body, closed = answer(sock)
    assert (status, body["error"]["code"], closed) == (413, "body_too_large", True)
    sock.close()


def test_a_slow_body_is_cut(api):
    """Slowloris: a byte now and then; the server stops waiting after api.body_timeout (1 s
    here) and closes, long before the announced body could arrive at this pace."""
    server, token = api
    sock = head(server.port, 400, token)
    sent, status = 0, None
    while sent < 400:
        readable, _, _ = select.select([sock], [], [], 0.25)
        if readable:
            status, body, closed = answer(sock)
            break
        try:
            sock.sendall(b" ")
        except (BrokenPipeError, ConnectionResetError):
            break
        sent += 1
    sock.close()
    assert status == 408 and body["error"]["code"] == "body_timeout" and closed
    assert sent < 400


def test_a_good_request_still_works(api):
    server, token = api
    sock = head(server.port, 2, token, keep_alive=False)
    sock.sendall(b"{}")
    status, body, _closed = answer(sock)
    sock.close()
    assert status == 422 and body["error"]["code"] == "invalid_request"  # read, parsed, validated
