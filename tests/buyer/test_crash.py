"""A buyer SIGKILLed while paying leaves its journal consistent: a real process, the real journal, a real seller.

Killed between signing and journaling, it leaves nothing: no reservation, no row, and nothing sent (the
reservation, the signature and the row are one journal transaction, so a crash before its commit undoes
all of it). Killed once journaled but before the paid request left, it leaves a `signed` row with its
reservation: recover() keeps the amount reserved while the authorization could still be redeemed, and
releases it (void) once the authorization has expired unused.
"""

from __future__ import annotations

import asyncio
import signal
import subprocess
import sys
from pathlib import Path

from fixtures.chain import Chain
from helpers import BUYER, SELLER, address, dev

from escrow_py.buyer import Journal, LedgerStatus, PaymentState, RecoveryAction, arecover

from .shop import Shop

AGENT = Path(__file__).with_name("crash_agent.py")


def _killed_at(point: str, chain: Chain, journal: Path, served: str) -> None:
    agent = subprocess.run(
        [sys.executable, str(AGENT), chain.node.url, str(journal), served, point],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert agent.returncode == -signal.SIGKILL, agent.stderr[-3000:]


def test_killed_between_signing_and_journaling_leaves_nothing(
    chain: Chain, shop: Shop, served: str, tmp_path: Path
) -> None:
    journal_path = tmp_path / "buyer.sqlite"
    buyer_before, seller_before = chain.token.balance_of(address(BUYER)), chain.token.balance_of(address(SELLER))
    _killed_at("signed", chain, journal_path, served)
    journal = Journal(journal_path, audit=False)
    try:
        assert journal.entries() == []  # signed, then killed before the commit: no row,
    finally:
        journal.close()
    assert _ledger(journal_path) == []  # and no reservation holding the budget either
    assert shop.calls == {}  # the seller never saw the payment
    report = asyncio.run(arecover(journal_path, dev(BUYER), chain.node.url))
    assert report.items == []
    assert chain.token.balance_of(address(BUYER)) == buyer_before
    assert chain.token.balance_of(address(SELLER)) == seller_before


def test_killed_after_journaling_before_sending_holds_the_budget_until_the_authorization_expires(
    chain: Chain, shop: Shop, served: str, tmp_path: Path
) -> None:
    journal_path = tmp_path / "buyer.sqlite"
    buyer_before = chain.token.balance_of(address(BUYER))
    _killed_at("journaled", chain, journal_path, served)
    assert shop.calls == {}  # killed before the paid request left
    # The signature may have left (the buyer cannot know): its amount stays reserved while it can be redeemed.
    report = asyncio.run(arecover(journal_path, dev(BUYER), chain.node.url))
    (item,) = report.items
    assert (item.action, item.journal_state) == (RecoveryAction.WAITING, PaymentState.SIGNED)
    assert _ledger(journal_path) == [(item.escrow_id, LedgerStatus.RESERVED)]
    journal = Journal(journal_path, audit=False)
    try:
        entry = journal.get(item.escrow_id)
    finally:
        journal.close()
    assert entry is not None
    chain.mine(entry.valid_before)
    report = asyncio.run(arecover(journal_path, dev(BUYER), chain.node.url))
    assert report.by_id(item.escrow_id).journal_state is PaymentState.VOID
    assert _ledger(journal_path) == [(item.escrow_id, LedgerStatus.RELEASED)]
    assert chain.token.balance_of(address(BUYER)) == buyer_before


def _ledger(journal_path: Path) -> list[tuple[bytes, LedgerStatus]]:
    journal = Journal(journal_path, audit=False)
    try:
        return [(r.escrow_id, r.status) for r in journal.ledger_rows()]
    finally:
        journal.close()
