"""The one place a duplicate case changes status, with the audit entry that says why.

Every status change of a :class:`~models.DuplicateCase` goes through :func:`change`, which
checks it against :data:`TRANSITIONS`, sets the bookkeeping that goes with it (decision,
who, when, failure, the state a dismissal was made for) and writes the ``audit_log`` row in
the caller's transaction. Nothing else assigns ``DuplicateCase.status``
(tests/test_architecture.py checks the source).

The lifecycle, in words:

* detection **opens** a case when an order holds more than it should; it **resolves** an
  open or failed case as ``refunded`` (decision ``external``) when the money came back
  outside this service, and **reopens** a ``refunded`` case when the order holds more than
  its total again (an outside refund that failed, a refund of ours that failed later);
* an approval (a person's, or the job's in auto mode) moves ``open``/``failed`` to
  ``refunding``; settling moves ``refunding`` to ``refunded`` only when the order then
  holds no more than its total, to ``failed`` when Stripe refused or failed a refund, and
  back to ``open`` (to a person, with the reason) when a refund was skipped or the order
  still holds too much;
* Stripe reporting that a refund of ours failed moves ``refunding``/``refunded`` to
  ``failed`` — unless the order has another active case: then the news is **merged** into
  that case (the one-active-case-per-order rule is never broken) and the old case keeps
  its status with an audit entry;
* a person **dismisses** an ``open``/``failed`` case (recording what they saw) and may
  **reopen** a dismissed one.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum
from typing import Any

from sqlalchemy.orm import Session

from models import ACTIVE_CASE_STATUSES, AuditEntry, CaseStatus, DuplicateCase, utcnow

RECONCILER = "reconciler"


class CaseAction(StrEnum):
    """Each value is also the ``audit_log.action`` written for it."""

    OPEN = "case_opened"
    APPROVE = "approve"  # a person approved refunds
    AUTO_REFUND = "auto_refund"  # the job approved a clear case in auto mode
    SETTLE_REFUNDED = "case_refunded"
    SETTLE_FAILED = "case_failed"
    RETURN_TO_REVIEW = "returned_to_review"  # a refund skipped, or the order still holds too much
    REFUND_FAILED = "refund_failed"  # Stripe failed/canceled a refund of ours, maybe days later
    RESOLVE_EXTERNAL = "resolved_external"  # the excess went back outside this service
    REOPEN_EXCESS = "reopened_excess"  # a settled case's order holds more than its total again
    DISMISS = "dismiss"
    REOPEN = "reopen"  # a person reopened a dismissal
    MERGE = "merged"  # news about another case of the order, folded into this one


_ACTIVE = frozenset(CaseStatus(s) for s in ACTIVE_CASE_STATUSES)

# action -> (statuses it may start from, status it leads to; None: unchanged)
TRANSITIONS: dict[CaseAction, tuple[frozenset[CaseStatus | None], CaseStatus | None]] = {
    CaseAction.OPEN: (frozenset({None}), CaseStatus.OPEN),
    CaseAction.APPROVE: (frozenset({CaseStatus.OPEN, CaseStatus.FAILED}), CaseStatus.REFUNDING),
    CaseAction.AUTO_REFUND: (frozenset({CaseStatus.OPEN}), CaseStatus.REFUNDING),
    CaseAction.SETTLE_REFUNDED: (frozenset({CaseStatus.REFUNDING}), CaseStatus.REFUNDED),
    CaseAction.SETTLE_FAILED: (frozenset({CaseStatus.REFUNDING}), CaseStatus.FAILED),
    CaseAction.RETURN_TO_REVIEW: (frozenset({CaseStatus.REFUNDING}), CaseStatus.OPEN),
    CaseAction.REFUND_FAILED: (frozenset({CaseStatus.REFUNDING, CaseStatus.REFUNDED, CaseStatus.FAILED}), CaseStatus.FAILED),
    CaseAction.RESOLVE_EXTERNAL: (frozenset({CaseStatus.OPEN, CaseStatus.FAILED}), CaseStatus.REFUNDED),
    CaseAction.REOPEN_EXCESS: (frozenset({CaseStatus.REFUNDED}), CaseStatus.OPEN),
    CaseAction.DISMISS: (frozenset({CaseStatus.OPEN, CaseStatus.FAILED}), CaseStatus.DISMISSED),
    CaseAction.REOPEN: (frozenset({CaseStatus.DISMISSED}), CaseStatus.OPEN),
    CaseAction.MERGE: (frozenset(CaseStatus), None),
}


class CaseTransitionRefused(Exception):
    """The case is not in a status the action may start from."""

    def __init__(self, case: DuplicateCase, action: CaseAction) -> None:
        allowed = sorted(s.value for s in TRANSITIONS[action][0] if s is not None)
        super().__init__(f"case {case.id} is {case.status}; {action.value} needs {' or '.join(allowed) or 'a new case'}")
        self.case_id = case.id
        self.status = case.status
        self.action = action


@dataclass(frozen=True, slots=True)
class DismissedState:
    """What a person saw when dismissing: held money per currency and the held charges."""

    held: dict[str, int]
    charges: frozenset[str]

    def as_json(self) -> dict[str, Any]:
        return {"held": dict(sorted(self.held.items())), "charges": sorted(self.charges)}

    @classmethod
    def from_json(cls, data: dict[str, Any] | None) -> "DismissedState | None":
        if not data:
            return None
        return cls({str(c): int(a) for c, a in (data.get("held") or {}).items()}, frozenset(data.get("charges") or ()))

    def stands_for(self, held: dict[str, int], charges: frozenset[str]) -> bool:
        """The dismissal still covers an order that now holds ``held`` in ``charges``:
        no currency holds more than then, and no charge holds money that did not then."""
        return charges <= self.charges and all(amount <= self.held.get(currency, 0) for currency, amount in held.items())


def change(
    session: Session,
    case: DuplicateCase,
    action: CaseAction,
    *,
    actor: str = RECONCILER,
    note: str | None = None,
    reason: str | None = None,
    details: dict[str, Any] | None = None,
    dismissed_state: DismissedState | None = None,
) -> None:
    """Apply ``action`` to ``case`` (flushed or not) and write its audit entry, in the
    caller's transaction. Raises :class:`CaseTransitionRefused` when the case's status
    does not allow it; nothing is changed then.

    ``note`` is a person's note; ``reason`` the job's explanation (a failure, why a case
    went back to review or was reopened)."""
    allowed, target = TRANSITIONS[action]
    current = CaseStatus(case.status) if case.status is not None else None
    if current not in allowed:
        raise CaseTransitionRefused(case, action)
    if target is not None:
        case.status = target.value
    _record_decision(case, action, actor=actor, note=note, reason=reason, dismissed_state=dismissed_state)
    audit_details = dict(details or {})
    if action is CaseAction.DISMISS and dismissed_state is not None:
        audit_details.setdefault("state", dismissed_state.as_json())
    session.add(
        AuditEntry(
            actor=actor,
            action=action.value,
            # A new case has no id until flushed: the caller passes it then (see open_case).
            case_id=case.id,
            note=note if note is not None else reason,
            details=audit_details,
        )
    )


def _record_decision(
    case: DuplicateCase,
    action: CaseAction,
    *,
    actor: str,
    note: str | None,
    reason: str | None,
    dismissed_state: DismissedState | None,
) -> None:
    """What ``action`` writes on the case besides its status: who decided and when, the
    note, the failure, the escalation, the dismissed state."""
    now = utcnow()
    if action in (CaseAction.APPROVE, CaseAction.AUTO_REFUND):
        case.decision = "finance" if action is CaseAction.APPROVE else "auto"
        case.decided_by, case.decided_at = actor, now
        case.failure = None
        if note:
            case.note = note
    elif action in (CaseAction.SETTLE_FAILED, CaseAction.REFUND_FAILED):
        case.failure = reason
    elif action is CaseAction.RETURN_TO_REVIEW or action is CaseAction.REOPEN_EXCESS:
        # Back to a person: never refunded automatically from here. A person's note stays;
        # the reason is in the audit entry (and the caller's review reasons).
        case.decision = case.decided_by = case.decided_at = None
        case.automatic = False
        case.escalation = reason
    elif action is CaseAction.RESOLVE_EXTERNAL:
        case.decision, case.decided_by, case.decided_at = "external", RECONCILER, now
    elif action is CaseAction.DISMISS:
        case.decision, case.decided_by, case.decided_at = "finance", actor, now
        case.note = note
        case.dismissed_state = dismissed_state.as_json() if dismissed_state is not None else None
    elif action is CaseAction.REOPEN:
        case.decision = case.decided_by = case.decided_at = None
        case.dismissed_state = None
        case.note = note  # the dismissal note stays in the audit log, not on the open case
    elif action is CaseAction.MERGE and reason and case.status in _ACTIVE:
        # The order's active case takes the news: a person decides it from here.
        case.escalation = reason
        case.automatic = False


def new_case(order_id: str, *, kind: str, run_id: int | None) -> DuplicateCase:
    """A new ``open`` case, not yet added or flushed; :func:`record_opened` writes its
    audit entry once it has an id (detection flushes a chunk's new cases at once)."""
    return DuplicateCase(order_id=order_id, kind=kind, status=CaseStatus.OPEN.value, opened_by_run_id=run_id)


def record_opened(session: Session, case: DuplicateCase, *, details: dict[str, Any] | None = None) -> None:
    """The audit entry of a case made by :func:`new_case`, once flushed."""
    if case.id is None or case.status != CaseStatus.OPEN:
        raise ValueError("record_opened needs a flushed case from new_case")
    session.add(AuditEntry(actor=RECONCILER, action=CaseAction.OPEN.value, case_id=case.id, details=dict(details or {})))


def is_active(case: DuplicateCase) -> bool:
    return CaseStatus(case.status) in _ACTIVE
