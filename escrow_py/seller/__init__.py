"""The seller: an ASGI middleware that sells routes for delivery-escrow payments.

    from escrow_py.seller import EscrowMiddleware, SellerConfig, PricedRoute
    app.add_middleware(EscrowMiddleware, config=SellerConfig(
        rpc_url=..., escrow=..., token=..., network="eip155:84532", pay_to=..., operator=signer,
        routes=[PricedRoute("GET", "/report/{item}", amount=10_000, max_timeout_seconds=120)],
        store="seller.sqlite"))

A request to a priced route without PAYMENT-SIGNATURE gets 402 with the offer for
exactly that request (`offer_for`). A paid one goes through `verify_offchain`
then `verify_onchain`, is deposited (the operator's transaction), served, stored
under its escrow id with its delivery hash queued for `deliverMany`, and answered
with PAYMENT-RESPONSE. A failed handler is refunded at once. The same payment
again replays the stored response byte for byte. The delivery poster runs with
the app's lifespan; `await EscrowMiddleware.of(app).poster.flush()` or
`post_pending(config)` runs one pass.

Several processes (`uvicorn --workers N`) or replicas on several hosts share one store
(`store="seller.sqlite"`, or `store="postgresql://..."` across hosts): a payment is claimed in
the store while one request handles it, a stored response is never overwritten, and the
operator key's nonces and the poster's lease live in the store too (see SellerStore).

A request of any method that reaches a priced handler is priced (HEAD through a GET
route, the other methods of a multi-method route). When the app starts, `check_seller`
checks the chain id, the escrow's code, the token's ERC-3009 domain and the operator's
gas, and a failure stops the start naming the setting.

Errors: ConfigError for bad settings (raised when SellerConfig or PricedRoute is
built, or at start-up). A bad payment never raises to the server: it answers 400 or
402 with a Reason in PAYMENT-REQUIRED's `error` (a refused deposit adds the
decoded revert: "simulation_failed: ..."). A failure on the seller's side answers
503 with Retry-After and {"error": reason, "message": ...}: chain_unavailable,
operator_unfunded, operator_nonce_conflict, deposit_pending, payment_in_progress.
Chain failures while refunding or posting are logged and retried (by the poster,
or the keeper); a delivery a reorg drops is posted again.

    EscrowError
    ├── ConfigError
    │   └── (SellerConfig / PricedRoute settings)
    └── ProtocolError
        └── Refusal     a rule broken: `.reason` (Reason) and `.status` (400 or 402)
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from web3 import Web3

from escrow_py._lazy import lazy_names
from escrow_py.seller._chain import seller_chain
from escrow_py.seller._config import PricedRoute, SellerConfig
from escrow_py.seller._middleware import EscrowMiddleware
from escrow_py.seller._offers import ExactOffer, SellerHooks
from escrow_py.seller._poster import DeliveryPoster, PostReport
from escrow_py.seller._sdk import DeliveryEscrowServerScheme, DeliveryHashHeader
from escrow_py.seller._startup import check_seller
from escrow_py.seller._store import SellerStore, StoredResponse
from escrow_py.seller._verify import Refusal, VerifiedPayment, offer_for, verify_offchain, verify_onchain

if TYPE_CHECKING:
    from escrow_py.seller._remote import FacilitatorMiddleware, FacilitatorSellerConfig


# The keyless seller's names, imported when first used (PEP 562): they bring httpx (and here the rich and
# click of httpx's CLI: about 0.2 s of CPU together), which a seller holding its own key, and the
# facilitator, never use.
_LAZY = {"FacilitatorMiddleware": "_remote", "FacilitatorSellerConfig": "_remote"}

__getattr__ = lazy_names(__name__, _LAZY)


def post_pending(config: SellerConfig, *, w3: Web3 | None = None) -> PostReport:
    """One poster pass from the store named in `config` (blocking): for a cron job, a restart, or a test.

    It takes the operator key's nonces from the store, and the key's poster lease (an empty
    report while a running middleware's poster holds it), so it is safe beside running replicas.
    """
    store = SellerStore(config.store)
    try:
        poster = DeliveryPoster.of(config, seller_chain(config, w3, book=store), store)
        try:
            return poster.post_pending(force_settle=True)
        finally:
            store.release_lease(poster.lease_name, poster.owner)
    finally:
        store.close()


__all__ = [
    "DeliveryEscrowServerScheme",
    "DeliveryHashHeader",
    "DeliveryPoster",
    "EscrowMiddleware",
    "ExactOffer",
    "FacilitatorMiddleware",
    "FacilitatorSellerConfig",
    "PostReport",
    "PricedRoute",
    "Refusal",
    "SellerConfig",
    "SellerHooks",
    "SellerStore",
    "StoredResponse",
    "VerifiedPayment",
    "check_seller",
    "offer_for",
    "post_pending",
    "seller_chain",
    "verify_offchain",
    "verify_onchain",
]
