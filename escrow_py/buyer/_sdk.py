"""The delivery-escrow scheme as a plugin of the official `x402` SDK's client.

    from x402 import x402Client
    client = x402Client().register("eip155:84532", DeliveryEscrowScheme(signer, rpc_url, "buyer.sqlite"))

The SDK hands a scheme only the requirements, never the request, so the plugin
signs extra.requestHash as given (the seller recomputes it on the paid request
and refuses a payment for another request). Each payment is journaled before it
is returned to the SDK, without a request to replay: recover() can refund or
void it, not fetch its bytes again. Checking the body against
PAYMENT-RESPONSE's deliveryHash is left to the caller (`verify_delivery`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import httpx
from web3 import Web3
from x402.schemas import PaymentPayload, PaymentRequirements

from escrow_py.buyer._core import PaymentCore, PaymentPolicy
from escrow_py.buyer._errors import DeliveryMismatch
from escrow_py.buyer._journal import Journal, PaymentState
from escrow_py.buyer._policy import Policy
from escrow_py.chain.signer import Signer
from escrow_py.terms import delivery_hash
from escrow_py.wire import (
    PAYMENT_RESPONSE_HEADER,
    SCHEME,
    X402_VERSION,
    EscrowPayload,
    EscrowRequirements,
    SettlementExtra,
    decode_payment_response,
    encode_payment_signature,
)


class DeliveryEscrowScheme:
    """A `SchemeNetworkClient` (x402.interfaces) for the delivery-escrow scheme."""

    scheme = SCHEME

    def __init__(
        self,
        signer: Signer,
        rpc_url: str,
        journal: str | Path | Journal,
        *,
        policy: Policy | PaymentPolicy | None = None,
        task: str = "default",
        w3: Web3 | None = None,
    ) -> None:
        # The SDK never shows the plugin the request: a Policy with a host allowlist denies (host_unknown).
        self.core = PaymentCore(signer, rpc_url, journal, policy=policy, task=task, w3=w3)

    def create_payment_payload(self, requirements: PaymentRequirements) -> dict[str, Any]:
        req = EscrowRequirements.from_model(requirements)
        terms, authorization, signature = self.core.sign(req, req.extra.request_hash, None)
        payload = EscrowPayload(authorization, signature, terms).to_json()
        # The SDK builds the header itself; journal the same envelope so the row is complete.
        header = encode_payment_signature(
            PaymentPayload(x402_version=X402_VERSION, accepted=requirements, payload=payload)
        )
        self.core.record_payment(
            escrow_id=authorization.nonce,
            chain_id=self.core.chain.chain_id,
            escrow=req.extra.escrow,
            method="",
            url="",
            headers={},
            body=b"",
            terms=terms,
            valid_before=authorization.valid_before,
            payment_header=header,
        )
        return payload

    def verify_delivery(self, response: httpx.Response) -> bytes:
        """Check a paid response's body against its PAYMENT-RESPONSE deliveryHash; journals and returns the body."""
        extra = SettlementExtra.from_json(decode_payment_response(response.headers[PAYMENT_RESPONSE_HEADER]).extra)
        received = delivery_hash(response.content)
        if extra.delivery_hash != received:
            self.core.journal.update(
                extra.escrow_id, PaymentState.MISMATCH, response_hash=received, committed_hash=extra.delivery_hash
            )
            raise DeliveryMismatch(extra.escrow_id, extra.delivery_hash, received)
        self.core.journal.update(
            extra.escrow_id, PaymentState.DELIVERED, response_hash=received, committed_hash=extra.delivery_hash
        )
        return response.content
