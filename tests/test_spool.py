"""The CDR spool under the failures it exists for: torn lines, a crash mid-replay,
appends during a replay, rows the database refuses, two replayers, bad directories.
Real files, the real CDR writes, on SQLite and PostgreSQL."""
from __future__ import annotations

import threading
import time
from datetime import datetime, timezone

import pytest
from sqlalchemy import text
from sqlalchemy.exc import OperationalError

from callctl.service import CallService
from tests.agicalls import agi_call
from callctl.store.calls import write_cdrs
from callctl.store.spool import CdrSpool, SpoolError

START = datetime(2026, 11, 29, 8, 0, tzinfo=timezone.utc).timestamp()


def row(service: CallService, n: int) -> dict:
    call = agi_call(f"lab-{START:.0f}.{n}", called="+8617100000001", caller="+8613900000001",
                        action="reject", reason="unknown_caller", start=f"{START + n:.3f}", end=f"{START + n + 1:.3f}")
    return service.cdr_row(call, datetime.now(timezone.utc))


def stored(engine) -> dict[str, int]:
    with engine.connect() as conn:
        return dict(conn.execute(text("SELECT call_id, count(*) FROM cdrs GROUP BY call_id")).all())


@pytest.fixture
def service(engine, tmp_path):
    return CallService(engine, CdrSpool(tmp_path / "spool"))


def test_torn_last_line_never_swallows_the_next_cdr(service, engine):
    spool = service.spool
    spool.append(row(service, 1))
    with open(spool.path, "ab") as f:  # a crash mid-append: half a line, no newline
        f.write(b'{"call_id":"lab-torn","decis')
    spool.append(row(service, 2))  # acknowledged after the crash: must survive
    assert service.replay_spool() == 2
    assert set(stored(engine)) == {f"lab-{START:.0f}.1", f"lab-{START:.0f}.2"}
    assert spool.unreadable.read_bytes() == b'{"call_id":"lab-torn","decis\n'  # kept for a person
    assert not spool.pending()


def test_crash_mid_replay_replays_the_rest_and_nothing_twice(service, engine):
    rows = [row(service, n) for n in range(500)]
    for r in rows:
        service.spool.append(r)
    calls = []

    def dies_after_two_batches(batch):
        if len(calls) == 2:
            raise OperationalError("INSERT", {}, Exception("server closed the connection"))
        calls.append(len(batch))
        write_cdrs(engine, batch)

    with pytest.raises(OperationalError):
        service.spool.replay(dies_after_two_batches, batch=100)
    assert len(stored(engine)) == 200 and service.spool.replaying.exists()
    assert service.replay_spool() == 500  # from the start: the first 200 are skipped
    counts = stored(engine)
    assert len(counts) == 500 and set(counts.values()) == {1}
    assert not service.spool.pending()


def test_appends_during_a_replay_are_kept_and_replayed_once(service, engine):
    for n in range(300):
        service.spool.append(row(service, n))
    appended = threading.Event()

    def slow_write(batch):
        write_cdrs(engine, batch)
        time.sleep(0.01)

    def append_more():
        for n in range(300, 400):
            service.spool.append(row(service, n))
        appended.set()

    writer = threading.Thread(target=append_more)
    writer.start()
    first = service.spool.replay(slow_write, batch=10)
    writer.join()
    second = service.replay_spool()
    counts = stored(engine)
    assert first + second >= 400 and len(counts) == 400 and set(counts.values()) == {1}
    assert appended.is_set() and not service.spool.pending()


def test_a_row_the_database_refuses_is_set_aside_not_retried_forever(service, engine):
    service.spool.append(row(service, 1))
    bad = row(service, 2)
    bad["started_at"] = None  # NOT NULL: the database refuses this row, not the others
    service.spool.append(bad)
    service.spool.append(row(service, 3))
    assert service.replay_spool() == 3
    assert set(stored(engine)) == {f"lab-{START:.0f}.1", f"lab-{START:.0f}.3"}
    assert f"lab-{START:.0f}.2".encode() in service.spool.unreadable.read_bytes()
    assert not service.spool.pending()


def test_only_one_replayer_at_a_time_across_spool_handles(service, engine, tmp_path):
    other = CdrSpool(tmp_path / "spool")  # as a second daemon sharing the directory would
    for n in range(20):
        service.spool.append(row(service, n))
    inside = threading.Event()
    release = threading.Event()

    def held(batch):
        inside.set()
        release.wait(10)
        write_cdrs(engine, batch)

    replayer = threading.Thread(target=service.spool.replay, args=(held,))
    replayer.start()
    assert inside.wait(10)
    assert other.replay(lambda batch: write_cdrs(engine, batch)) == 0  # busy: it does not replay too
    release.set()
    replayer.join()
    assert len(stored(engine)) == 20 and not other.pending()


def test_unusable_spool_directory_is_a_clear_error(tmp_path):
    (tmp_path / "file").write_text("")
    with pytest.raises(SpoolError, match="spool directory"):
        CdrSpool(tmp_path / "file" / "spool")


def test_spooled_cdr_of_a_call_reported_twice_is_stored_once(engine, tmp_path):
    """started_at is part of the CDR key: the same call without a usable start time (garbage
    from the PBX) still gets the same started_at, from the uniqueid, on every report."""
    up = CallService(engine, CdrSpool(tmp_path / "spool"))
    call = agi_call("lab-1795887084.7", called="+8617100000001", action="reject", reason="blocked",
                        start="garbage", end="")
    first, second = up.cdr_row(call, datetime.now(timezone.utc)), up.cdr_row(call, datetime(2030, 1, 1, tzinfo=timezone.utc))
    assert first["started_at"] == second["started_at"] == datetime.fromtimestamp(1795887084, timezone.utc)
    assert up.record(call) == "written" and up.record(call) == "duplicate"
    assert stored(engine) == {"lab-1795887084.7": 1}
