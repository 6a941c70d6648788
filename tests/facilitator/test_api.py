"""The facilitator's endpoints on a real chain: settle deposits, deliver releases in a batch, refund refunds."""

from __future__ import annotations

import asyncio
import time

from fixtures.chain import Chain
from helpers import BUYER, OPERATOR, SELLER, address
from x402 import x402ResourceServer
from x402.http import AuthHeaders, FacilitatorConfig, HTTPFacilitatorClient
from x402.schemas import PaymentPayload, PaymentRequirements

from escrow_py.protocol.terms import State, delivery_hash

from .kit import Fac, idem, requirements, signed


def wait_for(condition, timeout: float = 120.0) -> None:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "condition not met in time"
        time.sleep(0.1)


def test_supported_names_the_escrow_operator_and_token(chain: Chain, fac: Fac) -> None:
    with fac.client() as http:
        answer = http.get("/supported").json()
    (kind,) = answer["kinds"]
    assert (kind["scheme"], kind["network"]) == ("delivery-escrow", "eip155:84532")
    assert kind["extra"]["escrow"] == chain.escrow.address
    assert kind["extra"]["operator"] == address(OPERATOR)
    assert kind["extra"]["asset"] == chain.token.address
    assert answer["signers"] == {"eip155:*": [address(OPERATOR)]}


def test_settle_deliver_release(chain: Chain, fac: Fac) -> None:
    payment, body = signed(chain, requirements(chain))
    with fac.client(fac.key) as http:
        verdict = http.post("/verify", json=body).json()
        assert verdict == {"isValid": True, "payer": address(BUYER)}
        assert chain.escrow.state_of(payment.escrow_id) == State.NONE  # verify moves nothing
        settled = http.post("/settle", json=body)
        assert settled.status_code == 200, settled.text
        answer = settled.json()
        assert answer["success"] is True and answer["transaction"].startswith("0x")
        assert answer["extra"]["escrowId"] == "0x" + payment.escrow_id.hex()
        assert chain.escrow.state_of(payment.escrow_id) == State.HELD
        # The same payment again: the same deposit, no second transaction.
        again = http.post("/settle", json=body)
        assert again.json()["transaction"] == answer["transaction"]
        hashed = delivery_hash(b'{"item":"1"}')
        entry = {"escrowId": "0x" + payment.escrow_id.hex(), "deliveryHash": "0x" + hashed.hex()}
        queued = http.post("/deliver", json={"deliveries": [entry]}, headers={"Idempotency-Key": idem()})
        assert queued.status_code == 202, queued.text
        wait_for(lambda: chain.escrow.state_of(payment.escrow_id) == State.RELEASED)
        shown = http.get(f"/escrows/0x{payment.escrow_id.hex()}").json()
        assert shown["delivery"]["deliveryHash"] == "0x" + hashed.hex()
        wait_for(lambda: http.get(f"/escrows/0x{payment.escrow_id.hex()}").json()["delivery"]["status"] == "posted")


def test_deliveries_of_several_payments_go_in_one_batch(chain: Chain, fac: Fac) -> None:
    ids = []
    with fac.client(fac.key) as http:
        for _ in range(3):
            payment, body = signed(chain, requirements(chain))
            assert http.post("/settle", json=body).json()["success"] is True
            ids.append(payment.escrow_id)
        entries = [{"escrowId": "0x" + i.hex(), "deliveryHash": "0x" + delivery_hash(i).hex()} for i in ids]
        assert (
            http.post("/deliver", json={"deliveries": entries}, headers={"Idempotency-Key": idem()}).status_code == 202
        )
    wait_for(lambda: all(chain.escrow.state_of(i) == State.RELEASED for i in ids))
    txs = {fac.facilitator.store.delivery(i).tx_hash for i in ids}  # type: ignore[union-attr]
    assert len(txs) == 1  # one deliverMany for the three


def test_refund_after_a_failed_handler(chain: Chain, fac: Fac) -> None:
    payment, body = signed(chain, requirements(chain))
    with fac.client(fac.key) as http:
        assert http.post("/settle", json=body).json()["success"] is True
        before = chain.token.balance_of(address(BUYER))
        refunded = http.post("/refund", json={"escrowId": "0x" + payment.escrow_id.hex()},
                             headers={"Idempotency-Key": idem()})  # fmt: skip
        assert refunded.status_code == 200, refunded.text
        assert refunded.json()["state"] == "refunded"
    assert chain.escrow.state_of(payment.escrow_id) == State.REFUNDED
    assert chain.token.balance_of(address(BUYER)) == before + payment.terms.amount


def test_an_invalid_payment_is_refused_in_the_body_not_deposited(chain: Chain, fac: Fac) -> None:
    payment, body = signed(chain, requirements(chain), terms_changes={"amount": 1})
    with fac.client(fac.key) as http:
        verdict = http.post("/verify", json=body).json()
        assert verdict["isValid"] is False and verdict["invalidReason"] == "amount_mismatch"
        settled = http.post("/settle", json=body).json()
        assert settled["success"] is False and settled["errorReason"] == "amount_mismatch"
    assert chain.escrow.state_of(payment.escrow_id) == State.NONE


def test_the_sdk_http_facilitator_client_verifies_and_settles(chain: Chain, fac: Fac) -> None:
    """x402's own HTTPFacilitatorClient, with the API key from an AuthProvider, against the facilitator."""

    class ApiKey:
        def get_auth_headers(self) -> AuthHeaders:
            h = {"Authorization": f"Bearer {fac.key}"}
            return AuthHeaders(verify=h, settle=h, supported=h)

    client = HTTPFacilitatorClient(FacilitatorConfig(url=fac.url, auth_provider=ApiKey(), timeout=60))
    server = x402ResourceServer(client)
    supported = client.get_supported()
    assert supported.kinds[0].scheme == "delivery-escrow"
    payment, body = signed(chain, requirements(chain))
    payload = PaymentPayload.model_validate(body["paymentPayload"])
    reqs = PaymentRequirements.model_validate(body["paymentRequirements"])

    async def run() -> None:
        verdict = await client.verify(payload, reqs)
        assert verdict.is_valid, verdict
        settled = await client.settle(payload, reqs)
        assert settled.success and settled.extra is not None
        assert settled.extra["escrowId"] == "0x" + payment.escrow_id.hex()
        await client.aclose()

    asyncio.run(run())
    assert chain.escrow.state_of(payment.escrow_id) == State.HELD
    assert server is not None
    assert address(SELLER) == payment.terms.seller


def test_prometheus_metrics_count_requests_transactions_queues_and_held_value(chain: Chain, fac: Fac) -> None:
    payment, body = signed(chain, requirements(chain))
    with fac.client(fac.key) as http:
        assert http.post("/settle", json=body).json()["success"]
        assert http.post("/settle", content=b"{", headers={"content-type": "application/json"}).status_code == 422
        text = http.get("/metrics").text
    token = chain.token.address
    assert 'x402_facilitator_requests_total{endpoint="settle",status="200"} 1.0' in text
    assert 'x402_facilitator_requests_total{endpoint="settle",status="422"} 1.0' in text
    assert 'x402_facilitator_transactions_total{kind="deposit",outcome="mined"} 1.0' in text
    assert f'x402_facilitator_held_value{{token="{token}"}} 10000.0' in text
    assert 'x402_facilitator_queue_depth{queue="deliveries"} 0.0' in text
    assert 'x402_facilitator_escrows{state="held"} 1.0' in text
    assert chain.escrow.state_of(payment.escrow_id) == State.HELD
