"""The seller's own failures (503 + Retry-After, wire.Unavailable) against the buyer, over real uvicorn and anvil.

The seller answers 503 with a reason of its own when it cannot take a payment now (its
operator has no gas, its deposit is not confirmed in time, ...): not a rejection. The buyer
sends the same PAYMENT-SIGNATURE again after Retry-After, capped, a bounded number of times and
never within its margin of validBefore, journals each resend, never signs a second payment,
and when it gives up raises the error that says where the money is. The faults are real: an
operator key drained with anvil_setBalance, a deposit left in the pool with automine off.
"""

from __future__ import annotations

import asyncio
import json
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from itertools import pairwise
from pathlib import Path
from typing import Any

import httpx
import localhttp
import pytest
from fixtures.chain import Chain
from helpers import BUYER, OPERATOR, address, dev, no_automine, rpc

from escrow_py.buyer import (
    AsyncEscrowClient,
    EscrowAuth,
    EscrowClient,
    Journal,
    PaymentNotDelivered,
    PaymentRejected,
    PaymentState,
    ResendPolicy,
    recover,
)
from escrow_py.buyer._journal import JournalEntry
from escrow_py.chain.escrow import Deposited
from escrow_py.protocol.errors import ConfigError
from escrow_py.protocol.reasons import Reason
from escrow_py.protocol.terms import State
from escrow_py.protocol.wire import PAYMENT_SIGNATURE_HEADER

from .shop import make_shop, serving

FORMS = ["EscrowClient", "AsyncEscrowClient", "EscrowAuth"]


@dataclass(frozen=True)
class Seen:
    """One answer to a paid request, as the buyer's HTTP client received it."""

    at: float
    status: int
    signature: str
    error: str | None


def _error_of(response: httpx.Response) -> str | None:
    try:
        body = json.loads(response.content)
    except ValueError:
        return None
    return body.get("error") if isinstance(body, dict) else None


def _pay(
    form: str,
    chain: Chain,
    url: str,
    journal: Path,
    resend: ResendPolicy,
    *,
    on_503: Callable[[], None] = lambda: None,
) -> tuple[httpx.Response, list[Seen]]:
    """GET `url` with the buyer client `form`; every answer to a paid request is recorded, `on_503` runs on each 503."""
    seen: list[Seen] = []

    def note(response: httpx.Response) -> None:
        signature = response.request.headers.get(PAYMENT_SIGNATURE_HEADER)
        if signature is not None:
            seen.append(Seen(time.monotonic(), response.status_code, signature, _error_of(response)))
            if response.status_code == 503:
                on_503()

    if form == "AsyncEscrowClient":

        async def run() -> httpx.Response:
            async def hook(response: httpx.Response) -> None:
                await response.aread()
                note(response)

            hooks = {"response": [hook]}
            async with AsyncEscrowClient(
                dev(BUYER), chain.node.url, journal, resend=resend, event_hooks=hooks, timeout=60
            ) as client:
                return await client.get(url)

        return asyncio.run(run()), seen

    def sync_hook(response: httpx.Response) -> None:
        response.read()
        note(response)

    hooks = {"response": [sync_hook]}
    if form == "EscrowClient":
        with EscrowClient(dev(BUYER), chain.node.url, journal, resend=resend, event_hooks=hooks, timeout=60) as client:
            return client.get(url), seen
    auth = EscrowAuth(dev(BUYER), chain.node.url, journal, resend=resend)
    try:
        with localhttp.Client(auth=auth, event_hooks=hooks, timeout=60) as http:
            return http.get(url), seen
    finally:
        auth.journal.close()


class Later:
    """Runs `action` once, `delay` seconds after the first `trigger()`; `join()` waits for it (never leaks)."""

    def __init__(self, delay: float, action: Callable[[], object]) -> None:
        self._timer = threading.Timer(delay, action)
        self._lock = threading.Lock()

    def trigger(self) -> None:
        with self._lock:
            if not self._timer.is_alive() and not self._timer.finished.is_set():
                self._timer.start()

    def join(self) -> None:
        with self._lock:
            if self._timer.is_alive():
                self._timer.join(30)
            else:
                self._timer.cancel()


def _gas_money(chain: Chain, wei: int) -> None:
    rpc(chain, "anvil_setBalance", [address(OPERATOR), hex(wei)])


def _only_entry(journal: Path) -> tuple[JournalEntry, list[dict[str, Any]]]:
    """The one payment in the journal (one signature, whatever was resent), and its audit trail's resends."""
    stored = Journal(journal)
    try:
        (entry,) = stored.entries()
        assert stored.audit is not None
        resends = [r for r in stored.audit.records() if r["event"] == "resend"]
    finally:
        stored.close()
    return entry, resends


def _deposits_of(chain: Chain, escrow_id: bytes) -> list[Deposited]:
    events = chain.escrow.events(0, int(chain.w3.eth.block_number))
    return [e for e in events if isinstance(e, Deposited) and e.id == escrow_id]


@pytest.mark.parametrize("form", FORMS)
def test_an_unfunded_operator_gets_the_same_payment_again_and_it_is_served_once_funded(
    chain: Chain, tmp_path: Path, form: str
) -> None:
    shop = make_shop(chain, tmp_path)
    journal = tmp_path / "buyer.sqlite"
    funding = Later(0.5, lambda: _gas_money(chain, 10**20))
    with serving(shop.app) as url:
        _gas_money(chain, 0)  # drained after the seller's start-up check
        # The seller asks for 30 s (Retry-After); this buyer waits at most 1 s between sends.
        resend = ResendPolicy(attempts=10, max_wait=1.0)
        try:
            response, seen = _pay(form, chain, f"{url}/report/gas", journal, resend, on_503=funding.trigger)
        finally:
            funding.join()

    assert response.status_code == 200, response.text
    assert response.json()["item"] == "gas"
    entry, resends = _only_entry(journal)
    assert entry.state is PaymentState.DELIVERED
    assert seen[0].status == 503 and seen[0].error == Reason.OPERATOR_UNFUNDED
    assert seen[-1].status == 200
    # Every send carried the one signed payment: resent, never signed again.
    assert {s.signature for s in seen} == {entry.payment_header}
    assert [s.status for s in seen[:-1]] == [503] * (len(seen) - 1)
    # Each resend waited Retry-After capped at max_wait, and was journaled with its reason.
    assert all(later.at - earlier.at >= 0.9 for earlier, later in pairwise(seen))
    assert len(resends) == len(seen) - 1
    assert {(r["reason"], r["retryAfter"], r["wait"]) for r in resends} == {(Reason.OPERATOR_UNFUNDED, 30, 1.0)}
    assert [r["attempt"] for r in resends] == list(range(1, len(resends) + 1))
    assert len(_deposits_of(chain, entry.escrow_id)) == 1
    assert shop.calls == {"report": 1}


def test_resends_are_bounded_and_giving_up_on_a_refused_operator_says_the_money_never_moved(
    chain: Chain, tmp_path: Path
) -> None:
    shop = make_shop(chain, tmp_path)
    journal = tmp_path / "buyer.sqlite"
    with serving(shop.app) as url:
        _gas_money(chain, 0)
        with pytest.raises(PaymentRejected) as rejected:
            _pay("EscrowClient", chain, f"{url}/report/broke", journal, ResendPolicy(attempts=2, max_wait=0.2))
        _gas_money(chain, 10**20)
    entry, resends = _only_entry(journal)
    error = rejected.value
    assert (error.escrow_id, error.reason, error.status) == (entry.escrow_id, Reason.OPERATOR_UNFUNDED, 503)
    assert entry.state is PaymentState.REJECTED
    assert [r["attempt"] for r in resends] == [1, 2]
    assert _deposits_of(chain, entry.escrow_id) == [] and shop.calls == {}


def test_resends_stop_at_the_margin_before_valid_before(chain: Chain, tmp_path: Path) -> None:
    # A 30 s authorization and a 27 s margin leave about 3 s to resend in, whatever the attempt count.
    shop = make_shop(chain, tmp_path, max_timeout_seconds=30)
    journal = tmp_path / "buyer.sqlite"
    with serving(shop.app) as url:
        _gas_money(chain, 0)
        began = time.monotonic()
        with pytest.raises(PaymentRejected):
            _pay("EscrowClient", chain, f"{url}/report/late", journal, ResendPolicy(1000, max_wait=1.0, margin=27))
        elapsed = time.monotonic() - began
        _gas_money(chain, 10**20)
    _, resends = _only_entry(journal)
    assert 1 <= len(resends) <= 3, resends
    assert elapsed < 3 + 10, elapsed  # the margin, not 1000 attempts, ended it (10 s: slack for a loaded machine)


def test_a_pending_deposit_is_waited_for_with_the_same_payment_and_served_when_it_lands(
    chain: Chain, tmp_path: Path
) -> None:
    shop = make_shop(chain, tmp_path, tx_timeout=2, reprice_after=60)
    journal = tmp_path / "buyer.sqlite"
    mining = Later(0.5, lambda: rpc(chain, "evm_mine", []))
    with serving(shop.app) as url, no_automine(chain):
        try:
            resend = ResendPolicy(max_wait=1.0)
            response, seen = _pay("EscrowClient", chain, f"{url}/report/slow", journal, resend, on_503=mining.trigger)
        finally:
            mining.join()
    assert response.status_code == 200, response.text
    entry, resends = _only_entry(journal)
    assert entry.state is PaymentState.DELIVERED
    assert seen[0].error == Reason.DEPOSIT_PENDING and {s.signature for s in seen} == {entry.payment_header}
    assert resends and {r["reason"] for r in resends} == {Reason.DEPOSIT_PENDING}
    assert len(_deposits_of(chain, entry.escrow_id)) == 1


def test_giving_up_on_a_pending_deposit_says_where_the_money_is_and_recover_gets_the_delivery(
    chain: Chain, tmp_path: Path
) -> None:
    shop = make_shop(chain, tmp_path, tx_timeout=2, reprice_after=60)
    journal = tmp_path / "buyer.sqlite"
    with serving(shop.app) as url:
        with no_automine(chain), pytest.raises(PaymentNotDelivered) as lost:
            _pay("EscrowClient", chain, f"{url}/report/stuck", journal, ResendPolicy(attempts=1, max_wait=0.5))
        entry, resends = _only_entry(journal)
        error = lost.value
        assert (error.escrow_id, error.escrow, error.deadline) == (
            entry.escrow_id,
            chain.escrow.address,
            entry.terms.deadline,
        )
        assert Reason.DEPOSIT_PENDING in str(error) and "may still land" in str(error)
        assert entry.state is PaymentState.SIGNED  # no more than what is known: a deposit may be on its way
        assert [r["reason"] for r in resends] == [Reason.DEPOSIT_PENDING]
        # Mining resumed (leaving no_automine): the deposit the seller sent lands, and it is the only one.
        assert chain.escrow.state_of(entry.escrow_id) is State.HELD
        item = recover(journal, dev(BUYER), chain.node.url).by_id(entry.escrow_id)
    assert item.journal_state is PaymentState.DELIVERED, item.outcome
    assert len(_deposits_of(chain, entry.escrow_id)) == 1
    assert shop.calls == {"report": 1}


def test_the_resend_rule_caps_the_wait_counts_the_resends_and_keeps_the_margin() -> None:
    policy = ResendPolicy(attempts=3, max_wait=10.0, margin=20.0)
    assert policy.next_wait(2, resent=0, time_left=60) == 2.0
    assert policy.next_wait(10**9, resent=0, time_left=60) == 10.0  # a seller asking for ages waits max_wait
    assert policy.next_wait(-4, resent=0, time_left=60) == 0.0
    assert policy.next_wait(2, resent=3, time_left=60) is None  # no resends left
    assert policy.next_wait(5, resent=0, time_left=4.9) is None  # it would land inside the margin
    assert ResendPolicy(attempts=0).next_wait(1, resent=0, time_left=60) is None
    for bad in ({"attempts": -1}, {"attempts": 1.5}, {"max_wait": -1}, {"margin": "20"}, {"attempts": True}):
        with pytest.raises(ConfigError, match=f"ResendPolicy.{next(iter(bad))}"):
            ResendPolicy(**bad)
