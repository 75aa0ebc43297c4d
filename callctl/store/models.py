"""The one data model (SQLAlchemy 2). sql/<dialect>/*.sql creates the same schema;
tests/test_schema.py proves the two agree on PostgreSQL and SQLite."""
from __future__ import annotations

from datetime import datetime, timezone

from sqlalchemy import (
    BigInteger,
    Boolean,
    CheckConstraint,
    FetchedValue,
    DateTime,
    Double,
    ForeignKey,
    Index,
    Integer,
    String,
    Text,
    UniqueConstraint,
    text,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, validates
from sqlalchemy.sql import operators
from sqlalchemy.types import TypeDecorator

from callctl.core.decision import Mode
from callctl.core.enums import (BindingStatus, BlockDirection, BlockScope, FindingAction, GrantStatus, NumberState,
                                RevealParty, RevealScenario, SubjectKind)
from callctl.store import crypto

# SQLite has no BIGINT rowid alias; INTEGER keeps AUTOINCREMENT-free rowid ids there.
Id = BigInteger().with_variant(Integer(), "sqlite")


def one_of(column: str, values) -> str:
    """A CHECK constraint's text from an enum: "scope IN ('binding','caller',...)" (the
    migrations spell the same text; tests/test_schema.py compares them)."""
    return f"{column} IN ({','.join(repr(str(v)) for v in values)})"


class UTCDateTime(TypeDecorator):
    """Aware UTC datetimes in, aware UTC datetimes out, on every database."""

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value, dialect):
        if value is None:
            return None
        if value.tzinfo is None:
            raise ValueError("naive datetime given to the database; use UTC-aware times")
        value = value.astimezone(timezone.utc)
        return value.replace(tzinfo=None) if dialect.name == "sqlite" else value

    def process_result_value(self, value, dialect):
        if value is None:
            return None
        if value.tzinfo is None:
            return value.replace(tzinfo=timezone.utc)
        return value.astimezone(timezone.utc)


class EncryptedNumber(TypeDecorator):
    """A person's real number: plain E.164 in Python, an AES-GCM ciphertext naming its
    key in the database (callctl.store.crypto). Ciphertexts are randomised, so SQL can
    only ask IS NULL of them: compare the `*_hash` column with number_hash() instead."""

    impl = String(120)
    cache_ok = True

    class comparator_factory(TypeDecorator.Comparator):
        def operate(self, op, *other, **kwargs):
            if op not in (operators.is_, operators.is_not):
                raise TypeError(
                    f"{self.expr}: encrypted numbers cannot be compared in SQL; "
                    "compare its _hash column with callctl.store.crypto.number_hash()"
                )
            return super().operate(op, *other, **kwargs)

    def process_bind_param(self, value, dialect):
        return None if value is None else crypto.ring().seal(value)

    def process_result_value(self, value, dialect):
        return None if value is None else crypto.ring().open(value)


def number_hash_of(column: str):
    """Column default: the lookup hash of the row's `column`, for Core and ORM inserts
    alike (ORM updates go through the @validates hooks below)."""

    def default(context):
        value = context.get_current_parameters().get(column)
        return None if value is None else crypto.number_hash(value)

    return default


# FEED_TXID: on PostgreSQL the id of the transaction that wrote the row (a column default,
# sql/postgresql/0101_*), which orders the regulator's feed (callctl/feed.py); NULL on SQLite.


def utcnow() -> datetime:
    return datetime.now(timezone.utc)


class Base(DeclarativeBase):
    pass


class Tenant(Base):
    __tablename__ = "tenants"
    __table_args__ = (UniqueConstraint("name", name="uq_tenants_name"),)
    id: Mapped[int] = mapped_column(Id, primary_key=True)
    name: Mapped[str] = mapped_column(String(100))
    hotline: Mapped[str] = mapped_column(String(20))
    strict: Mapped[bool] = mapped_column(Boolean, server_default=text("true"))
    ring_timeout: Mapped[int] = mapped_column(Integer, server_default=text("30"))
    max_call_seconds: Mapped[int] = mapped_column(Integer, server_default=text("3600"))
    time_zone: Mapped[str] = mapped_column(String(64), server_default=text("'Asia/Shanghai'"))
    # Calling hours "HH:MM" in time_zone, for calls to customers (0040).
    calls_from: Mapped[str] = mapped_column(String(5), server_default=text("'08:00'"))
    calls_until: Mapped[str] = mapped_column(String(5), server_default=text("'21:00'"))
    # Calls up at once on one PBX; None: no limit (0110). Counted by the PBX (GROUP_COUNT).
    max_concurrent_calls: Mapped[int | None] = mapped_column(Integer)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, server_default=text("CURRENT_TIMESTAMP"))


class TenantCaller(Base):
    """A number (or prefix) the tenant's agents call from."""

    __tablename__ = "tenant_callers"
    __table_args__ = (UniqueConstraint("tenant_id", "pattern", name="uq_tenant_callers_pattern"),)
    id: Mapped[int] = mapped_column(Id, primary_key=True)
    tenant_id: Mapped[int] = mapped_column(ForeignKey("tenants.id"))
    pattern: Mapped[str] = mapped_column(String(20))
    is_prefix: Mapped[bool] = mapped_column(Boolean, server_default=text("false"))
    # Why agents on this number or prefix call: their caller group's purpose (0090).
    purpose: Mapped[str] = mapped_column(String(16), server_default=text("'service'"))


class VirtualNumber(Base):
    __tablename__ = "virtual_numbers"
    __table_args__ = (
        CheckConstraint(one_of("state", NumberState), name="ck_vn_state"),
        CheckConstraint(one_of("mode", Mode), name="ck_vn_mode"),
        Index("ix_vn_pool", "tenant_id", "state", "id"),
        # The X serving shared modes, where an AXB or AXE binding looks first (0140, 0141).
        Index("ix_vn_shared", "tenant_id", "mode", "id",
              postgresql_where=text("state = 'bound' AND (mode = 'AXB' OR mode = 'AXE')"),
              sqlite_where=text("state = 'bound' AND (mode = 'AXB' OR mode = 'AXE')")),
        UniqueConstraint("e164", name="uq_vn_e164"),
    )
    id: Mapped[int] = mapped_column(Id, primary_key=True)
    e164: Mapped[str] = mapped_column(String(20))
    tenant_id: Mapped[int] = mapped_column(ForeignKey("tenants.id"))
    state: Mapped[str] = mapped_column(String(12), server_default=text("'free'"))
    quarantined_until: Mapped[datetime | None] = mapped_column(UTCDateTime)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, server_default=text("CURRENT_TIMESTAMP"))
    mode: Mapped[str | None] = mapped_column(String(3))  # the mode it serves while bound


class Binding(Base):
    __tablename__ = "bindings"
    __table_args__ = (
        CheckConstraint(one_of("mode", Mode), name="ck_binding_mode"),
        CheckConstraint(one_of("status", BindingStatus), name="ck_binding_status"),
        # AXN: X serves one customer at a time.
        Index(
            "ux_binding_axn_number",
            "number_id",
            unique=True,
            postgresql_where=text("status = 'active' AND mode = 'AXN'"),
            sqlite_where=text("status = 'active' AND mode = 'AXN'"),
        ),
        # AXE: an extension serves one customer on its X at a time.
        Index(
            "ux_binding_axe_extension",
            "number_id",
            "extension",
            unique=True,
            postgresql_where=text("status = 'active' AND mode = 'AXE'"),
            sqlite_where=text("status = 'active' AND mode = 'AXE'"),
        ),
        # X's active bindings; the longest AXE extension last (the prompt's width, 0070).
        Index("ix_binding_number_status", "number_id", "status", text("length(extension)")),
        Index("ix_binding_tenant_reference", "tenant_id", "reference"),
        # A party's bindings, and its bindings on one X (the call-time facts, 0070).
        Index("ix_binding_party_a_hash", "party_a_hash", "number_id", "status"),
        Index("ix_binding_party_b_hash", "party_b_hash", "number_id", "status"),
        # Housekeeping's lapsed bindings (0090).
        Index("ix_binding_expiry", "expires_at", postgresql_where=text("status = 'active'"),
              sqlite_where=text("status = 'active'")),
    )
    id: Mapped[int] = mapped_column(Id, primary_key=True)
    tenant_id: Mapped[int] = mapped_column(ForeignKey("tenants.id"))
    number_id: Mapped[int] = mapped_column(ForeignKey("virtual_numbers.id"))
    mode: Mapped[str] = mapped_column(String(3))
    party_a: Mapped[str] = mapped_column(EncryptedNumber)
    party_b: Mapped[str | None] = mapped_column(EncryptedNumber)
    extension: Mapped[str | None] = mapped_column(String(8))
    reference: Mapped[str | None] = mapped_column(String(100))
    status: Mapped[str] = mapped_column(String(8), server_default=text("'active'"))
    expires_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, server_default=text("CURRENT_TIMESTAMP"))
    ended_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    party_a_hash: Mapped[str | None] = mapped_column(String(64), default=number_hash_of("party_a"))
    party_b_hash: Mapped[str | None] = mapped_column(String(64), default=number_hash_of("party_b"))
    # status 'ended' by itself past expires_at: 'expired'; by unbind: 'unbound' (0090).
    end_reason: Mapped[str | None] = mapped_column(String(8))
    purposes: Mapped[str | None] = mapped_column(String(200))  # accepted, comma-separated; NULL: default
    profile: Mapped[str | None] = mapped_column(String(16))  # protection profile, e.g. elderly

    @validates("party_a", "party_b")
    def _keep_hash(self, key, value):
        setattr(self, f"{key}_hash", None if value is None else crypto.number_hash(value))
        return value


class Block(Base):
    __tablename__ = "blocks"
    __table_args__ = (
        CheckConstraint(one_of("scope", BlockScope), name="ck_block_scope"),
        CheckConstraint(one_of("direction", BlockDirection), name="ck_block_direction"),
        Index("ix_block_tenant", "tenant_id", "scope"),
        Index("ix_block_number", "number_id"),
        Index("ix_block_binding", "binding_id"),
        Index("ux_block_finding", "finding_id", unique=True),
        Index("ix_block_caller_hash", "caller_hash"),
        Index("ix_block_feed", "feed_txid", "id"),
    )
    id: Mapped[int] = mapped_column(Id, primary_key=True)
    tenant_id: Mapped[int] = mapped_column(ForeignKey("tenants.id"))
    scope: Mapped[str] = mapped_column(String(8))
    direction: Mapped[str] = mapped_column(String(14))
    binding_id: Mapped[int | None] = mapped_column(ForeignKey("bindings.id"))
    number_id: Mapped[int | None] = mapped_column(ForeignKey("virtual_numbers.id"))
    caller: Mapped[str | None] = mapped_column(EncryptedNumber)  # may be a customer's number
    reason: Mapped[str] = mapped_column(Text)
    created_by: Mapped[str] = mapped_column(String(100))
    starts_at: Mapped[datetime] = mapped_column(UTCDateTime)
    ends_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, server_default=text("CURRENT_TIMESTAMP"))
    lifted_by: Mapped[str | None] = mapped_column(String(100))  # lifting sets ends_at (0040)
    # Set on blocks the anomaly job made; unique, so re-runs never block twice.
    finding_id: Mapped[int | None] = mapped_column(ForeignKey("anomaly_findings.id"))
    caller_hash: Mapped[str | None] = mapped_column(String(64), default=number_hash_of("caller"))
    feed_txid: Mapped[int | None] = mapped_column(BigInteger, server_default=FetchedValue())  # FEED_TXID

    @validates("caller")
    def _keep_hash(self, key, value):
        self.caller_hash = None if value is None else crypto.number_hash(value)
        return value


class Cdr(Base):
    """One row per call attempt. Numbers of people are stored masked only. On PostgreSQL
    partitioned by day on started_at (primary key (id, started_at) there; see
    sql/postgresql/0060_* and callctl.store.partitions)."""

    __tablename__ = "cdrs"
    __table_args__ = (
        # unique per call; started_at is in the key because PostgreSQL partitions by it
        UniqueConstraint("call_id", "started_at", name="uq_cdrs_call"),
        Index("ix_cdr_started", "started_at"),
        # The anomaly job's orders (migration 0069): per caller, per tenant, per binding.
        Index("ix_cdr_tenant_caller", "tenant_id", "caller_hash", "started_at", "id",
              postgresql_include=["direction", "binding_id"]),
        Index("ix_cdr_tenant_started", "tenant_id", "started_at", "id", postgresql_include=["direction"]),
        Index("ix_cdr_binding_started", "binding_id", "started_at", "id",
              postgresql_include=["tenant_id", "direction", "dial_status", "hangup_cause", "ended_at",
                                  "answered_at", "talk_seconds"]),
        Index("ix_cdr_feed", "feed_txid", "id"),  # the regulator's feed (0101, 0102)
    )
    id: Mapped[int] = mapped_column(Id, primary_key=True)
    call_id: Mapped[str] = mapped_column(String(150))
    tenant_id: Mapped[int | None] = mapped_column(BigInteger().with_variant(Integer(), "sqlite"))
    binding_id: Mapped[int | None] = mapped_column(BigInteger().with_variant(Integer(), "sqlite"))
    virtual_number: Mapped[str | None] = mapped_column(String(20))
    direction: Mapped[str | None] = mapped_column(String(14))
    caller_masked: Mapped[str | None] = mapped_column(String(24))
    callee_masked: Mapped[str | None] = mapped_column(String(24))
    decision: Mapped[str] = mapped_column(String(8))
    reject_reason: Mapped[str | None] = mapped_column(String(20))
    started_at: Mapped[datetime] = mapped_column(UTCDateTime)
    answered_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    ended_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    ring_seconds: Mapped[float | None] = mapped_column(Double)
    talk_seconds: Mapped[float | None] = mapped_column(Double)
    dial_status: Mapped[str | None] = mapped_column(String(20))
    hangup_cause: Mapped[int | None] = mapped_column(Integer)
    node: Mapped[str | None] = mapped_column(String(64))
    # Keyed non-reversible hash of the caller's number: "per caller" anomaly rules group on it.
    caller_hash: Mapped[str | None] = mapped_column(String(64))
    purpose: Mapped[str | None] = mapped_column(String(16))  # to_customer calls: why (0120)
    hangup_by: Mapped[str | None] = mapped_column(String(8))  # caller | callee | pbx (0130)
    feed_txid: Mapped[int | None] = mapped_column(BigInteger, server_default=FetchedValue())  # FEED_TXID


class AnomalyFinding(Base):
    """What the anomaly job found: one per rule, subject and period (the unique key)."""

    __tablename__ = "anomaly_findings"
    __table_args__ = (
        UniqueConstraint("rule", "tenant_id", "subject", "period", name="uq_finding_key"),
        CheckConstraint(one_of("subject_kind", SubjectKind), name="ck_finding_subject_kind"),
        CheckConstraint(one_of("action", FindingAction), name="ck_finding_action"),
        Index("ix_finding_window_end", "window_end"),
        Index("ix_finding_feed", "feed_txid", "id"),
    )
    id: Mapped[int] = mapped_column(Id, primary_key=True)
    rule: Mapped[str] = mapped_column(String(32))
    tenant_id: Mapped[int] = mapped_column(ForeignKey("tenants.id"))
    subject_kind: Mapped[str] = mapped_column(String(8))  # caller | binding | tenant
    subject: Mapped[str] = mapped_column(String(64))  # caller hash, binding id or tenant id
    binding_id: Mapped[int | None] = mapped_column(BigInteger().with_variant(Integer(), "sqlite"))
    period: Mapped[int] = mapped_column(BigInteger)  # epoch second the rule's period starts
    window_start: Mapped[datetime] = mapped_column(UTCDateTime)
    window_end: Mapped[datetime] = mapped_column(UTCDateTime)
    calls: Mapped[int] = mapped_column(Integer)  # evidence CDRs in the window
    measure: Mapped[float] = mapped_column(Double)  # what was compared with the threshold
    threshold: Mapped[float] = mapped_column(Double)
    severity: Mapped[str] = mapped_column(String(8))
    action: Mapped[str] = mapped_column(String(8))  # alert | block
    evidence: Mapped[str] = mapped_column(Text)  # CDR ids, a JSON array
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, server_default=text("CURRENT_TIMESTAMP"))
    feed_txid: Mapped[int | None] = mapped_column(BigInteger, server_default=FetchedValue())  # FEED_TXID


class AnomalyState(Base):
    """The anomaly job's watermark over cdrs.id (see callctl/anomaly/job.py)."""

    __tablename__ = "anomaly_state"
    job: Mapped[str] = mapped_column(String(32), primary_key=True)
    safe_id: Mapped[int] = mapped_column(BigInteger, server_default=text("0"))
    checked_id: Mapped[int] = mapped_column(BigInteger, server_default=text("0"))
    checked_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    seen_id: Mapped[int] = mapped_column(BigInteger, server_default=text("0"))  # the last pass's top id
    seen_count: Mapped[int] = mapped_column(BigInteger, server_default=text("0"))  # its CDRs in (safe_id, seen_id]
    passes: Mapped[int] = mapped_column(BigInteger, server_default=text("0"))
    updated_at: Mapped[datetime | None] = mapped_column(UTCDateTime)


class ApiToken(Base):
    """A provisioning API token, kept as a SHA-256 only. role 'tenant' is bound to one
    tenant; other roles (regulator, admin, ...) may have none."""

    __tablename__ = "api_tokens"
    __table_args__ = (
        UniqueConstraint("token_hash", name="uq_api_tokens_hash"),
        CheckConstraint("role <> 'tenant' OR tenant_id IS NOT NULL", name="ck_api_token_tenant"),
        Index("ix_api_tokens_tenant", "tenant_id"),
    )
    id: Mapped[int] = mapped_column(Id, primary_key=True)
    token_hash: Mapped[str] = mapped_column(String(64))
    role: Mapped[str] = mapped_column(String(16))
    tenant_id: Mapped[int | None] = mapped_column(ForeignKey("tenants.id"))
    name: Mapped[str] = mapped_column(String(100))
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, server_default=text("CURRENT_TIMESTAMP"))
    revoked_at: Mapped[datetime | None] = mapped_column(UTCDateTime)


class RevealGrant(Base):
    """Permission for one named person to see one party's real number of one binding,
    for a claim, complaint or AML case: approved by a second person, time-limited,
    limited in uses (callctl/store/reveal.py)."""

    __tablename__ = "reveal_grants"
    __table_args__ = (
        CheckConstraint(one_of("party", RevealParty), name="ck_grant_party"),
        CheckConstraint(one_of("scenario", RevealScenario), name="ck_grant_scenario"),
        CheckConstraint(one_of("status", GrantStatus), name="ck_grant_status"),
        CheckConstraint("decided_by IS NULL OR decided_by <> requested_by", name="ck_grant_second_person"),
        Index("ix_grant_binding", "binding_id"),
    )
    id: Mapped[int] = mapped_column(Id, primary_key=True)
    binding_id: Mapped[int] = mapped_column(ForeignKey("bindings.id"))
    party: Mapped[str] = mapped_column(String(1))
    scenario: Mapped[str] = mapped_column(String(10))
    case_reference: Mapped[str] = mapped_column(String(100))
    requested_by: Mapped[str] = mapped_column(String(100))
    requested_at: Mapped[datetime] = mapped_column(UTCDateTime)
    max_uses: Mapped[int] = mapped_column(Integer)
    ttl_seconds: Mapped[int] = mapped_column(Integer)
    status: Mapped[str] = mapped_column(String(10), server_default=text("'requested'"))
    decided_by: Mapped[str | None] = mapped_column(String(100))
    decided_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    expires_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    uses: Mapped[int] = mapped_column(Integer, server_default=text("0"))


class AuditEntry(Base):
    """The append-only, hash-chained audit log. `hash` covers `prev_hash` and the row's
    canonical content (callctl.store.reveal.entry_hash); never a real number."""

    __tablename__ = "audit_log"
    id: Mapped[int] = mapped_column(Id, primary_key=True, autoincrement=False)
    at: Mapped[datetime] = mapped_column(UTCDateTime)
    actor: Mapped[str] = mapped_column(String(100))
    action: Mapped[str] = mapped_column(String(30))
    grant_id: Mapped[int | None] = mapped_column(Id)
    detail: Mapped[str] = mapped_column(Text)
    prev_hash: Mapped[str] = mapped_column(String(64))
    hash: Mapped[str] = mapped_column(String(64))


class KeyCheck(Base):
    """The check value of one key ring secret ("key:<id>", "lookup", "audit"): compared
    at startup, so a wrong secret fails closed (callctl/store/keycheck.py)."""

    __tablename__ = "key_checks"
    name: Mapped[str] = mapped_column(String(40), primary_key=True)
    check_value: Mapped[str] = mapped_column(String(64))
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, server_default=text("CURRENT_TIMESTAMP"))
class CustomerPreference(Base):
    """The customer's own word about one tenant's calls, keyed by the lookup hash of the
    customer's number (0090). It outranks the tenant: "my contact, my decision"."""

    __tablename__ = "customer_preferences"
    __table_args__ = (
        CheckConstraint("calls IN ('allowed','none','service_only')", name="ck_pref_calls"),
        CheckConstraint("channel IN ('phone','app','sms','none')", name="ck_pref_channel"),
        Index("ux_pref_customer", "customer_hash", "tenant_id", unique=True),
    )
    id: Mapped[int] = mapped_column(Id, primary_key=True)
    tenant_id: Mapped[int] = mapped_column(ForeignKey("tenants.id"))
    customer_hash: Mapped[str] = mapped_column(String(64))
    calls: Mapped[str] = mapped_column(String(12), server_default=text("'allowed'"))
    quiet_from: Mapped[str | None] = mapped_column(String(5))  # the customer's own quiet hours
    quiet_until: Mapped[str | None] = mapped_column(String(5))
    channel: Mapped[str] = mapped_column(String(5), server_default=text("'phone'"))
    consent_source: Mapped[str | None] = mapped_column(String(100))
    consent_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    updated_by: Mapped[str] = mapped_column(String(100))
    updated_at: Mapped[datetime] = mapped_column(UTCDateTime)


class Event(Base):
    """The outbox: one row per event insurers (webhooks) and the regulator are told of,
    written in the transaction of what it reports; `body` is masked JSON (0090)."""

    __tablename__ = "events"
    __table_args__ = (Index("ix_events_tenant", "tenant_id", "id"), {"sqlite_autoincrement": True})
    id: Mapped[int] = mapped_column(Id, primary_key=True)
    tenant_id: Mapped[int] = mapped_column(Id)
    kind: Mapped[str] = mapped_column(String(24))
    occurred_at: Mapped[datetime] = mapped_column(UTCDateTime)
    body: Mapped[str] = mapped_column(Text)


class Webhook(Base):
    __tablename__ = "webhooks"
    __table_args__ = (Index("ix_webhooks_tenant", "tenant_id"),)
    id: Mapped[int] = mapped_column(Id, primary_key=True)
    tenant_id: Mapped[int] = mapped_column(ForeignKey("tenants.id"))
    url: Mapped[str] = mapped_column(String(500))
    secret: Mapped[str] = mapped_column(String(200))  # sealed with the key ring
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, server_default=text("CURRENT_TIMESTAMP"))
    removed_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    queued_upto: Mapped[int] = mapped_column(BigInteger, server_default=text("0"))


class WebhookDelivery(Base):
    __tablename__ = "webhook_deliveries"
    __table_args__ = (
        UniqueConstraint("webhook_id", "event_id", name="uq_delivery"),
        Index("ix_delivery_due", "next_attempt_at", postgresql_where=text("delivered_at IS NULL"),
              sqlite_where=text("delivered_at IS NULL")),
    )
    id: Mapped[int] = mapped_column(Id, primary_key=True)
    webhook_id: Mapped[int] = mapped_column(ForeignKey("webhooks.id"))
    event_id: Mapped[int] = mapped_column(ForeignKey("events.id"))
    attempts: Mapped[int] = mapped_column(Integer, server_default=text("0"))
    next_attempt_at: Mapped[datetime] = mapped_column(UTCDateTime)
    delivered_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    last_status: Mapped[int | None] = mapped_column(Integer)
    last_error: Mapped[str | None] = mapped_column(String(200))


class BlacklistEntry(Base):
    """A caller number barred across all tenants (callctl/store/blacklist.py): proposed
    by staff or by the anomaly job, in force once two people other than the proposer
    approved it, until its end or a lift. Never deleted."""

    __tablename__ = "blacklist"
    __table_args__ = (
        CheckConstraint("origin IN ('manual','automatic')", name="ck_blacklist_origin"),
        CheckConstraint("status IN ('proposed','active','refused','lifted')", name="ck_blacklist_status"),
        CheckConstraint(
            "(approved_by IS NULL OR approved_by <> proposed_by)"
            " AND (confirmed_by IS NULL OR (confirmed_by <> proposed_by AND confirmed_by <> approved_by))",
            name="ck_blacklist_two_people"),
        CheckConstraint("status <> 'active' OR (confirmed_by IS NOT NULL AND starts_at IS NOT NULL)",
                        name="ck_blacklist_active"),
        # One open entry per number.
        Index("ux_blacklist_open", "caller_hash", unique=True,
              postgresql_where=text("status IN ('proposed','active')"),
              sqlite_where=text("status IN ('proposed','active')")),
        Index("ix_blacklist_caller", "caller_hash", "status"),  # the call-time lookup (callctl.store.calls)
    )
    id: Mapped[int] = mapped_column(Id, primary_key=True)
    caller: Mapped[str | None] = mapped_column(EncryptedNumber)  # NULL: proposed from CDRs (hash only)
    caller_hash: Mapped[str] = mapped_column(String(64))
    caller_masked: Mapped[str] = mapped_column(String(24))
    origin: Mapped[str] = mapped_column(String(10))  # manual | automatic
    status: Mapped[str] = mapped_column(String(10), server_default=text("'proposed'"))
    reason: Mapped[str] = mapped_column(Text)
    proposed_by: Mapped[str] = mapped_column(String(100))
    proposed_at: Mapped[datetime] = mapped_column(UTCDateTime)
    seconds: Mapped[int | None] = mapped_column(Integer)  # how long it lasts once in force; NULL: until lifted
    approved_by: Mapped[str | None] = mapped_column(String(100))  # the first approval
    approved_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    confirmed_by: Mapped[str | None] = mapped_column(String(100))  # the second: in force from then
    starts_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    ends_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    closed_by: Mapped[str | None] = mapped_column(String(100))  # who refused or lifted it
    closed_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    close_note: Mapped[str | None] = mapped_column(Text)
    appeal: Mapped[str | None] = mapped_column(Text)
    appealed_by: Mapped[str | None] = mapped_column(String(100))
    appealed_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    appeal_outcome: Mapped[str | None] = mapped_column(String(10))  # upheld | lifted


class BlacklistEvidence(Base):
    """Why an entry exists, per tenant: one of its findings (with the CDR ids) or CDR
    ids staff named. A tenant sees its own rows only."""

    __tablename__ = "blacklist_evidence"
    __table_args__ = (
        UniqueConstraint("entry_id", "finding_id", name="uq_blacklist_evidence_finding"),
        Index("ix_blacklist_evidence_tenant", "tenant_id", "entry_id"),
        Index("ix_blacklist_evidence_finding", "finding_id"),
    )
    id: Mapped[int] = mapped_column(Id, primary_key=True)
    entry_id: Mapped[int] = mapped_column(ForeignKey("blacklist.id"))
    tenant_id: Mapped[int] = mapped_column(ForeignKey("tenants.id"))
    finding_id: Mapped[int | None] = mapped_column(ForeignKey("anomaly_findings.id"))
    cdr_ids: Mapped[str] = mapped_column(Text)  # a JSON array
    added_by: Mapped[str] = mapped_column(String(100))
    added_at: Mapped[datetime] = mapped_column(UTCDateTime)
