"""Provisioning throughput with the bench database's 1,000,000 bindings already present
(bench.py loads them; `bench.py --only provisioning` runs just this part):

1. `callctl pool import FILE`: new virtual numbers for the steps below, from CSV.
2. `callctl bind --bulk FILE`: AXN bindings from CSV, bindings created per second,
   end to end (the real command: parsing, validation, set-based batches, output file).
3. The HTTP API: `callctl serve api` on a free loopback port, a tenant token made with
   `callctl token create`, N concurrent clients POSTing /v1/bindings (closed loop: each
   sends its next request when the last is answered); bindings created per second,
   request latency, and the CPU each bind cost the API server, its PostgreSQL backends
   and the client (/proc), all on this one box.
4. The same API offered a fixed rate (`offered_rate`, default 500 binds/s, open loop:
   request i leaves at t0 + i/rate whatever the earlier ones are doing); latency p50/p99
   from each request's scheduled moment, so a late client or a queue counts.

The client is aiohttp: on this 2-core box it shares the CPU with the server, and it
costs 0.2 ms of CPU per request where httpx cost 2.7 ms (measured 2026-12-05).

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

import aiohttp
from sqlalchemy import text

REPO = Path(__file__).resolve().parent.parent

from bench.cpu import alive_cpu, backend_cpu_seconds, cpu_used
from lab import sipp
from callctl.store.db import make_engine
from lab.harness import ApiServer

POOL_PREFIX = "+86172"
BULK_CUSTOMER_PREFIX = "+86137"
API_CUSTOMER_PREFIX = "+86136"
API_APPLICATION = "callctl-api-bench"  # the API server's PostgreSQL backends, for their CPU


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


def _body(i: int) -> dict:
    return {"customer": f"{API_CUSTOMER_PREFIX}{i + 1:08d}", "reference": f"API-{i + 1}", "ttl_seconds": 86400 * 30}


def _session(base_url: str, token: str, connections: int) -> aiohttp.ClientSession:
    return aiohttp.ClientSession(base_url, headers={"Authorization": f"Bearer {token}"},
                                 connector=aiohttp.TCPConnector(limit=connections),
                                 timeout=aiohttp.ClientTimeout(total=30))


async def post_bindings(base_url: str, token: str, first: int, count: int,
                        concurrency: int) -> tuple[list[float], dict, float]:
    """count POST /v1/bindings (customers first, first+1, ...) from `concurrency` clients;
    latencies (ms), statuses, wall seconds."""
    latencies: list[float] = []
    statuses: dict[int, int] = {}
    next_index = iter(range(first, first + count))
    async with _session(base_url, token, concurrency) as client:
        async def worker():
            for i in next_index:
                t = time.perf_counter()
                async with client.post("/v1/bindings", json=_body(i)) as response:
                    await response.read()
                latencies.append((time.perf_counter() - t) * 1000)
                statuses[response.status] = statuses.get(response.status, 0) + 1

        t0 = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        wall = time.perf_counter() - t0
    return latencies, statuses, wall


async def offered_rate(base_url: str, token: str, first: int, rate: float, seconds: float,
                       connections: int = 256) -> tuple[list[float], dict, float]:
    """Open loop: request i leaves at t0 + i/rate, on a task of its own, whether or not
    the earlier ones were answered. Latency (ms) runs from the scheduled moment, so time
    spent waiting for the client, a connection or the server all counts. Returns the
    latencies, statuses, and how late the latest request left (ms)."""
    count = int(rate * seconds)
    latencies: list[float] = []
    statuses: dict[int, int] = {}
    async with _session(base_url, token, connections) as client:
        async def one(i: int, due: float):
            async with client.post("/v1/bindings", json=_body(i)) as response:
                await response.read()
            latencies.append((time.perf_counter() - due) * 1000)
            statuses[response.status] = statuses.get(response.status, 0) + 1

        t0, tasks, latest = time.perf_counter() + 0.05, [], 0.0
        for n in range(count):
            due = t0 + n / rate
            delay = due - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            latest = max(latest, time.perf_counter() - due)
            tasks.append(asyncio.create_task(one(first + n, due)))
        await asyncio.gather(*tasks)
    return latencies, statuses, latest * 1000


def _server_pids(pid: int) -> list[int]:
    """`callctl serve api` and its worker processes."""
    children = Path(f"/proc/{pid}/task/{pid}/children")
    found = [pid]
    for child in (children.read_text().split() if children.exists() else []):
        found += _server_pids(int(child))
    return found


class CpuMeter:
    """CPU seconds (user + system) used by the API server's processes, its PostgreSQL
    backends (by application_name) and this client process, between two readings."""

    def __init__(self, bench_url: str, server_pid: int):
        self.engine = make_engine(bench_url, pool_size=1)
        self.server_pid = server_pid

    def read(self) -> dict[str, dict[int, float] | float]:
        return {"server": alive_cpu(_server_pids(self.server_pid)),
                "postgres": backend_cpu_seconds(self.engine, API_APPLICATION), "client": time.process_time()}

    @staticmethod
    def per_bind_ms(before: dict, after: dict, binds: int) -> dict[str, float]:
        """A process started in between counts from zero (a backend the pool opened)."""
        used = {part: cpu_used(before[part], after[part]) for part in ("server", "postgres")}
        used["client"] = after["client"] - before["client"]
        return {f"{part}_cpu_ms_per_bind": round(seconds * 1000 / max(binds, 1), 3) for part, seconds in used.items()}

    def close(self) -> None:
        self.engine.dispose()


def pool_import(bench_url: str, workdir: Path, tenant: str, count: int, say=print) -> dict:
    """`callctl pool import` of `count` new virtual numbers (+86172...), for the steps below."""
    pool_file = workdir / "pool.csv"
    with open(pool_file, "w") as out:
        out.write("number\n")
        out.writelines(f"{POOL_PREFIX}{i:08d}\n" for i in range(1, count + 1))
    say(f"Provisioning: callctl pool import, {count:,} numbers ...")
    summary, seconds = timed_command(bench_url, workdir, "pool", "import", str(pool_file), "--tenant", tenant)
    done = {"numbers": summary["done"], "seconds": round(seconds, 2), "per_s": round(summary["done"] / seconds)}
    say(f"Provisioning: {summary['done']:,} numbers imported in {seconds:.1f} s ({done['per_s']:,}/s)")
    return done


def bulk_bind(bench_url: str, workdir: Path, tenant: str, rows: int, say=print) -> dict:
    """`callctl bind --bulk` of `rows` AXN bindings (free numbers from pool_import), timed end to end."""
    bulk_file = workdir / "bindings.csv"
    with open(bulk_file, "w") as out:
        out.write("customer,reference,ttl_seconds\n")
        out.writelines(f"{BULK_CUSTOMER_PREFIX}{i:08d},BULK-{i},31536000\n" for i in range(1, rows + 1))
    before = binding_count(bench_url)
    say(f"Provisioning: callctl bind --bulk, {rows:,} AXN bindings, {before:,} bindings present ...")
    summary, seconds = timed_command(bench_url, workdir, "bind", "--bulk", str(bulk_file), "--tenant", tenant)
    if summary["done"] != rows:
        raise ProvisioningBenchError(f"bulk bind made {summary['done']} of {rows} bindings")
    done = {"bindings": summary["done"], "bindings_present_before": before,
            "seconds": round(seconds, 2), "per_s": round(summary["done"] / seconds)}
    say(f"Provisioning: {summary['done']:,} bindings in {seconds:.1f} s ({done['per_s']:,}/s)")
    return done


def run(bench_url: str, workdir: Path, *, tenant: str, bulk_rows: int, api_requests: int,
        concurrency: int, workers: int, rate: float = 500.0, rate_seconds: float = 10.0, say=print) -> dict:
    workdir.mkdir(parents=True, exist_ok=True)
    result: dict = {"bulk_rows": bulk_rows, "api_requests": api_requests, "api_concurrency": concurrency,
                    "api_workers": workers, "offered_rate": rate, "offered_seconds": rate_seconds}
    result["bindings_before"] = binding_count(bench_url)
    offered = int(rate * rate_seconds)

    result["pool_import"] = pool_import(bench_url, workdir, tenant, bulk_rows + api_requests + offered, say)

    result["bulk_bind"] = bulk_bind(bench_url, workdir, tenant, bulk_rows, say)

    made = callctl(bench_url, "token", "create", "--tenant", tenant, "--name", "bench", workdir=workdir)
    if made.returncode != 0:
        raise ProvisioningBenchError(f"callctl token create failed: {made.stderr[-500:]}")
    token = json.loads(made.stdout)["token"]
    before = binding_count(bench_url)
    say(f"Provisioning: HTTP API ({workers} worker process(es)), {api_requests:,} POST /v1/bindings from "
        f"{concurrency} clients, {before:,} bindings present ...")
    api_url = f"{bench_url}{'&' if '?' in bench_url else '?'}application_name={API_APPLICATION}"
    # Connections enough in each worker's pool for every client at once: none is closed
    # after its request (a backend that exits takes its CPU figure with it).
    with ApiServer(api_url, workdir, extra_env={"CALLCTL_API_WORKERS": str(workers),
                                                "CALLCTL_DB_THREADS": str(max(8, concurrency))}) as server:
        warm = min(100, api_requests // 10)  # connections opened, code paths hot; not counted
        asyncio.run(post_bindings(server.url, token, 0, warm, concurrency))
        meter = CpuMeter(bench_url, server.proc.pid)
        try:
            cpu0 = meter.read()
            latencies, statuses, wall = asyncio.run(post_bindings(server.url, token, warm, api_requests - warm,
                                                                  concurrency))
            cost = CpuMeter.per_bind_ms(cpu0, meter.read(), statuses.get(201, 0))
        finally:
            meter.close()
        created = statuses.get(201, 0)
        if created != len(latencies):
            raise ProvisioningBenchError(f"API answered {statuses}; wanted only 201")
        result["api"] = {"bindings": created, "bindings_present_before": before, "seconds": round(wall, 2),
                         "per_s": round(created / wall), "latency_ms_p50": sipp.percentile(latencies, 50),
                         "latency_ms_p99": sipp.percentile(latencies, 99), "statuses": statuses, **cost}
        api = result["api"]
        say(f"Provisioning: API {created:,} bindings in {wall:.1f} s ({api['per_s']:,}/s), "
            f"latency p50 {api['latency_ms_p50']:.1f} ms, p99 {api['latency_ms_p99']:.1f} ms; CPU per bind: "
            f"server {api['server_cpu_ms_per_bind']:.2f} ms, PostgreSQL {api['postgres_cpu_ms_per_bind']:.2f} ms, "
            f"client {api['client_cpu_ms_per_bind']:.2f} ms")

        say(f"Provisioning: HTTP API offered {rate:g} binds/s for {rate_seconds:g} s (open loop) ...")
        latencies, statuses, late = asyncio.run(offered_rate(server.url, token, api_requests, rate, rate_seconds))
    created = statuses.get(201, 0)
    if created != offered:
        raise ProvisioningBenchError(f"API at {rate:g}/s answered {statuses}; wanted {offered} x 201")
    result["api_offered"] = {"rate": rate, "bindings": created, "latency_ms_p50": sipp.percentile(latencies, 50),
                             "latency_ms_p99": sipp.percentile(latencies, 99), "latency_ms_max": max(latencies),
                             "client_late_ms_max": round(late, 1)}
    at = result["api_offered"]
    say(f"Provisioning: API at {rate:g} binds/s offered: latency p50 {at['latency_ms_p50']:.1f} ms, "
        f"p99 {at['latency_ms_p99']:.1f} ms, max {at['latency_ms_max']:.1f} ms (the client left at most "
        f"{late:.1f} ms late)")
    result["bindings_after"] = binding_count(bench_url)
    return result
