"""`callctl cdr import-pbx`: the CDRs the dialplan kept while no daemon answered, on
SQLite and PostgreSQL. The lab test (tests/test_lab_calls.py) makes such a file with a
real Asterisk; these check the importer's edges."""
from __future__ import annotations

import pytest
from sqlalchemy import create_engine
from sqlalchemy.exc import SQLAlchemyError

from callctl.asterisk.fallback import import_fallback
from callctl.service import CallService
from callctl.store import cdrs, tenants

X, AGENT, CUSTOMER = "+8617100000001", "+8613900000001", "+8613800000001"


def kept(call_id: str, **extra) -> str:
    fields = {"called": X, "caller": AGENT, "dest": CUSTOMER, "action": "bridge", "tenant": "1",
              "direction": "to_customer", "start": "1795887084.100", "end": "1795887094.100",
              "dialstatus": "ANSWER", "dialedtime": "10000", "answeredtime": "8000", "hangupcause": "16",
              "node": "pbx1", **extra}
    return ",".join([f"uniqueid={call_id}"] + [f"{k}={v}" for k, v in fields.items()])


@pytest.fixture
def service(engine):
    tenants.add_tenant(engine, "acme", "+861058000000", callers=[AGENT])
    return CallService(engine, spool=None)


def test_each_kept_cdr_written_once_and_the_file_removed(service, tmp_path):
    path = tmp_path / "fallback.txt"
    path.write_text("\n".join([kept("pbx1-1795887084.1"), "garbage without an id", "",
                               kept("pbx1-1795887084.1"), kept("pbx1-1795887090.2", action="reject",
                                                               reason="unavailable", dest="")]) + "\n")
    assert import_fallback(service, path) == {"written": 2, "duplicate": 1, "unreadable": 1}
    assert not path.exists() and not path.with_name("fallback.txt.importing").exists()
    rows = {r["call_id"]: r for r in cdrs.list_cdrs(service.engine)}
    assert rows["pbx1-1795887084.1"]["decision"] == "bridged"
    assert rows["pbx1-1795887084.1"]["callee_masked"] == "+86138****0001"
    assert rows["pbx1-1795887084.1"]["talk_seconds"] == 8.0
    assert rows["pbx1-1795887090.2"]["reject_reason"] == "unavailable"
    assert import_fallback(service, path) == {"written": 0, "duplicate": 0, "unreadable": 0}  # nothing there


def test_an_import_cut_short_is_finished_first_and_new_lines_follow(service, tmp_path):
    path = tmp_path / "fallback.txt"
    path.with_name("fallback.txt.importing").write_text(kept("pbx1-1795887084.1") + "\n")
    path.write_text(kept("pbx1-1795887084.1") + "\n" + kept("pbx1-1795887099.3") + "\n")
    assert import_fallback(service, path) == {"written": 2, "duplicate": 1, "unreadable": 0}
    assert sorted(r["call_id"] for r in cdrs.list_cdrs(service.engine)) == [
        "pbx1-1795887084.1", "pbx1-1795887099.3"]


def test_database_down_loses_nothing(service, tmp_path):
    path = tmp_path / "fallback.txt"
    path.write_text(kept("pbx1-1795887084.1") + "\n")
    dead = CallService(create_engine("postgresql+psycopg2://postgres@127.0.0.1:1/none",
                                     connect_args={"connect_timeout": 1}), spool=None)
    with pytest.raises(SQLAlchemyError):
        import_fallback(dead, path)
    assert path.with_name("fallback.txt.importing").exists()  # kept for the next import
    assert import_fallback(service, path)["written"] == 1
