"""The benchmarks' data: a fresh PostgreSQL bench database with callctl's schema, one
tenant and N bound AXN bindings loaded set-based (INSERT ... SELECT FROM generate_series,
the customers' numbers encrypted and hashed in Python and COPYed in), and shared AXE/AXB
X for the in-process part. bench.py measures calls on it, provisioning_bench.py
provisioning; anomaly_bench.py loads its own CDRs.

The numbers are synthetic (+86171... virtual numbers, +86138... customers, one agent):
nothing here is anybody's phone number.
"""
from __future__ import annotations

import io
import multiprocessing
import os
import signal
import time
from pathlib import Path

import psycopg2
from sqlalchemy import text

from callctl.store import crypto
from callctl.store.db import make_engine, upgrade
from callctl.store.tenants import add_tenant

DB_NAME = "callctl_bench"
TENANT = "bench"
HOTLINE = "+861058000000"
AGENT = "+8613900000001"          # the tenant's agent: calls from it to X reach the customer
X_PREFIX = "+86171"               # virtual numbers: +86171 + 8 digits (1..N)
A_PREFIX = "+86138"               # customers:       +86138 + 8 digits (same suffix as X)


KEY_FILE = Path(__file__).resolve().parent.parent / "var" / "bench" / "bench.keys"


class BenchError(RuntimeError):
    """A problem that stops the benchmark with one clear sentence."""


def use_bench_keys() -> None:
    """The bench's own key ring for the synthetic customers (made once, var/bench/bench.keys,
    0600), unless one is configured in CALLCTL_KEYS; daemons started later inherit it. One
    ring across runs: the databases kept between runs (anomaly, detection) hold its check
    values, and a throwaway ring per run would not match them."""
    if os.environ.get(crypto.ENV_KEYS):
        return
    if not KEY_FILE.exists():
        KEY_FILE.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(KEY_FILE, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as out:
            out.write(f"{crypto.LOOKUP}={crypto.new_key()} bench={crypto.new_key()}\n")
    os.environ[crypto.ENV_KEYS] = KEY_FILE.read_text().strip()


def x_number(i: int) -> str:
    return f"{X_PREFIX}{i:08d}"


def admin_connect(admin_dsn: str):
    try:
        conn = psycopg2.connect(admin_dsn, connect_timeout=3)
    except psycopg2.OperationalError as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise BenchError(
            f"PostgreSQL is not reachable at {admin_dsn} ({first}). The benchmark needs a server on "
            "127.0.0.1:5432 with trust auth for user postgres (e.g. `pg_ctlcluster 15 main start`), "
            "or pass --pg-admin DSN."
        ) from None
    conn.autocommit = True
    return conn


def prepare_database(admin_dsn: str, bench_url: str, n: int) -> dict:
    """A fresh callctl_bench with the schema, one tenant and n bound AXN bindings."""
    t0 = time.perf_counter()
    times = {}
    conn = admin_connect(admin_dsn)
    try:
        with conn.cursor() as cur:
            name = bench_url.rsplit("/", 1)[1]
            cur.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
            cur.execute(f'CREATE DATABASE "{name}"')
    finally:
        conn.close()
    engine = make_engine(bench_url)
    try:
        upgrade(engine)
        # All day: the bench's calls must bridge whenever it runs (the default hours end at 21:00).
        tenant = add_tenant(engine, TENANT, HOTLINE, callers=[AGENT], hours="00:00-24:00")
        times["schema_and_tenant_s"] = time.perf_counter() - t0
        t1 = time.perf_counter()
        with engine.begin() as db:
            # Bulk load as the PostgreSQL manual advises ("Populating a Database"): take the
            # secondary indexes, unique and foreign-key constraints of the two tables off,
            # load set-based, put the very same definitions (read from the catalog) back.
            defs = secondary_definitions(db, ("virtual_numbers", "bindings"))
            for drop, _ in reversed(defs):
                db.exec_driver_sql(drop)
            db.exec_driver_sql("SET LOCAL maintenance_work_mem = '512MB'")
            db.execute(
                text(
                    "INSERT INTO virtual_numbers (e164, tenant_id, state) "
                    "SELECT :xp || lpad(g::text, 8, '0'), :tid, 'bound' "
                    "FROM generate_series(1, :n) AS g"
                ),
                {"xp": X_PREFIX, "tid": tenant["id"], "n": n},
            )
            times["virtual_numbers_s"] = time.perf_counter() - t1
            t2 = time.perf_counter()
            # Customers' numbers are stored encrypted, as callctl stores them: sealed and
            # hashed here, COPYed to a scratch table, joined to their X set-based.
            load_customers(db, n)
            times["encrypt_customers_s"] = time.perf_counter() - t2
            # Long-term policies: expire in a year; reference = a policy number.
            db.execute(
                text(
                    "INSERT INTO bindings (tenant_id, number_id, mode, party_a, party_a_hash, reference, status, "
                    "                      expires_at) "
                    "SELECT v.tenant_id, v.id, 'AXN', c.party_a, c.party_a_hash, "
                    "       'POL-' || substr(v.e164, 7), 'active', now() + interval '365 days' "
                    "FROM virtual_numbers v JOIN bench_customers c ON c.suffix = substr(v.e164, 7) "
                    "WHERE v.tenant_id = :tid"
                ),
                {"tid": tenant["id"]},
            )
            times["bindings_s"] = time.perf_counter() - t2
            t2 = time.perf_counter()
            for _, create in defs:
                db.exec_driver_sql(create)
            times["indexes_and_constraints_s"] = time.perf_counter() - t2
            if secondary_definitions(db, ("virtual_numbers", "bindings")) != defs:
                raise BenchError("bulk load: indexes/constraints after the load differ from the schema's")
        t3 = time.perf_counter()
        with engine.connect().execution_options(isolation_level="AUTOCOMMIT") as db:
            db.exec_driver_sql("VACUUM ANALYZE")
        times["vacuum_analyze_s"] = time.perf_counter() - t3
        with engine.connect() as db:
            counts = db.execute(
                text(
                    "SELECT (SELECT count(*) FROM virtual_numbers WHERE state = 'bound'), "
                    "       (SELECT count(*) FROM bindings WHERE status = 'active' AND mode = 'AXN'), "
                    "       (SELECT count(DISTINCT party_a_hash) FROM bindings)"
                )
            ).one()
    finally:
        engine.dispose()
    if tuple(counts) != (n, n, n):
        raise BenchError(f"bench data incomplete: bound X / AXN bindings / customers = {tuple(counts)}, wanted {n}")
    times = {k: round(v, 2) for k, v in times.items()}
    return {"bindings": n, "tenant_id": tenant["id"], "load_s": round(time.perf_counter() - t0, 2), "steps": times}


def load_customers(db, n: int, chunk: int = 100_000) -> None:
    """bench_customers(suffix, party_a, party_a_hash): customer i sealed and hashed with
    the process's key ring, COPYed in chunks (a transaction-scoped scratch table). The
    sealing (about 35 us a number) runs in one forked process per CPU while the chunks
    already sealed are COPYed: at 10M it was most of the load."""
    crypto.ring()  # loaded before the fork: every worker seals with the same ring
    db.exec_driver_sql(
        "CREATE TEMP TABLE bench_customers (suffix text PRIMARY KEY, party_a text, party_a_hash text) ON COMMIT DROP"
    )
    cursor = db.connection.dbapi_connection.cursor()
    spans = [(start, min(start + chunk, n + 1)) for start in range(1, n + 1, chunk)]
    # Workers with SIGTERM's default action (bench.py's handler raises in them) that end
    # when the work does (close + join): terminate() could catch one holding a lock.
    pool = multiprocessing.get_context("fork").Pool(os.cpu_count() or 1, signal.signal, (signal.SIGTERM, signal.SIG_DFL))
    try:
        for lines in pool.imap(_sealed_customers, spans):
            cursor.copy_expert("COPY bench_customers FROM STDIN", io.StringIO(lines))
        pool.close()
    except BaseException:
        pool.terminate()
        raise
    finally:
        pool.join()
    db.exec_driver_sql("ANALYZE bench_customers")


def _sealed_customers(span: tuple[int, int]) -> str:
    ring = crypto.ring()
    lines = []
    for i in range(*span):
        number = f"{A_PREFIX}{i:08d}"
        lines.append(f"{i:08d}\t{ring.seal(number)}\t{ring.hash(number)}\n")
    return "".join(lines)


def secondary_definitions(db, tables: tuple[str, ...]) -> list[tuple[str, str]]:
    """(DROP, CREATE) statements for the unique constraints, plain indexes and foreign keys
    of `tables`, in creation order (indexes and unique constraints, then foreign keys).
    Primary keys and CHECK constraints stay: the rows reference the keys, checks are cheap."""
    out = []
    cons = db.execute(
        text(
            "SELECT c.conrelid::regclass::text, c.conname, c.contype, pg_get_constraintdef(c.oid) "
            "FROM pg_constraint c WHERE c.conrelid::regclass::text = ANY(:t) AND c.contype IN ('u', 'f') "
            "ORDER BY c.contype DESC, c.conrelid::regclass::text, c.conname"
        ),
        {"t": list(tables)},
    ).all()
    idx = db.execute(
        text(
            "SELECT i.tablename, i.indexname, i.indexdef FROM pg_indexes i "
            "WHERE i.schemaname = current_schema() AND i.tablename = ANY(:t) "
            "AND NOT EXISTS (SELECT 1 FROM pg_constraint c WHERE c.conindid = "
            "                (quote_ident(i.schemaname) || '.' || quote_ident(i.indexname))::regclass) "
            "ORDER BY i.tablename, i.indexname"
        ),
        {"t": list(tables)},
    ).all()
    for table, name, definition in idx:
        out.append((f'DROP INDEX "{name}"', definition))
    for table, name, kind, definition in cons:  # 'u' before 'f'
        out.append((f'ALTER TABLE "{table}" DROP CONSTRAINT "{name}"',
                    f'ALTER TABLE "{table}" ADD CONSTRAINT "{name}" {definition}'))
    return out


# Shared X for the in-process part: an AXE X with SHARED_BINDINGS customers and an AXB X
# with SHARED_BINDINGS pairs, beside the AXN range (+86172..., outside +86171 + 1..N).
SHARED_BINDINGS = 10_000
SHARED_X = {"AXE": "+8617200000001", "AXB": "+8617200000002"}
AXE_CUSTOMER, AXB_A, AXB_B = "+86137", "+86136", "+86135"  # + 8 digits (1..SHARED_BINDINGS)


def shared_party(prefix: str, j: int) -> str:
    return f"{prefix}{j:08d}"


def load_shared(bench_url: str, tenant_id: int, k: int = SHARED_BINDINGS) -> float:
    """The two shared X and their k bindings each, loaded set-based like the AXN ones
    (numbers sealed and hashed here, COPYed, joined in); AXE extensions 0..k-1, all of
    one width. Returns the seconds it took."""
    t0 = time.perf_counter()
    ring = crypto.ring()
    digits = len(str(k - 1))
    engine = make_engine(bench_url, pool_size=1)
    try:
        with engine.begin() as db:
            db.execute(text("INSERT INTO virtual_numbers (e164, tenant_id, state, mode) "
                            "VALUES (:axe, :tid, 'bound', 'AXE'), (:axb, :tid, 'bound', 'AXB')"),
                       {"axe": SHARED_X["AXE"], "axb": SHARED_X["AXB"], "tid": tenant_id})
            db.exec_driver_sql("CREATE TEMP TABLE bench_shared (j int PRIMARY KEY, c text, c_hash text, "
                               "a text, a_hash text, b text, b_hash text) ON COMMIT DROP")
            lines = []
            for j in range(1, k + 1):
                numbers = (shared_party(prefix, j) for prefix in (AXE_CUSTOMER, AXB_A, AXB_B))
                lines.append("\t".join([str(j), *(v for n in numbers for v in (ring.seal(n), ring.hash(n)))]) + "\n")
            db.connection.dbapi_connection.cursor().copy_expert("COPY bench_shared FROM STDIN", io.StringIO("".join(lines)))
            db.execute(text(
                "INSERT INTO bindings (tenant_id, number_id, mode, party_a, party_a_hash, extension, reference, status) "
                "SELECT v.tenant_id, v.id, 'AXE', s.c, s.c_hash, lpad((s.j - 1)::text, :digits, '0'), "
                "       'POL-AXE-' || s.j, 'active' "
                "FROM bench_shared s CROSS JOIN virtual_numbers v WHERE v.e164 = :axe"),
                {"digits": digits, "axe": SHARED_X["AXE"]})
            db.execute(text(
                "INSERT INTO bindings (tenant_id, number_id, mode, party_a, party_a_hash, party_b, party_b_hash, "
                "                      reference, status) "
                "SELECT v.tenant_id, v.id, 'AXB', s.a, s.a_hash, s.b, s.b_hash, 'POL-AXB-' || s.j, 'active' "
                "FROM bench_shared s CROSS JOIN virtual_numbers v WHERE v.e164 = :axb"),
                {"axb": SHARED_X["AXB"]})
        with engine.connect().execution_options(isolation_level="AUTOCOMMIT") as db:
            db.exec_driver_sql("ANALYZE virtual_numbers, bindings")
    finally:
        engine.dispose()
    return time.perf_counter() - t0
