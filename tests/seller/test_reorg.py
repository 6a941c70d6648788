"""Reorgs do not lose deliveries (issue 12), over a real uvicorn and the session anvil with anvil_reorg.

The poster follows every posted delivery until `confirmation_depth` blocks deep; a
deliverMany that a reorg drops is sent again while the escrow's deadline allows, and the
operator's cached nonce is taken from the chain again, so the next transaction does not
wait behind the gap the dropped one left.
"""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import localhttp
from fixtures.chain import Chain
from web3.types import RPCEndpoint

from escrow_py.protocol.terms import State
from escrow_py.seller import EscrowMiddleware

from .payer import buy
from .shop import make_shop, served


def _rpc(chain: Chain, method: str, params: list[Any]) -> Any:
    answer = chain.w3.provider.make_request(RPCEndpoint(method), params)
    assert "error" not in answer, answer
    return answer.get("result")


def _sell(chain: Chain, url: str, path: str) -> bytes:
    async def run() -> bytes:
        async with localhttp.AsyncClient(base_url=url, timeout=60) as client:
            response, payment = await buy(client, chain, "GET", path)
        assert response.status_code == 200, response.text
        return payment.escrow_id

    return asyncio.run(run())


def _delivered_and_reorged(chain: Chain, middleware: EscrowMiddleware, escrow_id: bytes) -> bytes:
    """Post the delivery, then drop its block with anvil_reorg; returns the dropped transaction."""
    report = middleware.poster.post_pending()
    assert report.posted == [escrow_id]
    assert report.tx_hash is not None
    assert chain.escrow.state_of(escrow_id) == State.RELEASED
    _rpc(chain, "anvil_reorg", [1, []])  # the block holding the deliverMany is replaced by an empty one
    assert chain.escrow.state_of(escrow_id) == State.HELD
    return report.tx_hash


def test_a_delivery_a_reorg_drops_is_sent_again_and_followed_until_deep_enough(chain: Chain, tmp_path: Path) -> None:
    chain.mine()
    shop = make_shop(chain, tmp_path / "seller.sqlite", poster_interval=3600, confirmation_depth=3)
    with served(shop.app) as (url, _):
        escrow_id = _sell(chain, url, "/report/reorg")
        dropped = _delivered_and_reorged(chain, shop.middleware, escrow_id)
        report = shop.middleware.poster.post_pending()
        assert report.reposted == [escrow_id]
        assert report.posted == [escrow_id]
        # Mined again (it may be the very same signed transaction: same nonce, same entries, same fees).
        assert report.tx_hash is not None
        assert chain.w3.eth.get_transaction_receipt(report.tx_hash)["status"] == 1  # type: ignore[arg-type]
        assert dropped is not None
        assert chain.escrow.state_of(escrow_id) == State.RELEASED
        assert shop.middleware.store.delivery(escrow_id).tx_hash == report.tx_hash  # type: ignore[union-attr]
        # Followed until confirmation_depth blocks deep, then left alone.
        assert shop.middleware.poster.post_pending().final == []
        for _ in range(3):
            chain.mine()
        assert shop.middleware.poster.post_pending().final == [escrow_id]
        assert shop.middleware.poster.post_pending().final == []


def test_after_a_reorg_drops_a_sent_transaction_the_nonce_is_taken_from_the_chain_again(
    chain: Chain, tmp_path: Path
) -> None:
    chain.mine()
    # No repricing and a short wait: a transaction stuck behind a nonce gap would just time out.
    shop = make_shop(chain, tmp_path / "seller.sqlite", poster_interval=3600, tx_timeout=5, reprice_after=600)
    with served(shop.app) as (url, _):
        escrow_id = _sell(chain, url, "/report/gap")
        dropped = _delivered_and_reorged(chain, shop.middleware, escrow_id)
        dropped_nonce = int(_rpc(chain, "eth_getTransactionCount", [shop.config.operator.address, "latest"]), 16)
        report = shop.middleware.poster.post_pending()
        assert report.errors == [], report.errors
        assert report.posted == [escrow_id]
        resent = chain.w3.eth.get_transaction(report.tx_hash)  # type: ignore[arg-type]
        assert resent["nonce"] == dropped_nonce, "the re-sent delivery did not take the dropped one's nonce"
        assert dropped is not None
        # And the next sale's deposit is not queued behind a gap either.
        second = _sell(chain, url, "/report/after-gap")
        assert chain.escrow.state_of(second) == State.HELD
