"""The EAST contact register (`callctl export contacts`, callctl/register.py) on SQLite and
PostgreSQL through the real command: one row per policy reference with the virtual
number and the binding's validity and status as of the date; the binding in force wins
over older ones of the same policy; later bindings are not there yet; never a real
number; bad input is a clear error."""
from __future__ import annotations

import csv
import io
from datetime import datetime, timedelta, timezone

import pytest
from sqlalchemy import update

from callctl import register
from callctl.store import bindings, pool, tenants
from callctl.errors import ProvisionError
from callctl.store.models import Binding
from tests import realnumbers
from tests.test_cli import run

HOTLINE = realnumbers.tenant_line("+861058019001")
CUSTOMERS = realnumbers.person("+8613800019001", "+8613800019002", "+8613800019003", "+8613800019004")
POOL = ["+8617100019001", "+8617100019002", "+8617100019003", "+8617100019004"]
DAY = datetime(2026, 11, 10, 4, 0, tzinfo=timezone.utc)  # 12:00 in Shanghai


def made_at(engine, binding_id: int, created: datetime, ended: datetime | None = None,
            expires: datetime | None = None) -> None:
    """Back-date a binding (the register reads history)."""
    with engine.begin() as conn:
        conn.execute(update(Binding).where(Binding.id == binding_id).values(
            created_at=created, ended_at=ended, expires_at=expires, status="ended" if ended else "active"))


def test_one_row_per_policy_as_of_the_date_and_no_real_number(engine, tmp_path):
    tenants.add_tenant(engine, "acme", HOTLINE)
    tenants.add_tenant(engine, "=evil", HOTLINE)
    pool.add_numbers(engine, "acme", POOL)
    old = bindings.bind(engine, "acme", CUSTOMERS[0], reference="POL-1")
    new = bindings.bind(engine, "acme", CUSTOMERS[1], reference="POL-1")
    lapsed = bindings.bind(engine, "acme", CUSTOMERS[2], reference="=HYPERLINK(1)")
    later = bindings.bind(engine, "acme", CUSTOMERS[3], reference="POL-9")
    made_at(engine, old["id"], DAY - timedelta(days=30), ended=DAY - timedelta(days=5))  # the policy's first X
    made_at(engine, new["id"], DAY - timedelta(days=5))  # re-bound: this one stands for the contact
    made_at(engine, lapsed["id"], DAY - timedelta(days=20), expires=DAY - timedelta(days=1))
    made_at(engine, later["id"], DAY + timedelta(days=2))  # not yet there on the as-of date
    env = {"PATH": "/usr/bin:/bin", "CALLCTL_DATABASE_URL": engine.url.render_as_string(hide_password=False)}
    done = run("export", "contacts", "--tenant", "acme", "--as-of", "2026-11-10", env=env, cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    got = list(csv.DictReader(io.StringIO(done.stdout)))
    assert list(got[0]) == list(register.COLUMNS)
    assert [(r["policy_reference"], r["contact_number"], r["status_as_of"]) for r in got] == [
        ("'=HYPERLINK(1)", lapsed["x"], "expired"), ("POL-1", new["x"], "active")]
    pol = got[1]
    assert (pol["mode"], pol["contact_number_kind"], pol["valid_until"], pol["binding_id"]) == (
        "AXN", "virtual", "", str(new["id"]))
    assert pol["as_of"] == "2026-11-10T16:00:00+00:00"  # the end of the day in Shanghai
    assert got[0]["valid_until"] == (DAY - timedelta(days=1)).isoformat()
    for number in CUSTOMERS + (HOTLINE,):
        assert number[3:] not in done.stdout
    # A day later POL-9 is there too; before POL-1's re-binding, its first X stood for it.
    later_rows = list(register.rows(engine, "acme", "2026-11-13"))
    assert [r["policy_reference"] for r in later_rows] == ["=HYPERLINK(1)", "POL-1", "POL-9"]
    earlier = {r["policy_reference"]: r for r in register.rows(engine, "acme", "2026-11-01")}
    assert earlier["POL-1"]["contact_number"] == old["x"] and earlier["POL-1"]["status_as_of"] == "active"
    out = tmp_path / "register.csv"
    assert run("export", "contacts", "--tenant", "acme", "--as-of", "2026-11-10T12:00:00+08:00", "-o", str(out),
               env=env, cwd=tmp_path).returncode == 0
    assert out.read_text().count("\n") == 3
    bad = run("export", "contacts", "--tenant", "acme", "--as-of", "last week", env=env, cwd=tmp_path)
    assert bad.returncode == 1 and "invalid_as_of" in bad.stderr and bad.stdout == "" and "Traceback" not in bad.stderr
    for tenant, as_of, code in (("nobody", "2026-11-10", "tenant_not_found"),
                                ("acme", "2026-11-10T12:00:00", "invalid_as_of")):
        with pytest.raises(ProvisionError) as refused:
            register.rows(engine, tenant, as_of)
        assert refused.value.code == code
