"""/v1/blacklist: the shared harassment blacklist. A tenant token sees its part (its own
callers, its own evidence); platform tokens issued to a named person propose, approve
(two people, never the proposer), refuse, record and decide appeals and lift entries,
each step audited (docs/regulator.md). Numbers in answers are masked."""
from __future__ import annotations

from typing import Literal

from fastapi import APIRouter, Depends
from sqlalchemy.engine import Engine

from callctl.api.auth import person, tenant
from callctl.api.deps import engine
from callctl.api.schemas import AppealIn, BlacklistIn, DecisionIn, PathId
from callctl.store import blacklist
from callctl.store.tokens import Principal

router = APIRouter(prefix="/v1/blacklist", tags=["blacklist"])


@router.get("")
def tenant_blacklist(who: Principal = Depends(tenant), db: Engine = Depends(engine)):
    """The shared blacklist as this tenant may see it: entries on its own callers or
    carrying its evidence, with its own evidence only (masked numbers)."""
    return blacklist.tenant_entries(db, who.tenant_name)


@router.post("/entries", status_code=201)
def propose(body: BlacklistIn, by: str = Depends(person), db: Engine = Depends(engine)):
    """Propose a caller's number with evidence (findings, CDRs); in force after two approvals."""
    return blacklist.propose(db, caller=body.caller, reason=body.reason, proposed_by=by, seconds=body.seconds,
                             findings=body.findings, cdrs=body.cdrs)


@router.get("/entries")
def entries(status: Literal["proposed", "active", "refused", "lifted"] | None = None,
            _by: str = Depends(person), db: Engine = Depends(engine)):
    return blacklist.list_entries(db, status=status)


@router.get("/entries/{entry_id}")
def entry(entry_id: PathId, _by: str = Depends(person), db: Engine = Depends(engine)):
    return blacklist.get(db, entry_id)


@router.post("/entries/{entry_id}/approve")
def approve(entry_id: PathId, by: str = Depends(person), db: Engine = Depends(engine)):
    """An approval by someone other than the proposer; the second puts the entry in force."""
    return blacklist.approve(db, entry_id, by)


@router.post("/entries/{entry_id}/refuse")
def refuse(entry_id: PathId, body: DecisionIn, by: str = Depends(person), db: Engine = Depends(engine)):
    return blacklist.refuse(db, entry_id, by, body.note)


@router.post("/entries/{entry_id}/appeal")
def appeal(entry_id: PathId, body: AppealIn, by: str = Depends(person), db: Engine = Depends(engine)):
    """The number's holder contests an entry in force (through support or its tenant)."""
    return blacklist.appeal(db, entry_id, by, body.note)


@router.post("/entries/{entry_id}/uphold")
def uphold(entry_id: PathId, body: DecisionIn, by: str = Depends(person), db: Engine = Depends(engine)):
    return blacklist.uphold(db, entry_id, by, body.note)


@router.post("/entries/{entry_id}/lift")
def lift(entry_id: PathId, body: DecisionIn, by: str = Depends(person), db: Engine = Depends(engine)):
    """End an entry in force now; it stays on record."""
    return blacklist.lift(db, entry_id, by, body.note)
