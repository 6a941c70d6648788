"""Step 2, decide: what the spending policy says of an offer about to be signed. Pure.

The offer rules (Policy.check_offer) are decided here, once. The budgets need what is already
committed, so the journal's ledger decides them (Policy.check_budgets) inside the transaction that
reserves the amount; it never runs the offer rules again.
"""

from __future__ import annotations

import httpx

from escrow_py.buyer._errors import PolicyDenied
from escrow_py.buyer._policy import ALLOW, Decision, PaymentContext, Policy
from escrow_py.buyer._validate import TASK_EXTENSION
from escrow_py.protocol.reasons import Reason
from escrow_py.protocol.terms import Terms
from escrow_py.protocol.wire import EscrowRequirements


def payment_context(
    request: httpx.Request | None, requirements: EscrowRequirements, terms: Terms, task: str
) -> PaymentContext:
    """What the policy looks at. `task` is the settings' budget name, unless the request names its own
    (the x402_task extension); `request` is None when the SDK plugin pays (the host is then unknown)."""
    if request is not None and isinstance(request.extensions.get(TASK_EXTENSION), str):
        task = request.extensions[TASK_EXTENSION]
    return PaymentContext(
        network=requirements.network,
        token=terms.token,
        escrow=requirements.extra.escrow,
        seller=terms.seller,
        host=None if request is None else request.url.host,
        amount=terms.amount,
        deadline_seconds=requirements.max_timeout_seconds,
        task=task,
        settlement=requirements.extra.settlement.value,
    )


def decide(ctx: PaymentContext, rules: Policy | None) -> Decision:
    """The offer rules' verdict (allow when there are none)."""
    return ALLOW if rules is None else rules.check_offer(ctx)


def custom_denial(denied: PolicyDenied) -> Decision:
    """A caller's PaymentPolicy hook said no: the decision the audit trail records."""
    return Decision(False, Reason.CUSTOM, denied.reason)


def denial(decision: Decision) -> PolicyDenied:
    """The error a denying decision raises, with its rule and numbers."""
    return PolicyDenied(
        decision.detail,
        code=decision.reason,
        limit=decision.limit,
        wanted=decision.wanted,
        available=decision.available,
    )
