"""The shared harassment blacklist: caller numbers no tenant may use to reach any customer.

An entry is proposed by platform staff (with the number) or by the anomaly job, when
one caller is in findings of two or more tenants (with its lookup hash and masked form
only: CDRs hold nothing more). It comes into force when two people, neither of them
the proposer, have approved it, like a reveal's second person; it lasts `seconds` from
then or until lifted. It can be appealed; the appeal is upheld or the entry lifted.
Entries are never deleted, and every step (refused attempts too) is appended to the
hash-chained audit log (callctl.store.reveal.append), which the regulator's feed reads.

Calls read it by the caller's lookup hash in the one call-time statement
(callctl.store.calls), so a change is in force on every daemon's next call.
A tenant is shown an entry only if the number is one of its own callers or it has
evidence on it, and then only its own evidence (tenant_entries).
"""
from __future__ import annotations

import json
from datetime import datetime, timedelta

from sqlalchemy import func, select, text
from sqlalchemy.engine import Engine
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from callctl.core.numbers import mask
from callctl.errors import Conflict, Forbidden, NotFound, ProvisionError
from callctl.store.blocks import _no_phone_number, _text
from callctl.store.crypto import number_hash
from callctl.store.models import (AnomalyFinding, BlacklistEntry, BlacklistEvidence, Cdr, Tenant, TenantCaller,
                                  utcnow)
from callctl.store.inputs import parse_number
from callctl.store.tenants import tenant_row
from callctl.store.reveal import _person, append

STATUSES = ("proposed", "active", "refused", "lifted")
AUTOMATIC_BY = "anomaly"  # proposed_by of the anomaly job's proposals


def _in_force(entry: BlacklistEntry, now: datetime) -> bool:
    return (entry.status == "active" and entry.starts_at <= now
            and (entry.ends_at is None or entry.ends_at > now))


def _iso(value: datetime | None) -> str | None:
    return value.isoformat() if value else None


def entry_view(entry: BlacklistEntry, evidence: list[BlacklistEvidence], names: dict[int, str],
               now: datetime) -> dict:
    """The platform's view: everything but the number, which shows masked."""
    return {
        "id": entry.id, "caller": entry.caller_masked, "origin": entry.origin, "status": entry.status,
        "in_force": _in_force(entry, now), "reason": entry.reason,
        "proposed_by": entry.proposed_by, "proposed_at": _iso(entry.proposed_at), "seconds": entry.seconds,
        "approved_by": entry.approved_by, "approved_at": _iso(entry.approved_at),
        "confirmed_by": entry.confirmed_by, "starts_at": _iso(entry.starts_at), "ends_at": _iso(entry.ends_at),
        "closed_by": entry.closed_by, "closed_at": _iso(entry.closed_at), "close_note": entry.close_note,
        "appeal": entry.appeal, "appealed_by": entry.appealed_by, "appealed_at": _iso(entry.appealed_at),
        "appeal_outcome": entry.appeal_outcome,
        "evidence": [_evidence_view(e, names) for e in evidence],
        "tenants": sorted({names.get(e.tenant_id, str(e.tenant_id)) for e in evidence}),
    }


def _evidence_view(row: BlacklistEvidence, names: dict[int, str]) -> dict:
    return {"tenant": names.get(row.tenant_id, str(row.tenant_id)), "finding_id": row.finding_id,
            "cdr_ids": json.loads(row.cdr_ids), "added_by": row.added_by, "added_at": _iso(row.added_at)}


def _audit(session: Session, person: str, action: str, entry: BlacklistEntry, now: datetime, **more) -> None:
    append(session, person, action, None,
           {"blacklist_id": entry.id, "caller": entry.caller_masked, "origin": entry.origin,
            "status": entry.status, **{k: v for k, v in more.items() if v is not None}}, now)


def _names(session: Session) -> dict[int, str]:
    return dict(session.execute(select(Tenant.id, Tenant.name)).all())


def _evidence(session: Session, entry_id: int) -> list[BlacklistEvidence]:
    return list(session.scalars(select(BlacklistEvidence).where(BlacklistEvidence.entry_id == entry_id)
                                .order_by(BlacklistEvidence.id)))


def _view(session: Session, entry: BlacklistEntry, now: datetime) -> dict:
    return entry_view(entry, _evidence(session, entry.id), _names(session), now)


def _seconds(seconds: int | None) -> int | None:
    if seconds is not None and not 60 <= seconds <= 10 * 366 * 86400:
        raise ProvisionError("invalid_time", "an entry lasts 60 seconds to 10 years (or until lifted)")
    return seconds


def propose(engine: Engine, *, caller: str, reason: str, proposed_by: str, seconds: int | None = None,
            findings: list[int] = (), cdrs: list[int] = (), region: str = "CN",
            now: datetime | None = None) -> dict:
    """Platform staff propose a number, with evidence: findings about that caller and
    CDRs it placed (each tenant's own). It is in force after two approvals."""
    now = now or utcnow()
    proposed_by = _person(proposed_by, "the proposer")
    reason = _text(reason, "reason", 500)
    _no_phone_number(reason, region)
    seconds = _seconds(seconds)
    number = parse_number(caller, "caller", region)
    digest = number_hash(number)
    with Session(engine) as session, session.begin():
        evidence = _staff_evidence(session, digest, list(findings), list(cdrs))
        if not evidence:
            raise ProvisionError("no_evidence", "name at least one finding (--finding) or CDR (--cdr) of this caller")
        if _open_entry(session, digest) is not None:
            raise Conflict("blacklist_open", "this number has an open (proposed or active) entry already")
        entry = BlacklistEntry(caller=number, caller_hash=digest, caller_masked=mask(number), origin="manual",
                               status="proposed", reason=reason, proposed_by=proposed_by, proposed_at=now,
                               seconds=seconds)
        session.add(entry)
        session.flush()
        for tenant_id, finding_id, cdr_ids in evidence:
            session.add(BlacklistEvidence(entry_id=entry.id, tenant_id=tenant_id, finding_id=finding_id,
                                          cdr_ids=json.dumps(cdr_ids), added_by=proposed_by, added_at=now))
        session.flush()
        _audit(session, proposed_by, "blacklist_proposed", entry, now, reason=reason, seconds=seconds,
               evidence_tenants=sorted({t for t, _, _ in evidence}))
        return _view(session, entry, now)


def _staff_evidence(session: Session, digest: str, findings: list[int], cdrs: list[int]):
    """(tenant id, finding id, CDR ids) rows, each checked to be about this caller."""
    rows = []
    for finding_id in findings:
        finding = session.get(AnomalyFinding, finding_id)
        if finding is None:
            raise NotFound("finding_not_found", f"no finding {finding_id}")
        if finding.subject_kind != "caller" or finding.subject != digest:
            raise ProvisionError("invalid_evidence", f"finding {finding_id} is not about this caller")
        rows.append((finding.tenant_id, finding.id, sorted(json.loads(finding.evidence))))
    by_tenant: dict[int, list[int]] = {}
    for cdr_id in cdrs:
        cdr = session.execute(select(Cdr.tenant_id, Cdr.caller_hash).where(Cdr.id == cdr_id)).first()
        if cdr is None:
            raise NotFound("cdr_not_found", f"no CDR {cdr_id}")
        if cdr.caller_hash != digest or cdr.tenant_id is None:
            raise ProvisionError("invalid_evidence", f"CDR {cdr_id} is not a call of this caller to a tenant")
        by_tenant.setdefault(cdr.tenant_id, []).append(cdr_id)
    rows += [(tenant_id, None, sorted(ids)) for tenant_id, ids in by_tenant.items()]
    return rows


def _open_entry(session: Session, digest: str, lock: bool = False) -> BlacklistEntry | None:
    query = select(BlacklistEntry).where(BlacklistEntry.caller_hash == digest,
                                         BlacklistEntry.status.in_(("proposed", "active")))
    return session.scalar(query.with_for_update() if lock else query)


def _entry(session: Session, entry_id: int) -> BlacklistEntry:
    entry = session.get(BlacklistEntry, entry_id, with_for_update=True)
    if entry is None:
        raise NotFound("blacklist_not_found", f"no blacklist entry {entry_id}")
    return entry


# A refused step is the person's (403: they may not take it) or the entry's state (409).
_BY_PERSON = {"self_approval", "second_person"}


def _refused_step(engine: Engine, entry_id: int, person: str, action: str, check, change, now: datetime,
                  note: str | None = None) -> dict:
    """One step on an entry: `check` names why it may not happen (the refused attempt
    is audited, then raised), else `change` makes it (returning another action name
    to audit, if it decides one) and it is audited."""
    refused = None
    with Session(engine) as session, session.begin():
        entry = _entry(session, entry_id)
        problem = check(entry)
        if problem:
            _audit(session, person, "blacklist_step_refused", entry, now, step=action, refused=problem[0])
            refused = (Forbidden if problem[0] in _BY_PERSON else Conflict)(*problem)
        else:
            action = change(entry) or action
            session.flush()
            _audit(session, person, action, entry, now, note=note or None)
            view = _view(session, entry, now)
    if refused:
        raise refused
    return view


def approve(engine: Engine, entry_id: int, person: str, now: datetime | None = None) -> dict:
    """The first approval records the person; a second, different one puts it in force."""
    now = now or utcnow()
    person = _person(person, "the approver")

    def check(entry):
        if entry.status != "proposed":
            return "blacklist_decided", f"entry {entry_id} is {entry.status} already"
        if person == entry.proposed_by:
            return "self_approval", "two people other than the proposer must approve"
        if person == entry.approved_by:
            return "second_person", f"{person} approved it already: a second person must"
        return None

    def change(entry):
        if entry.approved_by is None:
            entry.approved_by, entry.approved_at = person, now
            return None
        entry.confirmed_by, entry.status, entry.starts_at = person, "active", now
        entry.ends_at = now + timedelta(seconds=entry.seconds) if entry.seconds else None
        return "blacklist_in_force"

    return _refused_step(engine, entry_id, person, "blacklist_approved", check, change, now)


def refuse(engine: Engine, entry_id: int, person: str, note: str = "", now: datetime | None = None) -> dict:
    now = now or utcnow()
    person = _person(person, "the refuser")

    def check(entry):
        if entry.status != "proposed":
            return "blacklist_decided", f"entry {entry_id} is {entry.status} already"
        if person == entry.proposed_by:
            return "self_approval", "another person than the proposer must decide"
        return None

    def change(entry):
        entry.status, entry.closed_by, entry.closed_at, entry.close_note = "refused", person, now, note or None

    return _refused_step(engine, entry_id, person, "blacklist_refused", check, change, now, note)


def appeal(engine: Engine, entry_id: int, person: str, note: str, now: datetime | None = None) -> dict:
    """The number's holder (through support or its tenant) contests an entry in force."""
    now = now or utcnow()
    person = _person(person, "the appellant")
    note = _text(note, "appeal", 1000)
    _no_phone_number(note, "CN")

    def check(entry):
        if entry.status != "active":
            return "blacklist_not_active", f"entry {entry_id} is {entry.status}: only an entry in force is appealed"
        if entry.appeal is not None and entry.appeal_outcome is None:
            return "appeal_pending", f"entry {entry_id} has an appeal awaiting a decision"
        return None

    def change(entry):
        entry.appeal, entry.appealed_by, entry.appealed_at, entry.appeal_outcome = note, person, now, None

    return _refused_step(engine, entry_id, person, "blacklist_appealed", check, change, now, note)


def uphold(engine: Engine, entry_id: int, person: str, note: str = "", now: datetime | None = None) -> dict:
    """The appeal is decided against the appellant: the entry stays in force."""
    now = now or utcnow()
    person = _person(person, "the person deciding")

    def check(entry):
        if entry.appeal is None or entry.appeal_outcome is not None:
            return "no_appeal", f"entry {entry_id} has no appeal awaiting a decision"
        if person == entry.appealed_by:
            return "self_approval", "the appellant cannot decide the appeal"
        return None

    def change(entry):
        entry.appeal_outcome = "upheld"

    return _refused_step(engine, entry_id, person, "blacklist_appeal_upheld", check, change, now, note)


def lift(engine: Engine, entry_id: int, person: str, note: str = "", now: datetime | None = None) -> dict:
    """End an entry in force now (a pending appeal is decided by it). Kept as evidence."""
    now = now or utcnow()
    person = _person(person, "the person lifting")

    def check(entry):
        if entry.status != "active":
            return "blacklist_not_active", f"entry {entry_id} is {entry.status}: only an entry in force is lifted"
        return None

    def change(entry):
        entry.status, entry.closed_by, entry.closed_at, entry.close_note = "lifted", person, now, note or None
        entry.ends_at = now if entry.ends_at is None or entry.ends_at > now else entry.ends_at
        if entry.appeal is not None and entry.appeal_outcome is None:
            entry.appeal_outcome = "lifted"

    return _refused_step(engine, entry_id, person, "blacklist_lifted", check, change, now, note)


def get(engine: Engine, entry_id: int, now: datetime | None = None) -> dict:
    with Session(engine) as session:
        entry = session.get(BlacklistEntry, entry_id)
        if entry is None:
            raise NotFound("blacklist_not_found", f"no blacklist entry {entry_id}")
        return _view(session, entry, now or utcnow())


def list_entries(engine: Engine, *, status: str | None = None, caller: str | None = None, region: str = "CN",
                 limit: int = 100, now: datetime | None = None) -> list[dict]:
    """The platform's list, newest first."""
    now = now or utcnow()
    if status is not None and status not in STATUSES:
        raise ProvisionError("invalid_status", f"status must be one of {', '.join(STATUSES)}")
    query = select(BlacklistEntry).order_by(BlacklistEntry.id.desc()).limit(limit)
    if status:
        query = query.where(BlacklistEntry.status == status)
    if caller:
        query = query.where(BlacklistEntry.caller_hash == number_hash(parse_number(caller, "caller", region)))
    with Session(engine) as session:
        names = _names(session)
        return [entry_view(e, _evidence(session, e.id), names, now) for e in session.scalars(query)]


def tenant_entries(engine: Engine, tenant: str, now: datetime | None = None) -> list[dict]:
    """What a tenant may know: entries that were in force on one of its own caller
    numbers, or that carry its evidence; the masked number, why, when, and its own
    evidence only. Proposals not (yet) approved and other tenants' data are not shown."""
    now = now or utcnow()
    with Session(engine) as session:
        owner = tenant_row(session, tenant)
        own_hashes = {number_hash(p) for p in session.scalars(
            select(TenantCaller.pattern).where(TenantCaller.tenant_id == owner.id, TenantCaller.is_prefix.is_(False)))}
        with_evidence = select(BlacklistEvidence.entry_id).where(BlacklistEvidence.tenant_id == owner.id)
        entries = session.scalars(
            select(BlacklistEntry).where(
                BlacklistEntry.starts_at.is_not(None),
                BlacklistEntry.caller_hash.in_(own_hashes) | BlacklistEntry.id.in_(with_evidence))
            .order_by(BlacklistEntry.id.desc())).all()
        out = []
        for entry in entries:
            mine = [e for e in _evidence(session, entry.id) if e.tenant_id == owner.id]
            out.append({
                "id": entry.id, "caller": entry.caller_masked, "reason": entry.reason,
                "status": entry.status, "in_force": _in_force(entry, now), "starts_at": _iso(entry.starts_at),
                "ends_at": _iso(entry.ends_at), "origin": entry.origin,
                "your_evidence": [{"finding_id": e.finding_id, "cdr_ids": json.loads(e.cdr_ids)} for e in mine],
            })
        return out


# --- automatic proposals (the anomaly job) ------------------------------------------------

def propose_from_findings(engine: Engine, *, rules: list[str], min_tenants: int, lookback_seconds: int,
                          now: datetime | None = None) -> list[int]:
    """One proposal per caller that `rules` found in `min_tenants` or more tenants within
    the lookback, carrying every tenant's findings as evidence. A caller with an open
    entry gets the new findings added to it; findings already evidence of any entry
    (a refused or lifted one too) never make a new proposal by themselves. Returns the
    ids of entries proposed or given new evidence."""
    now = now or utcnow()
    if not rules:
        return []
    since = now - timedelta(seconds=lookback_seconds)
    recent = (AnomalyFinding.subject_kind == "caller", AnomalyFinding.rule.in_(rules),
              AnomalyFinding.window_end > since)
    crossing = (select(AnomalyFinding.subject).where(*recent).group_by(AnomalyFinding.subject)
                .having(func.count(func.distinct(AnomalyFinding.tenant_id)) >= min_tenants))
    used = select(BlacklistEvidence.finding_id).where(BlacklistEvidence.finding_id.is_not(None))
    for attempt in range(2):  # a concurrent pass may propose the same caller first: then add to it
        try:
            with Session(engine) as session, session.begin():
                rows = session.execute(
                    select(AnomalyFinding.subject, AnomalyFinding.tenant_id, AnomalyFinding.id,
                           AnomalyFinding.rule, AnomalyFinding.evidence, AnomalyFinding.id.in_(used).label("used"))
                    .where(*recent, AnomalyFinding.subject.in_(crossing))
                    .order_by(AnomalyFinding.subject, AnomalyFinding.id)).all()
                by_caller: dict[str, list] = {}
                for row in rows:
                    by_caller.setdefault(row.subject, []).append(row)
                return [entry_id for digest, found in by_caller.items()
                        if (entry_id := _propose_caller(session, digest, found, now)) is not None]
        except IntegrityError:
            if attempt:
                raise
    return []


def _propose_caller(session: Session, digest: str, found: list, now: datetime) -> int | None:
    fresh = [f for f in found if not f.used]
    if not fresh:
        return None
    entry = _open_entry(session, digest, lock=True)
    names = _names(session)
    tenants = sorted({names.get(f.tenant_id, str(f.tenant_id)) for f in found})
    if entry is None:
        cdr_ids = [i for f in found for i in json.loads(f.evidence)]
        masked = session.scalar(select(Cdr.caller_masked).where(Cdr.id.in_(cdr_ids[:20]),
                                                                Cdr.caller_masked.is_not(None)).limit(1))
        rules = sorted({f.rule for f in found})
        entry = BlacklistEntry(
            caller=None, caller_hash=digest, caller_masked=masked or "(withheld)", origin="automatic",
            status="proposed", proposed_by=AUTOMATIC_BY, proposed_at=now,
            reason=f"found by {', '.join(rules)} in {len(tenants)} tenants")
        session.add(entry)
        session.flush()
        add, action = found, "blacklist_proposed"
    else:
        add, action = fresh, "blacklist_evidence_added"
    for f in add:
        session.add(BlacklistEvidence(entry_id=entry.id, tenant_id=f.tenant_id, finding_id=f.id,
                                          cdr_ids=json.dumps(sorted(json.loads(f.evidence))),
                                          added_by=AUTOMATIC_BY, added_at=now))
    session.flush()
    _audit(session, AUTOMATIC_BY, action, entry, now, reason=entry.reason, evidence_tenants=tenants,
           findings=[f.id for f in add if not f.used])
    return entry.id
