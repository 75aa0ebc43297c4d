"""The anomaly job: one pass over the CDRs that arrived since the stored watermark, or
passes on an interval until told to stop.

Watermark. CDR ids come from a sequence, but a CDR with a lower id can commit after one
with a higher id (two daemons writing at once), and a CDR replayed from a daemon's spool
after an outage gets a new id while its started_at lies in the past. So a pass reads the
CDRs with id > safe_id, where safe_id only moves up to the highest id that a pass saw at
least `overlap_seconds` earlier: by then every CDR with a lower id has committed. CDRs
near the top are therefore read by more than one pass, which changes nothing: findings
and blocks have unique keys and are inserted with ON CONFLICT DO NOTHING.

Each rule then re-evaluates, in the database, the started_at range those CDRs touch,
widened by the rule's window on each side, so late CDRs join the windows they belong to.
A pass reads one snapshot. On PostgreSQL the rules run side by side on `workers`
connections that share the pass's snapshot (pg_export_snapshot); each commits its own
findings and blocks, and the watermark moves only after every rule has. A pass that
fails part-way leaves the watermark where it was: the next pass computes the same
findings again, and the unique keys keep them single. On SQLite a pass is one
transaction.
"""
from __future__ import annotations

import json
import queue
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

import structlog
from sqlalchemy import String, and_, bindparam, func, insert, or_, select, text
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.engine import Connection, Engine
from sqlalchemy.exc import SQLAlchemyError

from callctl.anomaly.base import RULES, Rule
from callctl.anomaly.config import PROFILES, AnomalyConfig
from callctl.anomaly.sql import Sql, finding_insert
from callctl.core.enums import FindingAction
from callctl.store import events
from callctl.store.blacklist import propose_from_findings
from callctl.store.blocks import place_finding_blocks
from callctl.store.models import AnomalyFinding, AnomalyState, Block, Cdr, Event, Tenant, UTCDateTime

log = structlog.get_logger("callctl.anomaly")
JOB = "anomaly"
EPOCH = datetime(1970, 1, 1, tzinfo=timezone.utc)


@dataclass
class PassResult:
    cdrs: int = 0  # CDRs read as new by this pass
    from_id: int = 0
    to_id: int = 0
    findings: dict[str, int] = field(default_factory=dict)  # rule -> new findings
    blocks: int = 0
    blacklist: list[int] = field(default_factory=list)  # entries proposed or given new evidence
    seconds: float = 0.0

    @property
    def new_findings(self) -> int:
        return sum(self.findings.values())


def run_pass(engine: Engine, config: AnomalyConfig, now: datetime | None = None) -> PassResult:
    started = time.monotonic()
    now = now or datetime.now(timezone.utc)
    sql = Sql(engine.dialect.name)
    result = PassResult()
    # One snapshot for the whole pass (SQLite has one anyway): what the pass counts below
    # is exactly what its rules read.
    options = {"isolation_level": "REPEATABLE READ"} if sql.dialect == "postgresql" else {}
    with engine.connect().execution_options(**options) as conn, conn.begin():
        _tune(conn)
        state = _lock_state(conn)
        lo = state.safe_id
        if state.seen_id > lo and _count(conn, lo, state.seen_id) == state.seen_count:
            lo = state.seen_id  # nothing committed late below the last pass's top: read above it
        hi = conn.scalar(select(func.coalesce(func.max(Cdr.id), 0)))
        result.from_id, result.to_id = lo, hi
        if hi > lo:
            _run_rules(engine, conn, sql, config, result, now)
        _advance(conn, config, state, hi, now)
    if config.blacklist.enabled and result.new_findings:
        # After the pass's commit: on PostgreSQL its rules wrote on other connections.
        proposals = config.blacklist
        result.blacklist = propose_from_findings(engine, rules=proposals.rules, min_tenants=proposals.min_tenants,
                                                 lookback_seconds=proposals.lookback_seconds, now=now)
    result.seconds = time.monotonic() - started
    log.info("anomaly pass", cdrs=result.cdrs, from_id=lo, to_id=hi, findings=result.new_findings,
             blocks=result.blocks, blacklist=result.blacklist, seconds=round(result.seconds, 3))
    return result


def _run_rules(engine: Engine, conn: Connection, sql: Sql, config: AnomalyConfig, result: PassResult,
               now: datetime) -> None:
    """Every rule over the CDRs from_id < id <= to_id of `result`; counts into `result`."""
    lo, hi = result.from_id, result.to_id
    count, first, last = conn.execute(
        select(func.count(), func.min(Cdr.started_at), func.max(Cdr.started_at))
        .where(Cdr.id > lo, Cdr.id <= hi)
    ).one()
    result.cdrs = count
    if not count:
        return
    above = (conn.scalar(select(func.coalesce(func.max(AnomalyFinding.id), 0))),
             conn.scalar(select(func.coalesce(func.max(Block.id), 0))))
    tenants = conn.execute(select(Tenant.id, Tenant.name, Tenant.time_zone, Tenant.calls_from,
                                  Tenant.calls_until)).all()

    def apply(rule_conn: Connection, name: str) -> tuple[int, int]:
        began = time.monotonic()
        found = _run_rule(rule_conn, sql, config, name, tenants, first, last, lo, hi, now)
        blocks = _place_blocks(rule_conn, config, name, tenants, now)
        if found or blocks:
            _record_events(rule_conn, name, *above, now)
        log.debug("anomaly rule", rule=name, findings=found, seconds=round(time.monotonic() - began, 3))
        return found, blocks

    if sql.dialect == "postgresql" and config.workers > 1:
        snapshot = conn.scalar(text("SELECT pg_export_snapshot()"))
        outcomes = _side_by_side(engine, snapshot, config.workers, apply)
    else:
        outcomes = {name: apply(conn, name) for name in RULES}
    for name in RULES:
        result.findings[name] = outcomes[name][0]
        result.blocks += outcomes[name][1]


def _advance(conn: Connection, config: AnomalyConfig, state, hi: int, now: datetime) -> None:
    """Move the watermark past what this pass read."""
    # Every id up to the checkpoint taken `overlap` ago has committed by now and was
    # read by this pass or an earlier one: it becomes the safe watermark.
    values = {"passes": state.passes + 1, "updated_at": now}
    safe = state.safe_id
    if state.checked_at is None or state.checked_at <= now - timedelta(seconds=config.overlap_seconds):
        safe = max(state.checked_id, state.safe_id)
        values.update(safe_id=safe, checked_id=max(hi, safe), checked_at=now)
    values.update(seen_id=max(hi, safe), seen_count=_count(conn, safe, max(hi, safe)))
    conn.execute(AnomalyState.__table__.update().where(AnomalyState.job == JOB).values(**values))


def _tune(conn: Connection) -> None:
    if conn.dialect.name == "postgresql":
        conn.exec_driver_sql("SET LOCAL work_mem = '256MB'")  # the rules' sorts and aggregates
        conn.exec_driver_sql("SET LOCAL jit = off")  # compiling cost more than it saved here


def _side_by_side(engine: Engine, snapshot: str, workers: int, apply) -> dict[str, tuple[int, int]]:
    """Every rule, on `workers` PostgreSQL connections at once (a rule is one statement,
    which PostgreSQL runs on one core). Each connection reads the pass's snapshot, takes
    the next rule until none is left, then commits; the first failure stops the rest and
    is raised."""
    pending: queue.SimpleQueue[str] = queue.SimpleQueue()
    for name in RULES:
        pending.put(name)
    outcomes: dict[str, tuple[int, int]] = {}
    failed = threading.Event()

    def work() -> None:
        try:
            with engine.connect().execution_options(isolation_level="REPEATABLE READ") as conn, conn.begin():
                conn.exec_driver_sql("SET TRANSACTION SNAPSHOT %s", (snapshot,))  # first, as it must be
                _tune(conn)
                while not failed.is_set():
                    try:
                        name = pending.get_nowait()
                    except queue.Empty:
                        return
                    outcomes[name] = apply(conn, name)
        except BaseException:
            failed.set()
            raise

    with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="callctl-anomaly") as pool:
        running = [pool.submit(work) for _ in range(min(workers, len(RULES)))]
    for done in running:
        done.result()
    return outcomes


def _count(conn: Connection, above: int, upto: int) -> int:
    return conn.scalar(select(func.count()).select_from(Cdr).where(Cdr.id > above, Cdr.id <= upto))


def _lock_state(conn: Connection):
    insert = {"postgresql": postgresql.insert, "sqlite": sqlite.insert}[conn.dialect.name]
    conn.execute(insert(AnomalyState.__table__).values(job=JOB).on_conflict_do_nothing(index_elements=["job"]))
    # One pass at a time: a second job waits here (SQLite writers queue at BEGIN already).
    return conn.execute(
        select(AnomalyState).where(AnomalyState.job == JOB).with_for_update()
    ).one()


def _ms(moment: datetime) -> int:
    return int((moment - EPOCH) / timedelta(milliseconds=1))


def _run_rule(conn, sql: Sql, config: AnomalyConfig, name: str, tenants, first: datetime,
              last: datetime, lo: int, hi: int, now: datetime) -> int:
    """Run one rule; one statement per group of tenants with the same settings (and zone)."""
    local_time = RULES[name].local_time
    groups: dict[tuple, tuple[Rule, list[int]]] = {}
    for tenant_id, tenant_name, zone, calls_from, calls_until in tenants:
        rule = config.rule(name, tenant_name).for_tenant(calls_from, calls_until)
        if rule.enabled:
            key = (rule.model_dump_json(), zone if local_time else None)
            groups.setdefault(key, (rule, []))[1].append(tenant_id)
    defaults = config.rule(name)  # the settings read once for every tenant (Rule.tenant_wide)
    # An empty list matches nothing: `x IN (NULL)` is never true.
    shared = {key: list(getattr(defaults, key)) or [None] for key in RULES[name].tenant_wide}
    runs = [(rule, tenant_ids, zone, None) for (_, zone), (rule, tenant_ids) in groups.items()]
    if RULES[name].subject_kind == "binding":  # protected customers: the tightened rule, on their bindings only
        names = {t[0]: t[1] for t in tenants}
        for profile in config.profiles:
            for rule, tenant_ids, zone, _ in list(runs):
                for tenant_id in tenant_ids:
                    tight = config.profile_rule(name, names[tenant_id], profile)
                    if tight is not None and tight.enabled:
                        runs.append((tight, [tenant_id], zone, profile))
    found = 0
    for rule, tenant_ids, zone, profile in runs:
        # The periods the new CDRs fall in plus one window either side, aligned to the
        # window: fixed periods are then whole, sliding windows see their history.
        w = rule.window * 1000
        scan_from = EPOCH + timedelta(milliseconds=((_ms(first) - w) // w) * w)
        scan_to = EPOCH + timedelta(milliseconds=((_ms(last) + w) // w + 1) * w)
        moments = ("scan_from", "scan_to") + (("new_from", "new_to") if lo > 0 and sql.dialect == "postgresql" else ())
        statement = text(finding_insert(rule, tenant_ids, sql, incremental=lo > 0, profile=profile)).bindparams(
            *(bindparam(key, type_=UTCDateTime) for key in moments),
            *(bindparam(key, expanding=True, type_=String if isinstance(listed[0], str) else None)
              for key, listed in shared.items()),
        )
        values = {
            "rule": name, "kind": rule.subject_kind, "lo": lo, "hi": hi, "evidence_limit": config.evidence_limit,
            "threshold": rule.threshold, "severity": rule.severity, "action": rule.action, **shared,
        }
        if lo > 0 and sql.dialect == "postgresql":
            values.update(new_from=first, new_to=last)
        # A rule on local time: one statement per stretch of one UTC offset; the others, one in all.
        segments = offset_segments(zone, scan_from, scan_to) if local_time else [(scan_from, scan_to, 0)]
        for start, end, offset_ms in segments:
            values.update(scan_from=start, scan_to=end, utc_offset_ms=offset_ms)
            found += conn.execute(statement, values).rowcount
    return found


def offset_segments(zone: str, start: datetime, end: datetime) -> list[tuple[datetime, datetime, int]]:
    """[start, end) cut where the zone's UTC offset changes, each piece with its offset (ms)."""
    try:
        tz = ZoneInfo(zone)
    except (ZoneInfoNotFoundError, ValueError):
        log.warning("unknown tenant time zone, using UTC", zone=zone)
        tz = timezone.utc
    offset = lambda moment: moment.astimezone(tz).utcoffset()
    cuts, day = [], start
    while day < end:
        following = min(day + timedelta(days=1), end)
        if offset(following) != offset(day):  # a change within the day: find its instant
            before, after = day, following
            while after - before > timedelta(microseconds=1):
                middle = before + (after - before) / 2
                before, after = (middle, after) if offset(middle) == offset(before) else (before, middle)
            cuts.append(after)
        day = following
    bounds = [start, *cuts, end]
    return [(a, b, int(offset(a) / timedelta(milliseconds=1))) for a, b in zip(bounds, bounds[1:])]


def _place_blocks(conn, config: AnomalyConfig, name: str, tenants, now: datetime) -> int:
    """One block per blocking finding of this rule (callctl.store.blocks)."""
    kind = RULES[name].subject_kind
    groups: dict[tuple[str, int], list[int]] = {}
    for tenant_id, tenant_name, *_ in tenants:
        rules = [config.rule(name, tenant_name)]
        if kind == "binding":  # a profile may make a per-customer rule block
            rules += [config.profile_rule(name, tenant_name, p) for p in config.profiles]
        for rule in rules:
            if rule is not None and rule.enabled and rule.action == FindingAction.BLOCK:
                tenant_ids = groups.setdefault((rule.block.direction, rule.block.seconds), [])
                if tenant_id not in tenant_ids:
                    tenant_ids.append(tenant_id)
    # A protected customer's block lasts longer (the profile's block_factor, 2 unless set).
    factors = {p: config.profiles[p].block_factor if p in config.profiles else 2.0 for p in PROFILES}
    return sum(place_finding_blocks(conn, name, kind, direction, tenant_ids, now, timedelta(seconds=seconds),
                                    factors)
               for (direction, seconds), tenant_ids in groups.items())


def follow(engine: Engine, config: AnomalyConfig, stop: threading.Event, interval: float | None = None,
           on_pass=None, reload=None) -> int:
    """Passes until `stop` is set (SIGTERM); a pass under way finishes first. Before each
    pass `reload(config)` gives the rules to use (SIGHUP: read again). Returns passes."""
    passes = 0
    while not stop.is_set():
        if reload is not None:
            config = reload(config)
        try:
            result = run_pass(engine, config)
        except SQLAlchemyError as exc:  # database down, or another job's pass won the race
            log.error("anomaly pass failed; retrying after the interval", error=type(exc).__name__,
                      detail=str(getattr(exc, "orig", exc)).splitlines()[0][:200])
        else:
            passes += 1
            if on_pass:
                on_pass(result)
        stop.wait(interval if interval is not None else config.interval_seconds)
    return passes


def _record_events(conn: Connection, name: str, finding_above: int, block_above: int, now: datetime) -> None:
    """Events for the tenants' webhooks (the outbox), in the rule's transaction: the
    findings this pass raised and the automatic blocks it placed. No caller hashes."""
    f = AnomalyFinding
    rows = []
    for finding in conn.execute(select(f).where(f.rule == name, f.id > finding_above)):
        body = {"id": finding.id, "rule": finding.rule, "subject_kind": finding.subject_kind,
                "binding_id": finding.binding_id, "window_start": finding.window_start,
                "window_end": finding.window_end, "calls": finding.calls, "severity": finding.severity,
                "action": finding.action}
        rows.append({"tenant_id": finding.tenant_id, "kind": str(events.Kind.FINDING_RAISED), "body": body})
    for block in conn.execute(select(Block).where(Block.created_by == f"anomaly:{name}", Block.id > block_above)):
        body = {"id": block.id, "scope": block.scope, "direction": block.direction, "binding_id": block.binding_id,
                "starts_at": block.starts_at, "ends_at": block.ends_at, "finding_id": block.finding_id}
        rows.append({"tenant_id": block.tenant_id, "kind": str(events.Kind.BLOCK_PLACED), "body": body})
    if rows:
        conn.execute(insert(Event), [{**row, "occurred_at": now, "body": events.dumps(row["body"])} for row in rows])


def page_findings(engine: Engine, tenant_id: int, rule: str | None = None, since: datetime | None = None,
                  limit: int = 100, cursor: str | None = None) -> dict:
    """One tenant's findings, newest first, a page at a time (keyset on window end, id)."""
    from callctl.store.cdrs import decode_cursor, encode_cursor

    before = decode_cursor(cursor) if cursor else None
    rows = list_findings(engine, rule=rule, since=since, limit=limit + 1, tenant_id=tenant_id, before=before)
    last = rows[limit - 1] if len(rows) > limit else None
    following = encode_cursor(datetime.fromisoformat(last["window_end"]), last["id"]) if last else None
    return {"items": rows[:limit], "next": following}


def list_findings(engine: Engine, tenant: str | None = None, rule: str | None = None,
                  since: datetime | None = None, limit: int = 100, *, tenant_id: int | None = None,
                  before: tuple[datetime, int] | None = None) -> list[dict]:
    """Newest findings first, with the tenant's name and any block they caused."""
    query = (
        select(AnomalyFinding, Tenant.name.label("tenant"), Block.id.label("block_id"),
               Block.ends_at.label("block_ends_at"))
        .join(Tenant, Tenant.id == AnomalyFinding.tenant_id)
        .outerjoin(Block, Block.finding_id == AnomalyFinding.id)
        .order_by(AnomalyFinding.window_end.desc(), AnomalyFinding.id.desc())
        .limit(limit)
    )
    if tenant:
        query = query.where(Tenant.name == tenant)
    if tenant_id is not None:
        query = query.where(AnomalyFinding.tenant_id == tenant_id)
    if before is not None:
        end, row_id = before
        query = query.where(or_(AnomalyFinding.window_end < end,
                                and_(AnomalyFinding.window_end == end, AnomalyFinding.id < row_id)))
    if rule:
        query = query.where(AnomalyFinding.rule == rule)
    if since:
        query = query.where(AnomalyFinding.window_end >= since)
    rows = []
    with engine.connect() as conn:
        for row in conn.execute(query):
            finding = row._mapping
            rows.append({
                "id": finding["id"], "rule": finding["rule"], "tenant": finding["tenant"],
                "subject_kind": finding["subject_kind"], "subject": finding["subject"],
                "window_start": finding["window_start"].isoformat(),
                "window_end": finding["window_end"].isoformat(),
                "calls": finding["calls"], "measure": finding["measure"], "threshold": finding["threshold"],
                "severity": finding["severity"], "action": finding["action"],
                "block_id": finding["block_id"],
                "block_ends_at": finding["block_ends_at"].isoformat() if finding["block_ends_at"] else None,
                "evidence": sorted(json.loads(finding["evidence"])),
            })
    return rows
