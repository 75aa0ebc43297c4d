"""Many nodes on replicated PostgreSQL, failover under load (lab/cluster.py).

Network namespaces this test creates and removes: two PBX hosts (Asterisk from the lab
chroot + `callctl serve asterisk` + SIPp carrier and phone each), a PostgreSQL primary
and its synchronous streaming replica, each host on its own address on veth pairs to a
bridge in the test's own namespace; nothing leaves the machine. Both daemons are given
the one multi-host URL (host=primary,replica target_session_attrs=read-write).

Phase 1, failover: SIPp load through both Asterisk boxes; the primary's host is lost
(every process in it SIGKILLed), the replica is promoted. While no primary answers,
calls fail closed (503) and CDRs are spooled; after the promotion calls route again
with no daemon restart, every spooled CDR lands exactly once, no bridged call drops.
Phase 2, restarts under load: one daemon is stopped with SIGTERM and started again, the
other SIGKILLed and started again; no bridged call drops and every call has its CDR
(the dialplan keeps a CDR no daemon acknowledged in its fallback file: imported).
Phase 3: Asterisk restarted under a running daemon routes again.

The figures are shown in the test run's summary (tests/figures.py): calls refused during
the outage, seconds to recover, CDRs spooled and replayed, duplicates (0).
"""
from __future__ import annotations

import json
import re
import signal
import threading
import time
from collections import Counter
from datetime import datetime, timezone

import pytest

from prometheus_client.parser import text_string_to_metric_families

from lab import sipp
from lab import cluster, harness
from tests import figures as shown
from tests.test_lab_cdr_outage import invites_and_finals

pytestmark = [pytest.mark.lab, pytest.mark.cluster, pytest.mark.timeout(1500)]  # waits its turn for the lab

AGENT, HOTLINE = "+8613900000041", "+861058000041"
CUSTOMERS = {"pbx1": "+8613800000041", "pbx2": "+8613800000042"}
POOL = ["+8617100000041", "+8617100000042"]
PROBE_CALLER = "+8613700000041"  # a caller blocked to measure how soon the replica sees a block
RATE, TALK_MS = 4.0, 3000
PHASE1_S, KILL_AT_S, OUTAGE_S = 36.0, 9.0, 8.0
PHASE2_S = 18.0
ALL_DAY = "00:00-24:00"


def _utc(stamp: str) -> datetime:
    return datetime.fromisoformat(stamp.replace("Z", "+00:00"))


@pytest.fixture
def deployment(tmp_path):
    """Namespaces, primary + replica, both PBX hosts with Asterisk and a daemon."""
    with harness.LabLock():
        nets = cluster.Namespaces().create()
        pbxes: dict[str, cluster.Asterisk] = {}
        daemons: dict[str, cluster.Daemon] = {}
        try:
            base = cluster.workdir()
            primary, replica = cluster.Postgres(nets, "db1", base), cluster.Postgres(nets, "db2", base)
            primary.init_primary()
            primary.start()
            primary.sql("CREATE DATABASE callctl")
            url = (f"postgresql://postgres@/callctl?host={primary.address}:5432&host={replica.address}:5432"
                   "&target_session_attrs=read-write")
            for host in ("pbx1", "pbx2"):
                daemons[host] = cluster.Daemon(nets, host, url, tmp_path, {"CALLCTL_DB_TIMEOUT": "1"})
            admin = daemons["pbx1"]
            admin.cli("db", "upgrade")
            admin.cli("tenant", "add", "acme", "--hotline", HOTLINE, "--caller", AGENT, "--hours", ALL_DAY)
            admin.cli("pool", "add", "--tenant", "acme", *POOL)
            xs = {host: json.loads(admin.cli("bind", "--tenant", "acme", "--customer", customer).stdout)["x"]
                  for host, customer in CUSTOMERS.items()}
            replica.init_replica(primary)
            replica.start()
            # Synchronous: a CDR the primary acknowledged is on the replica's disk too.
            # Set after the copy, so the replica (promoted: no standby of its own) has none.
            primary.sql("ALTER SYSTEM SET synchronous_standby_names = '*'")
            primary.sql("SELECT pg_reload_conf()")
            for host in ("pbx1", "pbx2"):
                pbxes[host] = cluster.Asterisk(nets, host)
                pbxes[host].install()
                pbxes[host].start()
                daemons[host].start()
            yield nets, primary, replica, pbxes, daemons, xs, base
        finally:
            for daemon in daemons.values():
                daemon.stop()
            for pbx in pbxes.values():
                pbx.stop()
            nets.destroy()
            for pbx in pbxes.values():
                pbx.remove()
            import shutil
            shutil.rmtree(base, ignore_errors=True)


def load(nets, host: str, x: str, workdir, calls: int, talk_ms: int = TALK_MS):
    """A phone for the bound customer and a carrier calling X, both inside `host`."""
    phone = sipp.start_uas(harness.PHONE_PORT, expect_ruri=CUSTOMERS[host], expect_from=x,
                           forbidden=[AGENT.removeprefix("+86")], netns=nets.name(host))
    carrier = sipp.start("uac_call", remote=harness.SIP_TARGET, local_port=5080, netns=nets.name(host),
                         calls=[(AGENT, x, f"P-Asserted-Identity: <sip:{AGENT}@127.0.0.1>")],
                         max_calls=calls, rate=RATE, limit=200, variables={"talk_ms": talk_ms},
                         extra_args=["-trace_msg"], workdir=workdir)
    return phone, carrier


def cdr_rows(db: cluster.Postgres) -> list[tuple[str, str, str, str]]:
    out = db.sql("SELECT call_id, decision, coalesce(reject_reason, ''), coalesce(node, '') FROM cdrs", "callctl")
    return [tuple(line.split("|")) for line in out.splitlines() if line]


def finish(nets, host, phone, carrier, pbx, timeout):
    result = carrier.wait(timeout=timeout)
    deadline = time.monotonic() + 30
    while pbx.channels():
        assert time.monotonic() < deadline, f"{host}: channels left"
        time.sleep(0.2)
    return result, phone.stop()


def healthz_ok(daemon: cluster.Daemon) -> bool:
    return daemon.http("/healthz")[0] == 200


def metrics(daemon: cluster.Daemon) -> dict[tuple, float]:
    status, body = daemon.http("/metrics")
    assert status == 200
    return {(s.name, *sorted(s.labels.items())): s.value
            for family in text_string_to_metric_families(body) for s in family.samples}


def test_failover_and_restarts_under_load(deployment, tmp_path):
    nets, primary, replica, pbxes, daemons, xs, base = deployment
    figures = shown.section("cluster failover figures")  # in make test's summary, even if an assert fails

    # Staleness, measured: a block added on the primary, and how far the replica lags.
    daemons["pbx1"].cli("block", "add", "--scope", "caller", "--tenant", "acme", "--caller", PROBE_CALLER,
                        "--direction", "both", "--reason", "staleness probe")
    seen_at_once = replica.sql("SELECT count(*) FROM blocks", "callctl")
    figures["block visible on the replica at the first look after the command"] = seen_at_once == "1"

    # -- phase 1: failover under load --------------------------------------------------
    calls1 = int(PHASE1_S * RATE)
    runs = {host: load(nets, host, xs[host], tmp_path / f"p1-{host}", calls1) for host in pbxes}
    # The replica's lag under this load (CDR inserts), sampled until the kill.
    lags = []
    until = time.monotonic() + KILL_AT_S
    while time.monotonic() < until:
        lags += [float(v) for v in primary.sql(
            "SELECT extract(epoch FROM replay_lag) * 1000 FROM pg_stat_replication WHERE replay_lag IS NOT NULL"
        ).split()]
        time.sleep(0.5)
    figures["replica replay lag under load, ms (samples, median, max)"] = (
        (len(lags), round(sorted(lags)[len(lags) // 2], 2), round(max(lags), 2)) if lags else "no sample")
    assert healthz_ok(daemons["pbx1"])
    killed_at = datetime.now(timezone.utc)
    assert nets.kill_all("db1")  # the primary's machine is lost
    time.sleep(OUTAGE_S - 2)
    during = {host: metrics(d) for host, d in daemons.items()}  # scraped under load, mid-outage
    assert not healthz_ok(daemons["pbx1"])  # not ready while no primary answers
    time.sleep(2)
    promote_began = datetime.now(timezone.utc)
    replica.promote()
    promoted_at = datetime.now(timezone.utc)
    results = {host: finish(nets, host, *runs[host], pbxes[host], calls1 / RATE + 90) for host in pbxes}

    refused = 0
    recover_s = 0.0
    for host, (result, far) in results.items():
        calls = invites_and_finals(tmp_path / f"p1-{host}")
        finals = Counter(code for _, code in calls.values())
        assert result.created == calls1 == len(calls), host
        assert set(finals) <= {200, 503}, (host, finals)
        assert result.successful == finals[200] and result.failed == finals[503], host
        assert result.remote_hangups == 0, f"{host}: bridged calls dropped"  # no BYE from the PBX side
        assert far.failed == 0 and far.successful == finals[200], f"{host}: the phone saw a wrong call"
        assert finals[503] > 0, f"{host}: nothing failed closed during the outage"
        naive = {k: (sent, code) for k, (sent, code) in calls.items()}
        after = [code for sent, code in naive.values()
                 if sent.timestamp() > promoted_at.timestamp() + 3]  # SIPp logs local time
        assert after and set(after) == {200}, (host, Counter(after))  # routing again, no restart
        refused += finals[503]
        # seconds to recover: promotion begun -> the first call bridged again on this node
        bridged = [_utc(e["timestamp"]) for e in daemons[host].events("call routed")
                   if e.get("action") == "bridge" and _utc(e["timestamp"]) > promote_began]
        recover_s = max(recover_s, (min(bridged) - promote_began).total_seconds())
        assert daemons[host].proc.poll() is None  # never restarted
    # spooled CDRs replayed: wait for the spools to empty, then count
    deadline = time.monotonic() + 60
    while any(daemon.events("spooled CDRs replayed") == [] or
              (tmp_path / f"spool-{host}" / "cdrs.jsonl").exists() or
              (tmp_path / f"spool-{host}" / "cdrs.replaying.jsonl").exists()
              for host, daemon in daemons.items()):
        assert time.monotonic() < deadline, "spools not replayed"
        time.sleep(0.5)
    spooled = sum(len(d.events("database unavailable, CDR spooled")) for d in daemons.values())
    replayed = sum(e["count"] for d in daemons.values() for e in d.events("spooled CDRs replayed"))
    rows = cdr_rows(replica)
    ids = Counter(row[0] for row in rows)
    duplicates = sum(n - 1 for n in ids.values())
    by_node = Counter(row[3] for row in rows)
    figures.update({
        "phase 1 calls placed": 2 * calls1, "calls refused (503) during the outage": refused,
        "outage (kill -> promotion begun), s": round((promote_began - killed_at).total_seconds(), 1),
        "seconds to recover (promotion begun -> first bridged call, slowest node)": round(recover_s, 2),
        "CDRs spooled": spooled, "CDRs replayed": replayed, "CDR rows": len(rows), "duplicates": duplicates,
    })
    assert spooled > 0 and replayed == spooled
    assert duplicates == 0
    assert by_node == {"pbx1": calls1, "pbx2": calls1}  # every call of both boxes, once
    assert Counter(row[2] for row in rows if row[1] == "rejected") == {"unavailable": refused}
    # /metrics of each daemon (no restart yet) counts exactly what its CDRs say.
    for host, daemon in daemons.items():
        m = metrics(daemon)
        mine = [row for row in rows if row[3] == host]
        bridged = sum(1 for row in mine if row[1] == "bridged")
        assert m[("callctl_decisions_total", ("outcome", "bridge"), ("reason", ""))] == bridged, host
        assert m[("callctl_decisions_total", ("outcome", "reject"), ("reason", "unavailable"))] == len(mine) - bridged
        assert (m[("callctl_cdrs_total", ("outcome", "written"))] + m[("callctl_cdrs_total", ("outcome", "spooled"))]
                == len(mine)), host
        assert m[("callctl_cdrs_total", ("outcome", "lost"))] == 0 and m[("callctl_spool_depth",)] == 0
        assert m[("callctl_spool_replayed_total",)] == m[("callctl_cdrs_total", ("outcome", "spooled"))]
        assert m[("callctl_db_errors_total", ("path", "route"))] > 0 and m[("callctl_db_reconnects_total",)] > 0
        assert 0 < during[host][("callctl_decision_seconds_count",)] < m[("callctl_decision_seconds_count",)]
        assert healthz_ok(daemon)

    # -- phase 2: daemon SIGTERM and SIGKILL restarts under load ------------------------
    calls2 = int(PHASE2_S * RATE)
    runs = {host: load(nets, host, xs[host], tmp_path / f"p2-{host}", calls2, talk_ms=2000) for host in pbxes}
    time.sleep(5)
    daemons["pbx1"].signal(signal.SIGTERM)
    assert daemons["pbx1"].wait() == 0  # stopped accepting, finished its sessions, exited cleanly
    daemons["pbx1"].start()
    time.sleep(2)
    daemons["pbx2"].signal(signal.SIGKILL)
    assert daemons["pbx2"].wait() == -signal.SIGKILL
    daemons["pbx2"].start()
    results = {host: finish(nets, host, *runs[host], pbxes[host], calls2 / RATE + 90) for host in pbxes}
    imported = 0
    for host, (result, far) in results.items():
        calls = invites_and_finals(tmp_path / f"p2-{host}")
        finals = Counter(code for _, code in calls.values())
        assert set(finals) <= {200, 503} and result.created == calls2, (host, finals)
        assert result.remote_hangups == 0 and far.failed == 0, f"{host}: a bridged call dropped"
        if pbxes[host].fallback.exists():  # CDRs of calls that ended while no daemon answered
            done = daemons[host].cli("cdr", "import-pbx", str(pbxes[host].fallback), "--json")
            imported += json.loads(done.stdout)["written"]
    rows = cdr_rows(replica)
    ids = Counter(row[0] for row in rows)
    figures.update({"phase 2 calls placed": 2 * calls2, "CDRs from the PBX fallback files": imported,
                    "duplicates after phase 2": sum(n - 1 for n in ids.values())})
    assert sum(n - 1 for n in ids.values()) == 0
    assert Counter(row[3] for row in rows) == {"pbx1": calls1 + calls2, "pbx2": calls1 + calls2}

    # -- phase 3: Asterisk restarted under a running daemon -----------------------------
    pid = daemons["pbx1"].proc.pid
    pbxes["pbx1"].stop()
    pbxes["pbx1"].start()
    phone, carrier = load(nets, "pbx1", xs["pbx1"], tmp_path / "p3", 3, talk_ms=200)
    result, far = finish(nets, "pbx1", phone, carrier, pbxes["pbx1"], 60)
    assert result.successful == 3 and far.successful == 3
    assert daemons["pbx1"].proc.pid == pid and daemons["pbx1"].proc.poll() is None

    for daemon in daemons.values():
        assert daemon.stop() == 0
        assert "Traceback" not in daemon.output()
