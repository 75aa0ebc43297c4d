"""Detection latency: from the CDR of the call that crosses an anomaly rule's threshold to
the automatic block being in force, with CDRs arriving at 1,000 per second.

    .venv/bin/python -m bench.bench --only detection
    .venv/bin/python -m bench.bench --only detection --crossings 5 --anomaly-cdrs 100000   # a short check

1. The anomaly bench's database (bench/anomaly_bench.py: N CDRs of history, reused when
   it holds them), plus, made once, FEED_BINDINGS AXN bindings of its 20 tenants for
   the live calls (+86179... X, customers sealed with the bench's key ring). Unless the
   job's watermark is past the history already, one catch-up pass reads it (about a
   minute), as a job already running would have.
2. `callctl anomaly run --follow` starts (conf/anomaly.yaml, its own interval).
3. A feeder writes CDRs at --cdr-rate per second as the asyncio daemon records finished
   calls (PgCallStore.write_cdr: one statement and commit per CDR; a batch every ~10 ms): random bindings, a fifth from the customer, started now. Every
   --gap seconds it puts into that stream a burst of `calls` calls to one fresh binding
   (customer_frequency, action block: conf/anomaly.yaml), spread over a second; the
   burst's last CDR crosses the threshold, and the moment its batch committed is noted.
4. A poller reads the blocks the call path applies (scope binding, in force now) every
   POLL seconds; latency = first seen - crossing commit (resolution POLL).
5. p50/p95/max over --crossings, and the job's CPU share: its CPU seconds (/proc, all
   threads) over the wall seconds of the feed; the CPU of its PostgreSQL backends beside it.

The feed's CDRs (call_id detect-...) and their findings and blocks are deleted at the end;
the bindings and the job's watermark stay.
"""
from __future__ import annotations

import asyncio
import io
import json
import os
import random
import subprocess
import sys
import threading
import time
from datetime import datetime, timedelta, timezone
from pathlib import Path

from sqlalchemy import text

from bench import anomaly_bench, targets
from bench.bench import OUT_DIR, REPO, say
from bench.cpu import backend_cpu_seconds, cpu_seconds
from bench.data import BenchError
from callctl.anomaly.config import load as load_rules
from callctl.anomaly.job import run_pass
from callctl.store import crypto
from callctl.store.partitions import ensure_cdr_partitions
from callctl.store.pgcalls import PgCallStore
from lab import sipp

FEED_BINDINGS = 20_000     # bindings the background calls go to (1,000 per tenant)
AGENTS = 1_000            # callers per tenant
BURST_BINDINGS = 2_000     # fresh bindings, one per crossing (per run: offset by the run's start)
X_PREFIX, A_PREFIX = "+86179", "+86134"
RULE = "customer_frequency"
POLL = 0.05
BATCH_S = 0.01


def ensure_bindings(engine, n: int) -> list[tuple[int, int, str]]:
    """(binding id, tenant id, X) of the detection bindings, made once set-based."""
    with engine.begin() as db:
        have = db.execute(text("SELECT count(*) FROM bindings WHERE reference LIKE 'DETECT-%'")).scalar_one()
        if have != n:
            if have:
                raise BenchError(f"{have} detection bindings in the anomaly database, wanted {n}: drop it")
            ring = crypto.ring()
            db.exec_driver_sql("CREATE TEMP TABLE detect_customers (i int PRIMARY KEY, a text, a_hash text) ON COMMIT DROP")
            lines = "".join(f"{i}\t{ring.seal(f'{A_PREFIX}{i:08d}')}\t{ring.hash(f'{A_PREFIX}{i:08d}')}\n"
                            for i in range(1, n + 1))
            db.connection.dbapi_connection.cursor().copy_expert("COPY detect_customers FROM STDIN", io.StringIO(lines))
            db.execute(text("INSERT INTO virtual_numbers (e164, tenant_id, state) "
                            "SELECT :xp || lpad(i::text, 8, '0'), 1 + i % 20, 'bound' FROM generate_series(1, :n) i"),
                       {"xp": X_PREFIX, "n": n})
            db.execute(text(
                "INSERT INTO bindings (tenant_id, number_id, mode, party_a, party_a_hash, reference, status, expires_at) "
                "SELECT v.tenant_id, v.id, 'AXN', c.a, c.a_hash, 'DETECT-' || c.i, 'active', now() + interval '365 days' "
                "FROM detect_customers c JOIN virtual_numbers v ON v.e164 = :xp || lpad(c.i::text, 8, '0')"),
                {"xp": X_PREFIX})
        rows = db.execute(text("SELECT b.id, b.tenant_id, v.e164 FROM bindings b JOIN virtual_numbers v "
                               "ON v.id = b.number_id WHERE b.reference LIKE 'DETECT-%' ORDER BY b.id")).all()
    return [tuple(r) for r in rows]


def clear_feed(engine) -> None:
    """The feed's CDRs and what the job made of them out (findings of the last two days:
    the history lies further back), the job's watermark kept: the next run needs no
    catch-up pass."""
    with engine.begin() as db:
        db.execute(text("DELETE FROM cdrs WHERE call_id LIKE 'detect-%'"))
        recent = "SELECT id FROM anomaly_findings WHERE window_end > now() - interval '2 days'"
        db.execute(text(f"DELETE FROM blocks WHERE finding_id IN ({recent})"))
        db.execute(text(f"DELETE FROM anomaly_findings WHERE id IN ({recent})"))


def cdr(seq: int, binding: tuple[int, int, str], inbound: bool, now: datetime, rng: random.Random) -> dict:
    """One finished call's CDR as CallService.cdr_row makes it (synthetic, masked numbers)."""
    answered = rng.random() < 0.7
    talk = round(rng.uniform(1, 120), 3) if answered else 0.0
    # an agent of the tenant (AGENTS each) calls the customer, or the customer calls in
    suffix = binding[0] % 10**8 if inbound else binding[1] * 10**5 + rng.randrange(AGENTS)
    caller = f"{A_PREFIX if inbound else '+86133'}{suffix:08d}"
    return {
        "call_id": f"detect-{seq}", "tenant_id": binding[1], "binding_id": binding[0], "virtual_number": binding[2],
        "direction": "from_customer" if inbound else "to_customer", "caller_masked": caller[:6] + "****" + caller[-4:],
        "caller_hash": crypto.ring().hash(caller), "callee_masked": "+86134****0000", "decision": "bridged",
        "reject_reason": None, "started_at": now - timedelta(seconds=talk + 5),
        "answered_at": now - timedelta(seconds=talk) if answered else None, "ended_at": now,
        "ring_seconds": 5.0, "talk_seconds": talk, "dial_status": "ANSWER" if answered else "NOANSWER",
        "hangup_cause": 16, "node": "detect", "purpose": None, "hangup_by": None,
    }


class Poller(threading.Thread):
    """Notes when a block on each watched binding is first in force (as the call path reads it)."""

    def __init__(self, engine, stop: threading.Event):
        super().__init__(daemon=True)
        self.engine, self.stop, self.seen, self.watch = engine, stop, {}, set()
        self.lock = threading.Lock()

    def run(self) -> None:
        with self.engine.connect() as db:
            while not self.stop.wait(POLL):
                with self.lock:
                    watch = sorted(self.watch - set(self.seen))
                if not watch:
                    continue
                found = db.execute(text(
                    "SELECT binding_id FROM blocks WHERE scope = 'binding' AND binding_id = ANY(:ids) "
                    "AND starts_at <= now() AND (ends_at IS NULL OR ends_at > now())"), {"ids": watch}).scalars().all()
                db.commit()
                at = time.time()
                for b in found:
                    self.seen.setdefault(b, at)


def backends_cpu_s(engine) -> float:
    """CPU seconds of the job's PostgreSQL backends (application_name callctl-anomaly-bench)."""
    return sum(backend_cpu_seconds(engine, "callctl-anomaly-bench").values())


async def feed(url: str, bindings, bursts, rate: float, gap: float, calls: int, rng: random.Random,
               poller: Poller):
    """CDRs at `rate`/s, each batch of ~10 ms written at once through the daemon's call store
    (PgCallStore.write_cdr: one statement and commit per CDR, as a hangup writes it), a
    burst on bursts[k] every `gap` s. Returns {burst binding: time.time() after the
    crossing CDR committed}, CDRs written, seconds."""
    store = await PgCallStore.open(url, size=4, timeout=10.0)
    crossings: dict[int, float] = {}
    pending: list[tuple[float, tuple, bool]] = []  # (due, binding, crossing) of burst calls
    started = time.monotonic()
    seq, written, k = 0, 0, 0

    async def crossing_write(row: dict, binding_id: int) -> None:
        await store.write_cdr(row)
        crossings[binding_id] = time.time()

    try:
        while (elapsed := time.monotonic() - started) < gap * (len(bursts) + 1):
            if k < len(bursts) and elapsed >= gap * (k + 1):  # the next burst: `calls` CDRs over a second
                pending += [(elapsed + j / calls, bursts[k], j == calls - 1) for j in range(calls)]
                k += 1
            now = datetime.now(timezone.utc)
            due = max(int(elapsed * rate) - written, 0)
            writes = [store.write_cdr(cdr(seq + i, rng.choice(bindings), rng.random() < 0.2, now, rng))
                      for i in range(due)]
            seq, written = seq + due, written + due
            while pending and pending[0][0] <= elapsed:
                _, b, last = pending.pop(0)
                row = cdr(seq, b, False, now, rng)
                seq += 1
                if last:
                    with poller.lock:
                        poller.watch.add(b[0])
                writes.append(crossing_write(row, b[0]) if last else store.write_cdr(row))
            await asyncio.gather(*writes)
            await asyncio.sleep(max(0.0, BATCH_S - (time.monotonic() - started - elapsed)))
    finally:
        await store.close()
    return crossings, written, time.monotonic() - started


def run(args) -> dict:
    base = args.pg_admin.split("://", 1)[1].rsplit("/", 1)[0]
    url = f"postgresql+psycopg2://{base}/{anomaly_bench.DB_NAME}"
    say(f"Detection: the anomaly bench's database, {args.anomaly_cdrs:,} CDRs of history ...")
    engine = anomaly_bench.prepare(args.pg_admin, url, args.anomaly_cdrs)["engine"]
    rules_path = str(REPO / "conf" / "anomaly.yaml")
    config = load_rules(rules_path)
    rule = config.rule(RULE)
    if rule.action != "block":
        raise BenchError(f"{RULE} does not block in {rules_path}: nothing to time")
    rng = random.Random(args.seed)
    job = None
    try:
        ensure_cdr_partitions(engine)
        bindings = ensure_bindings(engine, FEED_BINDINGS + BURST_BINDINGS)
        feed_bindings, spare = bindings[:FEED_BINDINGS], bindings[FEED_BINDINGS:]
        bursts = rng.sample(spare, args.crossings)
        clear_feed(engine)
        with engine.connect() as db:
            seen = db.execute(text("SELECT coalesce((SELECT seen_id FROM anomaly_state WHERE job = 'anomaly'), -1), "
                                   "(SELECT coalesce(max(id), 0) FROM cdrs)")).one()
        if seen[0] < seen[1]:  # the job has not read the history yet (the anomaly part resets it)
            anomaly_bench._reset(engine)
            t = time.monotonic()
            # As a job following for a while stands: its last check of the watermark one
            # overlap ago (nothing is written meanwhile), so its first pass makes it safe.
            caught_up = run_pass(engine, config,
                                 now=datetime.now(timezone.utc) - timedelta(seconds=config.overlap_seconds + 1))
            say(f"Detection: catch-up pass over {caught_up.cdrs:,} CDRs in {time.monotonic() - t:.1f} s")
        env = {**os.environ, "CALLCTL_DATABASE_URL": url + "?application_name=callctl-anomaly-bench",
               "CALLCTL_LOG_LEVEL": "debug",  # each rule's seconds in detection_job.log
               "CALLCTL_CONFIG": str(REPO / "conf" / "callctl.yaml")}
        exe = Path(sys.executable).with_name("callctl")
        log = open(OUT_DIR / "detection_job.log", "w")
        argv = [str(exe), "anomaly", "run", "--follow", "--rules", rules_path] + (
            ["--interval", str(args.detect_interval)] if args.detect_interval else [])
        job = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=REPO)
        time.sleep(2)
        stop = threading.Event()
        poller = Poller(engine, stop)
        poller.start()
        cpu0, pg0 = cpu_seconds(job.pid), backends_cpu_s(engine)
        say(f"Detection: feeding {args.cdr_rate:g} CDRs/s with a burst of {rule.calls} calls to a fresh binding "
            f"every {args.gap:g} s, {args.crossings} crossings ...")
        crossings, written, wall = asyncio.run(feed(url, feed_bindings, bursts, args.cdr_rate, args.gap, rule.calls,
                                                    rng, poller))
        cpu1, pg1 = cpu_seconds(job.pid), backends_cpu_s(engine)
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and len(poller.seen) < len(crossings):
            time.sleep(0.2)
        stop.set()
        poller.join()
    finally:
        if job is not None:
            job.terminate()  # the pass under way finishes first
            try:
                job.wait(60)
            except subprocess.TimeoutExpired:
                job.kill()
                job.wait()
        clear_feed(engine)
        engine.dispose()
    latencies = [poller.seen[b] - at for b, at in crossings.items() if b in poller.seen]
    missed = len(crossings) - len(latencies)
    passes = [json.loads(line) for line in (OUT_DIR / "detection_job.log").read_text().splitlines()
              if line.startswith('{"cdrs"')]
    busy = [p["seconds"] for p in passes if p["cdrs"]]
    result = {
        "history_cdrs": args.anomaly_cdrs, "cdr_rate_offered": args.cdr_rate, "cdrs_written": written,
        "cdr_rate_achieved": round(written / wall, 1), "feed_s": round(wall, 1), "crossings": len(crossings),
        "blocked": len(latencies), "missed": missed, "interval_s": args.detect_interval or config.interval_seconds,
        "p50_s": sipp.percentile(latencies, 50), "p95_s": sipp.percentile(latencies, 95),
        "max_s": max(latencies) if latencies else None, "job_passes": len(passes),
        "pass_s_p50": sipp.percentile(busy, 50), "pass_s_max": max(busy) if busy else None,
        "job_cpu_share": round((cpu1 - cpu0) / wall, 3), "job_backends_cpu_share": round((pg1 - pg0) / wall, 3),
    }
    if missed or not crossings:
        raise BenchError(f"detection: {missed} of {len(crossings)} crossings not blocked within 60 s: {result}")
    report(result)
    return result


def report(r: dict) -> None:
    if r["history_cdrs"] >= 10_000_000 and r["crossings"] >= 20:
        targets.record("detection_p95_s", r["p95_s"], f"p50 {r['p50_s']:.2f} s, max {r['max_s']:.2f} s over "
                       f"{r['crossings']} crossings, {r['cdr_rate_achieved']:g} CDRs/s")
        targets.record("detection_job_cpu_share", r["job_cpu_share"],
                       f"its PostgreSQL backends {r['job_backends_cpu_share']:.2f} more")
    met = "met" if r["p95_s"] is not None and r["p95_s"] < 5 else "NOT met"
    say("\n".join([
        "", "=" * 78, "callctl detection latency (CDR crossing a threshold -> block in force)", "=" * 78,
        f"history                      {r['history_cdrs']:,} CDRs; feed {r['cdr_rate_achieved']:,} CDRs/s offered "
        f"{r['cdr_rate_offered']:g} ({r['cdrs_written']:,} in {r['feed_s']:.0f} s)",
        f"latency over {r['crossings']} crossings    p50 {r['p50_s']:.2f} s, p95 {r['p95_s']:.2f} s "
        f"(target < 5 s: {met}), max {r['max_s']:.2f} s",
        f"anomaly run --follow         {r['job_passes']} passes, interval {r['interval_s']:g} s, a pass with new CDRs "
        f"p50 {r['pass_s_p50']:.2f} s, max {r['pass_s_max']:.2f} s",
        f"                             CPU share "
        f"{r['job_cpu_share']:.2f} of a core (its PostgreSQL backends {r['job_backends_cpu_share']:.2f})",
        "=" * 78,
    ]))
