"""The seller's verify and settle hooks (SellerConfig.hooks; README, "Hooks") as a paid request runs them: what
a hook's abort answers (402 with its reason) and what a hook that raises answers (503: nothing was charged).

EscrowMiddleware (_middleware.py) and FacilitatorMiddleware (_remote.py) call `abort_on` around their
verify and their deposit or settlement; SellerHooks (_offers.py) holds the hooks and runs them.
"""

from __future__ import annotations

import logging
from typing import Any

from escrow_py.protocol.reasons import Reason
from escrow_py.seller._machine import SellerUnavailable
from escrow_py.seller._offers import SellerHooks
from escrow_py.seller._verify import Refusal

log = logging.getLogger("escrow_py.seller")

# A seller hook that raised: what the buyer is told (never the exception's text), and when to try again.
HOOK_FAILED = "the seller's own check of this payment failed; nothing was charged, send the same payment again"
HOOK_RETRY_AFTER = 5


async def abort_on(hooks: list[Any], context: Any) -> None:
    """Run a seller's before/after-verify or before-settle hooks, before anything is recorded or moved: an
    AbortResult refuses the payment with its reason (402); a hook that raises is a 503 (nothing was charged:
    the same payment may be sent again)."""
    try:
        aborted = await SellerHooks.run(hooks, context)
    except Exception:
        log.exception("a seller hook raised; the payment was not taken")
        raise SellerUnavailable(Reason.SELLER_HOOK_FAILED, HOOK_FAILED, HOOK_RETRY_AFTER) from None
    if aborted is not None:
        raise Refusal(aborted.reason, aborted.message or f"refused by the seller: {aborted.reason}")
