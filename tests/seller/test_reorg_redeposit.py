"""A reorg that takes the deposit away with its delivery: the poster deposits again from the stored signature,
then delivers; serve-first settlements a reorg drops are queued again (real anvil, anvil_reorg)."""

from __future__ import annotations

import time
from pathlib import Path

from fixtures.chain import Chain
from helpers import BUYER, SELLER, address

from escrow_py.protocol.terms import State
from escrow_py.seller import PricedRoute

from .shop import PRICE, make_shop, served
from .test_reorg import _rpc, _sell


def test_a_deposit_a_reorg_drops_after_serving_is_sent_again_then_delivered(chain: Chain, tmp_path: Path) -> None:
    chain.mine()
    shop = make_shop(chain, tmp_path / "seller.sqlite", poster_interval=3600, confirmation_depth=3)
    seller_before = chain.token.balance_of(address(SELLER))
    with served(shop.app) as (url, _):
        escrow_id = _sell(chain, url, "/report/reorg-deposit")  # the deposit's block
        assert shop.middleware.poster.post_pending().posted == [escrow_id]  # the delivery's block
        _rpc(chain, "anvil_reorg", [2, []])  # both blocks replaced by empty ones
        assert chain.escrow.state_of(escrow_id) is State.NONE  # served, and now unpaid
        report = shop.middleware.poster.post_pending()
        assert report.reposted == [escrow_id]
        # Delivered in that pass, or (seen twice in loaded full-suite runs, not understood: the delivery found the
        # escrow NONE just after the deposit's receipt) deferred a second and delivered by a later pass.
        posted, deadline = report.posted, time.monotonic() + 30
        while not posted and time.monotonic() < deadline:
            time.sleep(0.5)
            posted = shop.middleware.poster.post_pending().posted
        assert posted == [escrow_id]
    assert chain.escrow.state_of(escrow_id) is State.RELEASED
    assert chain.token.balance_of(address(SELLER)) == seller_before + PRICE


def test_a_settlement_a_reorg_drops_is_queued_again_and_sent(chain: Chain, tmp_path: Path) -> None:
    chain.mine()
    route = PricedRoute("GET", "/report/{item}", amount=PRICE, settlement="serve-first")
    limits = {"serve_first_max_price": PRICE, "serve_first_max_per_buyer": PRICE, "serve_first_max_total": PRICE}
    shop = make_shop(chain, tmp_path / "seller.sqlite", routes=[route], poster_interval=3600, **limits)
    with served(shop.app) as (url, _):
        escrow_id = _sell(chain, url, "/report/reorg-settle")
        assert shop.middleware.poster.post_pending().settled_first == [escrow_id]
        _rpc(chain, "anvil_reorg", [1, []])
        assert not chain.token.authorization_state(address(BUYER), escrow_id)
        report = shop.middleware.poster.post_pending()
        assert report.resettled == [escrow_id]
        assert report.settled_first == [escrow_id]
    assert chain.token.authorization_state(address(BUYER), escrow_id)
    assert shop.middleware.store.settlement(escrow_id).status == "settled"  # type: ignore[union-attr]
