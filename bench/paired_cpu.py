#!/usr/bin/env python3
"""The daemon's CPU per call, this checkout against another commit, measured paired.

    .venv/bin/python -m bench.paired_cpu REF [--calls 3000] [--rate 150] [--bindings 100000]
    .venv/bin/python -m bench.paired_cpu REF --head OTHER   # two commits, neither checked out
    .venv/bin/python -m bench.paired_cpu HEAD --ref-env CALLCTL_LOG_LEVEL=warning  # one setting's cost

Two `callctl serve asterisk` daemons run side by side on one bench database (bench/data.py):
this checkout's and REF's (its tree exported with `git archive`, run on this venv).
A client speaking FastAGI as Asterisk does (the environment, an answer to each command)
places calls at `--rate`, alternating between the daemons call by call, each call a route
session and then the hangup session reporting the CDR. Both see the same load at the same
moments, so the machine's noise falls on both; the figure is each daemon's CPU (user +
system, /proc) over its calls, and their ratio REF/HEAD (above 1: this checkout is cheaper).

No PBX and no SIP: this measures the daemon alone (`make bench` measures the whole path
through Asterisk with SIPp). Numbers are the bench's synthetic ones.
"""
from __future__ import annotations

import argparse
import asyncio
import os
import random
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench import targets
from bench.cpu import backend_cpu_seconds, cpu_seconds, cpu_used
from bench.data import AGENT, BenchError, prepare_database, x_number
from callctl.store import crypto
from callctl.store.db import make_engine
from lab.agiclient import agi_session
from lab.harness import Process, free_port

REPO = Path(__file__).resolve().parent.parent
DB_NAME = "callctl_bench_paired"


def export_tree(ref: str, into: Path) -> Path:
    """REF's files (not its .git) under `into`; BenchError when REF is not a commit."""
    archive = subprocess.run(["git", "-C", str(REPO), "archive", "--format=tar", ref], capture_output=True)
    if archive.returncode != 0:
        raise BenchError(f"git archive {ref}: {archive.stderr.decode().strip()}")
    into.mkdir(parents=True)
    subprocess.run(["tar", "-x", "-C", str(into)], input=archive.stdout, check=True)
    return into


def daemon(tree: Path, url: str, workdir: Path, extra_env: dict | None = None) -> Process:
    """`callctl serve asterisk` from `tree`'s sources (PYTHONPATH), on a port of its own."""
    workdir.mkdir(parents=True, exist_ok=True)
    port = free_port()
    env = {
        "PYTHONPATH": str(tree), "CALLCTL_CONFIG": str(tree / "conf" / "callctl.yaml"),
        "CALLCTL_DATABASE_URL": url, "CALLCTL_SPOOL_DIR": str(workdir / "spool"),
        "CALLCTL_AGI_LISTEN": f"127.0.0.1:{port}", "CALLCTL_LOG_FORMAT": "json", "CALLCTL_NODE": "bench",
        "CALLCTL_AUDIT_CHECKPOINT": str(workdir / "audit-head"),
        "CALLCTL_METRICS_LISTEN": f"127.0.0.1:{free_port()}",
        "CALLCTL_HOUSEKEEPING_SECONDS": "3600",  # the calls' CPU only
        **(extra_env or {}),
    }
    argv = [sys.executable, "-c", "import sys; from callctl.cli import main; sys.exit(main())", "serve", "asterisk"]
    return Process(argv, workdir / "callctl.log", env=env, cwd=tree, port=port)


async def one_call(port: int, n: int, x: str) -> bool:
    """A bridged call as the product dialplan makes it: route, then the hangup's CDR."""
    started = time.time()
    uniqueid = f"{started:.0f}.{n}"
    routed = await agi_session(port, "route", uniqueid, env={"agi_extension": x, "agi_callerid": AGENT})
    if routed is None or routed.get("CALLCTL_ACTION") != "bridge":
        return False
    args = [f"called={x}", f"caller={AGENT}", f"dest={routed['CALLCTL_DEST']}", "action=bridge", "reason=",
            f"binding={routed.get('CALLCTL_BINDING', '')}", f"tenant={routed.get('CALLCTL_TENANT', '')}",
            "direction=to_customer", f"start={started:.3f}", f"end={started + 1:.3f}", "dialstatus=ANSWER",
            "dialedtime=1000", "answeredtime=900", "hangupcause=16", "node=bench"]
    done = await agi_session(port, "hangup", uniqueid, args)
    return bool(done and done.get("CALLCTL_CDR"))


async def drive(ports: dict[str, int], pids: dict[str, int], calls: int, rate: float, bindings: int,
                seed: int, engine) -> dict:
    """`calls` calls per daemon, alternating, at `rate` calls/s in all."""
    rng = random.Random(seed)
    names = list(ports)
    before = {name: cpu_seconds(pids[name]) for name in names}
    pg_before = {name: backend_cpu_seconds(engine, application(name)) for name in names}
    tasks, failed = [], {name: 0 for name in names}
    began, n = time.monotonic(), 0
    for _ in range(calls):
        x = x_number(rng.randint(1, bindings))  # the same X for each daemon: the same work for both
        for name in names:
            tasks.append((name, asyncio.create_task(one_call(ports[name], n, x))))
            n += 1
            await asyncio.sleep(max(0.0, began + n / rate - time.monotonic()))
    for name, task in tasks:
        failed[name] += not await task
    await asyncio.sleep(0.5)  # the last CDR writes
    return {name: {"cpu_ms_per_call": (cpu_seconds(pids[name]) - before[name]) * 1000 / calls,
                   "pg_cpu_ms_per_call": cpu_used(pg_before[name], backend_cpu_seconds(
                       engine, application(name))) * 1000 / calls,
                   "failed": failed[name]} for name in names}


def application(name: str) -> str:
    """The application_name a daemon's database connections carry."""
    return "paired_head" if name == "HEAD" else "paired_ref"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("ref", help="the commit to compare this checkout against (e.g. a tag, a hash, HEAD~5)")
    p.add_argument("--head", help="measure this commit instead of the checkout (named HEAD in the output)")
    p.add_argument("--ref-env", action="append", default=[], metavar="NAME=VALUE",
                   help="environment of REF's daemon only, e.g. CALLCTL_LOG_LEVEL=warning (REF may be HEAD)")
    p.add_argument("--calls", type=int, default=3000, help="calls per daemon per round (default 3,000)")
    p.add_argument("--rate", type=float, default=150, help="calls/s offered in all (default 150)")
    p.add_argument("--rounds", type=int, default=3, help="rounds, the daemons restarted each (default 3)")
    p.add_argument("--warmup", type=int, default=200, help="uncounted calls per daemon first (default 200)")
    p.add_argument("--bindings", type=int, default=100_000, help="AXN bindings loaded (default 100,000)")
    p.add_argument("--pg-admin", default="postgresql://postgres@127.0.0.1:5432/postgres")
    args = p.parse_args(argv)
    os.environ.setdefault(crypto.ENV_KEYS, f"{crypto.LOOKUP}={crypto.new_key()} bench={crypto.new_key()}")
    url = f"postgresql+psycopg2://postgres@127.0.0.1:5432/{DB_NAME}"
    try:
        print(f"preparing {DB_NAME}: {args.bindings:,} AXN bindings ...", flush=True)
        prepare_database(args.pg_admin, url, args.bindings)
        engine = make_engine(url, pool_size=1)
        with tempfile.TemporaryDirectory(prefix="callctl-paired-") as tmp:
            ref_env = dict(pair.split("=", 1) for pair in args.ref_env)
            ref_name = f"{args.ref} ({' '.join(args.ref_env)})" if ref_env else args.ref
            head = REPO if args.head is None else export_tree(args.head, Path(tmp) / "head")
            trees = {"HEAD": head, ref_name: export_tree(args.ref, Path(tmp) / "ref")}
            results = []
            for round_ in range(args.rounds):
                order = list(trees) if round_ % 2 == 0 else list(reversed(trees))  # who goes first alternates
                running = {name: daemon(trees[name], f"{url}?application_name={application(name)}", Path(tmp) / f"{'ref' if name == ref_name else 'head'}-{round_}",
                                        ref_env if name == ref_name else None).start()
                           for name in order}
                try:
                    # Uncounted warm-up: connections made, statements prepared, caches filled.
                    asyncio.run(drive({n: d.port for n, d in running.items()}, {n: d.proc.pid for n, d in running.items()},
                                      args.warmup, args.rate, args.bindings, seed=1000 + round_, engine=engine))
                    got = asyncio.run(drive({n: d.port for n, d in running.items()},
                                            {n: d.proc.pid for n, d in running.items()},
                                            args.calls, args.rate, args.bindings, seed=round_, engine=engine))
                finally:
                    for d in running.values():
                        d.stop()
                results.append(got)
                print(f"round {round_ + 1}: " + ", ".join(
                    f"{name} {r['cpu_ms_per_call']:.3f} ms/call, PostgreSQL {r['pg_cpu_ms_per_call']:.3f} "
                    f"({r['failed']} failed)" for name, r in got.items())
                    + f"; REF/HEAD {got[ref_name]['cpu_ms_per_call'] / got['HEAD']['cpu_ms_per_call']:.3f}",
                      flush=True)
    except BenchError as exc:
        print(f"paired_cpu: {exc}", file=sys.stderr)
        return 1
    ratios = sorted(r[ref_name]["cpu_ms_per_call"] / r["HEAD"]["cpu_ms_per_call"] for r in results)
    print(f"daemon CPU per call, {ref_name}/HEAD over {args.rounds} rounds: "
          f"{ratios[0]:.3f}-{ratios[-1]:.3f} (median {ratios[len(ratios) // 2]:.3f}); above 1: HEAD is cheaper")
    for key, part in (("cpu_ms_per_call", "call_daemon_cpu_ms"), ("pg_cpu_ms_per_call", "call_postgres_cpu_ms")):
        head = statistics.median(r["HEAD"][key] for r in results)
        ref = statistics.median(r[ref_name][key] for r in results)
        print(f"{'daemon' if part == 'call_daemon_cpu_ms' else 'PostgreSQL'} CPU per call, median of rounds: "
              f"HEAD {head:.3f} ms, {ref_name} {ref:.3f} ms")
        if args.head is None and not ref_env:
            targets.record(part, head, f"{ref_name} {ref:.3f} ms beside it; {args.calls:,} calls x {args.rounds} "
                                       f"rounds at {args.rate:g}/s, {args.bindings:,} bindings")
    return 0 if all(r[n]["failed"] == 0 for r in results for n in r) else 1


if __name__ == "__main__":
    sys.exit(main())
