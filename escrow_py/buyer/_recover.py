"""recover(): finish every unfinished journaled payment from the journal file and the chain alone."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Generator
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path
from typing import Any

import httpx

from escrow_py.buyer._chain import CLOCK_SKEW
from escrow_py.buyer._core import PaymentCore
from escrow_py.buyer._errors import PaymentError
from escrow_py.buyer._journal import JournalEntry, PaymentState
from escrow_py.buyer._settings import BuyerSettings, no_other_options, settings_of
from escrow_py.chain.escrow import Settled
from escrow_py.chain.signer import Signer
from escrow_py.protocol.errors import ChainError, ConfigError, ProtocolError
from escrow_py.protocol.terms import State, delivery_hash
from escrow_py.protocol.wire import (
    PAYMENT_RESPONSE_HEADER,
    PAYMENT_SIGNATURE_HEADER,
    SettlementExtra,
    decode_payment_response,
)


class RecoveryAction(StrEnum):
    REPLAYED = "replayed"  # asked the seller for the bytes again with the same PAYMENT-SIGNATURE
    REFUNDED = "refunded"  # sent Escrow.refund from the buyer's key
    LEFT_TO_KEEPER = "left_to_keeper"  # expired and held; refund_expired=False
    MARKED_REFUNDED = "marked_refunded"  # someone else already refunded it
    MARKED_VOID = "marked_void"  # never deposited and the authorization expired
    MARKED_SETTLED = "marked_settled"  # served first, and the chain shows its settlement
    WAITING = "waiting"  # not deposited yet, the authorization still valid: nothing to do now


@dataclass(frozen=True, slots=True)
class RecoveryItem:
    """What recover() found and did for one payment."""

    escrow_id: bytes
    chain_state: State
    action: RecoveryAction
    outcome: str
    journal_state: PaymentState
    tx_hash: bytes | None = None
    body: bytes | None = None  # the delivered bytes, when a replay got them and they match the committed hash


@dataclass
class RecoveryReport:
    items: list[RecoveryItem] = field(default_factory=list)

    def by_id(self, escrow_id: bytes) -> RecoveryItem:
        for item in self.items:
            if item.escrow_id == escrow_id:
                return item
        raise KeyError(f"escrow 0x{escrow_id.hex()} is not in this report")


# A recovery step either finishes, or asks its driver to send one replay and hand back the answer.
_Flow = Generator[httpx.Request, "httpx.Response | Exception", RecoveryItem]


def replay_request(entry: JournalEntry) -> httpx.Request:
    """The journaled request again, with the same PAYMENT-SIGNATURE: redelivery, never a second charge."""
    headers = dict(entry.headers)
    headers[PAYMENT_SIGNATURE_HEADER] = entry.payment_header
    return httpx.Request(entry.method, entry.url, headers=headers, content=entry.body)


def _flow(core: PaymentCore, entry: JournalEntry, refund_expired: bool) -> _Flow:
    state = core.chain.state_of(entry.escrow_id, escrow=entry.escrow)
    now = core.chain.next_block_time()
    replayable = bool(entry.url)  # the SDK plugin never sees the request, so journals none
    if state is State.NONE and (settled := _settlement(core, entry)) is not None:
        # Served first and settled: the money went to the seller with this hash.
        if entry.response_hash is None and replayable:
            return (yield from _replay_released(core, entry, committed=settled.delivery_hash, chain_state=state))
        return _close_settled(core, entry, settled)
    if state is State.RELEASED and replayable:
        return (yield from _replay_released(core, entry))
    if state is State.HELD and now < entry.terms.deadline and replayable:
        return (yield from _replay_held(core, entry))
    return _settle_without_replay(core, entry, state, now, refund_expired)


def _replay_released(
    core: PaymentCore, entry: JournalEntry, *, committed: bytes | None = None, chain_state: State = State.RELEASED
) -> _Flow:
    """Replay a paid-out payment and judge the bytes by the hash on chain (`committed`: already found,
    a serve-first settlement's; else the Delivered event is searched)."""
    eid, journal = entry.escrow_id, core.journal
    answer = yield replay_request(entry)
    if isinstance(answer, Exception) or answer.status_code >= 400:
        shown = repr(answer) if isinstance(answer, Exception) else f"status {answer.status_code}"
        return RecoveryItem(
            eid, chain_state, RecoveryAction.REPLAYED, f"replay failed ({shown}); paid out", entry.state
        )
    if committed is None:
        # The chain, not the answer, is the judge; the answer only says where to look first.
        since = int(entry.created_at) - CLOCK_SKEW
        committed = core.chain.delivered_hash(eid, escrow=entry.escrow, since=since, tx_hash=_delivery_tx(answer))
    received = delivery_hash(answer.content)
    if committed is not None and received == committed:
        journal.update(eid, PaymentState.DELIVERED, response_hash=received, committed_hash=committed)
        outcome = "delivered: body matches the on-chain hash"
        return RecoveryItem(
            eid, chain_state, RecoveryAction.REPLAYED, outcome, PaymentState.DELIVERED, body=bytes(answer.content)
        )
    journal.update(eid, PaymentState.MISMATCH, response_hash=received, committed_hash=committed)
    shown = "none" if committed is None else "0x" + committed.hex()
    outcome = f"mismatch: body hashes to 0x{received.hex()}, chain has {shown}"
    return RecoveryItem(eid, chain_state, RecoveryAction.REPLAYED, outcome, PaymentState.MISMATCH)


def _settlement(core: PaymentCore, entry: JournalEntry) -> Settled | None:
    """The Settled event of a payment never deposited, if the token shows its authorization used."""
    terms, eid = entry.terms, entry.escrow_id
    if not core.chain.authorization_used(terms.token, terms.buyer, eid):
        return None
    return core.chain.settlement_of(eid, escrow=entry.escrow, since=int(entry.created_at) - CLOCK_SKEW)


def _close_settled(core: PaymentCore, entry: JournalEntry, settled: Settled) -> RecoveryItem:
    """A served-first payment the chain shows settled: delivered if the bytes received hash to the settled
    hash, mismatch if not; spent either way."""
    eid, journal, received = entry.escrow_id, core.journal, entry.response_hash
    tx = settled.at.tx_hash
    if received is None:
        # The money is gone to the seller whatever the bytes: the ledger says so; the journal waits for them.
        journal.confirm_on_chain(eid, spent=True)
        outcome = "settled on chain (spent); the bytes never arrived and no request is journaled to replay"
        return RecoveryItem(eid, State.NONE, RecoveryAction.WAITING, outcome, entry.state, tx)
    if received == settled.delivery_hash:
        journal.update(eid, PaymentState.DELIVERED, committed_hash=settled.delivery_hash, tx_hash=tx)
        journal.confirm_on_chain(eid, spent=True)
        outcome = f"settled in tx 0x{tx.hex()}: body matches the settled hash"
        return RecoveryItem(eid, State.NONE, RecoveryAction.MARKED_SETTLED, outcome, PaymentState.DELIVERED, tx)
    journal.update(eid, PaymentState.MISMATCH, committed_hash=settled.delivery_hash, tx_hash=tx)
    journal.confirm_on_chain(eid, spent=True)
    outcome = f"settled in tx 0x{tx.hex()} with hash 0x{settled.delivery_hash.hex()}, body hashes to 0x{received.hex()}"
    return RecoveryItem(eid, State.NONE, RecoveryAction.MARKED_SETTLED, outcome, PaymentState.MISMATCH, tx)


def _delivery_tx(answer: httpx.Response) -> bytes | None:
    value = answer.headers.get(PAYMENT_RESPONSE_HEADER)
    if value is None:
        return None
    try:
        return SettlementExtra.from_json(decode_payment_response(value).extra).delivery_transaction
    except ProtocolError:
        return None


def _replay_held(core: PaymentCore, entry: JournalEntry) -> _Flow:
    eid = entry.escrow_id
    answer = yield replay_request(entry)
    if isinstance(answer, Exception):
        return RecoveryItem(eid, State.HELD, RecoveryAction.REPLAYED, f"replay failed: {answer!r}; held", entry.state)
    try:
        core.settle(entry, answer, replay=True)
    except PaymentError as exc:
        after = core.journal.get(eid)
        return RecoveryItem(eid, State.HELD, RecoveryAction.REPLAYED, str(exc), after.state if after else entry.state)
    outcome = "delivered: body matches the committed hash"
    return RecoveryItem(
        eid, State.HELD, RecoveryAction.REPLAYED, outcome, PaymentState.DELIVERED, body=bytes(answer.content)
    )


def _settle_without_replay(
    core: PaymentCore, entry: JournalEntry, state: State, now: int, refund_expired: bool
) -> RecoveryItem:
    eid, journal = entry.escrow_id, core.journal

    def item(
        action: RecoveryAction, outcome: str, journal_state: PaymentState, tx: bytes | None = None
    ) -> RecoveryItem:
        return RecoveryItem(eid, state, action, outcome, journal_state, tx)

    if state is State.HELD and now >= entry.terms.deadline:
        if not refund_expired:
            journal.update(eid, PaymentState.HELD, detail="expired; left to the keeper")
            return item(
                RecoveryAction.LEFT_TO_KEEPER, f"deadline {entry.terms.deadline} passed; held", PaymentState.HELD
            )
        return _refund(core, entry)
    if state is State.REFUNDED:
        journal.update(eid, PaymentState.REFUNDED, detail="refunded on chain")
        return item(RecoveryAction.MARKED_REFUNDED, "refunded on chain", PaymentState.REFUNDED)
    if state is State.NONE and entry.valid_before <= now:
        # Never deposited, never settled (_flow looked): the token refuses the authorization from now on.
        outcome = f"never deposited or settled; authorization expired at {entry.valid_before}"
        journal.update(eid, PaymentState.VOID, detail=outcome)
        return item(RecoveryAction.MARKED_VOID, outcome, PaymentState.VOID)
    if state is State.NONE:
        what = "served first; not settled yet" if entry.state is PaymentState.UNSETTLED else "not deposited"
        return item(RecoveryAction.WAITING, f"{what}; authorization valid until {entry.valid_before}", entry.state)
    return item(RecoveryAction.WAITING, f"{state.name.lower()}; no request journaled to replay", entry.state)


def _refund(core: PaymentCore, entry: JournalEntry) -> RecoveryItem:
    eid, journal = entry.escrow_id, core.journal
    try:
        receipt = core.chain.refund(entry.terms, escrow=entry.escrow)
    except ChainError as exc:
        if core.chain.state_of(eid, escrow=entry.escrow) is State.REFUNDED:  # a keeper got there first
            journal.update(eid, PaymentState.REFUNDED, detail="refunded by another caller")
            return RecoveryItem(
                eid, State.HELD, RecoveryAction.MARKED_REFUNDED, "refunded by another caller", PaymentState.REFUNDED
            )
        return RecoveryItem(eid, State.HELD, RecoveryAction.REFUNDED, f"refund failed: {exc}", entry.state)
    tx = bytes(receipt["transactionHash"])
    journal.update(eid, PaymentState.REFUNDED, detail="refunded by recover()", tx_hash=tx)
    return RecoveryItem(
        eid, State.HELD, RecoveryAction.REFUNDED, f"refunded in tx 0x{tx.hex()}", PaymentState.REFUNDED, tx
    )


def reconcile_ledger(core: PaymentCore) -> None:
    """Bring the budget ledger in line with the chain: release reservations that were never sent, and take
    the chain's final word on finished payments (a delivered one the seller never posted ends refunded)."""
    journal = core.journal
    journal.release_orphans()
    for escrow_id in journal.unconfirmed():
        entry = journal.get(escrow_id)
        if entry is None:
            continue
        if entry.state is PaymentState.VOID:
            journal.confirm_on_chain(escrow_id, spent=False)
            continue
        state = core.chain.state_of(escrow_id, escrow=entry.escrow)
        if state is State.NONE and entry.state in (PaymentState.DELIVERED, PaymentState.MISMATCH):
            # Served first: the token's spent authorization is the settlement's trace.
            if core.chain.authorization_used(entry.terms.token, entry.terms.buyer, escrow_id):
                journal.confirm_on_chain(escrow_id, spent=True)
        elif state is State.RELEASED:
            journal.confirm_on_chain(escrow_id, spent=True)
        elif state is State.REFUNDED:
            journal.confirm_on_chain(escrow_id, spent=False)


def recover_with(core: PaymentCore, http: httpx.Client, *, refund_expired: bool = True) -> RecoveryReport:
    report = RecoveryReport()
    for entry in core.journal.entries(unfinished_only=True):
        flow = _flow(core, entry, refund_expired)
        step = _advance(flow, None)
        while isinstance(step, httpx.Request):
            answer: httpx.Response | Exception
            try:
                answer = http.send(step)
            except httpx.HTTPError as exc:
                answer = exc
            step = _advance(flow, answer)
        report.items.append(step)
    reconcile_ledger(core)
    return report


async def arecover_with(core: PaymentCore, http: httpx.AsyncClient, *, refund_expired: bool = True) -> RecoveryReport:
    return await arecover_flows(core, http.send, refund_expired=refund_expired)


async def arecover_flows(
    core: PaymentCore,
    send: Callable[[httpx.Request], Awaitable[httpx.Response]],
    *,
    refund_expired: bool = True,
    include: Callable[[JournalEntry], bool] | None = None,
) -> RecoveryReport:
    """Recover the unfinished payments `include` selects (all by default), each replay sent by `send`:
    an HTTP client's, or another transport's that carries the same request (escrow_py.mcp's tool calls)."""
    report = RecoveryReport()
    # The chain reads, refunds and journal writes between replays block: they run in a worker thread.
    for entry in await asyncio.to_thread(core.journal.entries, unfinished_only=True):
        if include is not None and not include(entry):
            continue
        flow = _flow(core, entry, refund_expired)
        step = await asyncio.to_thread(_advance, flow, None)
        while isinstance(step, httpx.Request):
            answer: httpx.Response | Exception
            try:
                answer = await send(step)
            except Exception as exc:  # noqa: BLE001 - a failed replay is reported, never fatal to recovery
                answer = exc
            step = await asyncio.to_thread(_advance, flow, answer)
        report.items.append(step)
    await asyncio.to_thread(reconcile_ledger, core)
    return report


def _advance(flow: _Flow, answer: httpx.Response | Exception | None) -> httpx.Request | RecoveryItem:
    """One step of a flow: the next replay to send, or its result (StopIteration cannot cross a thread's future)."""
    try:
        return next(flow) if answer is None else flow.send(answer)
    except StopIteration as done:
        item: RecoveryItem = done.value
        return item


def recover(
    settings: BuyerSettings | str | Path,
    signer: Signer | None = None,
    rpc_url: str | None = None,
    *,
    refund_expired: bool = True,
    transport: httpx.BaseTransport | None = None,
    **options: Any,
) -> RecoveryReport:
    """Finish every unfinished payment in the journal, in a fresh process if need be:
    `recover(settings)`, or `recover(journal, signer, rpc_url, **BuyerSettings keywords)`.

    Per payment, by its escrow's on-chain state: Released, replay the request with the
    same PAYMENT-SIGNATURE and check the bytes against the Delivered hash; never deposited
    but settled (serve-first: the token shows the authorization used, a Settled event the
    hash), check the bytes received (or replayed) against the settled hash, spent; Held and in
    time, replay; Held past the deadline, refund from the buyer's key (or, with
    refund_expired=False, leave it to the keeper); Refunded, record it; never
    deposited (nor settled) and the authorization expired, mark it void, its budget
    released (a serve-first payment whose seller never settled ends so). A chain that cannot be read
    (each call bounded by `rpc_timeout` seconds) raises a ChainError (RpcError) naming what was
    being read; what was settled before stays journaled.
    """
    core = PaymentCore(_recover_settings("recover", settings, signer, rpc_url, options))
    try:
        with httpx.Client(transport=transport) as http:
            return recover_with(core, http, refund_expired=refund_expired)
    finally:
        core.close()


async def arecover(
    settings: BuyerSettings | str | Path,
    signer: Signer | None = None,
    rpc_url: str | None = None,
    *,
    refund_expired: bool = True,
    transport: httpx.AsyncBaseTransport | None = None,
    **options: Any,
) -> RecoveryReport:
    """The async form of recover(); replays go through `transport` (e.g. httpx.ASGITransport)."""
    core = PaymentCore(_recover_settings("arecover", settings, signer, rpc_url, options))
    try:
        async with httpx.AsyncClient(transport=transport) as http:
            return await arecover_with(core, http, refund_expired=refund_expired)
    finally:
        core.close()


def _recover_settings(
    entry: str,
    settings: BuyerSettings | str | Path,
    signer: Signer | None,
    rpc_url: str | None,
    options: dict[str, Any],
) -> BuyerSettings:
    """recover()'s arguments (the journal first in its keyword form) as a BuyerSettings."""
    if isinstance(settings, BuyerSettings):
        if signer is not None:
            raise ConfigError(f"{entry}() takes a BuyerSettings or a journal, a signer and an rpc_url, not both")
        found = settings_of(settings, rpc_url, None, options)
    elif signer is None:
        raise TypeError(f"{entry}() needs a BuyerSettings, or a journal, a signer and an rpc_url")
    else:
        found = settings_of(signer, rpc_url, settings, options)
    no_other_options(entry, options)
    return found
