"""The outbox: events for insurers' webhooks (and the regulator's feed), one table in id
order, each written in the transaction of the thing it reports (docs/webhooks.md).

`body` is the event's masked data as JSON; the envelope (id, type, time, tenant) is
made when it is delivered (callctl.webhooks). Call events (a refused or an ended call)
are written with the call's CDR, and only for tenants with a webhook: a call to a
tenant without one pays for an index probe, nothing more.
"""
from __future__ import annotations

import json
from datetime import datetime
from enum import StrEnum

from sqlalchemy import String, bindparam, exists, insert, select
from sqlalchemy.engine import Connection
from sqlalchemy.orm import Session

from callctl.store.models import Event, UTCDateTime, Webhook


class Kind(StrEnum):
    CALL_REFUSED = "call.refused"
    CALL_ENDED = "call.ended"
    BINDING_EXPIRED = "binding.expired"
    PREFERENCE_CHANGED = "preference.changed"
    FINDING_RAISED = "finding.raised"
    BLOCK_PLACED = "block.placed"


def dumps(body: dict) -> str:
    return json.dumps(body, sort_keys=True, ensure_ascii=False, default=str)


def record(session: Session, tenant_id: int, kind: Kind, body: dict, now: datetime) -> None:
    """Add one event in the session's transaction."""
    session.add(Event(tenant_id=tenant_id, kind=str(kind), occurred_at=now, body=dumps(body)))


# The CDR fields an insurer is told of a call (all masked or its own).
_CALL_FIELDS = ("call_id", "binding_id", "virtual_number", "direction", "caller_masked", "callee_masked",
                "decision", "reject_reason", "started_at", "answered_at", "ended_at", "ring_seconds",
                "talk_seconds", "dial_status", "hangup_cause", "purpose")


def call_event(row: dict) -> tuple[str, str] | None:
    """(kind, body) of the event a CDR row makes; None for calls no tenant owns."""
    if row.get("tenant_id") is None or row.get("decision") not in ("bridged", "rejected"):
        return None
    kind = Kind.CALL_ENDED if row["decision"] == "bridged" else Kind.CALL_REFUSED
    body = {key: row.get(key) for key in _CALL_FIELDS}
    for key in ("started_at", "answered_at", "ended_at"):
        if body[key] is not None:
            body[key] = body[key].isoformat()
    return str(kind), dumps(body)


def _live_webhook(tenant_id):
    return exists().where(Webhook.tenant_id == tenant_id, Webhook.removed_at.is_(None))


# For SQLAlchemy connections (SQLite, spool replay): the event of a CDR just inserted.
_CALL_EVENT = insert(Event).from_select(
    ["tenant_id", "kind", "occurred_at", "body"],
    select(bindparam("tenant_id", type_=Event.tenant_id.type), bindparam("kind", type_=String),
           bindparam("now", type_=UTCDateTime()), bindparam("body", type_=String))
    .where(_live_webhook(bindparam("tenant_id", type_=Event.tenant_id.type))),
)


def write_call_event(conn: Connection, row: dict, now: datetime) -> None:
    made = call_event(row)
    if made is not None:
        conn.execute(_CALL_EVENT, {"tenant_id": row["tenant_id"], "kind": made[0], "body": made[1], "now": now})


# PostgreSQL (callctl.store.calls.cdr_with_event): the CDR insert and its event in one
# statement (one transaction), wrapped around the compiled CDR insert. $N..: kind, now, body.
PG_CALL_EVENT = (
    "WITH new AS ({insert} RETURNING tenant_id), "
    "ev AS (INSERT INTO events (tenant_id, kind, occurred_at, body) "
    "SELECT tenant_id, ${k}::text, ${n}::timestamptz, ${b}::text FROM new WHERE ${k}::text IS NOT NULL AND EXISTS "
    "(SELECT 1 FROM webhooks w WHERE w.tenant_id = new.tenant_id AND w.removed_at IS NULL)) "
    "SELECT count(*) FROM new"
)
# The same for many CDRs in one statement (pgcalls' group commit): the events' kinds,
# bodies, call ids and nodes as arrays, matched to the rows written by call and node.
# $N..: kinds, now, bodies, call ids, nodes. Answers the (call_id, node) of the rows written.
PG_CALL_EVENTS = (
    "WITH new AS ({insert} RETURNING call_id, node, tenant_id), "
    "ev AS (INSERT INTO events (tenant_id, kind, occurred_at, body) "
    "SELECT new.tenant_id, e.kind, ${n}::timestamptz, e.body FROM new "
    "JOIN unnest(${c}::text[], ${d}::text[], ${k}::text[], ${b}::text[]) AS e(call_id, node, kind, body) "
    "ON e.call_id = new.call_id AND e.node IS NOT DISTINCT FROM new.node "
    "WHERE e.kind IS NOT NULL AND EXISTS "
    "(SELECT 1 FROM webhooks w WHERE w.tenant_id = new.tenant_id AND w.removed_at IS NULL)) "
    "SELECT call_id, node FROM new"
)
