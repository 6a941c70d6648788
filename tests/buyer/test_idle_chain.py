"""A payment signed on an idle automine chain is still in time when it is mined (issue 11).

An automine chain makes a block only for a transaction, so its latest block is as old as the
last sale; the next block is stamped with the time it is mined. A deadline and a validBefore
counted from the latest block were already past when the deposit landed, and every payment
after two quiet minutes failed with simulation_failed. They now count from the next block's
time (escrow_py.chain.clock.next_block_time: the pending block's timestamp).

anvil's evm_increaseTime, with no block mined, is exactly what idling does to the chain: the
latest block keeps its stamp and the pending one moves on (the buyer reads no wall clock). One
test also waits for real, with a short window, to show the same without time controls.
"""

from __future__ import annotations

import time
from pathlib import Path

import localhttp
from fixtures.chain import Chain
from helpers import BUYER, OPERATOR, dev

from escrow_py.buyer import DeliveryEscrowScheme, EscrowClient, Journal, PaymentState
from escrow_py.protocol.terms import State
from escrow_py.protocol.wire import PAYMENT_REQUIRED_HEADER, EscrowPayload, decode_payment_required

from .shop import Shop, make_shop, serving

IDLE = 120  # the two minutes


def _block_time(chain: Chain, tag: str) -> int:
    return int(chain.w3.provider.make_request("eth_getBlockByNumber", [tag, False])["result"]["timestamp"], 16)  # type: ignore[arg-type]


def _stand_idle(chain: Chain, seconds: int) -> None:
    """What `seconds` without a transaction do to an automine chain: the next block's stamp moves on, no block."""
    latest = _block_time(chain, "latest")
    chain.w3.provider.make_request("evm_increaseTime", [seconds])  # type: ignore[arg-type]
    assert _block_time(chain, "latest") == latest
    assert _block_time(chain, "pending") >= latest + seconds


def test_a_payment_signed_after_two_idle_minutes_deposits_in_time(chain: Chain, served: str, tmp_path: Path) -> None:
    # The SDK plugin signs the seller's own requirements; the signed payment is deposited as the seller would.
    requirements = decode_payment_required(localhttp.get(f"{served}/report/idle").headers[PAYMENT_REQUIRED_HEADER])
    scheme = DeliveryEscrowScheme(dev(BUYER), chain.node.url, tmp_path / "buyer.sqlite")
    _stand_idle(chain, IDLE)
    payload = EscrowPayload.from_json(scheme.create_payment_payload(requirements.accepts[0]))
    terms, auth = payload.terms, payload.authorization
    # main: DeadlinePassed(deadline, now) with deadline == now: the whole window had gone by while idle.
    receipt = chain.escrow.deposit(chain.sender(OPERATOR), terms, auth, payload.signature)
    mined_at = int(chain.w3.eth.get_block(receipt["blockNumber"])["timestamp"])
    assert chain.escrow.state_of(auth.nonce) is State.HELD
    # The seller keeps (nearly) the whole window it asked for, counted from when the deposit was mined.
    assert IDLE - 5 <= terms.deadline - mined_at <= IDLE
    assert auth.valid_before == terms.deadline


def test_the_client_pays_through_the_seller_after_two_idle_minutes(chain: Chain, tmp_path: Path) -> None:
    # The seller on main judges a deadline by its own latest block too: its tolerance for a deadline
    # beyond its own clock (deadline_slack) is widened so that this test judges the buyer's window alone.
    shop: Shop = make_shop(chain, tmp_path, deadline_slack=3 * IDLE)
    journal = tmp_path / "buyer.sqlite"
    with serving(shop.app) as base, EscrowClient(dev(BUYER), chain.node.url, journal) as client:
        _stand_idle(chain, IDLE)
        response = client.get(f"{base}/report/idle")  # main: PaymentRejected (simulation_failed)
    assert response.status_code == 200 and response.json()["item"] == "idle"
    (entry,) = Journal(journal).entries()
    assert entry.state is PaymentState.DELIVERED
    assert chain.escrow.state_of(entry.escrow_id) in (State.HELD, State.RELEASED)  # the seller's poster may be done


def test_a_chain_left_idle_in_real_time_does_not_expire_the_payment(chain: Chain, tmp_path: Path) -> None:
    # No time controls: a 12-second window and a chain that stands still for longer than that.
    window = 12
    shop = make_shop(chain, tmp_path, max_timeout_seconds=window)  # the seller's own defaults otherwise
    journal = tmp_path / "buyer.sqlite"
    with serving(shop.app) as base, EscrowClient(dev(BUYER), chain.node.url, journal) as client:
        give_up = time.monotonic() + 120
        while _block_time(chain, "pending") - _block_time(chain, "latest") <= window + 2:
            assert time.monotonic() < give_up, "the chain's clock did not move"
            time.sleep(0.25)
        response = client.get(f"{base}/report/waited")  # main: PaymentRejected (simulation_failed)
    assert response.status_code == 200
    (entry,) = Journal(journal).entries()
    assert entry.state is PaymentState.DELIVERED
