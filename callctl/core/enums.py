"""The fixed sets of the data model. Each is a StrEnum, so a member is its stored string:
the store, the decision core, the CLI's choices, the API's schemas and the schema's
CHECK constraints (callctl.store.models.one_of) all take their values from here.
A new value: add it here, then a migration for the CHECK constraint (docs/architecture.md).
The decision's own sets (Reason, Direction, Mode) are in callctl/core/decision.py."""
from __future__ import annotations

from enum import StrEnum


class BlockScope(StrEnum):
    BINDING = "binding"  # one binding
    CALLER = "caller"  # one caller number (within a tenant)
    NUMBER = "number"  # one virtual number X
    TENANT = "tenant"  # a whole tenant: a suspension


class BlockDirection(StrEnum):
    TO_CUSTOMER = "to_customer"
    FROM_CUSTOMER = "from_customer"
    BOTH = "both"


class NumberState(StrEnum):
    FREE = "free"
    BOUND = "bound"
    QUARANTINED = "quarantined"  # released, resting before reuse
    DISABLED = "disabled"


class BindingStatus(StrEnum):
    ACTIVE = "active"
    ENDED = "ended"


class BindingView(StrEnum):
    """The status a list filters on: an active binding past its expiry shows as expired."""
    ACTIVE = "active"
    EXPIRED = "expired"
    ENDED = "ended"


class CallDecision(StrEnum):
    BRIDGED = "bridged"
    REJECTED = "rejected"
    SELF = "self"  # a call to the customers' self-service line


class FindingAction(StrEnum):
    ALERT = "alert"
    BLOCK = "block"


class Severity(StrEnum):
    LOW = "low"
    MEDIUM = "medium"
    HIGH = "high"


class SubjectKind(StrEnum):
    """What an anomaly rule counts per."""
    CALLER = "caller"  # a keyed hash of the caller's number
    BINDING = "binding"
    TENANT = "tenant"


class RevealScenario(StrEnum):
    CLAIM = "claim"
    COMPLAINT = "complaint"
    AML = "aml"


class RevealParty(StrEnum):
    A = "a"  # the customer
    B = "b"  # AXB's other party


class GrantStatus(StrEnum):
    REQUESTED = "requested"
    APPROVED = "approved"
    REFUSED = "refused"
