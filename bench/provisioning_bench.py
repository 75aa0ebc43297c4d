"""Provisioning throughput with the bench database's 1,000,000 bindings already present
(bench.py loads them; `bench.py --only provisioning` runs just this part):

1. `callctl pool import FILE`: new virtual numbers for the steps below, from CSV.
2. `callctl bind --bulk FILE`: AXN bindings from CSV, bindings created per second,
   end to end (the real command: parsing, validation, set-based batches, output file).
3. The HTTP API: `callctl serve api` on a free loopback port, a tenant token made with
   `callctl token create`, N concurrent clients POSTing /v1/bindings; bindings created
   per second and request latency.

The numbers are synthetic: +86172... virtual numbers, +86137.../+86136... customers.
"""
from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import httpx
from sqlalchemy import text

REPO = Path(__file__).resolve().parent.parent

from lab import sipp
from callctl.store.db import make_engine
from lab.harness import ApiServer

POOL_PREFIX = "+86172"
BULK_CUSTOMER_PREFIX = "+86137"
API_CUSTOMER_PREFIX = "+86136"


class ProvisioningBenchError(RuntimeError):
    pass


def callctl(bench_url: str, *args: str, workdir: Path) -> subprocess.CompletedProcess:
    exe = Path(sys.executable).with_name("callctl")
    argv = [str(exe)] if exe.exists() else [sys.executable, "-m", "callctl.cli"]
    env = {**os.environ, "CALLCTL_DATABASE_URL": bench_url, "CALLCTL_CONFIG": str(REPO / "conf" / "callctl.yaml")}
    return subprocess.run(argv + list(args), capture_output=True, text=True, env=env, cwd=workdir)


def binding_count(bench_url: str) -> int:
    engine = make_engine(bench_url, pool_size=1)
    try:
        with engine.connect() as db:
            return db.execute(text("SELECT count(*) FROM bindings")).scalar()
    finally:
        engine.dispose()


def timed_command(bench_url: str, workdir: Path, *args: str) -> tuple[dict, float]:
    t0 = time.perf_counter()
    done = callctl(bench_url, *args, workdir=workdir)
    seconds = time.perf_counter() - t0
    if done.returncode != 0:
        raise ProvisioningBenchError(f"callctl {' '.join(args[:2])} failed ({done.returncode}): {done.stderr[-1500:]}")
    return json.loads(done.stdout), seconds


async def post_bindings(base_url: str, token: str, first: int, count: int,
                        concurrency: int) -> tuple[list[float], dict, float]:
    """count POST /v1/bindings (customers first, first+1, ...) from `concurrency` clients;
    latencies (ms), statuses, wall seconds."""
    latencies: list[float] = []
    statuses: dict[int, int] = {}
    next_index = iter(range(first, first + count))
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(base_url=base_url, headers={"Authorization": f"Bearer {token}"},
                                 limits=limits, timeout=30) as client:
        async def worker():
            for i in next_index:
                body = {"customer": f"{API_CUSTOMER_PREFIX}{i + 1:08d}", "reference": f"API-{i + 1}",
                        "ttl_seconds": 86400 * 30}
                t = time.perf_counter()
                response = await client.post("/v1/bindings", json=body)
                latencies.append((time.perf_counter() - t) * 1000)
                statuses[response.status_code] = statuses.get(response.status_code, 0) + 1

        t0 = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        wall = time.perf_counter() - t0
    return latencies, statuses, wall


def run(bench_url: str, workdir: Path, *, tenant: str, bulk_rows: int, api_requests: int,
        concurrency: int, workers: int, say=print) -> dict:
    workdir.mkdir(parents=True, exist_ok=True)
    result: dict = {"bulk_rows": bulk_rows, "api_requests": api_requests, "api_concurrency": concurrency,
                    "api_workers": workers}
    result["bindings_before"] = binding_count(bench_url)

    pool_file = workdir / "pool.csv"
    with open(pool_file, "w") as out:
        out.write("number\n")
        out.writelines(f"{POOL_PREFIX}{i:08d}\n" for i in range(1, bulk_rows + api_requests + 1))
    say(f"Provisioning: callctl pool import, {bulk_rows + api_requests:,} numbers ...")
    summary, seconds = timed_command(bench_url, workdir, "pool", "import", str(pool_file), "--tenant", tenant)
    result["pool_import"] = {"numbers": summary["done"], "seconds": round(seconds, 2),
                             "per_s": round(summary["done"] / seconds)}
    say(f"Provisioning: {summary['done']:,} numbers imported in {seconds:.1f} s "
        f"({result['pool_import']['per_s']:,}/s)")

    bulk_file = workdir / "bindings.csv"
    with open(bulk_file, "w") as out:
        out.write("customer,reference,ttl_seconds\n")
        out.writelines(f"{BULK_CUSTOMER_PREFIX}{i:08d},BULK-{i},31536000\n" for i in range(1, bulk_rows + 1))
    before = binding_count(bench_url)
    say(f"Provisioning: callctl bind --bulk, {bulk_rows:,} AXN bindings, {before:,} bindings present ...")
    summary, seconds = timed_command(bench_url, workdir, "bind", "--bulk", str(bulk_file), "--tenant", tenant)
    if summary["done"] != bulk_rows:
        raise ProvisioningBenchError(f"bulk bind made {summary['done']} of {bulk_rows} bindings")
    result["bulk_bind"] = {"bindings": summary["done"], "bindings_present_before": before,
                           "seconds": round(seconds, 2), "per_s": round(summary["done"] / seconds)}
    say(f"Provisioning: {summary['done']:,} bindings in {seconds:.1f} s ({result['bulk_bind']['per_s']:,}/s)")

    made = callctl(bench_url, "token", "create", "--tenant", tenant, "--name", "bench", workdir=workdir)
    if made.returncode != 0:
        raise ProvisioningBenchError(f"callctl token create failed: {made.stderr[-500:]}")
    token = json.loads(made.stdout)["token"]
    before = binding_count(bench_url)
    say(f"Provisioning: HTTP API ({workers} worker process(es)), {api_requests:,} POST /v1/bindings from "
        f"{concurrency} clients, {before:,} bindings present ...")
    with ApiServer(bench_url, workdir, extra_env={"CALLCTL_API_WORKERS": str(workers)}) as server:
        warm = min(100, api_requests // 10)  # connections opened, code paths hot; not counted
        asyncio.run(post_bindings(server.url, token, 0, warm, concurrency))
        latencies, statuses, wall = asyncio.run(post_bindings(server.url, token, warm, api_requests - warm,
                                                              concurrency))
    created = statuses.get(201, 0)
    if created != len(latencies):
        raise ProvisioningBenchError(f"API answered {statuses}; wanted only 201")
    result["api"] = {"bindings": created, "bindings_present_before": before, "seconds": round(wall, 2),
                     "per_s": round(created / wall), "latency_ms_p50": sipp.percentile(latencies, 50),
                     "latency_ms_p99": sipp.percentile(latencies, 99), "statuses": statuses}
    say(f"Provisioning: API {created:,} bindings in {wall:.1f} s ({result['api']['per_s']:,}/s), "
        f"latency p50 {result['api']['latency_ms_p50']:.1f} ms, p99 {result['api']['latency_ms_p99']:.1f} ms")
    result["bindings_after"] = binding_count(bench_url)
    return result
