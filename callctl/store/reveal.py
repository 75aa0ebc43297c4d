"""Audited reveals: the only way to read a customer's real number.

A named person requests a grant (binding, party, scenario, case reference); a second,
different person approves or refuses it; an approved grant works for ttl_seconds from
approval and max_uses times, for the requester only. Every request, decision, reveal
and refused attempt is appended to the hash-chained audit log, which never holds the
real number. The CLI (and the API) are thin wrappers over these functions.
"""
from __future__ import annotations

import csv
import fcntl
import hashlib
import hmac
import io
import json
import os
from contextlib import contextmanager
from datetime import datetime, timedelta
from pathlib import Path

import structlog

from sqlalchemy import event, select, text
from sqlalchemy.orm import Session
from sqlalchemy.engine import Engine

from callctl.core.enums import RevealScenario
from callctl.core.numbers import mask
from callctl.errors import Forbidden, NotFound, ProvisionError
from callctl.store import crypto
from callctl.store.models import AuditEntry, Binding, RevealGrant, utcnow

SCENARIOS = tuple(RevealScenario)
GENESIS = "0" * 64
log = structlog.get_logger("callctl.audit")
_CHAIN_LOCK = 0x63616C6C  # pg_advisory_xact_lock key: one appender at a time ("call")


class RevealError(Forbidden):
    """A refused reveal step; the refusal is in the audit log already."""


class DecidedAlready(RevealError):
    """Approving or refusing a grant that was decided already."""

    status = 409


def _person(name: str, what: str) -> str:
    name = (name or "").strip()
    if not name or len(name) > 100:
        raise ProvisionError("invalid_person", f"{what} must name a person (1-100 characters)")
    return name


# --- the audit log ----------------------------------------------------------------------
#
# Each row's `hash` is an HMAC-SHA256 under the audit key (crypto.KeyRing.audit_key: from
# the key ring, never in the database) over the previous row's hash and the row's
# canonical content, so rows cannot be changed, removed, renumbered or added without the
# key. Rows written before the chain was keyed keep their plain SHA-256 and are sealed
# by a keyed `chain_keyed` row (`callctl db upgrade`). Removing rows at the end is caught
# by checkpoints: the head (id, hash) signed with the audit key, kept in a file outside
# the database (`audit_checkpoint`) and advanced by every append and every verify.

SEAL = "chain_keyed"


def _content(row: dict) -> str:
    return json.dumps(
        {"id": row["id"], "at": row["at"].isoformat(), "actor": row["actor"], "action": row["action"],
         "grant_id": row["grant_id"], "detail": row["detail"]},
        sort_keys=True, separators=(",", ":"), ensure_ascii=False,
    )


def entry_hash(prev_hash: str, row: dict) -> str:
    """Before the chain was keyed: SHA-256 over the previous hash and the row's canonical
    JSON (sorted keys). Anyone can compute it: kept to verify rows written then."""
    return hashlib.sha256((prev_hash + _content(row)).encode()).hexdigest()


def entry_mac(key: bytes, prev_hash: str, row: dict) -> str:
    """HMAC-SHA256 under the audit key over the previous hash and the row's canonical JSON."""
    return hmac.new(key, (prev_hash + _content(row)).encode(), hashlib.sha256).hexdigest()


def _row(entry: AuditEntry) -> dict:
    return {c: getattr(entry, c) for c in ("id", "at", "actor", "action", "grant_id", "detail")}


def append(session: Session, actor: str, action: str, grant_id: int | None, detail: dict,
           now: datetime | None = None) -> AuditEntry:
    """Append one entry in the caller's transaction. Appends are serialised (PostgreSQL:
    a transaction-scoped advisory lock; SQLite: the write lock taken at BEGIN), so two
    entries never share a predecessor and the chain never forks."""
    if session.get_bind().dialect.name == "postgresql":
        session.execute(text("SELECT pg_advisory_xact_lock(:k)"), {"k": _CHAIN_LOCK})
    last = session.execute(select(AuditEntry.id, AuditEntry.hash).order_by(AuditEntry.id.desc()).limit(1)).first()
    row = {"id": (last.id + 1) if last else 1, "at": (now or utcnow()).replace(microsecond=0),
           "actor": actor, "action": action, "grant_id": grant_id,
           "detail": json.dumps(detail, sort_keys=True, ensure_ascii=False)}
    prev = last.hash if last else GENESIS
    entry = AuditEntry(**row, prev_hash=prev, hash=entry_mac(crypto.ring().audit_key, prev, row))
    session.add(entry)
    session.flush()
    if not session.info.get("audit_listening"):  # whoever appends: the checkpoint follows the commit
        session.info["audit_listening"] = True
        event.listen(session, "after_commit", _committed)
        event.listen(session, "after_rollback", lambda s: s.info.pop("audit_head", None))
    session.info["audit_head"] = (entry.id, entry.hash)
    return entry


def _committed(session: Session) -> None:
    head = session.info.pop("audit_head", None)
    if head:
        advance_checkpoint(*head)


@contextmanager
def _audited(engine: Engine):
    """A transaction that appends to the log (the checkpoint advances once committed)."""
    with Session(engine) as session, session.begin():
        yield session


def seal_legacy(engine: Engine, now: datetime | None = None) -> int:
    """Key a chain written before the audit key existed: if its last row is unkeyed and
    the unkeyed chain is intact, append a keyed `chain_keyed` row over it, which pins
    every row before it. Returns the rows sealed (0: nothing to do, or not intact, which
    `audit verify` reports)."""
    with Session(engine) as session:
        last = session.scalars(select(AuditEntry).order_by(AuditEntry.id.desc()).limit(1)).first()
        if last is None or last.hash != entry_hash(last.prev_hash, _row(last)):
            return 0
        prev = GENESIS
        for number, entry in enumerate(session.scalars(select(AuditEntry).order_by(AuditEntry.id)), 1):
            if entry.id != number or entry.prev_hash != prev or entry.hash != entry_hash(prev, _row(entry)):
                return 0
            prev = entry.hash
    with _audited(engine) as session:
        append(session, "callctl db upgrade", SEAL, None, {"legacy_rows": last.id}, now)
    return last.id


def newest_entry_signed_by(conn, ring) -> bool:
    """For the key check (keycheck.py): does the newest row carry this ring's MAC (or,
    not keyed yet, the plain hash)? True for an empty log."""
    last = conn.execute(select(AuditEntry).order_by(AuditEntry.id.desc()).limit(1)).first()
    if last is None:
        return True
    row = dict(last._mapping)
    return last.hash in (entry_mac(ring.audit_key, last.prev_hash, row), entry_hash(last.prev_hash, row))


# --- checkpoints ----------------------------------------------------------------------

_checkpoint_file: Path | None = None


class CheckpointError(ProvisionError):
    pass


def use_checkpoint(path: str | os.PathLike | None) -> None:
    """Where this process keeps the checkpoint (None: nowhere; library use and tests)."""
    global _checkpoint_file
    _checkpoint_file = Path(path) if path else None


def _checkpoint_mac(entry_id: int, head: str) -> str:
    return hmac.new(crypto.ring().audit_key, f"callctl audit checkpoint {entry_id} {head}".encode(),
                    hashlib.sha256).hexdigest()


def checkpoint_line(entry_id: int, head: str) -> str:
    return json.dumps({"id": entry_id, "hash": head, "mac": _checkpoint_mac(entry_id, head)})


def read_checkpoint(path: str | os.PathLike) -> tuple[int, str] | None:
    """(id, hash) from a checkpoint file; None if there is none. CheckpointError if it is
    unreadable or not signed with the audit key."""
    try:
        text_ = Path(path).read_text()
    except FileNotFoundError:
        return None
    except OSError as exc:
        raise CheckpointError("checkpoint_unreadable", f"audit checkpoint {path}: {exc.strerror}") from None
    try:
        data = json.loads(text_)
        entry_id, head, mac = int(data["id"]), str(data["hash"]), str(data["mac"])
    except (ValueError, KeyError, TypeError):
        raise CheckpointError("checkpoint_invalid", f"audit checkpoint {path} is not a checkpoint") from None
    if not hmac.compare_digest(mac, _checkpoint_mac(entry_id, head)):
        raise CheckpointError("checkpoint_invalid", f"audit checkpoint {path} is not signed with the audit key")
    return entry_id, head


def advance_checkpoint(entry_id: int, head: str, path: Path | None = None) -> None:
    """Record (id, hash) as the head seen, unless the file records a later one. Under a
    lock (several processes append); written whole, 0600. A failure is logged: the
    entry is committed already, and the next append or verify writes it again."""
    path = path or _checkpoint_file
    if path is None:
        return
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path.with_name(path.name + ".lock"), "a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            try:
                seen = read_checkpoint(path)
            except CheckpointError:
                seen = None  # a broken file is replaced; verify reported it already
            if seen and seen[0] >= entry_id:
                return
            temp = path.with_name(path.name + ".tmp")
            fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            with os.fdopen(fd, "w") as out:
                out.write(checkpoint_line(entry_id, head) + "\n")
                out.flush()
                os.fsync(out.fileno())
            os.replace(temp, path)
    except OSError as exc:
        log.warning("audit checkpoint not written", path=str(path), error=exc.strerror)


def verify(engine: Engine, checkpoints: list[str | os.PathLike] = ()) -> dict:
    """Walk the chain, then hold it against the checkpoints (this process's file and
    any given). {"ok": True, "rows": n, "head": hash} or the first bad row and what is
    wrong. An intact chain advances this process's checkpoint to its head."""
    key = crypto.ring().audit_key
    files = [Path(p) for p in checkpoints] + ([_checkpoint_file] if _checkpoint_file else [])
    seen = {}
    for path in files:
        point = read_checkpoint(path)
        if point:
            seen.setdefault(point[0], []).append((point[1], path))
    expected_prev, expected_id, count = GENESIS, 1, 0
    with Session(engine) as session:
        seal = session.scalars(select(AuditEntry).where(AuditEntry.action == SEAL).order_by(AuditEntry.id)
                               .limit(1)).first()
        legacy_until = 0
        if seal is not None and seal.hash == entry_mac(key, seal.prev_hash, _row(seal)):
            legacy_until = json.loads(seal.detail).get("legacy_rows", 0) if seal.actor == "callctl db upgrade" else 0
            legacy_until = legacy_until if legacy_until == seal.id - 1 else 0
        for entry in session.scalars(select(AuditEntry).order_by(AuditEntry.id)):
            row = _row(entry)
            problem = None
            if entry.id != expected_id:
                problem = f"expected row {expected_id} next (a row was removed or renumbered)"
            elif entry.prev_hash != expected_prev:
                problem = "its prev_hash is not the previous row's hash (rows removed or reordered)"
            elif entry.id <= legacy_until and entry.hash != entry_hash(entry.prev_hash, row):
                problem = "its content does not match its hash (the row was changed)"
            elif entry.id > legacy_until and entry.hash != entry_mac(key, entry.prev_hash, row):
                problem = "its content does not match its MAC (the row was changed or written without the audit key)"
            for head, path in seen.get(entry.id, []) if not problem else []:
                if head != entry.hash:
                    problem = f"it is not the row checkpoint {path} saw (the log was rewritten)"
            if problem:
                return {"ok": False, "rows": count, "bad_row": entry.id, "problem": problem}
            expected_prev, expected_id, count = entry.hash, entry.id + 1, count + 1
    beyond = [(entry_id, path) for entry_id, points in seen.items() if entry_id >= expected_id for _, path in points]
    if beyond:
        entry_id, path = max(beyond)
        return {"ok": False, "rows": count, "bad_row": expected_id,
                "problem": f"missing: the log ends at row {count} but checkpoint {path} saw row {entry_id} "
                           "(rows removed at the end)"}
    if count:
        advance_checkpoint(count, expected_prev)
    return {"ok": True, "rows": count, "head": expected_prev}


EXPORT_COLUMNS = ("id", "at", "actor", "action", "grant_id", "detail", "prev_hash", "hash")


def export(engine: Engine, fmt: str = "json") -> str:
    """The whole log, oldest first, as JSON or CSV (it holds no real number)."""
    with Session(engine) as session:
        rows = [{c: (v.isoformat() if isinstance(v, datetime) else v) for c in EXPORT_COLUMNS
                 for v in [getattr(e, c)]} for e in session.scalars(select(AuditEntry).order_by(AuditEntry.id))]
    if fmt == "json":
        return json.dumps(rows, indent=2, ensure_ascii=False) + "\n"
    if fmt == "csv":
        out = io.StringIO()
        writer = csv.DictWriter(out, fieldnames=EXPORT_COLUMNS)
        writer.writeheader()
        writer.writerows(rows)
        return out.getvalue()
    raise ProvisionError("invalid_format", "format must be json or csv")


# --- grants -----------------------------------------------------------------------------

def grant_view(grant: RevealGrant, now: datetime | None = None) -> dict:
    now = now or utcnow()
    return {
        "id": grant.id, "binding_id": grant.binding_id, "party": grant.party, "scenario": grant.scenario,
        "case_reference": grant.case_reference, "requested_by": grant.requested_by,
        "requested_at": grant.requested_at.isoformat(), "status": grant.status,
        "decided_by": grant.decided_by, "decided_at": grant.decided_at.isoformat() if grant.decided_at else None,
        "expires_at": grant.expires_at.isoformat() if grant.expires_at else None,
        "uses": grant.uses, "max_uses": grant.max_uses, "ttl_seconds": grant.ttl_seconds,
        "active": _refusal(grant, grant.requested_by, now) is None,
    }


def _detail(grant: RevealGrant, **more) -> dict:
    return {"binding_id": grant.binding_id, "party": grant.party, "scenario": grant.scenario,
            "case_reference": grant.case_reference, **more}


def request(engine: Engine, binding_id: int, party: str, scenario: str, case_reference: str,
            requested_by: str, *, max_uses: int = 1, ttl_seconds: int = 3600, now: datetime | None = None) -> dict:
    now = now or utcnow()
    requested_by = _person(requested_by, "the requester")
    if scenario not in SCENARIOS:
        raise ProvisionError("invalid_scenario", f"scenario must be one of {', '.join(SCENARIOS)}")
    if party not in ("a", "b"):
        raise ProvisionError("invalid_party", "party must be a (the customer) or b (AXB's other party)")
    case_reference = (case_reference or "").strip()
    if not case_reference or len(case_reference) > 100:
        raise ProvisionError("invalid_case", "a case reference of 1-100 characters is required")
    if not 1 <= max_uses <= 100:
        raise ProvisionError("invalid_uses", "uses must be 1-100")
    if not 60 <= ttl_seconds <= 7 * 86400:
        raise ProvisionError("invalid_ttl", "a grant lasts 60 seconds to 7 days")
    with _audited(engine) as session:
        binding = session.get(Binding, binding_id)
        if binding is None:
            raise NotFound("binding_not_found", f"no binding {binding_id}")
        if party == "b" and binding.party_b is None:
            raise ProvisionError("invalid_party", f"binding {binding_id} has no party b")
        grant = RevealGrant(binding_id=binding_id, party=party, scenario=scenario, case_reference=case_reference,
                            requested_by=requested_by, requested_at=now, max_uses=max_uses,
                            ttl_seconds=ttl_seconds, status="requested", uses=0)
        session.add(grant)
        session.flush()
        append(session, requested_by, "reveal_requested", grant.id,
               _detail(grant, max_uses=max_uses, ttl_seconds=ttl_seconds), now)
        return grant_view(grant, now)


def _decide(engine: Engine, grant_id: int, person: str, approve: bool, note: str, now: datetime | None) -> dict:
    now = now or utcnow()
    person = _person(person, "the approver" if approve else "the refuser")
    refused: RevealError | None = None
    with _audited(engine) as session:
        grant = session.get(RevealGrant, grant_id, with_for_update=True)
        if grant is None:
            raise NotFound("grant_not_found", f"no reveal grant {grant_id}")
        if grant.status != "requested":
            refused = DecidedAlready("grant_decided", f"grant {grant_id} was {grant.status} already")
        elif person == grant.requested_by:
            refused = RevealError("self_approval", "a second person must decide: the requester cannot")
        if refused:
            append(session, person, "decision_refused", grant.id, _detail(grant, reason=refused.code), now)
        else:
            grant.status, grant.decided_by, grant.decided_at = ("approved" if approve else "refused"), person, now
            if approve:
                grant.expires_at = now + timedelta(seconds=grant.ttl_seconds)
            append(session, person, "reveal_approved" if approve else "reveal_refused", grant.id,
                   _detail(grant, note=note or None), now)
            view = grant_view(grant, now)
    if refused:
        raise refused
    return view


def approve(engine: Engine, grant_id: int, approver: str, note: str = "", now: datetime | None = None) -> dict:
    return _decide(engine, grant_id, approver, True, note, now)


def refuse(engine: Engine, grant_id: int, refuser: str, note: str = "", now: datetime | None = None) -> dict:
    return _decide(engine, grant_id, refuser, False, note, now)


def _refusal(grant: RevealGrant | None, person: str, now: datetime) -> str | None:
    if grant is None:
        return "no_grant"
    if grant.status != "approved":
        return f"grant_{grant.status}"
    if person != grant.requested_by:
        return "not_the_requester"
    if now >= grant.expires_at:
        return "grant_expired"
    if grant.uses >= grant.max_uses:
        return "grant_used_up"
    return None


def use(engine: Engine, grant_id: int, person: str, now: datetime | None = None) -> dict:
    """The real number, if the grant is active for this person; else RevealError. Both
    outcomes are audited; the log gets the masked number only."""
    now = now or utcnow()
    person = _person(person, "the person revealing")
    with _audited(engine) as session:
        grant = session.get(RevealGrant, grant_id, with_for_update=True)
        reason = _refusal(grant, person, now)
        if reason:
            append(session, person, "reveal_denied", grant.id if grant else None,
                   _detail(grant, reason=reason) if grant else {"grant": grant_id, "reason": reason}, now)
        else:
            binding = session.get(Binding, grant.binding_id)
            number = binding.party_a if grant.party == "a" else binding.party_b
            grant.uses += 1
            append(session, person, "reveal_used", grant.id, _detail(grant, use=grant.uses, shown=mask(number)), now)
            result = {"grant": grant_view(grant, now), "number": number}
    if reason:
        raise RevealError(reason, f"reveal refused ({reason.replace('_', ' ')}); the attempt is logged")
    return result


def list_grants(engine: Engine, binding_id: int | None = None, now: datetime | None = None) -> list[dict]:
    now = now or utcnow()
    with Session(engine) as session:
        query = select(RevealGrant).order_by(RevealGrant.id)
        if binding_id is not None:
            query = query.where(RevealGrant.binding_id == binding_id)
        return [grant_view(g, now) for g in session.scalars(query)]
