"""Bulk provisioning from CSV (`callctl pool import`, `callctl bind --bulk`) on SQLite
and PostgreSQL: good rows land, every bad row is listed with its line number and kept,
nothing is lost."""
from __future__ import annotations

import csv
import json
import stat
from datetime import timedelta

from sqlalchemy import text

from callctl.store import bulk, provision
from tests import leaks
from tests.test_cli import cli  # noqa: F401  (the real `callctl` command, both databases)

HOTLINE, AGENT = "+861058000000", "+8613900000001"


def write(path, lines: list[str]):
    path.write_text("\n".join(lines) + "\n")
    leaks.test_input(path, path.with_name(path.stem + ".rejected.csv"))  # the operator's own rows
    return path


def rows_of(path) -> list[dict]:
    with open(path, newline="") as handle:
        return list(csv.DictReader(handle))


def test_pool_import(engine, tmp_path):
    provision.add_tenant(engine, "acme", HOTLINE)
    provision.add_tenant(engine, "other", "+861058000001")
    provision.add_numbers(engine, "acme", ["+8617100000009"])
    source = write(tmp_path / "pool.csv", [
        "number,tenant",
        "+8617100000001,",            # 2: --tenant
        "017100000002,other",         # 3: national form, own tenant
        "+8617100000001,",            # 4: twice in the file
        "12,",                        # 5: not a number
        "+8617100000009,",            # 6: in a pool already
        "",                           # 7: blank: skipped
        "+8617100000003,nobody",      # 8: no such tenant
        "+8617100000004",             # 9: one field short
        *[f"+86171000001{i:02d}," for i in range(12)],  # 10-21: a few batches of 5
    ])
    result = bulk.import_pool(engine, source, tenant_name="acme", batch_size=5)
    assert result.done == 14 and result.rows == 19
    assert [(e.line, e.code) for e in result.errors] == [
        (4, "duplicate_row"), (5, "invalid_number"), (6, "number_exists"), (8, "tenant_not_found"), (9, "invalid_row"),
    ]
    assert "line 2" in str(result.errors[0])
    assert provision.pool_status(engine, "acme")["free"] == 1 + 1 + 12
    assert provision.pool_status(engine, "other")["free"] == 1
    rejected = rows_of(result.rejected_file)
    assert [r["line"] for r in rejected] == ["4", "5", "6", "8", "9"]
    assert rejected[2]["number"] == "+8617100000009" and rejected[2]["error"].startswith("number_exists")
    assert stat.S_IMODE(result.rejected_file.stat().st_mode) == 0o600


def test_bind_bulk_mixed_modes_errors_and_exhaustion(engine, tmp_path):
    provision.add_tenant(engine, "acme", HOTLINE, callers=[AGENT])
    provision.add_numbers(engine, "acme", [f"+86171000000{i:02d}" for i in range(1, 8)])
    source = write(tmp_path / "policies.csv", [
        "customer,mode,other_party,reference,expires_at,ttl_seconds",
        "+8613800000001,,,POL-1,2030-01-01T00:00:00+08:00,",   # 2
        "13800000002,AXN,,POL-2,,3600",                        # 3
        "+8613800000003,AXB,+8613800000004,POL-3,,",           # 4
        "+8613800000005,AXE,,POL-4,,",                         # 5
        "nope,,,POL-5,,",                                      # 6: bad number
        "+8613800000006,,,POL-6,2020-01-01T00:00:00Z,",        # 7: in the past
        "+8613800000007,,,POL-7,,soon",                        # 8: bad TTL
        "+8613800000008,AXB,,POL-8,,",                         # 9: no other party
        "+8613800000009,AXQ,,POL-9,,",                         # 10: no such mode
        *[f"+86138000001{i:02d},,,POL-1{i:02d},," for i in range(6)],  # 11-16: pool has room for 3
    ])
    result = bulk.bind_bulk(engine, source, tenant_name="acme", batch_size=4, extension_digits=2)
    assert result.done == 7 and result.rows == 15
    assert [(e.line, e.code) for e in result.errors] == [
        (6, "invalid_number"), (7, "invalid_expiry"), (8, "invalid_expiry"), (9, "missing_other_party"),
        (10, "invalid_mode"), (14, "pool_exhausted"), (15, "pool_exhausted"), (16, "pool_exhausted"),
    ]
    made = rows_of(result.bound_file)
    assert [r["line"] for r in made] == ["2", "3", "4", "5", "11", "12", "13"]
    assert made[0]["reference"] == "POL-1" and made[0]["expires_at"] == "2029-12-31T16:00:00+00:00"
    assert made[2]["mode"] == "AXB" and len(made[3]["extension"]) == 2
    assert len({r["x"] for r in made}) == 7 and len({r["id"] for r in made}) == 7
    assert "13800000001" not in result.bound_file.read_text()
    assert provision.pool_status(engine, "acme") == {"free": 0, "bound": 7, "quarantined": 0, "disabled": 0}
    page = provision.list_bindings(engine, reference="POL-2")["items"]
    assert page[0]["customer"] == "+86138****0002" and page[0]["expires_at"]
    rejected = rows_of(result.rejected_file)
    assert [r["line"] for r in rejected] == ["6", "7", "8", "9", "10", "14", "15", "16"]
    assert rejected[-1]["customer"] == "+8613800000105"  # kept as given, to fix and run again


def test_bind_bulk_reuses_x_after_cooldown_only(engine, tmp_path):
    provision.add_tenant(engine, "acme", HOTLINE)
    provision.add_numbers(engine, "acme", ["+8617100000001", "+8617100000002"])
    first = provision.bind(engine, "acme", "+8613800000001")
    provision.unbind(engine, first["id"], timedelta(hours=1))
    source = write(tmp_path / "b.csv", ["customer", "+8613800000002", "+8613800000003"])
    result = bulk.bind_bulk(engine, source, tenant_name="acme")
    assert result.done == 1 and [e.code for e in result.errors] == ["pool_exhausted"]
    later = bulk.bind_bulk(engine, source, tenant_name="acme", now=provision.utcnow() + timedelta(hours=1, seconds=1))
    assert later.done == 1 and rows_of(later.bound_file)[0]["x"] == "+8617100000001"


def test_bulk_commands(cli, tmp_path):  # noqa: F811
    cli("db", "upgrade")
    cli("tenant", "add", "acme", "--hotline", HOTLINE, "--caller", AGENT)
    pool = write(tmp_path / "pool.csv", ["number", *[f"+86171000000{i:02d}" for i in range(1, 21)], "bad"])
    imported = cli("pool", "import", str(pool), "--tenant", "acme")
    assert imported.returncode == 1 and "line 22: virtual number: not a phone number [invalid_number]" in imported.stderr
    assert json.loads(imported.stdout)["done"] == 20
    assert "rows" in imported.stderr or "row" in imported.stderr  # the tqdm progress bar
    again = cli("pool", "import", str(pool), "--tenant", "acme")
    assert json.loads(again.stdout)["done"] == 0 and again.stderr.count("number_exists") == 20
    policies = write(tmp_path / "policies.csv", ["tenant,customer,reference",
                                                *[f"acme,+86138000000{i:02d},POL-{i}" for i in range(1, 16)],
                                                "nobody,+8613800000099,POL-X"])
    bound = cli("bind", "--bulk", str(policies), "--out", str(tmp_path / "out.csv"))
    assert bound.returncode == 1 and "line 17: no tenant named 'nobody' [tenant_not_found]" in bound.stderr
    summary = json.loads(bound.stdout)
    assert summary["done"] == 15 and summary["rejected"] == 1
    assert len(rows_of(tmp_path / "out.csv")) == 15
    assert json.loads(cli("pool", "status", "--tenant", "acme").stdout)["bound"] == 15
    clean = write(tmp_path / "clean.csv", ["customer", "+8613800000050"])
    done = cli("bind", "--tenant", "acme", "--bulk", str(clean))
    assert done.returncode == 0 and json.loads(done.stdout)["rejected_file"] is None
    for args, message in ((["bind", "--bulk", str(tmp_path / "missing.csv")], "missing.csv"),
                          (["pool", "import", str(policies)], "line 1 must name the columns"),
                          (["bind", "--tenant", "acme"], "--customer (one binding) or --bulk")):
        failed = cli(*args)
        assert failed.returncode != 0 and message in failed.stderr and "Traceback" not in failed.stderr
    everything = "".join(p.stdout for p in (imported, bound, done)) + (tmp_path / "out.csv").read_text()
    assert "13800000001" not in everything


def test_bulk_rows_land_in_batches_not_one_transaction_per_row(engine, tmp_path):
    """Set-based: 30 AXN rows in batches of 10 are 3 transactions (on SQLite, 3 multi-row
    INSERTs; on PostgreSQL, 3 COPYs)."""
    from sqlalchemy import event

    provision.add_tenant(engine, "acme", HOTLINE)
    provision.add_numbers(engine, "acme", [f"+861710000{i:04d}" for i in range(1, 31)])
    commits, inserts = [], []
    on_commit = lambda conn: commits.append(1)  # noqa: E731

    def on_execute(conn, cursor, statement, parameters, context, executemany):
        if statement.lstrip().upper().startswith("INSERT INTO BINDINGS"):
            inserts.append(statement)

    event.listen(engine, "commit", on_commit)
    event.listen(engine, "before_cursor_execute", on_execute)
    try:
        source = write(tmp_path / "b.csv", ["customer", *[f"+861380000{i:04d}" for i in range(1, 31)]])
        assert bulk.bind_bulk(engine, source, tenant_name="acme", batch_size=10).done == 30
    finally:
        event.remove(engine, "commit", on_commit)
        event.remove(engine, "before_cursor_execute", on_execute)
    assert len(commits) == 3
    assert len(inserts) == (3 if engine.dialect.name == "sqlite" else 0)
    with engine.connect() as conn:
        assert conn.execute(text("SELECT count(DISTINCT number_id) FROM bindings")).scalar() == 30


def test_bind_bulk_keeps_awkward_text_intact(engine, tmp_path):
    """References with tabs, backslashes, quotes and line breaks land as written (COPY escaping)."""
    provision.add_tenant(engine, "acme", HOTLINE)
    provision.add_numbers(engine, "acme", ["+8617100000001", "+8617100000002"])
    awkward = ['POL\t1 \\N "quoted"', "POL-2\nsecond line\\"]
    leaks.test_input(tmp_path / "b.csv")
    with open(tmp_path / "b.csv", "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["customer", "reference"])
        writer.writerows([["+8613800000001", awkward[0]], ["+8613800000002", awkward[1]]])
    assert bulk.bind_bulk(engine, tmp_path / "b.csv", tenant_name="acme").done == 2
    assert [b["reference"] for b in provision.list_bindings(engine)["items"]] == awkward
