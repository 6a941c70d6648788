"""A real facilitator on uvicorn (its own SQLite file) over the session's anvil, and sellers' keys for it."""

from __future__ import annotations

import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import localhttp
import pytest
from fixtures.chain import Chain
from helpers import OPERATOR, SELLER, SELLER2, address, dev
from hexbytes import HexBytes
from seller.payer import Payment, sign_payment
from seller.shop import served

from escrow_py.chain.escrow import SETTLED_TOPIC, Settled, decode_settlement_log
from escrow_py.facilitator import Facilitator, FacilitatorConfig, KeyStore, create_app
from escrow_py.protocol.wire import EscrowRequirements, SettlementMode, payment_required
from escrow_py.seller import offer_for

PRICE = 10_000
CONSOLE_TOKEN = "console-test-token"
URL = "http://shop.test/report/1"


@dataclass
class Fac:
    url: str
    facilitator: Facilitator
    keys: KeyStore
    key: str  # SELLER's
    other_key: str  # SELLER2's
    db: Path

    def client(self, key: str | None = None, **headers: str) -> httpx.Client:
        auth = {"Authorization": f"Bearer {key}"} if key else {}
        return localhttp.Client(base_url=self.url, headers={**auth, **headers}, timeout=60)


def fac_config(chain: Chain, db: Path, **overrides: Any) -> FacilitatorConfig:
    settings: dict[str, Any] = {
        "rpc_url": chain.node.url,
        "escrow": chain.escrow.address,
        "token": chain.token.address,
        "network": "eip155:84532",
        "operator": dev(OPERATOR),
        "store": db,
        "poster_interval": 0.2,
        "rate": 20.0,  # per key: low enough that the hostile test reaches the limit quickly
        "burst": 40,
    }
    settings.update(overrides)
    return FacilitatorConfig(**settings)


@pytest.fixture
def fac(chain: Chain, tmp_path: Path) -> Iterator[Fac]:
    chain.mine()  # the chain's clock to the wall clock: a reverted snapshot leaves it behind
    db = tmp_path / "facilitator.sqlite"
    keys = KeyStore(db)
    _, key = keys.create("shop", [address(SELLER)])
    _, other = keys.create("other shop", [address(SELLER2)])
    facilitator = Facilitator(fac_config(chain, db))
    with served(create_app(facilitator, keys, console_token=CONSOLE_TOKEN)) as (url, _server):
        yield Fac(url, facilitator, keys, key, other, db)
    facilitator.close()
    keys.close()


def requirements(
    chain: Chain, *, pay_to: int = SELLER, amount: int = PRICE, url: str = URL,
    settlement: SettlementMode = SettlementMode.HOLD,
) -> EscrowRequirements:  # fmt: skip
    return offer_for(
        network="eip155:84532",
        amount=amount,
        asset=chain.token.address,
        pay_to=address(pay_to),
        escrow=chain.escrow.address,
        operator=address(OPERATOR),
        token_name="USDC",
        token_version="2",
        max_timeout_seconds=120,
        method="GET",
        resource_url=url,
        body=b"",
        settlement=settlement,
    )


def signed(chain: Chain, offer: EscrowRequirements, **options: Any) -> tuple[Payment, dict[str, Any]]:
    """A buyer's payment for `offer`, and the x402 settle/verify request body carrying it."""
    payment = sign_payment(chain, payment_required(URL, [offer.to_model()]), **options)
    from escrow_py.protocol.wire import decode_payment_signature

    model = decode_payment_signature(payment.header)
    body = {
        "x402Version": 2,
        "paymentPayload": model.model_dump(by_alias=True, exclude_none=True),
        "paymentRequirements": offer.to_model().model_dump(by_alias=True, exclude_none=True),
    }
    return payment, body


def idem() -> str:
    return os.urandom(8).hex()


def settled_on_chain(chain: Chain, start: int) -> dict[bytes, bytes]:
    """escrow id -> delivery hash of every serve-first `Settled` event from block `start` on."""
    last = int(chain.w3.eth.block_number)
    if last < start:
        return {}
    logs = chain.w3.eth.get_logs({"address": chain.escrow.address, "fromBlock": start, "toBlock": last,
                                  "topics": [HexBytes(SETTLED_TOPIC)]})  # fmt: skip
    return {e.id: e.delivery_hash for log in logs if isinstance(e := decode_settlement_log(log), Settled)}
