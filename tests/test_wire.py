"""The delivery-escrow wire format: round trips, the SDK's own decoders, and refusals with reasons."""

from __future__ import annotations

import base64
import json
import os

import httpx
import pytest
from eth_utils.address import to_checksum_address
from x402.http.utils import (
    decode_payment_required_header,
    decode_payment_response_header,
    decode_payment_signature_header,
)
from x402.schemas import PaymentPayload, PaymentRequired, PaymentRequirements, SettleResponse

from escrow_devtools.anvil import dev_signer
from escrow_py.protocol import codec, wire
from escrow_py.protocol.eip3009 import Authorization, authorization_for, sign_authorization
from escrow_py.protocol.errors import ProtocolError
from escrow_py.protocol.reasons import Reason
from escrow_py.protocol.terms import State, Terms, request_hash

ESCROW = "0x" + "ee" * 20
TOKEN = to_checksum_address("0x036CbD53842c5426634e7929541eC2318f3dCF7e")
BUYER, SELLER = dev_signer(1), dev_signer(2)
RESOURCE = "http://127.0.0.1:8000/report/7"


def _requirements() -> wire.EscrowRequirements:
    extra = wire.EscrowExtra(
        name="USDC", version="2", escrow=ESCROW, operator=SELLER.address, request_hash=request_hash("GET", RESOURCE)
    )
    return wire.EscrowRequirements(
        network="eip155:84532", amount=10_000, asset=TOKEN, pay_to=SELLER.address, max_timeout_seconds=120, extra=extra
    )


def _payload() -> wire.EscrowPayload:
    req = _requirements()
    terms = Terms(buyer=BUYER.address, seller=SELLER.address, operator=SELLER.address, token=TOKEN, amount=10_000,
                  deadline=1_800_000_000, request_hash=req.extra.request_hash, salt=os.urandom(32))  # fmt: skip
    auth = authorization_for(terms, ESCROW, 84532, 0, terms.deadline)
    signature = sign_authorization(BUYER, req.token_domain(), auth)
    return wire.EscrowPayload(authorization=auth, signature=signature, terms=terms)


def test_payment_required_decodes_with_the_sdk_decoder() -> None:
    header = wire.encode_payment_required(wire.payment_required(RESOURCE, [_requirements().to_model()]))
    decoded = decode_payment_required_header(header)
    assert decoded.x402_version == 2
    assert isinstance(decoded, PaymentRequired)
    assert decoded.resource is not None and decoded.resource.url == RESOURCE
    entry = decoded.accepts[0]
    assert isinstance(entry, PaymentRequirements) and entry.extra is not None
    assert (entry.scheme, entry.network, entry.amount, entry.pay_to) == (
        "delivery-escrow",
        "eip155:84532",
        "10000",
        SELLER.address,
    )
    assert entry.extra["requestHash"] == "0x" + request_hash("GET", RESOURCE).hex()
    assert wire.EscrowRequirements.from_model(entry) == _requirements()


def test_payment_signature_round_trips_through_the_sdk_and_back() -> None:
    payload = _payload()
    model = PaymentPayload(x402_version=2, accepted=_requirements().to_model(), payload=payload.to_json())
    header = wire.encode_payment_signature(model)
    assert decode_payment_signature_header(header).payload == payload.to_json()
    assert wire.EscrowPayload.from_json(wire.decode_payment_signature(header).payload) == payload


def test_settlement_response_round_trips() -> None:
    extra = wire.SettlementExtra(
        escrow_id=os.urandom(32), deadline=1_800_000_000, delivery_hash=os.urandom(32), state=State.HELD
    )
    model = SettleResponse(success=True, transaction="0x" + "ab" * 32, network="eip155:84532", extra=extra.to_json())
    header = wire.encode_payment_response(model)
    assert wire.SettlementExtra.from_json(decode_payment_response_header(header).extra) == extra


def _b64(text: str) -> str:
    return base64.b64encode(text.encode()).decode()


@pytest.mark.parametrize(
    ("header", "reason"),
    [
        ("not base64!", Reason.INVALID_PAYLOAD),
        (_b64("{not json"), Reason.INVALID_PAYLOAD),
        (_b64("[1, 2]"), Reason.INVALID_PAYLOAD),
        (_b64(json.dumps({"x402Version": 1})), Reason.UNSUPPORTED_VERSION),
        (_b64(json.dumps({"x402Version": 2, "payload": {}})), Reason.INVALID_PAYLOAD),
        ("A" * (wire.MAX_HEADER_BYTES + 4), Reason.HEADER_TOO_LARGE),
        # Bounded before anything is built: nesting (RecursionError), integer width, NaN, infinity.
        (_b64("[" * 2000), Reason.INVALID_PAYLOAD),
        (_b64('{"a":' + "[" * (codec.MAX_JSON_DEPTH) + "]" * codec.MAX_JSON_DEPTH + "}"), Reason.INVALID_PAYLOAD),
        (_b64('{"x402Version": 2, "n": ' + "9" * 79 + "}"), Reason.INVALID_PAYLOAD),
        (_b64('{"x402Version": 2, "n": NaN}'), Reason.INVALID_PAYLOAD),
        (_b64('{"x402Version": 2, "n": 1e999}'), Reason.INVALID_PAYLOAD),
    ],
)
def test_undecodable_signatures_are_refused_with_a_reason(header: str, reason: Reason) -> None:
    with pytest.raises(ProtocolError) as info:
        wire.decode_payment_signature(header)
    assert info.value.reason == reason


@pytest.mark.parametrize(
    ("mutate", "message"),
    [
        (lambda p: p.pop("signature"), "signature"),
        (lambda p: p.update(signature="0x1234"), "signature has 2 bytes"),
        (lambda p: p["terms"].update(amount="-1"), "amount"),
        (lambda p: p["terms"].update(buyer="0xnothex"), "terms"),
        (lambda p: p["terms"].update(extra="field"), "unexpected"),
        (lambda p: p["authorization"].update(nonce="0x12"), "nonce"),
        (lambda p: p["authorization"].pop("validBefore"), "validBefore is missing"),
        (lambda p: p["authorization"].update(value=True), "value"),
        # Every number bounded to its ABI width, in ASCII digits only.
        (lambda p: p["authorization"].update(validBefore=str(2**256)), "validBefore"),
        (lambda p: p["authorization"].update(validAfter=2**256), "validAfter"),
        (lambda p: p["authorization"].update(value="\u0661\u0662"), "value"),
        (lambda p: p["terms"].update(amount=str(2**256)), "amount"),
        (lambda p: p["terms"].update(deadline=2**64), "deadline"),
        (lambda p: p["terms"].update(deadline="1e3"), "deadline"),
        (lambda p: p["authorization"].update(nonce=["0x12"]), "nonce"),
    ],
)
def test_malformed_payloads_name_the_field(mutate: object, message: str) -> None:
    data = _payload().to_json()
    mutate(data)  # type: ignore[operator]
    with pytest.raises(ProtocolError, match=message) as info:
        wire.EscrowPayload.from_json(data)
    assert info.value.reason == Reason.INVALID_PAYLOAD


def test_requirements_of_another_scheme_are_refused() -> None:
    model = _requirements().to_model()
    model.scheme = "exact"
    with pytest.raises(ProtocolError) as info:
        wire.EscrowRequirements.from_model(model)
    assert info.value.reason == Reason.UNSUPPORTED_SCHEME


def test_network_ids_are_caip2() -> None:
    assert wire.network_of(84532) == "eip155:84532"
    assert wire.chain_id_of("eip155:8453") == 8453
    for bad in ("solana:mainnet", "eip155:\u00b2", "eip155:" + "9" * 80):
        with pytest.raises(ProtocolError):
            wire.chain_id_of(bad)


def test_a_nesting_at_the_limit_still_decodes_and_a_settlement_deadline_is_a_uint64() -> None:
    nested = '{"x402Version": 2, "a": ' + "[" * (codec.MAX_JSON_DEPTH - 1) + "]" * (codec.MAX_JSON_DEPTH - 1) + "}"
    with pytest.raises(ProtocolError, match="payload is missing"):  # past the depth check, refused by the model
        wire.decode_payment_signature(_b64(nested))
    extra = wire.SettlementExtra(escrow_id=os.urandom(32), deadline=1).to_json()
    extra["deadline"] = 2**64
    with pytest.raises(ProtocolError, match="uint64"):
        wire.SettlementExtra.from_json(extra)


def _unavailable(
    status: int = 503, body: object = None, headers: dict[str, str] | None = None
) -> wire.Unavailable | None:
    content = json.dumps({"error": "operator_unfunded", "message": "no gas"} if body is None else body).encode()
    # As bytes off the wire: a header value is any latin-1 text, not only ASCII.
    raw = httpx.Headers([(k.encode(), v.encode("latin-1")) for k, v in (headers or {}).items()])
    return wire.Unavailable.decode(status, raw, content)


def test_the_sellers_503_round_trips_and_only_its_own_reasons_count() -> None:
    sent = wire.Unavailable(Reason.DEPOSIT_PENDING, "not confirmed yet", 10)
    assert wire.Unavailable.decode(503, httpx.Headers({"Retry-After": "10"}), sent.body()) == sent
    assert _unavailable(headers={"Retry-After": "30"}) == wire.Unavailable(Reason.OPERATOR_UNFUNDED, "no gas", 30)
    # Not the seller's own failure: another status, another reason, a proxy's HTML, a 402's reason.
    assert _unavailable(status=502) is None
    assert _unavailable(body={"error": "upstream down"}) is None
    assert _unavailable(body={"error": Reason.SIMULATION_FAILED.value}) is None
    assert _unavailable(body=["operator_unfunded"]) is None
    assert wire.Unavailable.decode(503, httpx.Headers(), b"<html>Service Unavailable</html>") is None
    assert _unavailable(body={"error": "operator_unfunded", "message": "x" * 5000}) is None  # too large to be ours
    # A handler's own 503 carries the payment's outcome (PAYMENT-RESPONSE): final, never resent.
    assert _unavailable(headers={wire.PAYMENT_RESPONSE_HEADER: "e30="}) is None
    assert _unavailable(headers={wire.PAYMENT_REQUIRED_HEADER: "e30="}) is None


@pytest.mark.parametrize(
    ("retry_after", "seconds"),
    [(None, 1), ("0", 0), ("7", 7), ("999999999", 999_999_999), ("9" * 400, 1), ("-5", 1), ("2.5", 1),
     ("Wed, 21 Oct 2015 07:28:00 GMT", 1), ("\xb2", 1)],
)  # fmt: skip
def test_a_retry_after_that_is_not_plain_seconds_counts_as_one(retry_after: str | None, seconds: int) -> None:
    headers = {} if retry_after is None else {"Retry-After": retry_after}
    decoded = _unavailable(headers=headers)
    assert decoded is not None and decoded.retry_after == seconds


def test_the_payload_and_settlement_bytes_are_the_documented_wire_form() -> None:
    """docs/design.md section 3 is an interface: field order, names and number and hex forms are pinned here."""
    terms = Terms(buyer="0x" + "ab" * 20, seller="0x" + "cd" * 20, operator="0x" + "ef" * 20, token="0x" + "12" * 20,
                  amount=10**20, deadline=1_800_000_000, request_hash=b"\1" * 32, salt=b"\2" * 32)  # fmt: skip
    auth = Authorization(from_=terms.buyer, to="0x" + "34" * 20, value=10**20, valid_after=0,
                         valid_before=1_800_000_000, nonce=b"\3" * 32)  # fmt: skip
    payload = wire.EscrowPayload(authorization=auth, signature=b"\5" * 65, terms=terms)
    h = "0x" + "{}" * 32
    expected = (
        '{"authorization":{"from":"0xABaBaBaBABabABabAbAbABAbABabababaBaBABaB",'
        '"to":"0x3434343434343434343434343434343434343434","value":"100000000000000000000",'
        f'"validAfter":"0","validBefore":"1800000000","nonce":"{h.format(*["03"] * 32)}"}},'
        f'"signature":"0x{"05" * 65}",'
        '"terms":{"buyer":"0xABaBaBaBABabABabAbAbABAbABabababaBaBABaB",'
        '"seller":"0xCdCDCdCdcdcdcdCdcDcDCdcDcDCdCdcdCdcDCDcD","operator":"0xeFEfeFEfeFeFEFEFEfefeFeFefEfEfEfeFEFEFEf",'
        '"token":"0x1212121212121212121212121212121212121212","amount":"100000000000000000000",'
        f'"deadline":1800000000,"requestHash":"{h.format(*["01"] * 32)}","salt":"{h.format(*["02"] * 32)}"}}}}'
    )
    assert json.dumps(payload.to_json(), separators=(",", ":")) == expected
    assert wire.EscrowPayload.from_json(json.loads(expected)) == payload
    extra = wire.SettlementExtra(escrow_id=b"\7" * 32, deadline=5, refund_transaction=b"\3" * 32,
                                 settlement=wire.SettlementStatus.PENDING)  # fmt: skip
    assert extra.to_json() == {"escrowId": "0x" + "07" * 32, "deadline": 5, "refundTransaction": "0x" + "03" * 32,
                               "settlement": "pending"}  # fmt: skip
    assert list(extra.to_json()) == ["escrowId", "deadline", "refundTransaction", "settlement"]


def test_the_settlement_state_is_the_chain_state_by_its_lower_case_name() -> None:
    extra = wire.SettlementExtra(escrow_id=b"\7" * 32, deadline=5, state=State.RELEASED)
    assert extra.to_json()["state"] == "released"
    assert wire.SettlementExtra.from_json(extra.to_json()).state is State.RELEASED
    # Advisory: a state this version does not know (or a wrong type) is no state, not a refusal.
    for unknown in ("settled-later", "HELD", 3, None):
        assert wire.SettlementExtra.from_json({**extra.to_json(), "state": unknown}).state is None
    assert "state" not in wire.SettlementExtra(escrow_id=b"\7" * 32, deadline=5).to_json()
