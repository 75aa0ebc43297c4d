#!/usr/bin/env python3
"""SIPp load benchmark: callctl against a minimal FastAGI, through the real Asterisk lab.

    .venv/bin/python -m bench.bench            # full run (1,000,000 bindings), ~10 min
    .venv/bin/python -m bench.bench --quick    # short check (100,000 bindings, 1 repeat)

1. PostgreSQL (127.0.0.1:5432, user postgres, trust auth; bench/data.py, shared with
   the provisioning part): database `callctl_bench` is dropped and created fresh, migrated with callctl's own migrations, one tenant made
   with callctl.store.tenants.add_tenant (hotline + one agent caller), then N virtual
   numbers in state `bound` and N AXN bindings to distinct customer numbers, loaded with
   set-based SQL (INSERT ... SELECT FROM generate_series; the customers' numbers
   encrypted and hashed in Python and COPYed in), then VACUUM ANALYZE.
2. In-process decision latency: CallService.route_on_loop(X, agent) for random X on that DB,
   and what encryption costs per decision (decrypt + lookup hash, microseconds). Beside
   each of those calls, in turn, the same for an agent's first call to an AXE X shared by
   10,000 customers (the extension prompt) and a random party's call on an AXB X shared
   by 10,000 pairs (both loaded set-based too, +86172... X), with their ratio to AXN.
   `--only inprocess` runs steps 1 and 2 alone (no lab):
       .venv/bin/python -m bench.bench --only inprocess --database callctl_bench_inprocess
3. The lab (held under LabLock the whole time): each PBX in turn (`--pbx asterisk`,
   `freeswitch` or `both`, the default), a SIPp UAS on 5070 answers every outbound leg,
   SIPp UAC calls from the agent to random bound X at stepped rates. Two servers take
   turns on the PBX's port, interleaved per step: callctl (`callctl serve asterisk` on
   FastAGI 4573, `callctl serve freeswitch` on ESL 8084) on the bench database, and the
   minimal application (bench/minimal_fastagi.py, bench/minimal_esl.py: the floor of
   the protocol's cost, bridging every call to one destination).
   A step is clean when every call succeeds and the mean INVITE->200 setup time is under
   100 ms; a rate is clean for a server when its best repeat is clean. A server stops
   stepping after two consecutive unclean rates. The ratio of the two highest clean
   rates means something only once the minimal server found its limit: the default
   rates go on until both have (on this 2-core box: 325-350 and 400-450 calls/s).
4. Prints a table per step, a summary per PBX and, with both, their figures side by
   side (CPU ms per call of the call server, the PBX and PostgreSQL); writes
   var/bench/result.json. A short smoke run of both paths (about a minute):
       .venv/bin/python -m bench.bench --only calls --bindings 20000 --samples 200 \
           --rates 20,40 --seconds 2 --repeats 1 --warmup 5
5. Provisioning throughput on the same database (bench/provisioning_bench.py): pool
   import, `callctl bind --bulk`, and POST /v1/bindings through `callctl serve api`,
   bindings per second with the 1,000,000 bindings present and the CPU each bind cost
   (server, PostgreSQL, client), then the API offered 500 binds/s open loop (latency
   p50/p99). `--only provisioning` runs just this (no lab); `--only calls` skips it.
6. The anomaly pass over 10,000,000 CDRs (bench/anomaly_bench.py, `--only anomaly`).
7. Scale in bindings (bench/scale_bench.py, `--only scale`): 1,000,000 and 10,000,000
   bindings side by side, each in its own kept database.
8. Detection latency (bench/detection_bench.py, `--only detection`): CDRs at 1,000/s
   beside the anomaly part's 10M, the time from a threshold-crossing CDR to its block.

The numbers in this benchmark are synthetic (+86171... virtual numbers, +86138...
customers, one agent): nothing here is anybody's phone number.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import random
import signal
import statistics
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent

import uvloop
from sqlalchemy import text

from callctl import logs
from lab import sipp
from callctl.core.decision import Bridge, CollectExtension
from callctl.service import CallService
from callctl.store import crypto
from callctl.store.db import make_engine
from callctl.store.pgcalls import PgCallStore
from callctl.store.spool import CdrSpool
from bench.data import (
    AGENT,
    AXB_A,
    AXB_B,
    DB_NAME,
    SHARED_BINDINGS,
    SHARED_X,
    TENANT,
    BenchError,
    load_shared,
    prepare_database,
    shared_party,
    use_bench_keys,
    x_number,
)
from bench import targets
from bench.cpu import cpu_seconds, process_cpu_s
from lab.harness import (
    ASTERISK,
    FREESWITCH,
    LabError,
    LabLock,
    Pbx,
    callctl_daemon,
    json_events,
    floor_fastagi,
    minimal_esl,
    minimal_fastagi,
)

SETUP_LIMIT_MS = 100.0            # a clean step keeps the mean INVITE->200 below this
OUT_DIR = REPO / "var" / "bench"

SERVERS = ("callctl", "minimal", "floor")  # the floor only on Asterisk
PBXS = {"asterisk": ASTERISK, "freeswitch": FREESWITCH}
LABEL = {"callctl": "callctl", "minimal": "minimal app",  # FastAGI (Asterisk) or ESL (FreeSWITCH)
         "floor": "plain durable"}


def fmt(v: float | None, digits: int = 1) -> str:
    return "-" if v is None else f"{v:.{digits}f}"


def say(*args) -> None:
    print(*args, flush=True)


# ---------------------------------------------------------------------------- database


def crypto_cost(bench_url: str, samples: int) -> dict:
    """What encryption adds to one call-time decision: decrypting the binding's stored
    number(s) and hashing the caller for the caller-block lookup, in microseconds."""
    engine = make_engine(bench_url, pool_size=1)
    try:
        with engine.connect() as db:
            stored = [r[0] for r in db.exec_driver_sql(
                f"SELECT party_a FROM bindings ORDER BY random() LIMIT {min(samples, 10_000)}")]
    finally:
        engine.dispose()
    ring = crypto.ring()
    decrypt_us, hash_us = [], []
    for token in stored:
        t = time.perf_counter()
        number = ring.open(token)
        t1 = time.perf_counter()
        ring.hash(number)
        t2 = time.perf_counter()
        decrypt_us.append((t1 - t) * 1e6)
        hash_us.append((t2 - t1) * 1e6)
    per_call = [d + h for d, h in zip(decrypt_us, hash_us)]
    return {"samples": len(stored), "decrypt_p50_us": sipp.percentile(decrypt_us, 50),
            "hash_p50_us": sipp.percentile(hash_us, 50), "per_call_p50_us": sipp.percentile(per_call, 50),
            "per_call_p99_us": sipp.percentile(per_call, 99), "per_call_mean_us": statistics.fmean(per_call)}


def cdr_count(engine) -> int:
    with engine.connect() as db:
        return db.execute(text("SELECT count(*) FROM cdrs")).scalar_one()


# ---------------------------------------------------------------------------- in-process


def in_process_latency(bench_url: str, n_bindings: int, samples: int, rng: random.Random,
                       shared_rng: random.Random | None = None) -> dict:
    """CallService.route_on_loop(X, agent) on the bench DB, as the daemon calls it (its
    event loop, its asyncpg pool), one call at a time. With shared_rng (the shared X
    loaded: load_shared), each sample also times, in turn with it, an agent's first call
    to the AXE X (the extension prompt) and a random party's call on the AXB X."""
    shared = shared_rng is not None

    async def timed(service, x: str, caller: str):
        t = time.perf_counter()
        _, decision = await service.route_on_loop(x, caller)
        return (time.perf_counter() - t) * 1000, decision

    def axb_call() -> tuple[str, str]:
        j = shared_rng.randint(1, SHARED_BINDINGS)
        a, b = shared_party(AXB_A, j), shared_party(AXB_B, j)
        return (a, b) if shared_rng.random() < 0.5 else (b, a)

    async def measure(spool: str) -> dict[str, list[float]]:
        store = await PgCallStore.open(bench_url, size=1, timeout=5.0)
        try:
            service = CallService(None, CdrSpool(spool), store=store)
            for i in rng.sample(range(1, n_bindings + 1), min(200, n_bindings)):  # warm-up (pool, caches)
                await service.route_on_loop(x_number(i), AGENT)
                if shared:
                    await service.route_on_loop(SHARED_X["AXE"], AGENT)
                    await service.route_on_loop(SHARED_X["AXB"], axb_call()[0])
            ms: dict[str, list[float]] = {"AXN": [], "AXE": [], "AXB": []}
            wrong = {"AXN": 0, "AXE": 0, "AXB": 0}
            for i in rng.choices(range(1, n_bindings + 1), k=samples):
                took, decision = await timed(service, x_number(i), AGENT)
                ms["AXN"].append(took)
                wrong["AXN"] += not isinstance(decision, Bridge)
                if shared:
                    took, decision = await timed(service, SHARED_X["AXE"], AGENT)
                    ms["AXE"].append(took)
                    wrong["AXE"] += not isinstance(decision, CollectExtension)
                    caller, other = axb_call()
                    took, decision = await timed(service, SHARED_X["AXB"], caller)
                    ms["AXB"].append(took)
                    wrong["AXB"] += not (isinstance(decision, Bridge) and decision.destination == other)
            if any(wrong.values()):
                raise BenchError(f"in-process check: decisions not as expected per mode: {wrong}")
            return ms
        finally:
            await store.close()

    def stats(ms: list[float]) -> dict:
        return {"samples": len(ms), "p50_ms": sipp.percentile(ms, 50), "p99_ms": sipp.percentile(ms, 99),
                "mean_ms": statistics.fmean(ms), "max_ms": max(ms)}

    with tempfile.TemporaryDirectory(prefix="callctl-bench-spool-") as spool:
        ms = uvloop.run(measure(spool))
    result = stats(ms["AXN"])
    if shared:
        result["shared"] = {"bindings_per_x": SHARED_BINDINGS}
        for mode in ("AXE", "AXB"):
            s = stats(ms[mode])
            s["p50_over_axn"] = s["p50_ms"] / result["p50_ms"]
            s["p99_over_axn"] = s["p99_ms"] / result["p99_ms"]
            result["shared"][mode] = s
    return result


def scale_key(n_bindings: int) -> str | None:
    """Which scale a run's figures stand for: 1M or 10M bindings (others are smoke runs)."""
    return {1_000_000: "1m", 10_000_000: "10m"}.get(n_bindings)


def record_in_process(inproc: dict, n_bindings: int) -> None:
    scale = scale_key(n_bindings)
    if scale:
        targets.record(f"inprocess_p99_ms_{scale}", inproc["p99_ms"], f"{inproc['samples']:,} random X")
    if scale == "1m" and inproc.get("shared"):
        for mode in ("AXE", "AXB"):
            targets.record(f"inprocess_{mode.lower()}_p99_ms", inproc["shared"][mode]["p99_ms"],
                           f"p50 {inproc['shared'][mode]['p50_ms']:.2f} ms")


def say_in_process(inproc: dict) -> None:
    say(f"In-process: p50 {inproc['p50_ms']:.2f} ms, p99 {inproc['p99_ms']:.2f} ms, max {inproc['max_ms']:.1f} ms")
    shared = inproc.get("shared")
    if shared:
        for mode, what in (("AXE", "agent's first call (prompt)"), ("AXB", "a party's call")):
            s = shared[mode]
            say(f"In-process, {mode} X with {shared['bindings_per_x']:,} bindings, {what}: p50 {s['p50_ms']:.2f} ms "
                f"({s['p50_over_axn']:.2f}x AXN), p99 {s['p99_ms']:.2f} ms ({s['p99_over_axn']:.2f}x AXN), "
                f"max {s['max_ms']:.1f} ms")


# ---------------------------------------------------------------------------- SIPp steps

class Servers:
    """callctl, the minimal application and (Asterisk) the plain durable floor for one
    PBX; at most one runs (all want its port: FastAGI 4573, ESL 8084)."""

    def __init__(self, bench_url: str, workdir: Path, pbx: Pbx = ASTERISK):
        workdir = Path(workdir) / pbx.name
        self.procs = {
            "callctl": callctl_daemon(bench_url, workdir, pbx=pbx.name),
            "minimal": minimal_fastagi(workdir) if pbx is ASTERISK else minimal_esl(workdir),
        }
        if pbx is ASTERISK:
            self.procs["floor"] = floor_fastagi(workdir, bench_url.replace("postgresql+psycopg2://", "postgresql://"))
        self.running: str | None = None

    def start(self, name: str) -> None:
        self.stop()
        self.procs[name].start()
        self.running = name

    def stop(self) -> None:
        if self.running is not None:
            proc = self.procs[self.running]
            self.running = None
            rc = proc.stop()
            if rc not in (0, None, -signal.SIGTERM):
                raise BenchError(f"{proc.argv[1:3]} exited with {rc} on SIGTERM:\n{proc.output()[-1500:]}")

    def cpu_s(self) -> float | None:
        """CPU seconds (user + system, all threads) the running server has used so far."""
        proc = self.procs[self.running].proc if self.running else None
        try:
            return cpu_seconds(proc.pid)
        except (AttributeError, OSError):
            return None

    def log_size(self, name: str) -> int:
        p = self.procs[name].log_path
        return p.stat().st_size if p.exists() else 0

    def log_since(self, name: str, offset: int) -> str:
        with open(self.procs[name].log_path, "rb") as f:
            f.seek(offset)
            return f.read().decode(errors="replace")


def box_cpu_s(pbx: Pbx = ASTERISK) -> dict[str, float]:
    """CPU seconds (user + system, all threads) used so far by the PBX and by all of
    PostgreSQL's processes: with the call server's, where the box's CPU goes per call.
    Sampled while the step's daemon runs: its database backends exit with it."""
    totals = {pbx.name: 0.0, "postgres": 0.0}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            name, seconds = process_cpu_s(stat.read_text())
        except OSError:
            continue  # gone meanwhile
        if name in totals:
            totals[name] += seconds
    return {"pbx": totals[pbx.name], "postgres": totals["postgres"]}


def place_calls(pairs: list[tuple[str, str]], rate: float, talk_ms: int, what: str,
                pbx: Pbx = ASTERISK) -> sipp.SippResult:
    """One SIPp UAC run at `rate` calls/s over `pairs` into the PBX, with a fresh UAS answering."""
    count = len(pairs)
    uas = sipp.start_uas(5070)
    try:
        res = sipp.run_uac(
            "uac_call", pbx.sip_target, calls=pairs, count=count, rate=rate,
            limit=max(200, int(rate * 10)), talk_ms=talk_ms, timeout=count / rate + 60,
        )
        try:
            pbx.wait_no_channels(timeout=40)
        except LabError as exc:
            raise BenchError(f"{what}: {exc} after the step") from None
    finally:
        u = uas.stop(grace=1.0)
    res.uas_failed = u.failed  # type: ignore[attr-defined]
    return res


def step_is_clean(res: sipp.SippResult, count: int) -> bool:
    mean = res.setup_ms_mean
    return (res.status == "ok" and res.failed == 0 and res.successful == count
            and mean is not None and mean < SETUP_LIMIT_MS)


def run_steps(args, servers: Servers, engine, n_bindings: int, rng: random.Random,
              pbx: Pbx = ASTERISK) -> tuple[list, list]:
    steps: list[dict] = []
    routed_ms: list[float] = []
    names = tuple(servers.procs)
    active = {s: True for s in names}
    unclean_run = {s: 0 for s in names}
    order_flip = 0
    header = (f"{'rate':>5}  {'server':<16}{'rep':>3}  {'attempted':>9}{'ok':>7}{'failed':>7}  "
              f"{'setup mean':>10}{'p95':>7}  {'CPU/call':>8}{'PBX':>6}{'PG':>6}  {'dec p50':>7}{'p99':>7}  {'CDRs':>6}  clean")
    say(f"\nLoad steps through {pbx.name}. setup = SIPp INVITE -> 200 OK (ms); CPU/call = the call server's\n"
        "CPU ms per call (callctl, the minimal application or the plain durable floor: FastAGI route + hangup\n"
        "sessions, or the ESL\n"
        "session), PBX and PG the same for the PBX and PostgreSQL; dec = the daemon's 'call routed' ms;\n"
        "CDRs = rows written in the step.")
    say(header)
    say("-" * len(header))
    for rate in args.rates:
        if not any(active.values()):
            break
        per_server: dict[str, list[bool]] = {s: [] for s in names if active[s]}
        for rep in range(args.repeats):
            order = [s for s in (names if order_flip % 2 == 0 else names[::-1]) if active[s]]
            order_flip += 1
            for name in order:
                count = max(1, int(round(rate * args.seconds)))
                pairs = [(AGENT, x_number(i)) for i in rng.choices(range(1, n_bindings + 1), k=count)]
                servers.start(name)
                # warm-up: connections opened, code paths hot; not counted
                warm = [(AGENT, x_number(i)) for i in rng.choices(range(1, n_bindings + 1), k=args.warmup)]
                if warm:
                    w = place_calls(warm, min(20.0, rate), args.talk_ms, f"{name} warm-up", pbx)
                    if not w.ok:
                        raise BenchError(f"{LABEL[name]} warm-up calls failed: {w.summary()} "
                                         f"(sipp files in {w.workdir}):\n{servers.procs[name].output()[-1500:]}")
                offset = servers.log_size(name)
                cdrs_before = cdr_count(engine) if name == "callctl" else 0
                t0, cpu0, box0 = time.monotonic(), servers.cpu_s(), box_cpu_s(pbx)
                res = place_calls(pairs, rate, args.talk_ms, f"{name} at {rate}/s", pbx)
                wall, cpu1, box1 = time.monotonic() - t0, servers.cpu_s(), box_cpu_s(pbx)
                servers.stop()  # flushes the daemon's log; next step starts the other server
                row = {
                    "pbx": pbx.name, "rate": rate, "server": name, "repeat": rep + 1, "calls": count,
                    "attempted": res.created, "successful": res.successful, "failed": res.failed,
                    "status": res.status, "failure_reasons": res.failure_reasons,
                    "uas_failed": res.uas_failed, "retransmissions": res.retransmissions,
                    "setup_ms_mean": res.setup_ms_mean, "setup_ms_p95": res.setup_ms_p95,
                    "setup_ms_max": res.setup_ms_max, "sipp_elapsed_s": round(res.elapsed_s, 2),
                    "wall_s": round(wall, 2),
                    # the call server's own CPU per call (FastAGI route + hangup sessions, or the ESL session)
                    "server_cpu_ms_per_call": round((cpu1 - cpu0) * 1000 / max(res.created, 1), 2)
                    if cpu0 is not None and cpu1 is not None else None,
                    **{f"{part}_cpu_ms_per_call": round((box1[part] - box0[part]) * 1000 / max(res.created, 1), 2)
                       for part in box0},
                }
                row["clean"] = step_is_clean(res, count)
                agi = ""
                if name == "callctl":
                    events = json_events(servers.log_since(name, offset))
                    ms = [float(e["ms"]) for e in events if e.get("event") == "call routed" and "ms" in e]
                    outcomes: dict[str, int] = {}
                    for e in events:
                        if e.get("event") == "call recorded":
                            outcomes[e.get("outcome", "?")] = outcomes.get(e.get("outcome", "?"), 0) + 1
                    actions: dict[str, int] = {}
                    for e in events:
                        if e.get("event") == "call routed":
                            key = e.get("action") if e.get("action") == "bridge" else f"reject:{e.get('reason')}"
                            actions[key] = actions.get(key, 0) + 1
                    routed_ms.extend(ms)
                    row.update({
                        "routed": len(ms), "route_ms_p50": sipp.percentile(ms, 50), "route_ms_p99": sipp.percentile(ms, 99),
                        "route_ms_max": max(ms) if ms else None, "decisions": actions, "route_ms": ms,
                        "cdr_outcomes": outcomes, "cdrs_written": cdr_count(engine) - cdrs_before,
                    })
                    errors = [e for e in events if e.get("level") in ("warning", "error")]
                    if errors:
                        row["daemon_warnings"] = errors[:5]
                if not row["clean"] and res.status != "ok":
                    row["sipp_workdir"] = str(res.workdir)
                steps.append(row)
                per_server[name].append(row["clean"])
                if name == "callctl":
                    agi = f"{fmt(row['route_ms_p50'], 2):>7}{fmt(row['route_ms_p99'], 2):>7}  {row['cdrs_written']:>6}"
                else:
                    agi = f"{'':>7}{'':>7}  {'':>6}"
                note = "yes" if row["clean"] else "NO"
                if not row["clean"]:
                    why = []
                    if res.failed or res.successful != count:
                        why.append(f"{count - res.successful} not ok" + (f" {res.failure_reasons}" if res.failure_reasons else ""))
                    if res.setup_ms_mean is None or res.setup_ms_mean >= SETUP_LIMIT_MS:
                        why.append("slow setup")
                    if res.status != "ok" and not why:
                        why.append(f"sipp {res.status}")
                    note += " (" + "; ".join(why) + ")"
                say(f"{rate:>5g}  {LABEL[name]:<16}{rep + 1:>3}  {res.created:>9}{res.successful:>7}{res.failed:>7}  "
                    f"{fmt(res.setup_ms_mean):>10}{fmt(res.setup_ms_p95):>7}  {fmt(row['server_cpu_ms_per_call'], 2):>8}"
                    f"{fmt(row['pbx_cpu_ms_per_call'], 2):>6}{fmt(row['postgres_cpu_ms_per_call'], 2):>6}  "
                    f"{agi}  {note}")
        verdict = ", ".join(f"{LABEL[n]} {'clean' if any(c) else 'NOT clean'}" for n, c in per_server.items())
        say(f"{'':>5}  {pbx.name} rate {rate:g}/s (best of {args.repeats}): {verdict}")
        for name, cleans in per_server.items():
            if any(cleans):
                unclean_run[name] = 0
            else:
                unclean_run[name] += 1
                if unclean_run[name] >= 2:
                    active[name] = False
                    say(f"       {LABEL[name]}: two consecutive unclean rates, stops stepping")
    return steps, routed_ms


# ---------------------------------------------------------------------------- main

def _interrupt(*_):
    raise KeyboardInterrupt


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true",
                   help="short check: 100,000 bindings, rates 50,100,200, 1 repeat, 3 s steps")
    p.add_argument("--rates", help="comma-separated offered call rates, calls/s (default 25,50,100,150,200,250,275,300,325,350,375,400,425,450,500,550,600)")
    p.add_argument("--seconds", type=float, help="seconds of calls per step (default 5)")
    p.add_argument("--repeats", type=int, help="repeats per rate and server (default 2)")
    p.add_argument("--bindings", type=int, help="bindings to load (default 1,000,000)")
    p.add_argument("--talk-ms", type=int, default=100, help="talk time of each call, ms (100 ms ticks; default 100)")
    p.add_argument("--warmup", type=int, default=20, help="uncounted warm-up calls after each server start (default 20)")
    p.add_argument("--samples", type=int, default=10_000, help="in-process route() samples (default 10,000)")
    p.add_argument("--seed", type=int, default=1, help="random seed for the X chosen")
    p.add_argument("--pg-admin", default="postgresql://postgres@127.0.0.1:5432/postgres",
                   help="DSN used to drop/create the bench database")
    p.add_argument("--database", default=DB_NAME, help=f"the bench database, dropped and made afresh (default {DB_NAME})")
    p.add_argument("--only", choices=["calls", "provisioning", "anomaly", "inprocess", "scale", "detection"],
                   help="run one part: calls (SIPp through the lab), provisioning (bulk and API throughput), "
                        "anomaly (the anomaly job over CDRs), inprocess (the in-process decision latency "
                        "of AXN, AXE and AXB calls, no lab), scale (1M against 10M bindings: bench/scale_bench.py) "
                        "or detection (CDR to automatic block at 1,000 CDRs/s: bench/detection_bench.py)")
    p.add_argument("--pbx", choices=["asterisk", "freeswitch", "both"], default="both",
                   help="the PBX the calls go through (default both, one after the other, side by side)")
    p.add_argument("--bulk-rows", type=int, help="bindings in the bulk file (default 50,000; quick 10,000)")
    p.add_argument("--api-requests", type=int, help="POST /v1/bindings requests (default 3,000; quick 1,000)")
    p.add_argument("--api-concurrency", type=int, default=16, help="concurrent API clients (default 16)")
    p.add_argument("--api-rate", type=float, default=500.0,
                   help="binds/s offered to the API in the open-loop latency run (default 500)")
    p.add_argument("--api-rate-seconds", type=float, default=10.0,
                   help="seconds of the open-loop run (default 10)")
    p.add_argument("--api-workers", type=int, default=os.cpu_count() or 1,
                   help="callctl serve api worker processes (default: one per CPU)")
    p.add_argument("--anomaly-cdrs", type=int, default=10_000_000,
                   help="CDRs in the anomaly job's database (default 10,000,000)")
    p.add_argument("--scales", default="1000000,10000000",
                   help="scale part: binding counts, each in its own kept database, callctl_bench_scale_N "
                        "(default 1,000,000,10,000,000)")
    p.add_argument("--scale-reload", action="store_true", help="scale part: load each size's database afresh")
    p.add_argument("--scale-rate", type=float, default=100.0, help="scale part: lab calls/s (default 100)")
    p.add_argument("--scale-seconds", type=float, default=20.0, help="scale part: seconds of lab calls (default 20)")
    p.add_argument("--crossings", type=int, default=30, help="detection part: threshold crossings timed (default 30)")
    p.add_argument("--gap", type=float, default=3.0, help="detection part: seconds between crossings (default 3)")
    p.add_argument("--cdr-rate", type=float, default=1000.0, help="detection part: CDRs written per second (default 1,000)")
    p.add_argument("--detect-interval", type=float,
                   help="detection part: the job's --interval (default: interval_seconds of conf/anomaly.yaml)")
    a = p.parse_args(argv)
    a.scales = [int(n) for n in a.scales.split(",") if n.strip()]
    a.rates = [float(r) for r in (a.rates or ("50,100,200" if a.quick else "25,50,100,150,200,250,275,300,325,350,375,400,425,450,500,550,600")).split(",") if r.strip()]
    if not a.rates or any(r <= 0 for r in a.rates):
        p.error("--rates must be positive numbers")
    a.seconds = a.seconds or (3.0 if a.quick else 5.0)
    a.repeats = a.repeats or (1 if a.quick else 2)
    a.bindings = a.bindings or (100_000 if a.quick else 1_000_000)
    a.bulk_rows = a.bulk_rows or (10_000 if a.quick else 50_000)
    a.api_requests = a.api_requests or (1_000 if a.quick else 3_000)
    if a.bindings < 1 or a.bindings > 99_999_999:
        p.error("--bindings must be 1..99,999,999")
    return a


def main(argv=None) -> int:
    args = parse_args(argv)
    logs.setup("console", "warning")
    use_bench_keys()
    if args.only == "anomaly":
        return bench_anomaly(args)
    if args.only == "scale":
        return bench_scale(args)
    if args.only == "detection":
        return bench_detection(args)
    # SIGTERM (make interrupted, CI cancel) unwinds like Ctrl-C: finally blocks clean up.
    signal.signal(signal.SIGTERM, _interrupt)
    rng = random.Random(args.seed)
    base = args.pg_admin.split("://", 1)[1].rsplit("/", 1)[0]
    bench_url = f"postgresql+psycopg2://{base}/{args.database}"
    OUT_DIR.mkdir(parents=True, exist_ok=True)
    for old in ("callctl.log", "minimal_fastagi.log"):
        (OUT_DIR / old).unlink(missing_ok=True)
    started = time.monotonic()
    result: dict = {
        "started_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "host": {"node": platform.node(), "cpus": os.cpu_count(), "python": platform.python_version()},
        "config": {"rates": args.rates, "seconds_per_step": args.seconds, "repeats": args.repeats,
                   "talk_ms": args.talk_ms, "warmup_calls": args.warmup, "quick": args.quick,
                   "setup_limit_ms": SETUP_LIMIT_MS, "database": args.database},
    }

    say(f"callctl benchmark: {args.bindings:,} bindings, rates {', '.join(f'{r:g}' for r in args.rates)} calls/s, "
        f"{args.seconds:g} s per step, {args.repeats} repeat(s), talk {args.talk_ms} ms")
    say(f"PostgreSQL: preparing database {args.database} ...")
    db = prepare_database(args.pg_admin, bench_url, args.bindings)
    result["database"] = db
    say(f"PostgreSQL: {db['bindings']:,} virtual numbers + AXN bindings loaded in {db['load_s']:.1f} s "
        f"({', '.join(f'{k[:-2]} {v:.1f} s' for k, v in db['steps'].items())})")
    if args.only == "provisioning":
        return bench_provisioning(args, bench_url, result, started)

    loaded = load_shared(bench_url, db["tenant_id"])
    say(f"PostgreSQL: an AXE X with {SHARED_BINDINGS:,} customers and an AXB X with {SHARED_BINDINGS:,} pairs "
        f"loaded in {loaded:.1f} s")
    say(f"In-process: CallService.route_on_loop() for {args.samples:,} random X, each beside an agent's call "
        f"to the AXE X and a party's call on the AXB X ...")
    inproc = in_process_latency(bench_url, args.bindings, args.samples, rng, random.Random(args.seed + 1))
    result["in_process"] = inproc
    say_in_process(inproc)
    record_in_process(inproc, args.bindings)
    cost = crypto_cost(bench_url, args.samples)
    result["crypto"] = cost
    say(f"Encryption per decision (decrypt the customer's number + hash the caller): "
        f"p50 {cost['per_call_p50_us']:.1f} us (decrypt {cost['decrypt_p50_us']:.1f} + hash "
        f"{cost['hash_p50_us']:.1f}), p99 {cost['per_call_p99_us']:.1f} us, over {cost['samples']:,} stored numbers")
    if args.only == "inprocess":
        out = OUT_DIR / "in_process.json"
        out.write_text(json.dumps(result, indent=2, default=str) + "\n")
        say(f"JSON: {out.relative_to(REPO)}")
        return 0

    engine = make_engine(bench_url, pool_size=1)
    pbxs = list(PBXS.values()) if args.pbx == "both" else [PBXS[args.pbx]]
    result["steps"], result["summary"] = [], {}
    try:
        with LabLock():
            for pbx in pbxs:  # one lab at a time: the other PBX's idle CPU stays out of the figures
                steps, routed_ms = run_pbx(args, pbx, bench_url, engine, rng)
                result["summary"][pbx.name] = summarize(args, steps, routed_ms, inproc, db)
                result["steps"] += [{k: v for k, v in s.items() if k != "route_ms"} for s in steps]
    finally:
        engine.dispose()

    result["run_s"] = round(time.monotonic() - started, 1)
    out = OUT_DIR / "result.json"
    out.write_text(json.dumps(result, indent=2, default=str) + "\n")
    for name, summary in result["summary"].items():
        print_summary(summary, name, result["run_s"], out)
        record_calls(name, summary, args.bindings)
    if len(result["summary"]) > 1:
        print_side_by_side(result["summary"])
    if args.only is None:
        signal.signal(signal.SIGTERM, _interrupt)
        bench_provisioning(args, bench_url, result, started)
        bench_anomaly(args)
        bench_scale(args)  # 1M and 10M in their own databases (10M: about 10 min to load the first time)
        return bench_detection(args)
    return 0


def run_pbx(args, pbx: Pbx, bench_url: str, engine, rng: random.Random) -> tuple[list, list]:
    """The load steps through one PBX's lab: up, callctl and the minimal app interleaved, down."""
    servers = Servers(bench_url, OUT_DIR, pbx)
    up = False
    try:
        say(f"Lab: starting {pbx.name} ...")
        pbx.up()
        up = True
        return run_steps(args, servers, engine, args.bindings, rng, pbx)
    finally:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)  # let the clean-up finish
        servers.stop()
        if up:
            try:
                pbx.down()
            except LabError as exc:
                say(f"warning: {exc}")
        signal.signal(signal.SIGTERM, _interrupt)


def bench_provisioning(args, bench_url: str, result: dict, started: float) -> int:
    """Bulk and API provisioning throughput on the loaded database (bench/provisioning_bench.py)."""
    from bench import provisioning_bench

    try:
        prov = provisioning_bench.run(
            bench_url, OUT_DIR / "provisioning", tenant=TENANT, bulk_rows=args.bulk_rows,
            api_requests=args.api_requests, concurrency=args.api_concurrency, workers=args.api_workers,
            rate=args.api_rate, rate_seconds=args.api_rate_seconds, say=say)
    except provisioning_bench.ProvisioningBenchError as exc:
        raise BenchError(str(exc)) from None
    result["provisioning"] = prov
    result["run_s"] = round(time.monotonic() - started, 1)
    out = OUT_DIR / "result.json"
    out.write_text(json.dumps(result, indent=2, default=str) + "\n")
    bulk, api, at = prov["bulk_bind"], prov["api"], prov["api_offered"]
    if scale_key(args.bindings) == "1m":
        targets.record("bulk_binds_per_s", bulk["per_s"], f"{bulk['bindings']:,} rows")
        targets.record("api_binds_per_s", api["per_s"],
                       f"{prov['api_workers']} worker(s), {prov['api_concurrency']} clients, p99 {api['latency_ms_p99']:.1f} ms; "
                       f"CPU per bind: server {api['server_cpu_ms_per_bind']:.2f} ms, PostgreSQL "
                       f"{api['postgres_cpu_ms_per_bind']:.2f} ms, client {api['client_cpu_ms_per_bind']:.2f} ms")
        if at["rate"] == 500:
            targets.record("api_p99_ms_at_500", at["latency_ms_p99"],
                           f"open loop, {at['bindings']:,} binds, p50 {at['latency_ms_p50']:.1f} ms")
    verdict = lambda key, value: targets.BY_KEY[key].verdict(value)  # noqa: E731
    say("\n".join([
        "",
        "=" * 78,
        "callctl provisioning throughput",
        "=" * 78,
        f"bindings present before       {bulk['bindings_present_before']:,} (bulk), {api['bindings_present_before']:,} (API)",
        f"bulk (callctl bind --bulk)    {bulk['per_s']:,} bindings/s ({bulk['bindings']:,} in {bulk['seconds']:.1f} s, "
        f"end to end; target >= 5,000/s: {'met' if bulk['per_s'] >= 5000 else 'NOT met'})",
        f"HTTP API (POST /v1/bindings)  {api['per_s']:,} bindings/s ({api['bindings']:,} in {api['seconds']:.1f} s, "
        f"{prov['api_workers']} worker(s), {prov['api_concurrency']} clients; latency p50 {api['latency_ms_p50']:.1f} ms, "
        f"p99 {api['latency_ms_p99']:.1f} ms; target >= 2,000/s: {verdict('api_binds_per_s', api['per_s'])})",
        f"  CPU per bind                server {api['server_cpu_ms_per_bind']:.2f} ms, PostgreSQL "
        f"{api['postgres_cpu_ms_per_bind']:.2f} ms, client {api['client_cpu_ms_per_bind']:.2f} ms",
        f"HTTP API at {at['rate']:g}/s offered     latency p50 {at['latency_ms_p50']:.1f} ms, p99 {at['latency_ms_p99']:.1f} ms "
        f"(open loop, {at['bindings']:,} binds; target p99 < 20 ms at 500/s: "
        f"{verdict('api_p99_ms_at_500', at['latency_ms_p99']) if at['rate'] == 500 else 'not this rate'})",
        f"pool import                   {prov['pool_import']['per_s']:,} numbers/s "
        f"({prov['pool_import']['numbers']:,} in {prov['pool_import']['seconds']:.1f} s)",
        f"JSON: {out.relative_to(REPO)}",
        "=" * 78,
    ]))
    return 0


def bench_scale(args) -> int:
    """The figures at 1M and 10M bindings side by side (bench/scale_bench.py)."""
    from bench import scale_bench

    signal.signal(signal.SIGTERM, _interrupt)
    result = scale_bench.run(args)
    out = OUT_DIR / "scale.json"
    out.write_text(json.dumps(result, indent=2, default=str) + "\n")
    say(f"JSON: {out.relative_to(REPO)}")
    return 0


def bench_detection(args) -> int:
    """CDR crossing a threshold -> automatic block in force (bench/detection_bench.py)."""
    from bench import detection_bench

    signal.signal(signal.SIGTERM, _interrupt)
    result = detection_bench.run(args)
    out = OUT_DIR / "detection.json"
    out.write_text(json.dumps(result, indent=2) + "\n")
    say(f"JSON: {out.relative_to(REPO)}")
    return 0


def bench_anomaly(args) -> int:
    """The anomaly job's rate over --anomaly-cdrs CDRs (bench/anomaly_bench.py)."""
    from bench import anomaly_bench

    OUT_DIR.mkdir(parents=True, exist_ok=True)
    result = anomaly_bench.run(args.pg_admin, n=args.anomaly_cdrs, rules_path=str(REPO / "conf" / "anomaly.yaml"))
    out = OUT_DIR / "anomaly.json"
    out.write_text(json.dumps(result, indent=2) + "\n")
    if result["cdrs"] >= 10_000_000:
        targets.record("anomaly_pass_s_10m", result["first_pass"]["seconds"], f"{result['cdrs']:,} CDRs")
    say(f"Anomaly job: {result['first_pass']['cdrs_per_s']:,} CDRs/s over {result['cdrs']:,} CDRs "
        f"({result['first_pass']['seconds']} s for the whole pass; target under 60 s); written to {out}")
    return 0


def summarize(args, steps, routed_ms, inproc, db) -> dict:
    best: dict[str, dict] = {}
    ran = [name for name in SERVERS if any(s["server"] == name for s in steps)]
    for name in ran:
        rates = sorted({s["rate"] for s in steps if s["server"] == name})
        clean = [r for r in rates if any(s["clean"] for s in steps if s["server"] == name and s["rate"] == r)]
        best[name] = {
            "highest_clean_rate": max(clean) if clean else None,
            "clean_rates": clean,
            "tested_rates": rates,
            "limit_reached": bool(rates) and (not clean or max(clean) < max(rates)),
        }
        cpu = [s["server_cpu_ms_per_call"] for s in steps
               if s["server"] == name and s.get("server_cpu_ms_per_call") is not None]
        best[name]["cpu_ms_per_call_median"] = statistics.median(cpu) if cpu else None
        for part in ("pbx", "postgres"):
            used = [s[f"{part}_cpu_ms_per_call"] for s in steps if s["server"] == name]
            best[name][f"{part}_cpu_ms_per_call_median"] = statistics.median(used) if used else None

    def ratio_to(floor: str) -> tuple[float | None, bool]:
        """callctl's highest clean rate over `floor`'s, and whether it means anything:
        below the floor's limit the floor may go higher."""
        if floor not in best:
            return None, False
        c, m = best["callctl"]["highest_clean_rate"], best[floor]["highest_clean_rate"]
        ratio = (c / m) if c and m else None
        return ratio, ratio is not None and best[floor]["limit_reached"]

    ratio, determined = ratio_to("minimal")
    floor_ratio, floor_determined = ratio_to("floor")
    return {
        "bindings": db["bindings"],
        "load_s": db["load_s"],
        "servers": best,
        "ratio_callctl_over_minimal": ratio,
        "ratio_target": 0.95,
        "ratio_determined": determined,
        "ratio_met": determined and ratio >= 0.95,
        "ratio_callctl_over_floor": floor_ratio,
        "ratio_floor_determined": floor_determined,
        "daemon_route_ms": {"calls": len(routed_ms), "p50": sipp.percentile(routed_ms, 50), "p99": sipp.percentile(routed_ms, 99),
                            "max": max(routed_ms) if routed_ms else None},
        "daemon_route_ms_clean_steps": _route_stats([s for s in steps if s["server"] == "callctl" and s["clean"]]),
        # Where the box saturates shows here: the p99 of each offered rate, its repeats together.
        "daemon_route_p99_ms_by_rate": {
            rate: _route_stats([s for s in steps if s["server"] == "callctl" and s["rate"] == rate])["p99"]
            for rate in best["callctl"]["tested_rates"]},
        "daemon_p99_target_ms": 5.0,
        "daemon_p99_met": bool(routed_ms) and sipp.percentile(routed_ms, 99) < 5.0,
        "in_process_route_ms": {"calls": inproc["samples"], "p50": inproc["p50_ms"], "p99": inproc["p99_ms"]},
        "repeats": args.repeats,
    }


def record_calls(pbx: str, s: dict, n_bindings: int) -> None:
    """The ratio only when the minimal server found its limit (else it says nothing)."""
    c, m = (s["servers"][n]["highest_clean_rate"] for n in ("callctl", "minimal"))
    if s["ratio_determined"]:
        key = "call_ratio_minimal" if pbx == "asterisk" else "call_ratio_freeswitch"
        targets.record(key, s["ratio_callctl_over_minimal"], f"clean to {c:g} against {m:g} calls/s, {n_bindings:,} bindings")
    if s["ratio_floor_determined"]:
        f = s["servers"]["floor"]["highest_clean_rate"]
        targets.record("call_ratio_floor", s["ratio_callctl_over_floor"], f"clean to {c:g} against {f:g} calls/s")
    scale = scale_key(n_bindings)
    if pbx == "asterisk" and scale:
        d = s["daemon_route_ms"]
        targets.record(f"decision_p99_ms_{scale}", d["p99"], f"over {d['calls']:,} calls, every rate")


def _route_stats(steps: list[dict]) -> dict:
    ms = [v for s in steps for v in s.get("route_ms", [])]
    return {"calls": len(ms), "p50": sipp.percentile(ms, 50), "p99": sipp.percentile(ms, 99), "max": max(ms) if ms else None}


def print_summary(s: dict, pbx: str, run_s: float, out: Path) -> None:
    def rate_text(name):
        b = s["servers"][name]
        if b["highest_clean_rate"] is None:
            return "none clean" if b["tested_rates"] else "not run"
        more = "" if b["limit_reached"] else " (every rate tested was clean: limit not reached)"
        return f"{b['highest_clean_rate']:g} calls/s{more}"

    d, dc, ip = s["daemon_route_ms"], s["daemon_route_ms_clean_steps"], s["in_process_route_ms"]
    ratio = s["ratio_callctl_over_minimal"]
    verdict = ("met" if s["ratio_met"] else "NOT met") if s["ratio_determined"] else \
        "not determined: the minimal application's limit was not reached, offer higher --rates"
    best_of = f"best of {s['repeats']} repeat{'s' if s['repeats'] != 1 else ''}"
    lines = [
        "",
        "=" * 78,
        f"callctl benchmark summary: {pbx}",
        "=" * 78,
        f"bindings in PostgreSQL        {s['bindings']:,} (fresh load {s['load_s']:.1f} s)",
        f"clean step                    every call ok and mean INVITE->200 < {SETUP_LIMIT_MS:g} ms; a rate is clean if",
        f"                              its {best_of} is clean",
        f"highest clean rate, callctl   {rate_text('callctl')}",
        f"highest clean rate, minimal   {rate_text('minimal')}",
    ] + ([f"highest clean rate, floor     {rate_text('floor')} (plain durable: one read, one committed insert)"]
         if "floor" in s["servers"] else []) + [
        f"ratio callctl / minimal       {fmt(ratio, 2)}  (target >= 0.95: {verdict})",
    ] + ([f"ratio callctl / floor         {fmt(s['ratio_callctl_over_floor'], 2)}  "
          f"({'the floor found its limit' if s['ratio_floor_determined'] else 'not determined: the floor was clean at every rate'})"]
         if "floor" in s["servers"] else []) + [
        f"daemon decision latency       p50 {fmt(d['p50'], 2)} ms, p99 {fmt(d['p99'], 2)} ms, max {fmt(d['max'], 1)} ms "
        f"over {d['calls']:,} calls",
        f"  (log 'call routed' ms)      target p99 < 5 ms: {'met' if s['daemon_p99_met'] else 'NOT met'}",
        f"  same, clean steps only      p50 {fmt(dc['p50'], 2)} ms, p99 {fmt(dc['p99'], 2)} ms over {dc['calls']:,} calls",
        "  p99 by offered rate         " + ", ".join(
            f"{rate:g}/s {fmt(p99, 1)}" for rate, p99 in s["daemon_route_p99_ms_by_rate"].items()) + " ms",
    ] + [f"CPU per call with {LABEL[name] + ':':<13}server {fmt(b['cpu_ms_per_call_median'], 2)} ms, {pbx} "
         f"{fmt(b['pbx_cpu_ms_per_call_median'], 2)} ms, PostgreSQL {fmt(b['postgres_cpu_ms_per_call_median'], 2)} ms "
         f"(medians over steps)" for name, b in s["servers"].items()] + [
        f"in-process route() latency    p50 {fmt(ip['p50'], 2)} ms, p99 {fmt(ip['p99'], 2)} ms over {ip['calls']:,} random X",
        f"run time                      {run_s:.0f} s; JSON: {out.relative_to(REPO)}",
        "=" * 78,
    ]
    say("\n".join(lines))



def print_side_by_side(summaries: dict[str, dict]) -> None:
    """The PBXs' figures in columns (medians over steps, CPU ms per call)."""
    names = list(summaries)
    rows = [
        ("highest clean rate, callctl", lambda s: fmt(s["servers"]["callctl"]["highest_clean_rate"], 0)),
        ("highest clean rate, minimal", lambda s: fmt(s["servers"]["minimal"]["highest_clean_rate"], 0)),
        ("ratio callctl / minimal", lambda s: fmt(s["ratio_callctl_over_minimal"], 2)),
        ("decision p50 / p99 ms", lambda s: f"{fmt(s['daemon_route_ms']['p50'], 2)} / {fmt(s['daemon_route_ms']['p99'], 2)}"),
    ] + [(f"CPU ms/call with {server}: {part}", lambda s, k=key, v=server: fmt(s["servers"][v][k], 2))
         for server in ("callctl", "minimal") for part, key in (("server", "cpu_ms_per_call_median"), ("PBX", "pbx_cpu_ms_per_call_median"),
                                                ("PostgreSQL", "postgres_cpu_ms_per_call_median"))]
    say("\n" + f"{'':<38}" + "".join(f"{n:>18}" for n in names))
    for label, value in rows:
        say(f"{label:<38}" + "".join(f"{value(summaries[n]):>18}" for n in names))

if __name__ == "__main__":
    try:
        code = main()
        say(targets.table())
        sys.exit(code)
    except BenchError as exc:
        print(f"bench: ERROR: {exc}", file=sys.stderr)
        sys.exit(1)
    except (LabError, sipp.SippError) as exc:
        print(f"bench: lab ERROR: {exc}", file=sys.stderr)
        sys.exit(1)
    except KeyboardInterrupt:
        print("bench: interrupted", file=sys.stderr)
        sys.exit(130)
