"""The regulator's live feed: every contact-behaviour event, in order, with a resumable
cursor (GET /regulator/events?after=CURSOR, `callctl regulator feed [--follow]`).

It reads only what is already written, so the call path pays nothing but a column
default: calls from the CDRs, blocks placed (and suspensions) from `blocks`, findings
from `anomaly_findings`, and from the hash-chained audit log every reveal step, every
blacklist change, every block lift (callctl.store.blocks.lift_block audits it) and every
customer preference change, opt-outs among them (callctl.store.customers audits them).

The cursor is one position per source. Each source is read in an order in which no row
can ever appear behind a position already handed out, also with concurrent writers:

- audit log: by id. Appends are serialised by a lock held until commit (PostgreSQL:
  an advisory lock; SQLite: the write lock), so ids are in commit order.
- CDRs, blocks, findings on PostgreSQL: by (feed_txid, id), feed_txid being the id of
  the transaction that wrote the row (a column default, migration 0101). Sequence ids
  alone are not in commit order: a transaction holding id 10 can commit after one
  holding id 11 has been read. A row is handed out only once its feed_txid is below
  the oldest transaction still running (pg_snapshot_xmin of the reading statement's
  snapshot): every transaction below that has ended, and every later row gets a
  higher feed_txid. So nothing commits behind the cursor; the price is that an event
  waits while an older transaction, anywhere on the cluster, is still open.
- the same tables on SQLite: by id (one writer at a time commits, so ids are in commit
  order).

A page takes up to `limit` rows of each source past its position, then merges them by
event time, always taking the next row of some source (never skipping one), so every
source advances by a prefix of its order: no event is lost or repeated across pages,
whoever writes meanwhile. Every event carries the cursor that resumes right after it.
No real number is ever read: CDRs hold masked numbers, the audit log masked ones.
"""
from __future__ import annotations

import json
import re
from datetime import datetime, timezone

from sqlalchemy import literal_column, select, tuple_
from sqlalchemy.engine import Connection, Engine

from callctl.core.numbers import mask
from callctl.store.models import AnomalyFinding, AuditEntry, Binding, Block, Cdr, RevealGrant, Tenant, VirtualNumber
from callctl.errors import ProvisionError

SOURCES = ("call", "block", "finding", "audit")
_TAGS = {"call": "c", "block": "b", "finding": "f", "audit": "a"}
MAX_LIMIT = 1000
# The audit entries that are contact-behaviour events (the others are skipped).
AUDIT_EVENTS = ("reveal_requested", "reveal_approved", "reveal_refused", "reveal_used", "reveal_denied",
                "blacklist_proposed", "blacklist_evidence_added", "blacklist_approved", "blacklist_in_force",
                "blacklist_refused", "blacklist_appealed", "blacklist_appeal_upheld", "blacklist_lifted",
                "block_lifted", "preference_set")
_CURSOR = re.compile(r"1-c(\d+)\.(\d+)-b(\d+)\.(\d+)-f(\d+)\.(\d+)-a(\d+)")


def encode(positions: dict[str, tuple[int, int]]) -> str:
    """Positions as an opaque string of digits, letters, dots and dashes (URL-safe)."""
    c, b, f, a = (positions[s] for s in SOURCES)
    return f"1-c{c[0]}.{c[1]}-b{b[0]}.{b[1]}-f{f[0]}.{f[1]}-a{a[1]}"


def decode(cursor: str | None) -> dict[str, tuple[int, int]]:
    if not cursor:
        return {source: (0, 0) for source in SOURCES}
    match = _CURSOR.fullmatch(cursor.strip())
    if match is None:
        raise ProvisionError("invalid_cursor", "not a cursor this feed handed out (pass `next` or an event's `cursor`)")
    n = [int(v) for v in match.groups()]
    return {"call": (n[0], n[1]), "block": (n[2], n[3]), "finding": (n[4], n[5]), "audit": (0, n[6])}


def _after(table, position: tuple[int, int], postgres: bool):
    """Rows of `table` past `position` that can be handed out now, in feed order."""
    if not postgres:
        return [table.c.id > position[1]], [table.c.id]
    txid, id_ = table.c.feed_txid, table.c.id
    horizon = literal_column("pg_snapshot_xmin(pg_current_snapshot())::text::bigint")
    # txid >= t on its own too: an index range start the planner always sees.
    return ([txid >= position[0], tuple_(txid, id_) > tuple_(position[0], position[1]), txid < horizon],
            [txid, id_])


def _iso(value) -> str | None:
    return value.isoformat() if isinstance(value, datetime) else value


def page(engine: Engine, after: str | None = None, limit: int = 100) -> dict:
    """Up to `limit` events after the cursor `after` (None: from the beginning).
    {"events": [...], "next": cursor, "more": bool}; `next` equals `after` when
    nothing is new (ask again later)."""
    if not 1 <= limit <= MAX_LIMIT:
        raise ProvisionError("invalid_limit", f"limit must be 1-{MAX_LIMIT}")
    positions = decode(after)
    postgres = engine.dialect.name == "postgresql"
    with engine.connect() as conn:
        names = dict(conn.execute(select(Tenant.id, Tenant.name)).all())
        pending = {
            "call": _calls(conn, positions["call"], limit, postgres, names),
            "block": _blocks(conn, positions["block"], limit, postgres, names),
            "finding": _findings(conn, positions["finding"], limit, postgres, names),
            "audit": _audit(conn, positions["audit"], limit, names),
        }
    events, heads = [], {source: 0 for source in SOURCES}
    while len(events) < limit:
        ready = [s for s in SOURCES if heads[s] < len(pending[s])]
        if not ready:
            break
        # The source whose next event is oldest (ties: SOURCES order): a k-way merge,
        # so each source advances by a prefix of its own order.
        source = min(ready, key=lambda s: (pending[s][heads[s]][1]["at"] or "", SOURCES.index(s)))
        position, event = pending[source][heads[source]]
        heads[source] += 1
        positions[source] = position
        events.append({**event, "cursor": encode(positions)})
    more = any(heads[s] < len(pending[s]) or len(pending[s]) == limit for s in SOURCES)
    return {"events": events, "next": encode(positions), "more": more}


def _calls(conn: Connection, position, limit: int, postgres: bool, names: dict) -> list:
    table = Cdr.__table__
    where, order = _after(table, position, postgres)
    rows = conn.execute(select(table).where(*where).order_by(*order).limit(limit)).mappings().all()
    return [((row["feed_txid"] or 0, row["id"]), {
        "type": "call", "at": _iso(row["ended_at"] or row["started_at"]), "tenant": names.get(row["tenant_id"]),
        "cdr_id": row["id"], "call_id": row["call_id"], "x": row["virtual_number"], "direction": row["direction"],
        "caller": row["caller_masked"], "callee": row["callee_masked"], "decision": row["decision"],
        "reason": row["reject_reason"], "purpose": row.get("purpose"), "binding_id": row["binding_id"],
        "started_at": _iso(row["started_at"]), "answered_at": _iso(row["answered_at"]),
        "ended_at": _iso(row["ended_at"]), "ring_seconds": row["ring_seconds"],
        "talk_seconds": row["talk_seconds"], "dial_status": row["dial_status"], "node": row["node"],
    }) for row in rows]


def _blocks(conn: Connection, position, limit: int, postgres: bool, names: dict) -> list:
    table = Block.__table__
    where, order = _after(table, position, postgres)
    rows = conn.execute(select(table, VirtualNumber.e164).outerjoin(VirtualNumber, VirtualNumber.id == table.c.number_id)
                        .where(*where).order_by(*order).limit(limit)).mappings().all()
    return [((row["feed_txid"] or 0, row["id"]), {
        "type": "suspension" if row["scope"] == "tenant" else "block", "at": _iso(row["created_at"]),
        "tenant": names.get(row["tenant_id"]), "block_id": row["id"], "scope": row["scope"],
        "direction": row["direction"], "origin": "automatic" if row["finding_id"] else "manual",
        "finding_id": row["finding_id"], "binding_id": row["binding_id"], "x": row["e164"],
        "caller": mask(row["caller"]) if row["caller"] else None, "reason": row["reason"], "by": row["created_by"],
        "starts_at": _iso(row["starts_at"]), "ends_at": _iso(row["ends_at"]),
    }) for row in rows]


def _findings(conn: Connection, position, limit: int, postgres: bool, names: dict) -> list:
    table = AnomalyFinding.__table__
    where, order = _after(table, position, postgres)
    rows = conn.execute(select(table).where(*where).order_by(*order).limit(limit)).mappings().all()
    return [((row["feed_txid"] or 0, row["id"]), {
        "type": "finding", "at": _iso(row["created_at"]), "tenant": names.get(row["tenant_id"]),
        "finding_id": row["id"], "rule": row["rule"], "subject_kind": row["subject_kind"],
        "subject": row["subject"], "window_start": _iso(row["window_start"]), "window_end": _iso(row["window_end"]),
        "calls": row["calls"], "measure": row["measure"], "threshold": row["threshold"],
        "severity": row["severity"], "action": row["action"], "evidence": json.loads(row["evidence"]),
    }) for row in rows]


def _audit(conn: Connection, position, limit: int, names: dict) -> list:
    rows = conn.execute(
        select(AuditEntry.id, AuditEntry.at, AuditEntry.actor, AuditEntry.action, AuditEntry.grant_id,
               AuditEntry.detail, Binding.tenant_id)
        .outerjoin(RevealGrant, RevealGrant.id == AuditEntry.grant_id)
        .outerjoin(Binding, Binding.id == RevealGrant.binding_id)
        .where(AuditEntry.id > position[1], AuditEntry.action.in_(AUDIT_EVENTS))
        .order_by(AuditEntry.id).limit(limit)).all()
    out = []
    for row in rows:
        detail = json.loads(row.detail)
        detail.pop("shown", None)  # a reveal's masked number: the feed says who, why and when
        kind = row.action.split("_", 1)[0]
        event = {"type": {"reveal": "reveal", "blacklist": "blacklist"}.get(kind, row.action), "action": row.action,
                 "at": _iso(row.at), "by": row.actor, "audit_id": row.id, **detail}
        if kind == "reveal":
            event.update(grant_id=row.grant_id, tenant=names.get(row.tenant_id))
        elif row.action == "block_lifted":
            event["type"] = "suspension_lifted" if detail.get("scope") == "tenant" else "block_lifted"
        elif row.action == "preference_set":  # the customer's word (callctl.store.customers)
            event["type"] = "opt_out" if detail.get("calls") in ("none", "service_only") else "preference"
        out.append(((0, row.id), event))
    return out
