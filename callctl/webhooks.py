"""Webhooks: events from the outbox (callctl.store.events) to insurers' endpoints,
signed, retried with backoff, at least once, each with its idempotency id
(docs/webhooks.md).

The deliverer is its own process (`callctl webhook deliver --follow`), never the call
path: a dead or slow endpoint costs the deliverer time, not a call. Several deliverers
may run: each claims due deliveries the others do not hold (SKIP LOCKED, then a lease).
"""
from __future__ import annotations

import hashlib
import hmac
import ipaddress
import json
import secrets
import time
from dataclasses import dataclass
from datetime import datetime, timedelta
from urllib.parse import urlsplit

import httpx
import structlog
from sqlalchemy import and_, case, exists, func, literal, select, update
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.engine import Engine
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.orm import Session

from callctl.core.decision import Channel
from callctl.errors import NotFound, ProvisionError
from callctl.store import crypto
from callctl.store.models import Binding, CustomerPreference, Event, Tenant, Webhook, WebhookDelivery, utcnow
from callctl.store.tenants import tenant_row

log = structlog.get_logger("callctl.webhooks")

SIGNATURE_HEADER = "Callctl-Signature"  # "v1=" + hex HMAC-SHA256(secret, timestamp + "." + body)
TIMESTAMP_HEADER = "Callctl-Timestamp"  # unix seconds of this attempt
EVENT_ID_HEADER = "Callctl-Event-Id"  # the idempotency id: the same on every attempt
SETTLE = timedelta(seconds=60)  # events older than this are committed: the queue cursor may pass them
LEASE = timedelta(seconds=120)  # a claimed delivery is another deliverer's again after this


@dataclass(frozen=True)
class Retry:
    first: float = 5.0  # seconds before the first retry; doubling after each failure
    most: float = 3600.0  # ... up to this
    timeout: float = 5.0  # seconds an endpoint has to answer

    def after(self, attempts: int) -> timedelta:
        return timedelta(seconds=min(self.first * 2 ** max(attempts - 1, 0), self.most))


def sign(secret: str, timestamp: str, body: bytes) -> str:
    return "v1=" + hmac.new(secret.encode(), timestamp.encode() + b"." + body, hashlib.sha256).hexdigest()


def verify(secret: str, timestamp: str, body: bytes, signature: str) -> bool:
    """What a receiver does (docs/webhooks.md has it in five lines for insurers)."""
    return hmac.compare_digest(sign(secret, timestamp, body), signature)


# --- administration -------------------------------------------------------------------

def _loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _url(url: str) -> str:
    """An endpoint's URL: https://, or http:// to a loopback host only (a receiver on this
    box, tests): events carry masked numbers and signatures, never in clear over a network."""
    try:
        parts = urlsplit(url or "")
        host = parts.hostname
    except ValueError:  # e.g. an unclosed [ in the host
        parts, host = None, None
    if parts is None or parts.scheme not in ("https", "http") or not host or len(url) > 500:
        raise ProvisionError("invalid_url", "the endpoint must be an https:// URL, at most 500 characters")
    if parts.scheme == "http" and not _loopback(host):
        raise ProvisionError("invalid_url", "the endpoint must be https:// (http:// only to a loopback host, "
                                            "e.g. http://127.0.0.1:8000/hook)")
    return url


def add_webhook(engine: Engine, tenant_name: str, url: str, secret: str | None = None) -> dict:
    """A new endpoint for the tenant's events from now on; its secret is shown once."""
    url = _url(url)
    secret = secret or secrets.token_urlsafe(32)
    if not 16 <= len(secret) <= 100:
        raise ProvisionError("invalid_secret", "the secret must be 16-100 characters")
    with Session(engine) as session, session.begin():
        tenant = tenant_row(session, tenant_name)
        last = session.scalar(select(func.max(Event.id))) or 0
        hook = Webhook(tenant_id=tenant.id, url=url, secret=crypto.ring().seal(secret), queued_upto=last)
        session.add(hook)
        session.flush()
        return {**_view(hook, tenant.name, {}), "secret": secret}


def _view(hook: Webhook, tenant: str, stats: dict) -> dict:
    return {"id": hook.id, "tenant": tenant, "url": hook.url,
            "created_at": hook.created_at.isoformat() if hook.created_at else None,
            "removed_at": hook.removed_at.isoformat() if hook.removed_at else None,
            "delivered": stats.get("delivered", 0), "pending": stats.get("pending", 0),
            "failing": stats.get("failing", 0), "last_status": stats.get("last_status"),
            "last_error": stats.get("last_error"), "oldest_pending": stats.get("oldest_pending")}


def list_webhooks(engine: Engine, tenant_name: str | None = None) -> list[dict]:
    """Endpoints with their delivery status (for support staff)."""
    with Session(engine) as session:
        query = select(Webhook, Tenant.name).join(Tenant, Tenant.id == Webhook.tenant_id).order_by(Webhook.id)
        if tenant_name:
            query = query.where(Webhook.tenant_id == tenant_row(session, tenant_name).id)
        views = []
        for hook, tenant in session.execute(query).all():
            d = WebhookDelivery
            pending = d.delivered_at.is_(None)
            row = session.execute(select(
                func.count(case((d.delivered_at.is_not(None), 1))),
                func.count(case((pending, 1))),
                func.count(case((and_(pending, d.attempts > 0), 1))),
                func.min(case((pending, d.event_id))),
            ).where(d.webhook_id == hook.id)).one()
            last = session.execute(select(d.last_status, d.last_error).where(
                d.webhook_id == hook.id, d.attempts > 0).order_by(d.id.desc()).limit(1)).first()
            stats = {"delivered": row[0], "pending": row[1], "failing": row[2], "oldest_pending": row[3],
                     "last_status": last[0] if last else None, "last_error": last[1] if last else None}
            views.append(_view(hook, tenant, stats))
        return views


def remove_webhook(engine: Engine, webhook_id: int, now: datetime | None = None) -> dict:
    """Stop delivering to it (its pending deliveries are dropped); kept on record."""
    with Session(engine) as session, session.begin():
        hook = session.get(Webhook, webhook_id, with_for_update=True)
        if hook is None or hook.removed_at is not None:
            raise NotFound("webhook_not_found", f"no webhook {webhook_id}")
        hook.removed_at = now or utcnow()
        session.flush()
        return _view(hook, session.get(Tenant, hook.tenant_id).name, {})


def ping_webhook(engine: Engine, webhook_id: int, retry: Retry = Retry()) -> dict:
    """Send one signed `webhook.test` event now (not from the outbox); its outcome."""
    with Session(engine) as session:
        hook = session.get(Webhook, webhook_id)
        if hook is None or hook.removed_at is not None:
            raise NotFound("webhook_not_found", f"no webhook {webhook_id}")
        tenant = session.get(Tenant, hook.tenant_id).name
        secret = crypto.ring().open(hook.secret)
    envelope = {"id": f"test-{secrets.token_hex(8)}", "type": "webhook.test", "tenant": tenant,
                "occurred_at": utcnow().isoformat(), "data": {}}
    with httpx.Client(timeout=retry.timeout) as client:
        status, error = _post(client, hook.url, secret, envelope)
    return {"id": webhook_id, "url": hook.url, "ok": error is None, "status": status, "error": error}


# --- delivery -----------------------------------------------------------------------------

def queue(session: Session, now: datetime) -> int:
    """Delivery rows for events not yet queued to each live webhook of their tenant."""
    made = 0
    for hook in session.scalars(select(Webhook).where(Webhook.removed_at.is_(None))).all():
        fresh = select(literal(hook.id), Event.id, literal(now)).where(
            Event.tenant_id == hook.tenant_id, Event.id > hook.queued_upto,
            ~exists().where(WebhookDelivery.webhook_id == hook.id, WebhookDelivery.event_id == Event.id))
        # Two deliverers may queue the same event at once (NOT EXISTS sees neither's
        # uncommitted row): the unique (webhook, event) keeps one, the other skips it.
        dialect_insert = postgresql.insert if session.bind.dialect.name == "postgresql" else sqlite.insert
        made += session.execute(dialect_insert(WebhookDelivery).from_select(
            ["webhook_id", "event_id", "next_attempt_at"], fresh).on_conflict_do_nothing()).rowcount
        # Past events old enough to be committed the cursor moves on (a late commit of a
        # lower id within SETTLE is still found by the NOT EXISTS above).
        settled = session.scalar(select(func.max(Event.id)).where(
            Event.tenant_id == hook.tenant_id, Event.id > hook.queued_upto, Event.occurred_at <= now - SETTLE))
        if settled:
            hook.queued_upto = settled
    return made


def _claim(session: Session, now: datetime, batch: int) -> list[WebhookDelivery]:
    due = session.scalars(
        select(WebhookDelivery).join(Webhook, Webhook.id == WebhookDelivery.webhook_id)
        .where(WebhookDelivery.delivered_at.is_(None), WebhookDelivery.next_attempt_at <= now,
               Webhook.removed_at.is_(None))
        .order_by(WebhookDelivery.event_id).limit(batch).with_for_update(skip_locked=True, of=WebhookDelivery)
    ).all()
    for delivery in due:
        delivery.next_attempt_at = now + LEASE
    return due


def _envelope(session: Session, event: Event, tenant: str) -> dict:
    data = json.loads(event.body)
    envelope = {"id": str(event.id), "type": event.kind, "tenant": tenant,
                "occurred_at": event.occurred_at.isoformat(), "data": data}
    if event.kind == "call.refused" and data.get("binding_id"):
        envelope["suggestion"] = _suggestion(session, data["binding_id"])
    return envelope


def _suggestion(session: Session, binding_id: int) -> dict:
    """Reach the customer on their preferred digital channel instead of calling again."""
    channel = session.scalar(select(CustomerPreference.channel).join(Binding, and_(
        Binding.party_a_hash == CustomerPreference.customer_hash, Binding.tenant_id == CustomerPreference.tenant_id))
        .where(Binding.id == binding_id))
    if channel == Channel.NONE:
        return {"channel": None, "note": "the customer asked not to be contacted"}
    digital = channel if channel in (Channel.APP, Channel.SMS) else Channel.APP.value
    return {"channel": digital, "note": "reach the customer on this channel instead of calling again"}


def _post(client: httpx.Client, url: str, secret: str, envelope: dict) -> tuple[int | None, str | None]:
    body = json.dumps(envelope, sort_keys=True, ensure_ascii=False).encode()
    stamp = str(int(time.time()))
    headers = {"Content-Type": "application/json", TIMESTAMP_HEADER: stamp, EVENT_ID_HEADER: envelope["id"],
               SIGNATURE_HEADER: sign(secret, stamp, body), "User-Agent": "callctl-webhooks"}
    try:
        response = client.post(url, content=body, headers=headers)
    except httpx.HTTPError as exc:
        return None, type(exc).__name__
    return response.status_code, None if 200 <= response.status_code < 300 else f"HTTP {response.status_code}"


def deliver_once(engine: Engine, client: httpx.Client, retry: Retry = Retry(), batch: int = 100,
                 now: datetime | None = None) -> dict:
    """Queue new events, then send what is due (one batch). An endpoint that fails is
    not tried again in this pass; its other due deliveries wait with it."""
    now = now or utcnow()
    with Session(engine) as session, session.begin():
        queued = queue(session, now)
    with Session(engine) as session, session.begin():
        claimed = [(d.id, d.webhook_id, d.event_id, d.attempts) for d in _claim(session, now, batch)]
    sent = failed = 0
    down: dict[int, timedelta] = {}
    hooks: dict[int, tuple[str, str, str]] = {}
    waiting: dict[int, list[int]] = {}
    for delivery_id, webhook_id, event_id, attempts in claimed:
        if webhook_id in down:  # its endpoint failed in this pass: wait with it
            waiting.setdefault(webhook_id, []).append(delivery_id)
            continue
        with Session(engine) as session, session.begin():
            delivery = session.get(WebhookDelivery, delivery_id)
            if webhook_id not in hooks:
                hook = session.get(Webhook, webhook_id)
                hooks[webhook_id] = (hook.url, crypto.ring().open(hook.secret),
                                     session.get(Tenant, hook.tenant_id).name)
            url, secret, tenant = hooks[webhook_id]
            envelope = _envelope(session, session.get(Event, event_id), tenant)
            status, error = _post(client, url, secret, envelope)
            delivery.attempts = attempts + 1
            delivery.last_status, delivery.last_error = status, error
            if error is None:
                delivery.delivered_at = utcnow()
                sent += 1
            else:
                down[webhook_id] = retry.after(delivery.attempts)
                delivery.next_attempt_at = utcnow() + down[webhook_id]
                failed += 1
                log.warning("webhook delivery failed", webhook=webhook_id, event_id=event_id, error=error,
                            attempts=delivery.attempts)
    if waiting:
        with Session(engine) as session, session.begin():
            for webhook_id, ids in waiting.items():
                session.execute(update(WebhookDelivery).where(WebhookDelivery.id.in_(ids))
                                .values(next_attempt_at=utcnow() + down[webhook_id]))
    return {"queued": queued, "sent": sent, "failed": failed}


def deliver(engine: Engine, retry: Retry = Retry(), follow: bool = False, interval: float = 1.0,
            stop=None, reload=None) -> dict:
    """One pass (or, following, passes until stopped); totals. Before each pass
    `reload(retry)` gives the settings to use (SIGHUP: read again)."""
    totals = {"queued": 0, "sent": 0, "failed": 0}
    with httpx.Client(timeout=retry.timeout) as client:
        while True:
            if reload is not None:
                retry = reload(retry)
                client.timeout = httpx.Timeout(retry.timeout)
            try:
                outcome = deliver_once(engine, client, retry)
            except SQLAlchemyError as exc:  # the database away: the outbox waits, so do we
                if not follow:
                    raise
                log.error("webhook delivery pass failed; retrying", error=type(exc).__name__)
                outcome = {"queued": 0, "sent": 0, "failed": 0}
            for key in totals:
                totals[key] += outcome[key]
            if not follow or (stop is not None and stop.is_set()):
                return totals
            # Nothing sent: nothing due, or its endpoint failing. Wait even when new events
            # were queued meanwhile: calls go on while an endpoint is down, and retrying
            # it pass after pass would spin on the box's CPU that calls need.
            if outcome["sent"] == 0:
                (stop.wait(interval) if stop is not None else time.sleep(interval))
