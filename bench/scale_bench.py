"""Scale in bindings: the same figures at 1,000,000 and at 10,000,000 bindings, side by side.

    .venv/bin/python -m bench.bench --only scale                      # 1M then 10M
    .venv/bin/python -m bench.bench --only scale --scales 20000,100000  # a short check

For each size in turn, its own database, callctl_bench_scale_N (bench/data.py's set-based
load, the indexes built after it; kept and reused while it holds exactly the N bindings,
--scale-reload loads it afresh; 10M is about 6.7 GB: drop it with `dropdb` when done), then:

0. the call path's tables and indexes read once into the OS page cache (pg_prewarm), as
   on a box that has served calls for a while (cold, 10M bindings read from disk);
1. in-process decision p99 (bench.in_process_latency, random X);
2. through the Asterisk lab (held under LabLock): `callctl serve asterisk` on the
   database, SIPp calls to random X at a fixed moderate rate (bench.place_calls); the
   decision p99 from the daemon's 'call routed' lines, its RSS (/proc) before and after;
3. `callctl bind --bulk` speed with the N bindings present (provisioning_bench; its
   numbers and bindings deleted again after);
4. pg_database_size.

Records inprocess_p99_ms_1m/10m, decision_p99_ms_1m/10m, bulk_10m_over_1m,
daemon_rss_growth_10m and database_size_gb_10m when the sizes are 1M and 10M.
"""
from __future__ import annotations

import os
import random
import time
from pathlib import Path

from sqlalchemy import text

from bench import provisioning_bench, targets
from bench.bench import OUT_DIR, in_process_latency, place_calls, say, scale_key
from bench.data import AGENT, TENANT, BenchError, admin_connect, prepare_database, x_number
from callctl.store.db import make_engine, upgrade
from lab import sipp
from lab.harness import ASTERISK, LabLock, callctl_daemon, json_events

DB_NAME = "callctl_bench_scale"


def rss_mb(pid: int) -> float:
    """Resident memory of a process, MB (VmRSS from /proc)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise BenchError(f"no VmRSS for pid {pid}")


def database_size_gb(url: str) -> float:
    engine = make_engine(url, pool_size=1)
    try:
        with engine.connect() as db:
            return db.execute(text("SELECT pg_database_size(current_database())")).scalar_one() / 1e9
    finally:
        engine.dispose()


# What a decision and its CDR read of the two big tables: their heaps, keys and the
# indexes the facts statement and the CDR insert look X and its binding up in.
CALL_PATH = ("virtual_numbers", "virtual_numbers_pkey", "uq_vn_e164", "bindings", "bindings_pkey",
             "ix_binding_number_status")


def warm_call_path(url: str) -> tuple[float, float]:
    """Read the call path's relations once into the OS page cache (pg_prewarm 'read'), as a
    box that has served calls for a while holds them: random X across 10M bindings read
    about 4 pages per decision outside shared_buffers, from disk until cached (I/O read
    time p50 0.45 ms, p99 7 ms a decision, EXPLAIN (ANALYZE, BUFFERS) with track_io_timing).
    Returns (GB read, seconds)."""
    t0 = time.perf_counter()
    engine = make_engine(url, pool_size=1)
    try:
        with engine.begin() as db:
            db.execute(text("CREATE EXTENSION IF NOT EXISTS pg_prewarm"))
            size = db.execute(text("SELECT sum(pg_relation_size(c.oid)) FROM pg_class c WHERE c.relname = ANY(:r)"),
                              {"r": list(CALL_PATH)}).scalar_one()
            db.execute(text("SELECT pg_prewarm(c.oid, 'read') FROM pg_class c WHERE c.relname = ANY(:r)"),
                       {"r": list(CALL_PATH)})
    finally:
        engine.dispose()
    return float(size) / 1e9, time.perf_counter() - t0


def lab_decisions(url: str, n: int, rate: float, seconds: float, rng: random.Random, workdir: Path) -> dict:
    """callctl serve asterisk on `url`; SIPp calls to random X at `rate` for `seconds` (after
    a warm-up); the daemon's decision ms and its RSS before and after. Lab up and down here."""
    daemon = callctl_daemon(url, workdir)
    with LabLock():
        ASTERISK.up()
        try:
            daemon.start()
            warm = [(AGENT, x_number(i)) for i in rng.choices(range(1, n + 1), k=100)]
            place_calls(warm, 20.0, 100, "scale warm-up")
            rss_before, load_before = rss_mb(daemon.proc.pid), os.getloadavg()[0]
            offset = daemon.log_path.stat().st_size
            pairs = [(AGENT, x_number(i)) for i in rng.choices(range(1, n + 1), k=int(rate * seconds))]
            res = place_calls(pairs, rate, 100, f"scale {n:,} at {rate:g}/s")
            rss_after, load_after = rss_mb(daemon.proc.pid), os.getloadavg()[0]
        finally:
            daemon.stop()
            ASTERISK.down()
    with open(daemon.log_path, "rb") as f:
        f.seek(offset)
        events = json_events(f.read().decode(errors="replace"))
    ms = [float(e["ms"]) for e in events if e.get("event") == "call routed" and "ms" in e]
    if res.successful != len(pairs) or len(ms) < len(pairs):
        raise BenchError(f"scale lab step at {n:,}: {res.summary()}, {len(ms)} decisions logged "
                         f"(p50 {sipp.percentile(ms, 50)} ms, p99 {sipp.percentile(ms, 99)} ms); "
                         f"box load (1 min) {load_before:.1f} -> {load_after:.1f}")
    return {"calls": len(pairs), "rate": rate, "p50_ms": sipp.percentile(ms, 50), "p99_ms": sipp.percentile(ms, 99),
            "max_ms": max(ms), "setup_ms_mean": res.setup_ms_mean, "rss_mb_before": round(rss_before, 1),
            "rss_mb_after": round(rss_after, 1), "box_load_1min": [load_before, load_after]}


def loaded(admin_dsn: str, url: str, n: int) -> bool:
    """Does the size's database hold exactly the bench's n bindings (a load that finished)?"""
    admin = admin_connect(admin_dsn)
    try:
        with admin.cursor() as cur:
            cur.execute("SELECT 1 FROM pg_database WHERE datname = %s", (url.rsplit("/", 1)[1],))
            if cur.fetchone() is None:
                return False
    finally:
        admin.close()
    engine = make_engine(url, pool_size=1)
    try:
        with engine.connect() as db:
            return tuple(db.execute(text("SELECT (SELECT count(*) FROM bindings), (SELECT count(*) FROM virtual_numbers), "
                                         "(SELECT count(*) FROM tenants)")).one()) == (n, n, 1)
    finally:
        engine.dispose()


def one_size(args, base: str, n: int, rng: random.Random) -> dict:
    url = f"postgresql+psycopg2://{base}/{DB_NAME}_{n}"
    if loaded(args.pg_admin, url, n) and not args.scale_reload:
        say(f"Scale: {n:,} bindings, {DB_NAME}_{n} already loaded, reused (migrations applied)")
        engine = make_engine(url, pool_size=1)
        try:
            upgrade(engine)  # a schema newer than the kept database's
        finally:
            engine.dispose()
        db = {"load_s": None, "steps": {}}
    else:
        say(f"Scale: {n:,} bindings, loading {DB_NAME}_{n} ...")
        db = prepare_database(args.pg_admin, url, n)
        say(f"Scale: loaded in {db['load_s']:.0f} s ({', '.join(f'{k[:-2]} {v:.0f} s' for k, v in db['steps'].items())})")
    out = {"bindings": n, "load_s": db["load_s"], "load_steps": db["steps"], "database_gb": database_size_gb(url)}
    out["warm_gb"], out["warm_s"] = warm_call_path(url)
    say(f"Scale: call path's tables and indexes ({out['warm_gb']:.2f} GB) read into the page cache in {out['warm_s']:.0f} s")
    out["inprocess"] = in_process_latency(url, n, args.samples, rng)
    say(f"Scale: in-process p99 {out['inprocess']['p99_ms']:.2f} ms")
    out["lab"] = lab_decisions(url, n, args.scale_rate, args.scale_seconds, rng, OUT_DIR / "scale")
    lab = out["lab"]
    say(f"Scale: through the lab at {lab['rate']:g}/s, p99 {lab['p99_ms']:.2f} ms over {lab['calls']:,} calls; "
        f"daemon RSS {lab['rss_mb_before']:.0f} -> {lab['rss_mb_after']:.0f} MB")
    work = OUT_DIR / "scale" / "provisioning"
    work.mkdir(parents=True, exist_ok=True)
    try:
        provisioning_bench.pool_import(url, work, TENANT, args.bulk_rows, say)
        out["bulk"] = provisioning_bench.bulk_bind(url, work, TENANT, args.bulk_rows, say)
    except provisioning_bench.ProvisioningBenchError as exc:
        raise BenchError(str(exc)) from None
    finally:
        remove_bulk(url)
    return out


def remove_bulk(url: str) -> None:
    """The bulk step's bindings and numbers out again: the database stays n bindings, reusable."""
    engine = make_engine(url, pool_size=1)
    try:
        with engine.begin() as db:
            db.execute(text("DELETE FROM bindings WHERE number_id IN "
                            "(SELECT id FROM virtual_numbers WHERE e164 LIKE :p)"), {"p": provisioning_bench.POOL_PREFIX + "%"})
            db.execute(text("DELETE FROM virtual_numbers WHERE e164 LIKE :p"), {"p": provisioning_bench.POOL_PREFIX + "%"})
    finally:
        engine.dispose()


def run(args) -> dict:
    base = args.pg_admin.split("://", 1)[1].rsplit("/", 1)[0]
    rng = random.Random(args.seed)
    started = time.monotonic()
    sizes = [one_size(args, base, n, rng) for n in args.scales]
    report(sizes)
    return {"sizes": sizes, "run_s": round(time.monotonic() - started)}


def report(sizes: list[dict]) -> None:
    by = {scale_key(s["bindings"]): s for s in sizes}
    for key, s in by.items():
        if key:
            targets.record(f"inprocess_p99_ms_{key}", s["inprocess"]["p99_ms"], f"{s['inprocess']['samples']:,} random X")
            targets.record(f"decision_p99_ms_{key}", s["lab"]["p99_ms"],
                           f"{s['lab']['calls']:,} calls at {s['lab']['rate']:g}/s (scale part)")
    if "1m" in by and "10m" in by:
        small, big = by["1m"], by["10m"]
        targets.record("bulk_10m_over_1m", big["bulk"]["per_s"] / small["bulk"]["per_s"],
                       f"{big['bulk']['per_s']:,}/s against {small['bulk']['per_s']:,}/s")
        targets.record("daemon_rss_growth_10m", big["lab"]["rss_mb_after"] / small["lab"]["rss_mb_after"],
                       f"{big['lab']['rss_mb_after']:.0f} MB against {small['lab']['rss_mb_after']:.0f} MB")
        targets.record("database_size_gb_10m", big["database_gb"], f"1M: {small['database_gb']:.2f} GB")
    rows = [
        ("fresh load, s", lambda s: "reused" if s["load_s"] is None else f"{s['load_s']:.0f}"),
        ("database size, GB", lambda s: f"{s['database_gb']:.2f}"),
        ("call path warmed, GB (s)", lambda s: f"{s['warm_gb']:.2f} ({s['warm_s']:.0f})"),
        ("in-process decision p50 / p99, ms", lambda s: f"{s['inprocess']['p50_ms']:.2f} / {s['inprocess']['p99_ms']:.2f}"),
        ("lab decision p50 / p99, ms", lambda s: f"{s['lab']['p50_ms']:.2f} / {s['lab']['p99_ms']:.2f}"),
        ("lab setup mean, ms", lambda s: f"{s['lab']['setup_ms_mean']:.1f}"),
        ("box load (1 min) before / after calls", lambda s: "{:.1f} / {:.1f}".format(*s["lab"]["box_load_1min"])),
        ("daemon RSS before / after calls, MB", lambda s: f"{s['lab']['rss_mb_before']:.0f} / {s['lab']['rss_mb_after']:.0f}"),
        ("bulk bind, bindings/s", lambda s: f"{s['bulk']['per_s']:,}"),
    ]
    say("\n" + "=" * 78 + "\ncallctl scale in bindings (targets: p99 < 5 ms both ways, bulk at 10M >= 0.8 of 1M,"
        "\nRSS at 10M <= 1.1 of 1M)\n" + "=" * 78)
    say(f"{'':<38}" + "".join(f"{s['bindings']:>18,}" for s in sizes))
    for label, value in rows:
        say(f"{label:<38}" + "".join(f"{value(s):>18}" for s in sizes))
    say("=" * 78)
