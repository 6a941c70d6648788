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
from escrow_py.buyer._judge import Verdict
from escrow_py.buyer._settings import BuyerSettings, no_other_options, settings_of
from escrow_py.chain.escrow import Settled
from escrow_py.chain.signer import Signer
from escrow_py.protocol.errors import ChainError, ConfigError, ProtocolError
from escrow_py.protocol.terms import State, delivery_hash
from escrow_py.protocol.tls import tls_context
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
    """Read the chain, replay where the seller still owes bytes, decide, apply the finding once."""
    state = core.chain.state_of(entry.escrow_id, escrow=entry.escrow)
    now = core.chain.next_block_time()
    replayable = bool(entry.url)  # the SDK plugin never sees the request, so journals none
    if state is State.NONE and (settled := _settlement(core, entry)) is not None:
        # Served first and settled: the money went to the seller with this hash.
        if entry.response_hash is None and replayable:
            answer = yield replay_request(entry)
            return _apply(core, entry, judge_replay(entry, answer, settled.delivery_hash, chain_state=state))
        return _apply(core, entry, judge_settled(entry, settled))
    if state is State.RELEASED and replayable:
        answer = yield replay_request(entry)
        answered = _answered(answer)
        committed = None if answered is None else _delivered_hash(core, entry, answered)
        return _apply(core, entry, judge_replay(entry, answer, committed, chain_state=state))
    if state is State.HELD and now < entry.terms.deadline and replayable:
        return (yield from _replay_held(core, entry))
    finding = judge_without_replay(entry, state, now, refund_expired=refund_expired)
    if finding is None:
        return _refund(core, entry)
    return _apply(core, entry, finding)


# -- pure decisions: the journal entry and what the chain (and a replay) showed in, a Finding out ----


@dataclass(frozen=True, slots=True)
class Finding:
    """What recovery concluded for one payment: the report's item, the journal write it calls for
    (a Verdict; None: none) and the ledger's chain-final word (`spent`; None: not final yet).
    Decided by the pure functions below, applied once by `_apply`."""

    item: RecoveryItem
    verdict: Verdict | None = None
    spent: bool | None = None


def judge_replay(
    entry: JournalEntry, answer: httpx.Response | Exception, committed: bytes | None, *, chain_state: State
) -> Finding:
    """A replay of a payment whose money went to the seller (Released, or settled first), judged by the hash
    the chain committed (`committed`; None: none found), never by the answer's own header."""
    eid = entry.escrow_id
    answered = _answered(answer)
    if answered is None:
        shown = repr(answer) if isinstance(answer, Exception) else f"status {answer.status_code}"
        outcome = f"replay failed ({shown}); paid out"
        return Finding(RecoveryItem(eid, chain_state, RecoveryAction.REPLAYED, outcome, entry.state))
    received = delivery_hash(answered.content)
    if committed is not None and received == committed:
        outcome = "delivered: body matches the on-chain hash"
        item = RecoveryItem(
            eid, chain_state, RecoveryAction.REPLAYED, outcome, PaymentState.DELIVERED, body=bytes(answered.content)
        )
        return Finding(item, Verdict(PaymentState.DELIVERED, response_hash=received, committed_hash=committed))
    shown = "none" if committed is None else "0x" + committed.hex()
    outcome = f"mismatch: body hashes to 0x{received.hex()}, chain has {shown}"
    item = RecoveryItem(eid, chain_state, RecoveryAction.REPLAYED, outcome, PaymentState.MISMATCH)
    return Finding(item, Verdict(PaymentState.MISMATCH, response_hash=received, committed_hash=committed))


def judge_settled(entry: JournalEntry, settled: Settled) -> Finding:
    """A served-first payment the chain shows settled, judged by the bytes already received: delivered if
    they hash to the settled hash, mismatch if not; spent either way."""
    eid, received, tx = entry.escrow_id, entry.response_hash, settled.at.tx_hash
    if received is None:
        # The money is gone to the seller whatever the bytes: the ledger says so; the journal waits for them.
        outcome = "settled on chain (spent); the bytes never arrived and no request is journaled to replay"
        return Finding(RecoveryItem(eid, State.NONE, RecoveryAction.WAITING, outcome, entry.state, tx), spent=True)
    if received == settled.delivery_hash:
        outcome = f"settled in tx 0x{tx.hex()}: body matches the settled hash"
        state = PaymentState.DELIVERED
    else:
        outcome = (
            f"settled in tx 0x{tx.hex()} with hash 0x{settled.delivery_hash.hex()}, body hashes to 0x{received.hex()}"
        )
        state = PaymentState.MISMATCH
    item = RecoveryItem(eid, State.NONE, RecoveryAction.MARKED_SETTLED, outcome, state, tx)
    return Finding(item, Verdict(state, committed_hash=settled.delivery_hash, tx_hash=tx), spent=True)


def judge_without_replay(entry: JournalEntry, state: State, now: int, *, refund_expired: bool) -> Finding | None:
    """A payment nobody can replay now (not owed bytes, or no request journaled), by its escrow's state and the
    chain's clock `now`. None: it is Held past its deadline and the buyer refunds it (an action, not a fact)."""
    eid = entry.escrow_id

    def found(action: RecoveryAction, outcome: str, journal_state: PaymentState, detail: str | None) -> Finding:
        verdict = None if detail is None else Verdict(journal_state, detail)
        return Finding(RecoveryItem(eid, state, action, outcome, journal_state), verdict)

    if state is State.HELD and now >= entry.terms.deadline:
        if refund_expired:
            return None
        outcome = f"deadline {entry.terms.deadline} passed; held"
        return found(RecoveryAction.LEFT_TO_KEEPER, outcome, PaymentState.HELD, "expired; left to the keeper")
    if state is State.REFUNDED:
        return found(RecoveryAction.MARKED_REFUNDED, "refunded on chain", PaymentState.REFUNDED, "refunded on chain")
    if state is State.NONE and entry.valid_before <= now:
        # Never deposited, never settled (_flow looked): the token refuses the authorization from now on.
        outcome = f"never deposited or settled; authorization expired at {entry.valid_before}"
        return found(RecoveryAction.MARKED_VOID, outcome, PaymentState.VOID, outcome)
    if state is State.NONE:
        what = "served first; not settled yet" if entry.state is PaymentState.UNSETTLED else "not deposited"
        outcome = f"{what}; authorization valid until {entry.valid_before}"
        return found(RecoveryAction.WAITING, outcome, entry.state, None)
    outcome = f"{state.name.lower()}; no request journaled to replay"
    return found(RecoveryAction.WAITING, outcome, entry.state, None)


# -- reads and actions around the decisions -------------------------------------------------------


def _apply(core: PaymentCore, entry: JournalEntry, finding: Finding) -> RecoveryItem:
    """Write a finding to the journal and the ledger, once."""
    if finding.verdict is not None:
        core.apply(entry.escrow_id, finding.verdict)
    if finding.spent is not None:
        core.journal.confirm_on_chain(entry.escrow_id, spent=finding.spent)
    return finding.item


def _answered(answer: httpx.Response | Exception) -> httpx.Response | None:
    """The replay's answer if the seller answered it (below 400); None for an error status or a failed send."""
    return answer if isinstance(answer, httpx.Response) and answer.status_code < 400 else None


def _delivered_hash(core: PaymentCore, entry: JournalEntry, answer: httpx.Response) -> bytes | None:
    """The hash a Released escrow's Delivered event committed. The chain, not the answer, is the judge; the
    answer only says which transaction to look in first."""
    tx_hash = _delivery_tx(answer)
    since = int(entry.created_at) - CLOCK_SKEW
    return core.chain.delivered_hash(entry.escrow_id, escrow=entry.escrow, since=since, tx_hash=tx_hash)


def _settlement(core: PaymentCore, entry: JournalEntry) -> Settled | None:
    """The Settled event of a payment never deposited, if the token shows its authorization used."""
    terms, eid = entry.terms, entry.escrow_id
    if not core.chain.authorization_used(terms.token, terms.buyer, eid):
        return None
    return core.chain.settlement_of(eid, escrow=entry.escrow, since=int(entry.created_at) - CLOCK_SKEW)


def _delivery_tx(answer: httpx.Response) -> bytes | None:
    value = answer.headers.get(PAYMENT_RESPONSE_HEADER)
    if value is None:
        return None
    try:
        return SettlementExtra.from_json(decode_payment_response(value).extra).delivery_transaction
    except ProtocolError:
        return None


def _replay_held(core: PaymentCore, entry: JournalEntry) -> _Flow:
    """A Held escrow still in time: the replay is judged as the paid request's answer is (core.settle's Verdict)."""
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


def _refund(core: PaymentCore, entry: JournalEntry) -> RecoveryItem:
    """Refund a Held escrow past its deadline from the buyer's key; a keeper that got there first is fine."""
    eid = entry.escrow_id
    try:
        receipt = core.chain.refund(entry.terms, escrow=entry.escrow)
    except ChainError as exc:
        if core.chain.state_of(eid, escrow=entry.escrow) is State.REFUNDED:  # a keeper got there first
            item = RecoveryItem(
                eid, State.HELD, RecoveryAction.MARKED_REFUNDED, "refunded by another caller", PaymentState.REFUNDED
            )
            return _apply(core, entry, Finding(item, Verdict(PaymentState.REFUNDED, "refunded by another caller")))
        return RecoveryItem(eid, State.HELD, RecoveryAction.REFUNDED, f"refund failed: {exc}", entry.state)
    tx = bytes(receipt["transactionHash"])
    item = RecoveryItem(
        eid, State.HELD, RecoveryAction.REFUNDED, f"refunded in tx 0x{tx.hex()}", PaymentState.REFUNDED, tx
    )
    return _apply(core, entry, Finding(item, Verdict(PaymentState.REFUNDED, "refunded by recover()", tx_hash=tx)))


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
        with httpx.Client(transport=transport, verify=tls_context()) as http:
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
        async with httpx.AsyncClient(transport=transport, verify=tls_context()) as http:
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
