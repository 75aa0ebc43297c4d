"""Bulk provisioning from CSV (`callctl pool import`, `callctl bind --bulk`) on SQLite
and PostgreSQL: good rows land, every bad row is listed with its line number and kept,
nothing is lost."""
from __future__ import annotations

import csv
import io
import json
import re
import stat
from collections import Counter
from datetime import timedelta

import pytest
from hypothesis import HealthCheck, event, example, given, settings, strategies as st
from sqlalchemy import text

from callctl.store.models import utcnow
from callctl.store import bindings, bulk, bulk_csv, pool as store_pool, tenants
from callctl.errors import ProvisionError
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
    tenants.add_tenant(engine, "acme", HOTLINE)
    tenants.add_tenant(engine, "other", "+861058000001")
    store_pool.add_numbers(engine, "acme", ["+8617100000009"])
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
    assert store_pool.pool_status(engine, "acme")["free"] == 1 + 1 + 12
    assert store_pool.pool_status(engine, "other")["free"] == 1
    rejected = rows_of(result.rejected_file)
    assert [r["line"] for r in rejected] == ["4", "5", "6", "8", "9"]
    assert rejected[2]["number"] == "+8617100000009" and rejected[2]["error"].startswith("number_exists")
    assert stat.S_IMODE(result.rejected_file.stat().st_mode) == 0o600


def test_bind_bulk_mixed_modes_errors_and_exhaustion(engine, tmp_path):
    tenants.add_tenant(engine, "acme", HOTLINE, callers=[AGENT])
    store_pool.add_numbers(engine, "acme", [f"+86171000000{i:02d}" for i in range(1, 8)])
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
    assert store_pool.pool_status(engine, "acme") == {"free": 0, "bound": 7, "quarantined": 0, "disabled": 0}
    page = bindings.list_bindings(engine, reference="POL-2")["items"]
    assert page[0]["customer"] == "+86138****0002" and page[0]["expires_at"]
    rejected = rows_of(result.rejected_file)
    assert [r["line"] for r in rejected] == ["6", "7", "8", "9", "10", "14", "15", "16"]
    assert rejected[-1]["customer"] == "+8613800000105"  # kept as given, to fix and run again


def test_bind_bulk_reuses_x_after_cooldown_only(engine, tmp_path):
    tenants.add_tenant(engine, "acme", HOTLINE)
    store_pool.add_numbers(engine, "acme", ["+8617100000001", "+8617100000002"])
    first = bindings.bind(engine, "acme", "+8613800000001")
    bindings.unbind(engine, first["id"], timedelta(hours=1))
    source = write(tmp_path / "b.csv", ["customer", "+8613800000002", "+8613800000003"])
    result = bulk.bind_bulk(engine, source, tenant_name="acme")
    assert result.done == 1 and [e.code for e in result.errors] == ["pool_exhausted"]
    later = bulk.bind_bulk(engine, source, tenant_name="acme", now=utcnow() + timedelta(hours=1, seconds=1))
    # line 2 was bound by the first load (reported, not bound again); line 3 takes X1 now
    assert (later.done, later.existing, later.errors) == (1, 1, [])
    assert [(r["line"], r["x"]) for r in rows_of(later.bound_file)] == [("2", "+8617100000002"), ("3", "+8617100000001")]


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
    assert (summary["rows"], summary["done"], summary["existing"], summary["rejected"]) == (16, 15, 0, 1)
    again = json.loads(cli("bind", "--bulk", str(policies), "--out", str(tmp_path / "again.csv")).stdout)
    assert (again["rows"], again["done"], again["existing"], again["rejected"]) == (16, 0, 15, 1)  # #15.2
    assert len(rows_of(tmp_path / "again.csv")) == 15  # the bindings of the first load
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

    tenants.add_tenant(engine, "acme", HOTLINE)
    store_pool.add_numbers(engine, "acme", [f"+861710000{i:04d}" for i in range(1, 31)])
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
    tenants.add_tenant(engine, "acme", HOTLINE)
    store_pool.add_numbers(engine, "acme", ["+8617100000001", "+8617100000002"])
    awkward = ['POL\t1 \\N "quoted"', "POL-2\nsecond line\\"]
    leaks.test_input(tmp_path / "b.csv")
    with open(tmp_path / "b.csv", "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["customer", "reference"])
        writer.writerows([["+8613800000001", awkward[0]], ["+8613800000002", awkward[1]]])
    assert bulk.bind_bulk(engine, tmp_path / "b.csv", tenant_name="acme").done == 2
    assert [b["reference"] for b in bindings.list_bindings(engine)["items"]] == awkward


# ------------------------------------------------------------------ #15: nothing lost, nothing twice

def write_bytes(path, data: bytes):
    path.write_bytes(data)
    leaks.test_input(path, path.with_name(path.stem + ".rejected.csv"))
    return path


def active_bindings_per_customer(engine) -> Counter:
    with engine.connect() as conn:
        return Counter(conn.execute(text(
            "SELECT party_a_hash FROM bindings WHERE status = 'active'")).scalars())


def test_an_undecodable_byte_spoils_only_its_own_row(engine, tmp_path):
    """#15.1: one byte that is not UTF-8 in the middle of a file larger than a decoding
    chunk: only its row is rejected, with its true line number and its bytes kept; every
    other row is done; the counts add up."""
    tenants.add_tenant(engine, "acme", HOTLINE)
    numbers = [f"+86171{i:08d}".encode() for i in range(1, 1201)]
    numbers[599] += b"\xe9"  # line 601
    pool = write_bytes(tmp_path / "pool.csv", b"number\n" + b"\n".join(numbers) + b"\n")
    result = bulk.import_pool(engine, pool, tenant_name="acme", batch_size=500)
    assert (result.rows, result.done) == (1200, 1199)
    assert [(e.line, e.code) for e in result.errors] == [(601, "invalid_text")]
    assert store_pool.pool_status(engine, "acme")["free"] == 1199
    assert result.rejected_file.read_bytes() == b'line,error,number\n601,invalid_text: not UTF-8 text (a byte that is not),' \
        + numbers[599] + b"\n"

    customers = [f"+86138{i:08d},POL-{i}".encode() for i in range(1, 1201)]
    customers[899] = b"+8613800000900,POL-\xe9900"  # line 901, in the reference
    policies = write_bytes(tmp_path / "policies.csv", b"customer,reference\r\n" + b"\r\n".join(customers) + b"\r\n")
    bound = bulk.bind_bulk(engine, policies, tenant_name="acme", batch_size=500)
    assert (bound.rows, bound.done, bound.existing) == (1200, 1199, 0)
    assert [(e.line, e.code) for e in bound.errors] == [(901, "invalid_text")]
    assert bound.rejected_file.read_bytes().splitlines()[1] == b"901,invalid_text: not UTF-8 text (a byte that is not)," \
        + customers[899]
    assert len(rows_of(bound.bound_file)) == 1199


def test_bind_bulk_never_crashes_keeps_what_it_committed_and_binds_nobody_twice(engine, tmp_path):
    """#15.2: rows that crashed the load (a TTL past year 9999, a date that overflows in
    UTC, a NUL) are rejected like any bad row, after and before committed batches; what
    was committed is in FILE.bound.csv. Loading the corrected file again binds only the
    rows fixed (the idempotency rule: one active binding per customer and reference)."""
    tenants.add_tenant(engine, "acme", HOTLINE)
    store_pool.add_numbers(engine, "acme", [f"+86171{i:08d}" for i in range(1, 21)])
    good = [f"+86138{i:08d},POL-{i},,".encode() for i in range(1, 13)]
    bad = {
        3: b"nope,POL-B1,,",                                   # an earlier bad row
        6: b"+8613900000001,POL-B2,,99999999999999999",        # the OverflowError of #15.2
        7: b"+8613900000002,POL-B3,9999-12-31T23:00:00-14:00,",
        9: b"+8613900000003,POL-\x00B4,,",                     # NUL: PostgreSQL cannot store it
    }
    rows = good[:]
    for line, row in sorted(bad.items()):
        rows.insert(line - 2, row)
    source = write_bytes(tmp_path / "p.csv", b"customer,reference,expires_at,ttl_seconds\n" + b"\n".join(rows) + b"\n")
    first = bulk.bind_bulk(engine, source, tenant_name="acme", batch_size=3)
    assert (first.rows, first.done, len(first.errors)) == (16, 12, 4)
    assert [(e.line, e.code) for e in first.errors] == [
        (3, "invalid_number"), (6, "invalid_expiry"), (7, "invalid_expiry"), (9, "invalid_text")]
    assert sorted(int(r["line"]) for r in rows_of(first.bound_file)) == sorted(
        set(range(2, 18)) - set(bad))
    assert max(active_bindings_per_customer(engine).values()) == 1

    fixed = [row if line not in bad else f"+86139{line:08d},POL-F{line},,3600".encode()
             for line, row in enumerate(rows, start=2)]
    source.write_bytes(b"customer,reference,expires_at,ttl_seconds\n" + b"\n".join(fixed) + b"\n")
    again = bulk.bind_bulk(engine, source, tenant_name="acme", batch_size=3)
    assert (again.rows, again.done, again.existing, again.errors) == (16, 4, 12, [])
    assert again.rejected_file is None and not (tmp_path / "p.rejected.csv").exists()  # this run rejected nothing
    assert sorted(int(r["line"]) for r in rows_of(again.bound_file)) == list(range(2, 18))
    assert sum(active_bindings_per_customer(engine).values()) == 16
    assert max(active_bindings_per_customer(engine).values()) == 1
    third = bulk.bind_bulk(engine, source, tenant_name="acme")
    assert (third.done, third.existing) == (0, 16)
    # the same customer and reference with another mode is not "the same binding"
    clash = write(tmp_path / "clash.csv", ["customer,reference,mode", "+8613800000001,POL-1,AXE",
                                           "+8613800000002,POL-X,", "+8613800000002,POL-X,"])
    result = bulk.bind_bulk(engine, clash, tenant_name="acme")
    assert [(e.line, e.code) for e in result.errors] == [(2, "reference_in_use"), (4, "duplicate_row")]
    assert (result.rows, result.done) == (3, 1)


def test_the_rejected_file_keeps_raw_rows_is_0600_and_loads_again(engine, tmp_path):
    """#15.3: a row with the wrong number of fields is kept as it was (not as empty
    columns); an existing FILE.rejected.csv becomes 0600; the rejected file, fixed,
    loads again as it is (its line and error columns are ignored)."""
    tenants.add_tenant(engine, "acme", HOTLINE)
    store_pool.add_numbers(engine, "acme", [f"+86171{i:08d}" for i in range(1, 6)])
    stale = tmp_path / "p.rejected.csv"
    stale.write_text("left from an earlier run\n")
    stale.chmod(0o644)
    raw = [
        '+8613800000001,"POL-1, with a comma",extra',         # 2: three fields
        '+8613800000002',                                     # 3: one field
        '"+8613800000003","POL ""3""\nsecond line"',          # 4-5: quoted, spans two lines: good
        '+8613800000004,POL-4',                               # 6: good
        'bad number,POL-5',                                   # 7
    ]
    source = write(tmp_path / "p.csv", ["customer,reference", *raw])
    result = bulk.bind_bulk(engine, source, tenant_name="acme")
    assert (result.rows, result.done) == (5, 2)
    assert [(e.line, e.code) for e in result.errors] == [(2, "invalid_row"), (3, "invalid_row"), (7, "invalid_number")]
    assert stat.S_IMODE(stale.stat().st_mode) == 0o600
    lines = stale.read_text().splitlines()
    assert lines[0] == "line,error,customer,reference"
    assert lines[1] == '2,"invalid_row: 3 field(s), the header names 2",' + raw[0]
    assert lines[2] == '3,"invalid_row: 1 field(s), the header names 2",' + raw[1]
    assert lines[3] == '7,invalid_number: customer: not a phone number,' + raw[4]
    # the operator fixes the rows in place and loads the rejected file itself
    stale.write_text(stale.read_text().replace(',"POL-1, with a comma",extra', ',"POL-1, with a comma"')
                     .replace(",+8613800000002\n", ",+8613800000002,POL-2\n").replace("bad number", "+8613800000005"))
    again = bulk.bind_bulk(engine, stale, tenant_name="acme")
    assert (again.rows, again.done, again.errors) == (3, 3, [])
    references = {b["reference"] for b in bindings.list_bindings(engine)["items"]}
    assert references == {"POL-1, with a comma", "POL-2", 'POL "3"\nsecond line', "POL-4", "POL-5"}


def test_bind_bulk_waits_for_an_x_another_writer_holds(engine, tmp_path):
    """#15.5 for bulk: while another writer holds one of two free X, a load of two rows
    binds both once it is let go (SKIP LOCKED alone gave `pool_exhausted` for one)."""
    if engine.dialect.name != "postgresql":
        pytest.skip("SQLite has one writer at a time: no row locks to wait for")
    from tests.test_allocation import in_thread, wait_for_lock_waiters

    tenants.add_tenant(engine, "acme", HOTLINE)
    store_pool.add_numbers(engine, "acme", ["+8617100000001", "+8617100000002"])
    source = write(tmp_path / "b.csv", ["customer", "+8613800000001", "+8613800000002"])
    holder = engine.connect()
    try:
        holder.begin()
        holder.execute(text("SELECT id FROM virtual_numbers WHERE e164 = '+8617100000001' FOR UPDATE"))
        loader, out = in_thread("loader", lambda: bulk.bind_bulk(engine, source, tenant_name="acme"))
        wait_for_lock_waiters(engine, 1)
    finally:
        holder.rollback()
        holder.close()
    loader.join(60)
    assert (out[0].done, out[0].errors) == (2, [])


# ------------------------------------------------------------------ fuzzing the bulk reader (#15)
# Run longer with `--hypothesis-profile fuzz-long`; replay a failure with `--hypothesis-seed N`.

CUSTOMERS = ["+8613800000001", "+8613800000002", "+8613800000003", "13800000004", "008613800000005"]
_DIGITS = re.compile(r"1380000000[1-5]")  # the customers above, in any written form
_field = st.one_of(
    st.sampled_from([*CUSTOMERS, "", "AXN", "AXB", "axe", "AXQ", "POL-1", "POL-2", "2030-01-01T00:00:00+08:00",
                     "9999-12-31T23:00:00-14:00", "2020-01-01T00:00:00Z", "3600", "99999999999999999", "-1", "1e20",
                     "nobody", " +8613800000001 ", '"', "a,b", "line\nbreak", "\r", "\x00"]),
    st.text(max_size=12),
    st.sampled_from(["9" * 5000, "x" * 140_000]),  # huge: over Python's int digits and csv's field limits
)

# A reference is the insurer's own text, shown back as given (docs/bulk.md): not a number.
_not_a_number = _field.filter(lambda v: not _DIGITS.search(v))
_sensible = {  # what a column usually holds
    "customer": st.sampled_from(CUSTOMERS), "tenant": st.just(""), "mode": st.sampled_from(["", "AXN", "AXE", "AXB"]),
    "other_party": st.sampled_from(["", *CUSTOMERS]), "reference": st.sampled_from(["", "POL-1", "POL-2", "POL-3"]),
    "expires_at": st.sampled_from(["", "", "2030-01-01T00:00:00+08:00"]), "ttl_seconds": st.sampled_from(["", "", "60"]),
    "number": st.sampled_from([f"+86172FFFF000{i}" for i in range(6)] + ["0172FFFF0006"]),  # FFFF: the example
}


@st.composite
def bulk_files(draw, known: tuple[str, ...] = bulk.BIND_COLUMNS) -> bytes:
    """A bind --bulk (or pool import) file as an operator's tools might produce it, or break it."""
    optional = draw(st.permutations(known[1:] + bulk_csv.IGNORED_COLUMNS))
    columns = draw(st.permutations([known[0], *optional[:draw(st.integers(0, len(optional)))]]))
    if draw(st.integers(0, 9)) == 0:
        columns = draw(st.lists(st.sampled_from([*columns, known[0].title() + " ", "unknown", ""]), max_size=4))
    rows = []
    for _ in range(draw(st.integers(0, 10))):
        row = [draw(_sensible.get(c, _field) if draw(st.integers(0, 3)) else
                    _not_a_number if c == "reference" else _field) for c in columns]
        width = draw(st.sampled_from(["same"] * 8 + ["short", "long"]))
        rows.append(row[:-1] if width == "short" else row + ["extra"] if width == "long" else row)
        if draw(st.integers(0, 9)) == 0:
            rows.append([])  # a blank line
    out = io.StringIO()
    quoting = draw(st.sampled_from([csv.QUOTE_MINIMAL, csv.QUOTE_ALL, None]))
    ending = draw(st.sampled_from(["\n", "\r\n"]))
    for row in [columns, *rows]:
        if quoting is None:  # no quoting at all: commas, quotes and line breaks as they come
            out.write(",".join(row) + ending)
        else:
            csv.writer(out, quoting=quoting, lineterminator=ending).writerow(row)
    text = out.getvalue()
    encoding = draw(st.sampled_from(["utf-8", "utf-8", "utf-8", "utf-8-sig", "gbk", "latin-1", "utf-16"]))
    data = text.encode(encoding, errors="replace")
    mangle = draw(st.sampled_from(["none", "none", "bytes", "cut"]))
    if mangle == "bytes":
        at = draw(st.integers(0, len(data)))
        data = data[:at] + draw(st.binary(min_size=1, max_size=4)) + data[at:]
    elif mangle == "cut":
        data = data[:draw(st.integers(0, len(data)))]
    return data


_examples = iter(range(1, 10 ** 6))


@settings(max_examples=max(10, settings.default.max_examples // 2),  # the profile's share: two loads each
          deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow,
                                                HealthCheck.data_too_large, HealthCheck.large_base_example])
@given(data=bulk_files(), batch_size=st.integers(1, 6))
@example(data=b"customer,tenant\n+8613800000001,+8613800000001\n", batch_size=1)  # found: the tenant was printed
def test_fuzz_bulk_files_never_crash_lose_or_leak(engine, tmp_path, data, batch_size):
    """Any file, loaded twice: no crash; the file refused whole with nothing written, or
    every row done, existing or rejected (each line once, within the file) with counts
    that add up; nothing half-written (the table invariants); the second load binds
    nobody twice; no customer number in what is printed or in FILE.bound.csv."""
    from tests.test_allocation import assert_no_conflict

    n = next(_examples)
    tenant, folder = f"fuzz{n}", tmp_path / f"ex{n}"
    folder.mkdir()
    tenants.add_tenant(engine, tenant, HOTLINE)
    store_pool.add_numbers(engine, tenant, [f"+86171{n:04d}{i:04d}" for i in range(3)])
    source = write_bytes(folder / "f.csv", data)
    lines = data.count(b"\n") + 1
    results = []
    for _ in range(2):
        try:
            result = bulk.bind_bulk(engine, source, tenant_name=tenant, batch_size=batch_size, extension_digits=1)
        except ProvisionError as exc:
            assert exc.code == "invalid_file"
            event("refused whole")
            assert sorted(p.name for p in folder.iterdir()) == ["f.csv"]  # nothing written
            assert bindings.list_bindings(engine, tenant_id=tenants.tenant_id_of(engine, tenant))["items"] == []
            return
        results.append(result)
        event(f"loaded: {'some' if result.done else 'no'} rows done, {'some' if result.errors else 'no'} rejected")
        assert result.rows == result.done + result.existing + len(result.errors)
        made = rows_of(result.bound_file)
        assert len(made) == result.done + result.existing
        numbered = [int(r["line"]) for r in made] + [e.line for e in result.errors]
        assert len(set(numbered)) == len(numbered) and all(2 <= line <= lines for line in numbered)
        if result.errors:
            assert stat.S_IMODE(result.rejected_file.stat().st_mode) == 0o600
            assert result.rejected_file.read_bytes().startswith(b"line,error,")
        printed = "\n".join(map(str, result.errors)) + json.dumps([result.rows, result.done])
        leaks.record("cli", "bulk-fuzz", printed)
        assert not _DIGITS.search(printed + result.bound_file.read_text())
    first, second = results
    assert (second.done, second.existing) == (0, first.done)  # loaded twice: nobody bound twice
    assert len(bindings.list_bindings(engine, tenant_id=tenants.tenant_id_of(engine, tenant))["items"]) == first.done
    assert_no_conflict(engine)


@settings(max_examples=max(5, settings.default.max_examples // 4),
          deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow,
                                                HealthCheck.data_too_large, HealthCheck.large_base_example])
@given(data=bulk_files(bulk.POOL_COLUMNS), batch_size=st.integers(1, 6))
def test_fuzz_pool_files_never_crash_or_lose(engine, tmp_path, data, batch_size):
    """pool import reads files the same way: no crash, refused whole with nothing
    written or every row done or rejected once, the counts matching the pool; loaded
    again, nothing is added twice."""
    n = next(_examples)
    tenant, folder = f"fuzz{n}", tmp_path / f"ex{n}"
    folder.mkdir()
    tenants.add_tenant(engine, tenant, HOTLINE)
    data = data.replace(b"FFFF", b"%04d" % n)  # each example its own numbers
    source = write_bytes(folder / "f.csv", data)
    lines = data.count(b"\n") + 1
    done = []
    for _ in range(2):
        try:
            result = bulk.import_pool(engine, source, tenant_name=tenant, batch_size=batch_size)
        except ProvisionError as exc:
            assert exc.code == "invalid_file"
            assert sorted(p.name for p in folder.iterdir()) == ["f.csv"]
            assert sum(store_pool.pool_status(engine, tenant).values()) == 0
            return
        assert result.rows == result.done + len(result.errors)
        event(f"loaded: {'some' if result.done else 'no'} numbers added")
        numbered = [e.line for e in result.errors]
        assert len(set(numbered)) == len(numbered) and all(2 <= line <= lines for line in numbered)
        done.append(result.done)
        assert sum(store_pool.pool_status(engine, tenant).values()) == done[0]
    assert done[1] == 0
