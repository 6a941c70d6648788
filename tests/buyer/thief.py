"""A dishonest seller: it names as `extra.escrow` an address it controls, and takes what a buyer signs to it.

Not the project's middleware (a thief does not run it): a small Starlette app that answers a
well-formed delivery-escrow 402 (the requestHash is right, so only the escrow check can save the
buyer) and, given a signed payment, redeems it as the named "escrow" allows:

- `eoa`: its own wallet is the escrow; it calls the token's receiveWithAuthorization itself
  (to == msg.sender) and keeps the money;
- `lookalike`: a LookAlikeEscrow it deployed; it deposits the payment like a real seller, then
  drains the contract through its back door;
- `token`: the token contract itself; nobody can redeem that, but the buyer must still refuse;
- anything else: redeems nothing (a seller that lies about something other than the escrow).

Every paid request is answered 200 with a PAYMENT-RESPONSE whose deliveryHash matches the body,
so a buyer that signs believes it was served.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from eth_abi.abi import encode
from eth_utils.crypto import keccak
from hexbytes import HexBytes
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route
from web3 import Web3
from x402.schemas import SettleResponse

from escrow_py.chain.escrow import Escrow
from escrow_py.chain.token import Token
from escrow_py.chain.tx import TxSender
from escrow_py.protocol.terms import canonical_url, request_hash
from escrow_py.protocol.wire import (
    PAYMENT_REQUIRED_HEADER,
    PAYMENT_RESPONSE_HEADER,
    PAYMENT_SIGNATURE_HEADER,
    EscrowExtra,
    EscrowPayload,
    EscrowRequirements,
    SettlementExtra,
    decode_payment_signature,
    encode_payment_required,
    encode_payment_response,
    payment_required,
)

NETWORK = "eip155:84532"
BODY = b'{"article": "you paid for this"}'


@dataclass
class Thief:
    """The dishonest seller's app and what it managed to do."""

    w3: Web3
    sender: TxSender  # the thief's own key
    token: Token
    escrow: str  # the address it names as the escrow
    kind: str  # "eoa", "lookalike" or "token"
    amount: int
    paid_requests: int = 0
    redeemed: list[bytes] = field(default_factory=list)  # the transactions that took a buyer's money

    def app(self) -> Starlette:
        return Starlette(routes=[Route("/article/{name:path}", self._article, methods=["GET"])])

    def _article(self, request: Request) -> Response:  # sync: Starlette runs it in a worker thread
        header = request.headers.get(PAYMENT_SIGNATURE_HEADER)
        if header is None:
            return self._payment_required(request)
        self.paid_requests += 1
        payload = EscrowPayload.from_json(decode_payment_signature(header).payload)
        transaction = self._redeem(payload)
        settle = SettleResponse(
            success=True,
            transaction="0x" + transaction.hex(),
            network=NETWORK,
            payer=payload.terms.buyer,
            extra=SettlementExtra(
                escrow_id=payload.authorization.nonce, deadline=payload.terms.deadline, delivery_hash=keccak(BODY)
            ).to_json(),
        )
        headers = {PAYMENT_RESPONSE_HEADER: encode_payment_response(settle)}
        return Response(BODY, media_type="application/json", headers=headers)

    def _payment_required(self, request: Request) -> Response:
        query = request.scope["query_string"]
        raw_target = request.scope["raw_path"] + (b"?" + query if query else b"")
        url = canonical_url(f"{request.url.scheme}://{request.headers['host']}".encode() + raw_target)
        requirements = EscrowRequirements(
            network=NETWORK,
            amount=self.amount,
            asset=self.token.address,
            pay_to=self.sender.address,
            max_timeout_seconds=120,
            extra=EscrowExtra(
                name="USDC",
                version="2",
                escrow=self.escrow,
                operator=self.sender.address,
                request_hash=request_hash(request.method, url),
            ),
        )
        offer = payment_required(url, [requirements.to_model()])
        return Response(b"{}", status_code=402, headers={PAYMENT_REQUIRED_HEADER: encode_payment_required(offer)})

    def _redeem(self, payload: EscrowPayload) -> bytes:
        auth = payload.authorization
        if self.kind == "eoa":
            fn = self.token.contract.get_function_by_signature(
                "receiveWithAuthorization(address,address,uint256,uint256,uint256,bytes32,bytes)"
            )
            args = (auth.from_, auth.to, auth.value, auth.valid_after, auth.valid_before, auth.nonce, payload.signature)
            data = bytes(HexBytes(fn(*args)._encode_transaction_data()))
            receipt = self.sender.transact(self.token.address, data)
        elif self.kind == "lookalike":
            Escrow(self.w3, self.escrow).deposit(self.sender, payload.terms, auth, payload.signature)
            back_door = encode(["address", "address", "uint256"], [self.token.address, self.sender.address, auth.value])
            receipt = self.sender.transact(self.escrow, back_door)
        else:
            return bytes(32)  # e.g. an authorization to the token itself: nobody can redeem it
        tx = bytes(receipt["transactionHash"])
        self.redeemed.append(tx)
        return tx
