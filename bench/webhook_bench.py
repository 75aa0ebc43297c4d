#!/usr/bin/env python3
"""Call setup latency while an insurer's webhook receiver is down.

    .venv/bin/python -m bench.webhook_bench [--calls 600] [--rate 60] [--rounds 4]

The daemon (`callctl serve asterisk`) on a PostgreSQL bench database (bench/data.py, one
tenant), `callctl webhook deliver --follow` beside it, and a fake Asterisk (lab/agiclient.py)
placing calls at `--rate`: each a route session, then the hangup session reporting the
CDR (which writes the tenant's `call.ended` event to the outbox while it has a webhook).
Each round goes through four phases of `--calls` calls:

- no webhook: the tenant has none (the hangup writes no event, the deliverer idles);
- receiver up: a webhook to a local HTTP receiver that answers 204;
- receiver down, refused: the receiver is gone (connection refused);
- receiver down, hangs: it accepts and never answers (the deliverer waits its timeout).

Then the receiver comes back; the round waits until every event of the round has
arrived (checked by id against the outbox, none twice) and removes the webhook. The
phases alternate round by round, so the box's noise falls on all of them. Reported per
phase: p50/p99 of the route session (call setup) and of the hangup session, over all
rounds, and their ratio to the no-webhook phase. The target `webhook_down_p99_ratio`
is, for each "down" phase, the median over rounds of its route p99 over the round's
no-webhook route p99; the worse of the two (bench/targets.py).

The deliverer runs as configured (a pass a second when idle or failing, the endpoint's
timeout webhooks.timeout, 5 s) but retries after 1 s, doubling up to 5 s, so a round
drains quickly. Its CPU and its PostgreSQL backends' are shown per phase. Numbers are
synthetic.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

from sqlalchemy import func, select

from bench import targets
from bench.data import AGENT, TENANT, BenchError, admin_connect, prepare_database, x_number
from bench.cpu import backend_cpu_seconds, cpu_seconds, cpu_used
from bench.paired_cpu import daemon
from callctl.store import crypto
from callctl.store.db import make_engine
from callctl.store.models import Event, Webhook, WebhookDelivery
from callctl.webhooks import add_webhook, remove_webhook
from lab.agiclient import agi_session
from lab.harness import free_port

REPO = Path(__file__).resolve().parent.parent
DB_NAME = "callctl_bench_webhook"
PHASES = ("no webhook", "receiver up", "receiver down, refused", "receiver down, hangs")
DOWN = PHASES[2:]
SECRET = "bench-webhook-secret-0123456789"
DELIVERER = "webhook_bench_deliverer"  # the deliverer's application_name: its PostgreSQL backends' CPU


class Receiver:
    """The insurer's endpoint on a fixed port: `up` (204, each event id recorded), `hangs`
    (reads the request, never answers, drops it when the mode changes), or stopped."""

    def __init__(self):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}/events"
        self.mode = "up"
        self.ids: list[str] = []
        self.server = None

    def start(self, mode: str) -> None:
        self.mode = mode
        if self.server is not None:
            return
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):
                body = self.rfile.read(int(self.headers["Content-Length"]))
                if receiver.mode != "up":  # hangs: no answer ever; dropped once the mode changes
                    while receiver.mode == "hangs":
                        time.sleep(0.05)
                    self.close_connection = True
                    return
                receiver.ids.append(json.loads(body)["id"])
                self.send_response(204)
                self.end_headers()

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", self.port), Handler)
        self.server.daemon_threads = True
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def stop(self) -> None:
        self.mode = "stopped"
        if self.server is not None:
            self.server.shutdown()
            self.server.server_close()
            self.server = None


async def timed_call(port: int, uniqueid: str, x: str) -> tuple[float, float] | None:
    """A bridged call as the product dialplan makes it; (route ms, hangup ms), None if it failed."""
    t0 = time.perf_counter()
    routed = await agi_session(port, "route", uniqueid, env={"agi_extension": x, "agi_callerid": AGENT})
    t1 = time.perf_counter()
    if routed is None or routed.get("CALLCTL_ACTION") != "bridge":
        return None
    started = time.time()
    args = [f"called={x}", f"caller={AGENT}", f"dest={routed['CALLCTL_DEST']}", "action=bridge", "reason=",
            f"binding={routed.get('CALLCTL_BINDING', '')}", f"tenant={routed.get('CALLCTL_TENANT', '')}",
            "direction=to_customer", f"start={started - 1:.3f}", f"end={started:.3f}", "dialstatus=ANSWER",
            "dialedtime=1000", "answeredtime=900", "hangupcause=16", "node=bench"]
    t2 = time.perf_counter()
    done = await agi_session(port, "hangup", uniqueid, args)
    t3 = time.perf_counter()
    if not (done and done.get("CALLCTL_CDR") == "written"):
        return None
    return (t1 - t0) * 1000, (t3 - t2) * 1000


async def drive(port: int, calls: int, rate: float, bindings: int, tag: str, rng: random.Random) -> list:
    """`calls` calls at `rate` calls/s (open loop); the results of each."""
    tasks, began = [], time.monotonic()
    for n in range(calls):
        tasks.append(asyncio.create_task(timed_call(port, f"{tag}.{n}", x_number(rng.randint(1, bindings)))))
        await asyncio.sleep(max(0.0, began + (n + 1) / rate - time.monotonic()))
    return [await task for task in tasks]


def hook_status(engine, hook_id: int) -> int:
    """The tenant's events not delivered yet to the webhook (queued or not)."""
    with engine.connect() as db:
        hook = db.execute(select(Webhook.tenant_id, Webhook.queued_upto).where(Webhook.id == hook_id)).one()
        pending = db.scalar(select(func.count()).where(WebhookDelivery.webhook_id == hook_id,
                                                       WebhookDelivery.delivered_at.is_(None)))
        unqueued = db.scalar(select(func.count()).select_from(Event).where(
            Event.tenant_id == hook.tenant_id, Event.id > hook.queued_upto,
            ~select(WebhookDelivery.id).where(WebhookDelivery.webhook_id == hook_id,
                                              WebhookDelivery.event_id == Event.id).exists()))
    return pending + unqueued


def events_since(engine, tenant_id: int, after: int) -> set[str]:
    with engine.connect() as db:
        ids = db.scalars(select(Event.id).where(Event.tenant_id == tenant_id, Event.id > after)).all()
    return {str(i) for i in ids}


def deliverer(url: str, log: Path) -> subprocess.Popen:
    """`callctl webhook deliver --follow` as configured (its interval 1 s), quicker retries."""
    env = {**os.environ, "CALLCTL_CONFIG": str(REPO / "conf" / "callctl.yaml"),
           "CALLCTL_DATABASE_URL": f"{url}?application_name={DELIVERER}",
           "CALLCTL_LOG_FORMAT": "json", "CALLCTL_WEBHOOK_RETRY_SECONDS": "1",
           "CALLCTL_WEBHOOK_MAX_RETRY_SECONDS": "5"}
    return subprocess.Popen([sys.executable, "-m", "callctl.cli", "webhook", "deliver", "--follow"],
                            stdout=log.open("ab"), stderr=subprocess.STDOUT, env=env, cwd=REPO)


def drop_database(admin_dsn: str) -> None:
    try:
        conn = admin_connect(admin_dsn)
    except BenchError:
        return  # never made
    try:
        with conn.cursor() as cur:
            cur.execute(f'DROP DATABASE IF EXISTS "{DB_NAME}" WITH (FORCE)')
    finally:
        conn.close()


def percentile(values: list[float], q: float) -> float:
    return statistics.quantiles(values, n=100, method="inclusive")[q - 1] if len(values) > 1 else values[0]


def one_round(round_: int, args, port: int, engine, receiver: Receiver, tenant_id: int, follower: int,
              samples: dict, busy: dict, rng: random.Random) -> str:
    """The four phases, then the receiver back and every event of the round checked.
    busy[phase]: the deliverer's CPU seconds, its PostgreSQL backends' and the phase's seconds."""
    failed = 0

    def phase(name: str) -> None:
        nonlocal failed
        cpu, pg, began = cpu_seconds(follower), backend_cpu_seconds(engine, DELIVERER), time.monotonic()
        got = asyncio.run(drive(port, args.calls, args.rate, args.bindings, f"{round_}{PHASES.index(name)}", rng))
        used = (cpu_seconds(follower) - cpu, cpu_used(pg, backend_cpu_seconds(engine, DELIVERER)),
                time.monotonic() - began)
        busy[name] = [a + b for a, b in zip(busy[name], used)]
        failed += sum(r is None for r in got)
        samples[name].append([r for r in got if r is not None])  # one list per round

    phase("no webhook")
    receiver.ids.clear()
    receiver.start("up")
    hook = add_webhook(engine, TENANT, receiver.url, SECRET)
    with engine.connect() as db:
        after = db.scalar(select(Webhook.queued_upto).where(Webhook.id == hook["id"]))
    phase("receiver up")
    held = {}
    for down in (DOWN if round_ % 2 == 0 else DOWN[::-1]):  # which comes first alternates
        receiver.stop()
        if down.endswith("hangs"):
            receiver.start("hangs")
        phase(down)
        held[down] = hook_status(engine, hook["id"])
    receiver.start("up")
    back = time.monotonic()
    expected = events_since(engine, tenant_id, after)
    while not (expected <= set(receiver.ids) and hook_status(engine, hook["id"]) == 0):
        if time.monotonic() - back > args.drain_timeout:
            raise BenchError(f"round {round_ + 1}: {len(expected - set(receiver.ids))} events not delivered "
                             f"{args.drain_timeout:g} s after the receiver returned")
        time.sleep(0.2)
    drained = time.monotonic() - back
    remove_webhook(engine, hook["id"])
    extra = set(receiver.ids) - expected
    twice = len(receiver.ids) - len(set(receiver.ids))
    if failed or extra or twice:
        raise BenchError(f"round {round_ + 1}: {failed} calls failed, {len(extra)} unknown events, "
                         f"{twice} events received twice")
    return (f"round {round_ + 1}: {len(expected)} events; undelivered at the end of each down phase: "
            + ", ".join(f"{down} {n}" for down, n in held.items())
            + f"; every one received once, {drained:.1f} s after the receiver returned")


def report(samples: dict, busy: dict) -> float:
    """The table over all rounds; returns the target figure: for each down phase the
    median over rounds of (its route p99 / the round's no-webhook route p99), the worse
    of the two. Phases of one round are minutes apart at most: a burst of the box's other
    work lands on one phase of one round, and the median of rounds sets it aside."""
    base = {}
    print(f"\n{'phase':<24} {'calls':>6} {'route p50':>10} {'route p99':>10} {'hangup p50':>11} "
          f"{'hangup p99':>11} {'route p99 / none':>17} {'hangup p99 / none':>18} {'deliverer CPU, its PostgreSQL':>30}")
    ratios = {}
    for name in PHASES:
        route = [r for one in samples[name] for r, _ in one]
        hangup = [h for one in samples[name] for _, h in one]
        p = {"route": (percentile(route, 50), percentile(route, 99)),
             "hangup": (percentile(hangup, 50), percentile(hangup, 99))}
        base = base or p
        ratios[name] = (p["route"][1] / base["route"][1], p["hangup"][1] / base["hangup"][1])
        print(f"{name:<24} {len(route):>6} {p['route'][0]:>7.2f} ms {p['route'][1]:>7.2f} ms "
              f"{p['hangup'][0]:>8.2f} ms {p['hangup'][1]:>8.2f} ms {ratios[name][0]:>17.3f} {ratios[name][1]:>18.3f}"
              f" {100 * busy[name][0] / busy[name][2]:>13.0f}% {100 * busy[name][1] / busy[name][2]:>5.0f}% of a core")
    p99 = {name: [percentile([r for r, _ in one], 99) for one in samples[name]] for name in PHASES}
    print("route p99 of each round, ms: " + "; ".join(
        f"{name} " + " ".join(f"{v:.1f}" for v in p99[name]) for name in PHASES))
    medians = {}
    for down in DOWN:
        by_round = [a / b for a, b in zip(p99[down], p99["no webhook"])]
        medians[down] = statistics.median(by_round)
        print(f"{down} / no webhook, route p99 per round: {' '.join(f'{r:.2f}' for r in by_round)}; "
              f"median {medians[down]:.3f}")
    return max(medians.values())


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--calls", type=int, default=600, help="calls per phase per round (default 600)")
    p.add_argument("--rate", type=float, default=60, help="calls/s offered (default 60)")
    p.add_argument("--rounds", type=int, default=4, help="rounds of the four phases (default 4)")
    p.add_argument("--warmup", type=int, default=300, help="uncounted calls first (default 300)")
    p.add_argument("--bindings", type=int, default=10_000, help="AXN bindings loaded (default 10,000)")
    p.add_argument("--drain-timeout", type=float, default=600, help="seconds a round waits for its events")
    p.add_argument("--pg-admin", default="postgresql://postgres@127.0.0.1:5432/postgres")
    args = p.parse_args(argv)
    os.environ.setdefault(crypto.ENV_KEYS, f"{crypto.LOOKUP}={crypto.new_key()} bench={crypto.new_key()}")
    url = f"postgresql+psycopg2://postgres@127.0.0.1:5432/{DB_NAME}"
    samples = {name: [] for name in PHASES}
    busy = {name: [0.0, 0.0, 0.0] for name in PHASES}
    receiver = Receiver()
    try:
        print(f"preparing {DB_NAME}: {args.bindings:,} AXN bindings ...", flush=True)
        tenant_id = prepare_database(args.pg_admin, url, args.bindings)["tenant_id"]
        engine = make_engine(url, pool_size=2)
        with tempfile.TemporaryDirectory(prefix="callctl-webhook-bench-") as tmp:
            server = daemon(REPO, f"{url}?application_name=webhook_bench", Path(tmp) / "daemon").start()
            follower = deliverer(url, Path(tmp) / "deliverer.log")
            try:
                rng = random.Random(1)
                asyncio.run(drive(server.port, args.warmup, args.rate, args.bindings, "w", rng))
                for round_ in range(args.rounds):
                    print(one_round(round_, args, server.port, engine, receiver, tenant_id, follower.pid, samples,
                                    busy, rng), flush=True)
            finally:
                receiver.stop()
                follower.terminate()
                follower.wait(30)
                server.stop()
        engine.dispose()
    except BenchError as exc:
        print(f"webhook_bench: {exc}", file=sys.stderr)
        return 1
    finally:
        drop_database(args.pg_admin)
    ratio = report(samples, busy)
    print(f"\ncall setup (route session) p99, receiver down / no webhook (worse down phase, median of "
          f"rounds): {ratio:.3f} "
          f"(target <= {targets.BY_KEY['webhook_down_p99_ratio'].bound:g})")
    targets.record("webhook_down_p99_ratio", ratio, f"{args.calls:,} calls per phase x {args.rounds} rounds at "
                                                    f"{args.rate:g}/s, {args.bindings:,} bindings")
    print(targets.table())
    return 0


if __name__ == "__main__":
    sys.exit(main())
