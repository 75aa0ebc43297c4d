"""No acknowledged CDR is ever lost: the real daemon (`callctl serve asterisk` as a
subprocess) on a private PostgreSQL cluster, FastAGI sessions over a real socket sent the
way Asterisk sends them, the daemon killed with SIGKILL mid-stream with the database up
and with it down, the database stopped and hung, then everything restarted and counted.

The daemon acknowledges a CDR by setting CALLCTL_CDR on the channel; the fake Asterisk
here counts a call as acknowledged only when it received that command.
"""
from __future__ import annotations

import asyncio
import os
import signal
import socket
import stat
import subprocess
import time
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest
from sqlalchemy import text

from callctl.store import bindings, pool, tenants
from callctl.store.db import make_engine, upgrade
from callctl.store.partitions import cdr_partitions
from lab import harness
from lab.agiclient import agi_session  # noqa: F401 (also used by other test modules)
from tests.pg import PgCluster

X, AGENT, CUSTOMER, HOTLINE = "+8617100000001", "+8613900000001", "+8613800000001", "+861058000000"
ALL_DAY = "00:00-24:00"  # calling hours must not make these tests depend on the time of day


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


async def hangup(port: int, call_id: str, started: float) -> str | None:
    """The hangup AGI of a rejected call; returns the daemon's acknowledgement or None."""
    args = [f"called={X}", f"caller={AGENT}", "dest=", "action=reject", "reason=unknown_caller",
            "binding=", "tenant=1", "direction=to_customer", f"start={started:.3f}", f"end={started + 0.8:.3f}",
            "dialstatus=", "dialedtime=", "answeredtime=", "hangupcause=21", "node=lab"]
    variables = await agi_session(port, "hangup", call_id, args)
    return (variables or {}).get("CALLCTL_CDR")


async def route(port: int, call_id: str) -> tuple[dict[str, str] | None, float]:
    began = time.monotonic()
    variables = await agi_session(port, "route", call_id, env={"agi_extension": X, "agi_callerid": AGENT})
    return variables, time.monotonic() - began


class Stream:
    """Hangup sessions from several concurrent 'channels', SIGKILL to the daemon once
    `kill_after` of them were acknowledged, until every channel has seen the daemon gone."""

    def __init__(self, port: int, prefix: str):
        self.port, self.prefix = port, prefix
        self.sent: list[str] = []
        self.acked: dict[str, str] = {}
        self.started: dict[str, float] = {}

    async def run(self, daemon: harness.Process, kill_after: int, channels: int = 6) -> None:
        killed = asyncio.Event()

        async def channel(n: int) -> None:
            failures = 0
            while failures < 3:
                call_id = f"{self.prefix}-{time.time():.0f}.{n}{len(self.sent):05d}"
                self.sent.append(call_id)
                self.started[call_id] = time.time()
                ack = await hangup(self.port, call_id, self.started[call_id])
                if ack:
                    self.acked[call_id] = ack
                    if len(self.acked) >= kill_after and not killed.is_set():
                        killed.set()
                        daemon.proc.send_signal(signal.SIGKILL)  # others are mid-session now
                elif killed.is_set():
                    failures += 1
                else:
                    raise AssertionError(f"session refused before the kill: {call_id}")

        await asyncio.wait_for(asyncio.gather(*(channel(n) for n in range(channels))), 120)
        assert daemon.proc.wait(10) == -signal.SIGKILL


def postgres_pids(cluster: PgCluster) -> list[int]:
    postmaster = int(Path(cluster.dir, "data", "postmaster.pid").read_text().split()[0])
    children = subprocess.run(["pgrep", "-P", str(postmaster)], capture_output=True, text=True).stdout.split()
    return [postmaster, *map(int, children)]


@pytest.fixture
def cluster():
    pg = PgCluster()
    pg.start()
    yield pg
    for pid in postgres_pids(pg) if Path(pg.dir, "data", "postmaster.pid").exists() else []:
        os.kill(pid, signal.SIGCONT)  # in case a test left it frozen
    pg.destroy()


@pytest.fixture
def setup(cluster, tmp_path):
    url = "postgresql+psycopg2://" + cluster.dsn.split("://", 1)[1]
    engine = make_engine(url)
    upgrade(engine)
    tenants.add_tenant(engine, "acme", HOTLINE, callers=[AGENT], hours=ALL_DAY)
    pool.add_numbers(engine, "acme", [X])
    bindings.bind(engine, "acme", CUSTOMER)
    port = free_port()
    daemon = harness.callctl_daemon(url, tmp_path, port=port, extra_env={"CALLCTL_DB_TIMEOUT": "1"})
    yield engine, daemon, port, tmp_path / "spool"
    daemon.stop()
    engine.dispose()


def cdr_counts(engine) -> dict[str, int]:
    with engine.connect() as conn:
        return dict(conn.execute(text("SELECT call_id, count(*) FROM cdrs GROUP BY call_id")).all())


def wait_spool_empty(spool: Path, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while (spool / "cdrs.jsonl").exists() or (spool / "cdrs.replaying.jsonl").exists():
        assert time.monotonic() < deadline, "spool not replayed"
        time.sleep(0.2)


def test_sigkill_loses_no_acknowledged_cdr_database_up_or_down(setup, cluster):
    engine, daemon, port, spool = setup

    # 1. Database up: CDRs are committed, then acknowledged. SIGKILL mid-stream.
    daemon.start()
    up = Stream(port, "up")
    asyncio.run(up.run(daemon, kill_after=150))
    assert set(up.acked.values()) == {"written"}

    # 2. Database down: CDRs are fsync'd to the spool, then acknowledged. SIGKILL mid-stream.
    cluster.stop()
    daemon.start()
    variables, seconds = asyncio.run(route(port, "down-route"))
    assert variables["CALLCTL_ACTION"] == "reject" and variables["CALLCTL_REASON"] == "unavailable"
    assert seconds < 2.5  # db_timeout 1 s + 1 s guard; a refused connection is immediate
    down = Stream(port, "down")
    asyncio.run(down.run(daemon, kill_after=150))
    assert set(down.acked.values()) == {"spooled"}
    assert stat.S_IMODE(spool.stat().st_mode) == 0o700
    assert stat.S_IMODE((spool / "cdrs.jsonl").stat().st_mode) == 0o600

    # 3. Database back, daemon restarted: the spool is replayed, once.
    cluster.start()
    daemon.start()
    wait_spool_empty(spool)
    # The PBX asking again, with the same arguments, for calls already kept (the
    # dialplan's second attempt after a lost acknowledgement).
    started = {**up.started, **down.started}
    retried = list(up.acked)[:10] + list(down.acked)[:10]

    async def retry_all():
        return [await hangup(port, call_id, started[call_id]) for call_id in retried]
    assert asyncio.run(retry_all()) == ["duplicate"] * len(retried)

    counts = cdr_counts(engine)
    acked = {**up.acked, **down.acked}
    missing = [call_id for call_id in acked if call_id not in counts]
    print(f"\nsent {len(up.sent)} + {len(down.sent)} hangups, acknowledged {len(up.acked)} (committed) +"
          f" {len(down.acked)} (spooled), CDRs in the table {len(counts)}, missing {len(missing)}")
    assert missing == []
    assert max(counts.values()) == 1  # none twice
    assert set(counts) <= set(up.sent) | set(down.sent)
    assert not (spool / "cdrs.unreadable.jsonl").exists()


def test_hung_database_fails_closed_in_time_and_spools(setup, cluster):
    """A database that stops answering without an error (frozen server: no RST, TCP still
    acknowledged) gives 'unavailable' within the deadline, and the CDR is spooled."""
    engine, daemon, port, spool = setup
    daemon.start()
    assert asyncio.run(route(port, "warm"))[0]["CALLCTL_ACTION"] == "bridge"  # pooled connections open
    pids = postgres_pids(cluster)
    for pid in pids:
        os.kill(pid, signal.SIGSTOP)
    try:
        variables, seconds = asyncio.run(route(port, "frozen-route"))
        assert variables["CALLCTL_REASON"] == "unavailable" and seconds < 3.5
        began = time.monotonic()
        assert asyncio.run(hangup(port, "frozen-1", time.time())) == "spooled"
        assert time.monotonic() - began < 3.5
    finally:
        for pid in pids:
            os.kill(pid, signal.SIGCONT)
    wait_spool_empty(spool)
    assert cdr_counts(engine).get("frozen-1") == 1
    assert asyncio.run(route(port, "thawed"))[0]["CALLCTL_ACTION"] == "bridge"  # recovered on its own


def test_daemon_makes_missing_day_partitions_at_start(setup):
    engine, daemon, port, spool = setup
    day = datetime.now(timezone.utc).date() + timedelta(days=3)
    with engine.begin() as conn:
        conn.exec_driver_sql(f"DROP TABLE cdr_partitions.cdrs_{day:%Y%m%d}")
    daemon.start()
    deadline = time.monotonic() + 15
    while f"cdr_partitions.cdrs_{day:%Y%m%d}" not in {p["partition"] for p in cdr_partitions(engine)}:
        assert time.monotonic() < deadline, "the daemon did not make the missing partition"
        time.sleep(0.2)
    created = [e for e in harness.json_events(daemon.output()) if e.get("event") == "CDR partition created"]
    assert [e["day"] for e in created] == [day.isoformat()]
