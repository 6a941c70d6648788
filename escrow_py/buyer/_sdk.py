"""The delivery-escrow scheme as a plugin of the official `x402` SDK's client.

    from x402 import x402Client
    client = x402Client().register("eip155:84532", DeliveryEscrowScheme(signer, rpc_url, "buyer.sqlite"))
    # or DeliveryEscrowScheme(settings): the BuyerSettings every buyer entry point takes

The SDK hands a scheme only the requirements, never the request, so the plugin
signs extra.requestHash as given (the seller recomputes it on the paid request
and refuses a payment for another request). Each payment is journaled before it
is returned to the SDK, without a request to replay: recover() can refund or
void it, not fetch its bytes again.

The SDK never shows a scheme the paid response, so the plugin checks it as an httpx
response hook: every response that answers one of its payments is judged before the
caller sees it (body against PAYMENT-RESPONSE's deliveryHash), and a body that is not
the one paid for raises DeliveryMismatch out of the caller's request:

    http = httpx.AsyncClient(transport=x402_httpx_transport(client),
                             event_hooks={"response": [scheme.check_response]})

(`check_response_sync` for httpx.Client.) `verify_delivery(response)` does the same by hand.

The SDK pays only assets it knows (its default-asset table) unless told otherwise; for a
local chain's TestUSDC or any other token, allow it with a cap:

    client.set_spend_controls({"allowed_assets": [
        {"network": "eip155:84532", "asset": token, "max_amount_per_payment": "10000"}]})
"""

from __future__ import annotations

from types import TracebackType
from typing import Any, Self

import anyio.to_thread
import httpx
from x402.mechanisms.evm import find_default_asset
from x402.schemas import PaymentRequirements

from escrow_py.buyer._core import PaymentCore
from escrow_py.buyer._errors import PaymentError, PaymentRefused
from escrow_py.buyer._journal import JournalEntry, PaymentState, Replay
from escrow_py.buyer._offer import wire_url
from escrow_py.buyer._settings import BuyerSettings, JournalLike, no_other_options, settings_of
from escrow_py.chain.signer import Signer
from escrow_py.protocol.errors import ProtocolError
from escrow_py.protocol.reasons import Reason
from escrow_py.protocol.terms import delivery_hash, request_hash
from escrow_py.protocol.wire import (
    PAYMENT_RESPONSE_HEADER,
    PAYMENT_SIGNATURE_HEADER,
    SCHEME,
    EscrowPayload,
    EscrowRequirements,
    SettlementExtra,
    decode_payment_response,
    decode_payment_signature,
)


class DeliveryEscrowScheme:
    """A `SchemeNetworkClient` (x402.interfaces) for the delivery-escrow scheme."""

    scheme = SCHEME
    # How the SDK's spend controls recognise the assets of its table (Base Sepolia and Base USDC) on
    # this scheme's offers; without it every delivery-escrow offer needs an allowed_assets entry.
    find_default_asset = staticmethod(find_default_asset)

    def __init__(
        self,
        settings: BuyerSettings | Signer,
        rpc_url: str | None = None,
        journal: JournalLike | None = None,
        **options: Any,
    ) -> None:
        # The SDK never shows the plugin the request: a Policy with a host allowlist denies (host_unknown).
        # The SDK sends the paid request itself, so the settings' ResendPolicy is never used here.
        self.settings = settings_of(settings, rpc_url, journal, options)
        no_other_options("DeliveryEscrowScheme", options)
        self.core = PaymentCore(self.settings)

    def create_payment_payload(self, requirements: PaymentRequirements) -> dict[str, Any]:
        """Sign the requirements (after the same checks as EscrowClient: genuine escrow, network, token,
        balance, policy) and journal the payment; raises a PaymentRefused, nothing signed, on any failure."""
        try:
            req = EscrowRequirements.from_model(requirements)
        except ProtocolError as exc:
            raise PaymentRefused(Reason.INVALID_REQUIREMENTS, str(exc)) from None
        # The SDK builds the header itself; the journal keeps the same envelope so the row is complete.
        return self.core.pay(req, req.extra.request_hash, None, accepted=requirements, replay=Replay()).payload

    def close(self) -> None:
        """Close the journal (and its audit log) if the plugin opened it."""
        self.core.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None) -> None:
        self.close()

    async def check_response(self, response: httpx.Response) -> None:
        """httpx async response hook: judge a response that answers one of this plugin's payments."""
        if self._answers_ours(response):
            await response.aread()
            await anyio.to_thread.run_sync(self.verify_delivery, response)

    def check_response_sync(self, response: httpx.Response) -> None:
        """httpx sync response hook: as check_response."""
        if self._answers_ours(response):
            response.read()
            self.verify_delivery(response)

    def _answers_ours(self, response: httpx.Response) -> bool:
        """The response carries a delivery-escrow PAYMENT-RESPONSE for an escrow this journal signed."""
        value = response.headers.get(PAYMENT_RESPONSE_HEADER)
        if value is None:
            return False
        try:
            escrow_id = SettlementExtra.from_json(decode_payment_response(value).extra).escrow_id
        except ProtocolError:
            return False  # another scheme's answer (exact's carries no escrowId)
        return self.core.journal.get(escrow_id) is not None

    def verify_delivery(self, response: httpx.Response) -> bytes:
        """Judge a paid response as EscrowClient does and return its body if it is the one paid for.

        The payment is found by PAYMENT-RESPONSE's escrowId (or, without one, by the PAYMENT-SIGNATURE
        of the request, when the response carries it) in this plugin's journal. Raises DeliveryMismatch,
        PaymentNotDelivered, PaymentRejected or HandlerFailedRefunded as EscrowClient would (and
        ResponseInvalid when the settings' validator rejects the body), and a bare PaymentError when the
        response does not say which journaled payment it answers, names one already judged (unless it
        brings the same delivered bytes again: those are validated and returned, nothing is written), or
        answers a request other than the one the payment was signed for (its requestHash, when the
        response carries its request).
        """
        escrow_id = _answered_escrow_id(response)
        if escrow_id is None:
            raise PaymentError(
                "the response says no escrow (no readable PAYMENT-RESPONSE, no PAYMENT-SIGNATURE on its request): "
                "which payment it answers is unknown; recover() settles every journaled payment"
            )
        entry = self.core.journal.get(escrow_id)
        if entry is None:
            raise PaymentError(
                f"the response names escrow 0x{escrow_id.hex()}, which this journal never signed", escrow_id=escrow_id
            )
        if entry.state is not PaymentState.SIGNED:
            _judged_before(entry, response)
        elif (answered := _request_hash_of(response)) is not None and answered != entry.terms.request_hash:
            raise PaymentError(
                f"the response names escrow 0x{escrow_id.hex()}, signed for requestHash "
                f"0x{entry.terms.request_hash.hex()}, but answers another request ({response.request.method} "
                f"hashing to 0x{answered.hex()}): it is not that payment's delivery, and the journal is left as it "
                "was (the payment stays signed)",
                escrow_id=escrow_id,
            )
        else:
            self.core.settle(entry, response)
        self.core.validate(escrow_id, None, response)  # the same bytes again are validated again
        return response.content


def _judged_before(entry: JournalEntry, response: httpx.Response) -> None:
    """An answer naming a payment the journal has already judged: the same delivered bytes again (the hook,
    then the caller by hand) pass; anything else is refused with the journal left as it is.

    Escrow ids are public and the hook sees every response of its client: a response that could judge a payment
    again could turn a delivery into a mismatch (with hashes of its choosing) or a rejection.
    """
    received = delivery_hash(response.content)
    if entry.state in (PaymentState.DELIVERED, PaymentState.UNSETTLED) and entry.response_hash == received:
        return
    raise PaymentError(
        f"the response ({response.status_code}, body hashing to 0x{received.hex()}) names escrow "
        f"0x{entry.escrow_id.hex()}, whose payment was already judged {entry.state.value} (journaled body hash "
        f"{'none' if entry.response_hash is None else '0x' + entry.response_hash.hex()}): it is not the answer "
        "to that payment, and the journal is left as it was",
        escrow_id=entry.escrow_id,
    )


def _request_hash_of(response: httpx.Response) -> bytes | None:
    """The requestHash of the request `response` answers, as the seller hashes it from the wire; None when the
    response carries no request (one built by hand) or its request cannot be hashed.

    A receipt names its escrow, and escrow ids are public: only the request binds an answer to its payment.
    """
    try:
        sent = response.request
        return request_hash(sent.method, wire_url(sent), sent.content)
    except (RuntimeError, httpx.RequestNotRead, ValueError):  # no request; a streamed body; no canonical URL
        return None


def _answered_escrow_id(response: httpx.Response) -> bytes | None:
    """The escrow a paid response answers: PAYMENT-RESPONSE's escrowId, else its request's authorization nonce."""
    value = response.headers.get(PAYMENT_RESPONSE_HEADER)
    if value is not None:
        try:
            return SettlementExtra.from_json(decode_payment_response(value).extra).escrow_id
        except ProtocolError:
            pass
    try:
        header = response.request.headers.get(PAYMENT_SIGNATURE_HEADER)
    except RuntimeError:  # httpx raises when the response was built without a request
        return None
    if header is None:
        return None
    try:
        return EscrowPayload.from_json(decode_payment_signature(header).payload).authorization.nonce
    except ProtocolError:
        return None
