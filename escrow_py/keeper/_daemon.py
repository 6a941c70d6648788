"""The keeper loop: index events, follow up this keeper's transactions, decide, refund; repeat.

One cycle, on each new block:
1. index: every escrow contract's events up to the confirmed head (`_index`), undoing reorgs;
2. track: every transaction this keeper sent, until it is `reorg_depth` blocks deep. A receipt
   counts the `Refunded` logs that name this keeper; a mined revert splits its batch and
   quarantines the entry that reverts on its own; a transaction a reorg removed is broadcast again
   (the same bytes, so the same nonce) and the cached nonce is dropped; a stuck one is replaced;
3. act: refund the due escrows (`next_action`) in batches capped by calldata and gas, each
   simulated against the pending state just before it is signed, so escrows another keeper's
   pending transaction already covers are left out.

A payout the token refuses does not sink a batch: refundMany puts those entries back to Held and
emits `PayoutFailed(token, buyer, amount)`, and the rest of the batch is refunded. The keeper then
backs off that (token, buyer): its escrows wait `retry_after` seconds, doubled per refusal in a row
(at most LONGEST_RETRY), before they are sent again. It does the same, without sending anything, when
the simulation shows such an escrow still Held yet not refunded (the refusal is visible before mining).

Crash safety: every refund transaction is signed, then recorded with its raw bytes, then
broadcast. After a crash the recorded transaction is broadcast again as it was (same nonce),
never a new one; and `refundMany` skips escrows settled meanwhile, so a refund can be neither
lost nor paid twice.

Faults: any failure of a cycle (an RPC error object, a refused connection, a malformed answer,
even a bug) is logged, counted in `x402_keeper_cycle_failures`, and retried after a backoff;
/readyz answers 503 after a few in a row. The process never dies of one.
"""

from __future__ import annotations

import logging
import math
import random
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from eth_abi.abi import encode

from escrow_py.chain import rpc
from escrow_py.chain.escrow import ESCROW_ABI, PayoutFailed, Refunded, decode_log, decode_settlement_log
from escrow_py.chain.port import EscrowChain
from escrow_py.chain.signer import Signer
from escrow_py.chain.tx import SentTx, decode_revert
from escrow_py.chain.web3chain import connect_chain
from escrow_py.console import Explorer
from escrow_py.keeper._batch import PAYOUT_GAS, batch_gas, fingerprint, max_entries, ordered, refund_many_data, split
from escrow_py.keeper._checks import check_startup
from escrow_py.keeper._config import LONGEST_RETRY, KeeperConfig
from escrow_py.keeper._console import keeper_figures, open_console_db
from escrow_py.keeper._decide import Refund, next_action
from escrow_py.keeper._index import Head, Indexer, block_hash, read_head
from escrow_py.keeper._metrics import KeeperMetrics, MetricsServer
from escrow_py.keeper._store import IN_FLIGHT, PENDING, QUARANTINED, Attempt, KeeperStore, OpenEscrow, prune
from escrow_py.protocol.errors import ChainError, ContractRevert, RpcError
from escrow_py.protocol.terms import State
from escrow_py.storage import Database, describe

log = logging.getLogger("escrow_py.keeper")

# Failures a cycle treats as the chain's or the network's, logged without a stack trace.
RPC_FAILURES = (ChainError, OSError, ValueError)
PRUNE_EVERY = 3600.0  # seconds between two retention prunes
_TRANSFER = bytes.fromhex("a9059cbb")  # ERC-20 transfer(address,uint256)
# Node answers to eth_sendRawTransaction that say the nonce is taken, not that the transaction is bad.
_NONCE_TAKEN = ("nonce too low", "nonce is too low", "replacement transaction underpriced", "already exists",
                "nonce has already been used")  # fmt: skip
_ALREADY_KNOWN = ("already known", "already imported", "known transaction")
# Answers that refuse the moment, not the transaction: a provider's rate limit, a full or busy pool. The same bytes
# go out again next cycle; taken for a refusal of what the transaction is, they quarantined a lone escrow for good.
_REFUSED_FOR_NOW = ("limit exceeded", "rate limit", "too many requests", "txpool is full", "transaction pool is full",
                    "pool is full", "try again", "temporarily", "busy")  # fmt: skip
# Answers that refuse the transaction's fees, not the refund: recorded bytes re-broadcast after an outage meet a
# base fee that rose past their cap. The same nonce goes out again with higher fees, never the same bytes forever.
_UNDERPRICED = ("less than block base fee", "fee cap less than", "feecap too low", "fee too low", "underpriced")
# Reverts that are the escrow's own rules (e.g. a reorg took a deposit): a race with the chain, never a
# token's doing. Every other revert of a refund that passed its simulation is the token's: a TransferFailed,
# or an InsufficientGas because a token burned more gas once mined than it did in the simulation.
_ESCROW_RULES = frozenset(
    item["name"]
    for item in ESCROW_ABI
    if item.get("type") == "error" and item["name"] not in ("TransferFailed", "InsufficientGas")
)


@dataclass
class CycleReport:
    """What one cycle did, for logs and tests."""

    indexed_to: dict[str, int] = field(default_factory=dict)
    refunds_sent: int = 0
    batches_sent: int = 0
    failed: int = 0  # escrows whose refund reverted in simulation
    payouts_refused: int = 0  # payouts the token refused (PayoutFailed, or seen in the simulation): backed off
    confirmed: int = 0  # Refunded logs naming this keeper, in receipts now final
    replaced: int = 0
    covered: int = 0  # due escrows left out: the pending state showed them settled
    reverted: int = 0  # this keeper's transactions mined with status 0
    quarantined: int = 0
    reorged: int = 0  # this keeper's mined transactions a reorg removed

    def eventful(self) -> bool:
        return any((self.batches_sent, self.failed, self.payouts_refused, self.confirmed, self.replaced, self.covered,
                    self.reverted, self.quarantined, self.reorged))  # fmt: skip


class Keeper:
    """Refunds every Held escrow past its deadline on the configured escrow contracts."""

    def __init__(
        self,
        config: KeeperConfig,
        signer: Signer,
        *,
        store: KeeperStore | None = None,
        chain: EscrowChain | None = None,
    ) -> None:
        """`chain`: another EscrowChain than the node at config.rpc_url (sending from `signer`'s key)."""
        self.config = config
        # One deadline per call, retries included: a failed or hung request fails the cycle, which backs off.
        self.chain: EscrowChain = (
            chain if chain is not None else connect_chain(config.rpc_url, deadline=config.rpc_timeout, signer=signer)
        )
        self.me = signer.address.lower()
        self.store = store or KeeperStore(config.database)
        self.metrics = KeeperMetrics()
        self.escrows: tuple[str, ...] = tuple(config.escrows)
        self.indexers = {
            address: Indexer(self.chain, self.store, address, config.start_block, self.metrics.rpc_errors.inc)
            for address in config.escrows
        }
        self.tokens = config.allowed_tokens()
        self.buyers = frozenset(b.lower() for b in config.buyers)
        self.sellers = frozenset(s.lower() for s in config.sellers)
        self._server: MetricsServer | None = None
        self._console_db: Database | None = None  # the console's own read handle, while the server runs
        self._seen_head: str | None = None
        self._in_flight: set[bytes] = set()
        # Lowered after a node refuses a batch for good (too large for it): batches stay under it.
        self._batch_cap: int | None = None
        # Set when a cycle stopped sending early: the next one acts even without a new block.
        self._act_again = False
        self._random = random.Random()
        # Wall clock of retries and backoffs (never of expiry: that is chain time); a test may move it on.
        self.clock: Callable[[], float] = time.time
        self._gauges_set = False  # the escrow and quarantine gauges are read from the store once, then on changes
        self._pruned_at = -PRUNE_EVERY  # wall time of the last retention prune

    # -- start-up --------------------------------------------------------------------------------

    def check(self) -> None:
        """Start-up checks (chain id, escrow code, token allowlist, gas); ConfigError or RpcError if one fails."""
        check_startup(self.chain, self.config, self.chain.sender_address)

    # -- one cycle -------------------------------------------------------------------------------

    def run_once(self) -> CycleReport:
        report = CycleReport()
        head = read_head(self.chain)
        hashes = {head.number: head.hash}
        new_block = head.hash != self._seen_head
        if new_block:
            self.index(head, hashes, report)
        changed = self._track(head, hashes, new_block, report)
        if new_block or changed or self._act_again:
            self.act(report, head)
        self._seen_head = head.hash
        self._prune()
        self.metrics.cycle_ok()
        return report

    def _prune(self) -> None:
        """With a retention set, forget settled escrows past their deadline plus it, once every PRUNE_EVERY."""
        now = self.clock()
        if self.config.retention <= 0 or now - self._pruned_at < PRUNE_EVERY:
            return
        self._pruned_at = now
        deleted = prune(self.store.db, before=now - self.config.retention)
        if any(deleted.values()):
            log.info("pruned settled history", extra={"deleted": deleted})

    def index(self, head: Head | None = None, hashes: dict[int, str] | None = None,
              report: CycleReport | None = None) -> dict[str, int]:  # fmt: skip
        """Bring every escrow's events up to the confirmed head; returns the new checkpoints."""
        head = head or read_head(self.chain)
        hashes = {head.number: head.hash} if hashes is None else hashes
        done: dict[str, int] = {}
        confirmed = head.number - self.config.confirmations + 1
        for address, indexer in self.indexers.items():
            checkpoint, _, changed = indexer.sync(confirmed, hashes)
            done[address] = checkpoint
            if changed or not self._gauges_set:
                for state, n in self.store.counts(address).items():
                    self.metrics.escrows.labels(state=state).set(n)
        if not self._gauges_set:
            self._set_quarantine_gauge()
            self._set_backoff_gauge()
            self._gauges_set = True
        if done:
            self.metrics.last_indexed_block.set(min(done.values()))
        if report is not None:
            report.indexed_to = done
        return done

    # -- track this keeper's transactions ----------------------------------------------------------

    def _track(self, head: Head, hashes: dict[int, str], new_block: bool, report: CycleReport) -> bool:
        """Follow up every transaction this keeper sent; True if some escrow came back into play."""
        attempts = self.store.tracked_attempts(self.me)
        statuses = {a.tx_hash: a.status for a in attempts}
        changed = False
        confirmed_nonce: int | None = None
        newest: dict[int, Attempt] = {}
        for attempt in attempts:
            newest[attempt.nonce] = attempt  # oldest first: the last one per nonce is the newest
        broadcast_ok = True
        for attempt in attempts:
            status = statuses[attempt.tx_hash]
            if status in PENDING:
                # A receipt, or a nonce used up, can only appear with a new block.
                if new_block or status == "signed":
                    receipt = self._receipt(attempt.tx_hash)
                    if receipt is None:
                        if confirmed_nonce is None:
                            confirmed_nonce = self._confirmed_nonce()
                        if attempt.nonce < confirmed_nonce:
                            receipt = self._receipt(attempt.tx_hash)  # it may have been mined in between
                            if receipt is None:
                                # Its nonce went to another transaction (a replacement of it, or one from elsewhere).
                                self._set(attempt, "dropped", statuses)
                                changed = True
                                continue
                    if receipt is not None:
                        self._on_receipt(attempt, receipt, head, attempts=attempts, statuses=statuses, report=report)
                        changed = True
                        continue
                if status == "signed" and broadcast_ok:
                    # Recorded but not (known to be) accepted: a crash or a failed broadcast. A replacement's
                    # escrows were counted as sent with the transaction it replaces.
                    replacement = any(statuses[a.tx_hash] == "replaced" and a.nonce == attempt.nonce for a in attempts)
                    outcome = self._rebroadcast(attempt, statuses, report if not replacement else None, report)
                    broadcast_ok = outcome == "sent"
                    changed |= outcome == "rejected"
                elif (status == "sent" and newest[attempt.nonce] is attempt and broadcast_ok
                      and time.time() - attempt.updated_at > self.config.replace_after):  # fmt: skip
                    broadcast_ok = self._replace(attempt, statuses, report)
            elif status in ("mined", "reverted") and new_block:
                changed |= self._follow_mined(attempt, status, head, hashes=hashes, statuses=statuses, report=report)
        self._in_flight = {i for a in attempts if statuses[a.tx_hash] in IN_FLIGHT for i in a.ids}
        self._renew_claims(attempts, statuses)
        return changed

    def _renew_claims(self, attempts: list[Attempt], statuses: dict[bytes, str]) -> None:
        """Other keepers on this database stay off the escrows of this keeper's refunds while they may land."""
        for address in self.escrows:
            ids = [i for a in attempts if a.escrow == address and statuses[a.tx_hash] in IN_FLIGHT for i in a.ids]
            self.store.renew_claims(address, self.me, ids, self.clock())

    def _rebroadcast(
        self, attempt: Attempt, statuses: dict[bytes, str], first: CycleReport | None, report: CycleReport
    ) -> str:
        """Broadcast a recorded transaction again, as it was (same bytes, same nonce); refused for its fees (the base
        fee rose past its cap meanwhile), re-signed at its nonce with higher fees instead."""
        outcome = self._broadcast(attempt.escrow, self.store.attempt_tx(attempt.tx_hash), attempt.ids, first=first)
        if outcome == "underpriced":
            return "sent" if self._replace(attempt, statuses, report, first=first) else outcome
        if outcome in ("sent", "rejected"):
            statuses[attempt.tx_hash] = outcome
        return outcome

    def _set(self, attempt: Attempt, status: str, statuses: dict[bytes, str], **fields: Any) -> None:
        self.store.set_attempt_status(attempt.tx_hash, status, **fields)
        statuses[attempt.tx_hash] = status
        if status in ("dropped", "rejected", "replaced"):
            self.metrics.transactions.labels(outcome=status).inc()

    def _receipt(self, tx_hash: bytes) -> dict[str, Any] | None:
        receipt = self.chain.request("eth_getTransactionReceipt", ["0x" + tx_hash.hex()])
        return receipt if isinstance(receipt, dict) and receipt.get("blockHash") else None

    def _confirmed_nonce(self) -> int:
        return int(str(self.chain.request("eth_getTransactionCount", [self.chain.sender_address, "latest"])), 16)

    def _on_receipt(
        self, attempt: Attempt, receipt: dict[str, Any], head: Head, *, attempts: Sequence[Attempt],
        statuses: dict[bytes, str], report: CycleReport,
    ) -> None:  # fmt: skip
        """Record a mined attempt; the refunds it made are those its Refunded logs say, not its size."""
        block = (int(receipt["blockNumber"], 16), str(receipt["blockHash"]))
        gas = int(receipt["gasUsed"], 16)
        refunds, refused = _receipt_events(receipt, attempt.escrow)
        refunded = sum(1 for event in refunds if event.caller.lower() == self.me)
        ok = int(receipt["status"], 16) == 1
        self.metrics.gas_used.inc(gas)
        if not ok or refunded == 0:
            self.metrics.gas_wasted.inc(gas)
        status = "mined" if ok else "reverted"
        self.metrics.transactions.labels(outcome=status).inc()
        self._set(attempt, status, statuses, block=block, refunded=refunded, gas_used=gas)
        for sibling in attempts:  # the other transactions with its nonce can no longer be mined
            same_nonce = sibling.nonce == attempt.nonce and sibling.tx_hash != attempt.tx_hash
            if same_nonce and statuses[sibling.tx_hash] in PENDING:
                self._set(sibling, "dropped", statuses)
        if ok:
            fields = {"tx": "0x" + attempt.tx_hash.hex(), "block": block[0], "escrows": len(attempt.ids),
                      "refunded": refunded, "gas": gas}  # fmt: skip
            log.info("refund batch mined", extra=fields)
            if self.store.clear_backoffs(attempt.escrow, [event.id for event in refunds]):
                self._set_backoff_gauge()
            fees = self.store.attempt_tx(attempt.tx_hash).tx if refused else {}
            for failure in refused:
                self._payout_refused(attempt.escrow, failure.token, failure.to, failure.amount, stage="mined",
                                     report=report, fees=fees)  # fmt: skip
            if head.number - block[0] + 1 > self.config.reorg_depth:
                self._finalise(attempt, refunded, statuses, report)
        else:
            report.reverted += 1
            self._after_revert(attempt, gas, report)

    def _follow_mined(
        self, attempt: Attempt, status: str, head: Head, *, hashes: dict[int, str], statuses: dict[bytes, str],
        report: CycleReport,
    ) -> bool:  # fmt: skip
        """Until `reorg_depth` deep: is the attempt's block still on the chain? True if a reorg undid it."""
        number = attempt.block_number
        assert number is not None
        if number not in hashes:
            hashes[number] = block_hash(self.chain, number) or ""
        if hashes[number] == attempt.block_hash:
            if head.number - number + 1 > self.config.reorg_depth:
                if status == "mined":
                    self._finalise(attempt, attempt.refunded or 0, statuses, report)
                else:
                    self._set(attempt, "final", statuses)
            return False
        receipt = self._receipt(attempt.tx_hash)
        if receipt is not None:  # mined again, in the block that replaced it
            self._set(attempt, status, statuses, block=(int(receipt["blockNumber"], 16), str(receipt["blockHash"])))
            return False
        # A reorg removed it. The node's nonce for this key went back, so the cached one is wrong. The same
        # bytes go out again if they still refund something on the new chain (a reverted one is not worth its
        # gas twice: its set is already split); otherwise the escrows go back to the due list.
        report.reorged += 1
        self.metrics.transactions.labels(outcome="reorged").inc()
        self.chain.resync_nonce()
        again = status == "mined" and self._still_refunds(attempt)
        log.warning("refund 0x%s was removed by a reorg; %s", attempt.tx_hash.hex(),
                    "broadcasting it again" if again else "not sending it again")  # fmt: skip
        if again:
            self._set(attempt, "sent", statuses)  # accepted once already: counted as sent then
            self._rebroadcast(attempt, statuses, None, report)
        else:
            self._set(attempt, "dropped", statuses)
        return True

    def _still_refunds(self, attempt: Attempt) -> bool:
        data = bytes(self.store.attempt_tx(attempt.tx_hash).tx["data"])
        try:
            return int.from_bytes(self.chain.call(attempt.escrow, data, block="pending")[:32], "big") > 0
        except ContractRevert:
            return False

    def _finalise(self, attempt: Attempt, refunded: int, statuses: dict[bytes, str], report: CycleReport) -> None:
        self._set(attempt, "final", statuses)
        self.metrics.refunds_confirmed.inc(refunded)
        report.confirmed += refunded

    def _after_revert(self, attempt: Attempt, gas: int, report: CycleReport) -> None:
        """A batch reverted when mined though its simulation passed: never send that set again; isolate the culprit.

        First for free: the transaction is replayed as an eth_call with its own gas and fees (a token that
        checks the gas price fails there too), and bisected the same way; each entry that fails alone is
        quarantined and the others go out in the next batch. If the revert cannot be reproduced, the batch
        is split by token, then into parts, each sent on its own, and an entry whose refund reverts when mined
        alone is quarantined: one lost batch per split level.
        """
        ids = list(attempt.ids)
        self.store.add_reverted_set(fingerprint(ids), attempt.escrow, attempt.tx_hash, len(ids))
        fees = self.store.attempt_tx(attempt.tx_hash).tx
        entries = self.store.entries(attempt.escrow, ids)
        revert = self._priced_call(attempt.escrow, entries, fees) if entries else None
        reason = "not reproducible in eth_call" if revert is None else _describe(revert)
        if revert is not None and revert.name in _ESCROW_RULES:
            # The escrow's own rule, not a token: the chain moved under the transaction (a reorg took its
            # deposit or rewound the clock). Not the entries' fault; they are simulated again later.
            for escrow_id in ids:
                self.store.record_failure(attempt.escrow, escrow_id, f"reverted when mined: {reason}",
                                          self.clock() + self.config.retry_after)  # fmt: skip
            log.warning("refund batch 0x%s reverted when mined on an escrow rule: %s", attempt.tx_hash.hex(), reason)
            return
        if len(ids) == 1:
            self._quarantine(attempt.escrow, ids[0], f"refund reverted when mined: {reason}", report)
            return
        culprits = self._culprits(attempt.escrow, entries, fees) if revert is not None else {}
        for escrow_id, why in culprits.items():
            self._quarantine(attempt.escrow, escrow_id, f"refund reverts when it pays for gas: {why}", report)
        if culprits:
            log.warning("refund batch 0x%s of %d escrows reverted when mined (%d gas); %d quarantined, the rest "
                        "go out again", attempt.tx_hash.hex(), len(ids), gas, len(culprits))  # fmt: skip
            return
        parts = split(ids, {e.id: e.token for e in entries})
        self.store.set_suspect_groups(attempt.escrow, [(fingerprint(p), p) for p in parts],
                                      f"in a batch that reverted when mined: {reason}")  # fmt: skip
        log.warning(
            "refund batch 0x%s of %d escrows reverted when mined (%d gas): %s; sending it again in %d parts",
            attempt.tx_hash.hex(), len(ids), gas, reason, len(parts),
        )  # fmt: skip

    def _culprits(self, escrow: str, entries: list[OpenEscrow], fees: dict[str, Any]) -> dict[bytes, str]:
        """Bisect with priced eth_calls: the entries whose refund reverts on its own, and why."""
        revert = self._priced_call(escrow, entries, fees)
        if revert is None:
            return {}
        if len(entries) == 1:
            return {entries[0].id: _describe(revert)}
        middle = len(entries) // 2
        return self._culprits(escrow, entries[:middle], fees) | self._culprits(escrow, entries[middle:], fees)

    def _priced_call(self, escrow: str, entries: list[OpenEscrow], fees: dict[str, Any]) -> ContractRevert | None:
        """refundMany(entries) as an eth_call carrying a transaction's gas price, on the pending state: its revert."""
        call = {"from": self.chain.sender_address, "to": escrow, "data": "0x" + refund_many_data(entries).hex(),
                "gas": hex(batch_gas(len(entries))), "maxFeePerGas": hex(int(fees["maxFeePerGas"])),
                "maxPriorityFeePerGas": hex(int(fees["maxPriorityFeePerGas"]))}  # fmt: skip
        try:
            self.chain.request("eth_call", [call, "pending"])
        except rpc.NodeError as exc:
            if exc.revert_data is not None:
                return decode_revert(exc.revert_data)
            return ContractRevert("Error", {"message": str(exc)}) if exc.is_revert else None
        except RpcError:
            return None
        return None

    def _quarantine(self, escrow: str, escrow_id: bytes, reason: str, report: CycleReport) -> None:
        self.store.quarantine(escrow, escrow_id, reason)
        self.metrics.quarantined.inc()
        self._set_quarantine_gauge()
        report.quarantined += 1
        log.warning("escrow 0x%s quarantined: %s", escrow_id.hex(), reason)

    def _set_quarantine_gauge(self) -> None:
        self.metrics.quarantined_open.set(sum(len(self.store.troubles(a, QUARANTINED)) for a in self.escrows))

    def _payout_refused(
        self, escrow: str, token: str, buyer: str, amount: int, *, stage: str, report: CycleReport,
        fees: dict[str, Any] | None = None,
    ) -> None:  # fmt: skip
        """The token refused a refund payout to `buyer` (`stage`: mined, or seen in the simulation): back off."""
        reason = self._why_refused(escrow, token, buyer, amount, fees or {})
        backoff = self.store.record_refused_payout(
            escrow, token, buyer, reason, now=self.clock(), first_wait=self.config.retry_after,
            longest_wait=LONGEST_RETRY,
        )  # fmt: skip
        self.metrics.payouts_refused.labels(stage=stage).inc()
        self._set_backoff_gauge()
        report.payouts_refused += 1
        log.warning(
            "token %s refused a refund of %d to %s (%s, %s); its escrows wait %ds (refusal %d in a row)",
            token, amount, buyer, reason, "when mined" if stage == "mined" else "in the simulation",
            round(backoff.retry_at - self.clock()), backoff.failures,
        )  # fmt: skip

    def _why_refused(self, escrow: str, token: str, buyer: str, amount: int, fees: dict[str, Any]) -> str:
        """The token's own reason: its transfer replayed as an eth_call from the escrow, with the transaction's
        fees (a token may refuse only when the gas is paid for) and the payout's gas allowance."""
        data = _TRANSFER + encode(["address", "uint256"], [buyer, amount])
        call = {"from": escrow, "to": token, "gas": hex(PAYOUT_GAS), "data": "0x" + data.hex()}
        for field_name in ("maxFeePerGas", "maxPriorityFeePerGas"):
            if field_name in fees:
                call[field_name] = hex(int(fees[field_name]))
        # The escrow holds no ether to pay the fees of a call from it: lend it some, for this call only.
        lend = {escrow: {"balance": hex(10**24)}}
        try:
            result = str(self.chain.request("eth_call", [call, "pending", lend]))
        except rpc.NodeError as exc:
            if exc.revert_data:
                return f"PayoutFailed: {decode_revert(exc.revert_data)}"
            return f"PayoutFailed: {exc}" if exc.is_revert else "PayoutFailed"
        except RpcError:
            return "PayoutFailed"
        if result not in ("0x", "0x" + "00" * 31 + "01"):
            return f"PayoutFailed: the token answered {result[:66]}"
        return "PayoutFailed (not reproducible in eth_call)"

    def _set_backoff_gauge(self) -> None:
        self.metrics.backoffs.set(sum(len(self.store.backoffs(a)) for a in self.escrows))

    def _replace(
        self, attempt: Attempt, statuses: dict[bytes, str], report: CycleReport, *, first: CycleReport | None = None
    ) -> bool:
        """Re-sign a stuck transaction with the same nonce and higher fees; False if its broadcast failed.

        `first`: as for `_broadcast`, when no node accepted the replaced one, so its escrows are not counted yet."""
        replacement = self.chain.replace(self.store.attempt_tx(attempt.tx_hash))
        self.store.record_attempt(attempt.escrow, self.me, attempt.ids, replacement)
        self._set(attempt, "replaced", statuses)
        report.replaced += 1
        log.info("stuck refund 0x%s replaced by 0x%s", attempt.tx_hash.hex(), replacement.tx_hash.hex())
        return self._broadcast(attempt.escrow, replacement, attempt.ids, first=first) == "sent"

    # -- decide and act ------------------------------------------------------------------------------

    def act(self, report: CycleReport, head: Head | None = None) -> None:
        head = head or read_head(self.chain)
        self._act_again = False
        chain_time = head.timestamp
        limit = max_entries(self.config.batch_size, self.config.max_batch_gas, head.gas_limit)
        if self._batch_cap is not None:
            limit = min(limit, self._batch_cap)
        standby = math.ceil(self.config.standby_after)
        wall = self.clock()
        for address in self.escrows:
            groups: dict[str, list[OpenEscrow]] = {}
            plain: list[OpenEscrow] = []
            for entry in self.store.due(address, chain_time - standby, self._in_flight, claimable_by=self.me, now=wall):
                action = next_action(entry, chain_time, wall_time=wall, buyers=self.buyers, sellers=self.sellers,
                                     tokens=self.tokens, standby_after=self.config.standby_after)  # fmt: skip
                if isinstance(action, Refund):
                    (groups.setdefault(entry.group, []) if entry.group else plain).append(entry)
            # A suspect group goes out alone, so that if it reverts again, it sinks nothing else.
            batches = [ordered(g)[i : i + limit] for g in groups.values() for i in range(0, len(g), limit)]
            plain = ordered(plain)
            batches += [plain[i : i + limit] for i in range(0, len(plain), limit)]
            # Keepers racing over the same due escrows cut the same batches. Each takes them in its own random
            # order, so they mostly start on different ones and then see each other's in the pending state.
            self._random.shuffle(batches)
            for batch in batches:
                if not self._refund_batch(address, batch, chain_time, report):
                    self._act_again = True  # the node refused or could not be reached: next cycle, afresh
                    return

    def _refund_batch(self, address: str, batch: list[OpenEscrow], chain_time: int, report: CycleReport) -> bool:
        """Claim, simulate, sign, record and broadcast one batch; False if broadcasting should stop this cycle."""
        # Keepers sharing the database split the due escrows: what another keeper claimed first is its to refund.
        claimed = self.store.claim(address, self.me, [e.id for e in batch], self.clock())
        batch = [e for e in batch if e.id in claimed]
        if not batch:
            return True
        if self.store.is_reverted_set(fingerprint([e.id for e in batch])):
            self._never_again(address, batch, report)
            return True
        batch, would_refund = self._simulated(address, batch, report)
        if batch and would_refund < len(batch):
            # refundMany skips settled entries: against the pending state, some are covered by a transaction
            # not yet mined (another keeper's, usually). Keep the ones still Held there.
            refused: list[list[OpenEscrow]] = []
            held = self._still_held(address, batch, would_refund, refused)
            by_buyer: dict[tuple[str, str], int] = {}  # a bisection may cut one buyer's run in two: one refusal
            for run in refused:
                for entry in run:
                    by_buyer[entry.token, entry.buyer] = (
                        by_buyer.get((entry.token, entry.buyer), 0) + entry.terms.amount
                    )
            for (token, buyer), amount in by_buyer.items():
                self._payout_refused(address, token, buyer, amount, stage="simulation", report=report)
            covered = len(batch) - len(held) - sum(len(run) for run in refused)
            report.covered += covered
            self.metrics.covered.inc(covered)
            batch = held
            if batch and self.store.is_reverted_set(fingerprint([e.id for e in batch])):
                self._never_again(address, batch, report)
                return True
        if not batch:
            return True
        ids = [e.id for e in batch]
        signed = self.chain.sign(address, refund_many_data(batch), gas=batch_gas(len(batch)))
        # Durable before it leaves the process: a crash after this line re-broadcasts this exact transaction.
        self.store.record_attempt(address, self.me, ids, signed)
        self._in_flight.update(ids)
        if self._broadcast(address, signed, ids, first=report) != "sent":
            return False
        for entry in batch:
            self.metrics.refund_delay.observe(max(0, chain_time - entry.deadline))
        return True

    def _still_held(
        self, address: str, batch: list[OpenEscrow], would_refund: int, refused: list[list[OpenEscrow]]
    ) -> list[OpenEscrow]:
        """The entries of `batch` a pending-state refundMany would refund, given that it refunds `would_refund`.

        Bisected on the simulated count, not asked entry by entry: another keeper's transactions cover
        whole runs of a batch, so a few calls settle 250 entries. A part of one (token, buyer) that would
        refund nothing is either covered or refused by the token: one state read tells which, and a refused
        one goes to `refused` (the payout to that buyer fails whatever the batch).
        """
        if would_refund == len(batch):
            return batch
        if would_refund == 0:
            first = batch[0]
            if any((e.token, e.buyer) != (first.token, first.buyer) for e in batch):
                return []
            if self.chain.state_of(first.id, escrow=address, block="pending") is State.HELD:
                refused.append(batch)
            return []
        middle = len(batch) // 2
        held = []
        for part in (batch[:middle], batch[middle:]):
            try:
                count = int.from_bytes(self.chain.call(address, refund_many_data(part), block="pending")[:32], "big")
            except ContractRevert:  # the pending state moved under us: ask entry by entry
                held += [e for e in part if self.chain.state_of(e.id, escrow=address, block="pending") is State.HELD]
                continue
            held += self._still_held(address, part, count, refused)
        return held

    def _never_again(self, address: str, batch: list[OpenEscrow], report: CycleReport) -> None:
        """A batch equal to a set that reverted when mined: split it instead of paying for the same revert."""
        ids = [e.id for e in batch]
        if len(ids) == 1:
            self._quarantine(address, ids[0], "its refund alone reverted when mined before", report)
            return
        parts = split(ids, {e.id: e.token for e in batch})
        self.store.set_suspect_groups(address, [(fingerprint(p), p) for p in parts], "in a set that reverted before")

    def _simulated(self, address: str, batch: list[OpenEscrow], report: CycleReport) -> tuple[list[OpenEscrow], int]:
        """The entries whose refund goes through in an eth_call on the pending state, and how many it would refund.

        A batch that reverts is bisected; an entry that reverts alone is set aside for `retry_after` seconds.
        """
        try:
            result = self.chain.call(address, refund_many_data(batch), block="pending")
        except ContractRevert as revert:
            if len(batch) == 1:
                entry = batch[0]
                self.store.record_failure(address, entry.id, str(revert), self.clock() + self.config.retry_after)
                self.metrics.refunds_failed.inc()
                report.failed += 1
                log.warning("refund of 0x%s fails in simulation: %s", entry.id.hex(), revert)
                return [], 0
            middle = len(batch) // 2
            left, left_count = self._simulated(address, batch[:middle], report)
            right, right_count = self._simulated(address, batch[middle:], report)
            return left + right, left_count + right_count
        return batch, int.from_bytes(result[:32], "big")

    def _broadcast(self, escrow: str, signed: SentTx, ids: Sequence[bytes], *, first: CycleReport | None) -> str:
        """eth_sendRawTransaction; returns sent, transient (try the same bytes later), underpriced (re-sign at
        its nonce with higher fees), nonce, or rejected.

        `first` is the cycle's report when these escrows have not been counted as sent yet: they are
        counted, and "refund batch sent" logged, once a node has accepted the transaction, and only then.
        """
        try:
            self.chain.request("eth_sendRawTransaction", ["0x" + signed.raw.hex()])
        except rpc.NodeError as exc:
            message = str(exc.error.get("message", exc.error) if isinstance(exc.error, dict) else exc.error)
            lowered = message.lower()
            if not any(k in lowered for k in _ALREADY_KNOWN):
                return self._refused(escrow, signed, ids, message)
        except RpcError as exc:
            # Not known whether the node took it: the recorded bytes go out again next cycle.
            self.chain.resync_nonce()
            self.metrics.rpc_errors.inc()
            log.warning("broadcast of refund 0x%s failed, will retry the same transaction: %s",
                        signed.tx_hash.hex(), exc)  # fmt: skip
            return "transient"
        self.store.set_attempt_status(signed.tx_hash, "sent")
        self.metrics.transactions.labels(outcome="sent").inc()
        if first is not None:
            first.refunds_sent += len(ids)
            first.batches_sent += 1
            self.metrics.refunds_sent.inc(len(ids))
            log.info("refund batch sent", extra={"tx": "0x" + signed.tx_hash.hex(), "escrows": len(ids),
                                                 "nonce": signed.nonce})  # fmt: skip
        return "sent"

    def _refused(self, escrow: str, signed: SentTx, ids: Sequence[bytes], message: str) -> str:
        """The node answered eth_sendRawTransaction with an error object."""
        self.chain.resync_nonce()
        lowered = message.lower()
        if any(k in lowered for k in _NONCE_TAKEN):
            # Its nonce is used or held by another transaction: the tracker drops it once that one is mined.
            log.warning("refund 0x%s not accepted (%s); nonce resynchronised", signed.tx_hash.hex(), message)
            return "nonce"
        if any(k in lowered for k in _REFUSED_FOR_NOW):
            self.metrics.rpc_errors.inc()
            log.warning("broadcast of refund 0x%s refused for now (%s), will retry the same transaction",
                        signed.tx_hash.hex(), message)  # fmt: skip
            return "transient"
        if any(k in lowered for k in _UNDERPRICED):
            log.warning("refund 0x%s refused for its fees (%s); it goes out again at its nonce with higher fees",
                        signed.tx_hash.hex(), message)  # fmt: skip
            return "underpriced"
        self.store.set_attempt_status(signed.tx_hash, "rejected")
        self.metrics.transactions.labels(outcome="rejected").inc()
        self._in_flight.difference_update(ids)
        if "insufficient funds" in lowered:
            log.error("keeper key %s cannot pay for a refund of %d escrows: %s", self.chain.sender_address, len(ids),
                      message)  # fmt: skip
            return "rejected"
        # Refused for what it is (too large, over a gas limit): the same bytes would be refused forever.
        if len(ids) == 1:
            self._quarantine(escrow, ids[0], f"refund refused by the node: {message}", CycleReport())
        else:
            self._batch_cap = max(1, len(ids) // 2)
            log.warning("node refused a refund batch of %d escrows (%s); batches now hold at most %d",
                        len(ids), message, self._batch_cap)  # fmt: skip
        return "rejected"

    # -- loop ------------------------------------------------------------------------------------------

    def run(self, stop: threading.Event, *, check: bool = True) -> None:
        """Check the set-up, then cycle until `stop` is set; a failed cycle is logged, counted and backed off."""
        if check:
            self.check()
        address = self.config.metrics_address
        if address is not None:
            stale = max(30.0, 10 * self.config.poll_interval)
            self._console_db = console_db = open_console_db(self.config.database)
            self._server = MetricsServer(
                self.metrics, *address, stale_after=stale,
                figures=lambda: keeper_figures(console_db, lambda: self.chain.head().number),
                explorer=Explorer(self.chain.chain_id, lambda: self.chain.request("web3_clientVersion", [])),
            )  # fmt: skip
        log.info(
            "keeper started",
            extra={"keeper": self.chain.sender_address, "escrows": list(self.config.escrows),
                   "database": describe(self.config.database), "metrics_port": self.metrics_port,
                   "tokens": "any" if self.tokens is None else sorted(self.tokens)},
        )  # fmt: skip
        poll = self.config.poll_interval
        longest = max(poll, min(16 * poll, 60.0))
        try:
            while not stop.is_set():
                try:
                    report = self.run_once()
                    if report.eventful():
                        log.info("cycle", extra={"report": report.__dict__})
                except RPC_FAILURES as exc:
                    self.metrics.cycle_failed("rpc")
                    self.chain.resync_nonce()
                    log.warning("cycle failed (%d in a row): %s: %s", self.metrics.failures_in_a_row,
                                type(exc).__name__, exc)  # fmt: skip
                except Exception:  # a bug must not stop refunds for good: log it with its stack and go on
                    self.metrics.cycle_failed("internal")
                    self.chain.resync_nonce()
                    log.exception("cycle failed (%d in a row) on an unexpected error", self.metrics.failures_in_a_row)
                failures = self.metrics.failures_in_a_row
                stop.wait(poll if failures == 0 else min(poll * 2 ** (failures - 1), longest))
        finally:
            if self._server is not None:
                self._server.close()
            if self._console_db is not None:
                self._console_db.close()
                self._console_db = None

    @property
    def metrics_port(self) -> int | None:
        return None if self._server is None else self._server.port

    def close(self) -> None:
        self.store.close()


def _receipt_events(receipt: dict[str, Any], escrow: str) -> tuple[list[Refunded], list[PayoutFailed]]:
    """The escrow's Refunded and PayoutFailed events in a raw receipt, read by the binding's own decoders."""
    refunds: list[Refunded] = []
    refused: list[PayoutFailed] = []
    for entry in receipt.get("logs") or []:
        if str(entry.get("address", "")).lower() != escrow.lower():
            continue
        log_entry = {
            "topics": [bytes.fromhex(str(t)[2:]) for t in entry.get("topics") or []],
            "data": bytes.fromhex(str(entry.get("data", "0x"))[2:]),
            "blockNumber": int(entry["blockNumber"], 16),
            "blockHash": bytes.fromhex(str(entry["blockHash"])[2:]),
            "transactionHash": bytes.fromhex(str(entry["transactionHash"])[2:]),
            "logIndex": int(entry["logIndex"], 16),
        }
        if isinstance(event := decode_log(log_entry), Refunded):
            refunds.append(event)
        elif isinstance(failure := decode_settlement_log(log_entry), PayoutFailed):
            refused.append(failure)
    return refunds, refused


def _describe(revert: ContractRevert) -> str:
    """A revert as text, with a token's own revert data decoded where TransferFailed carries it."""
    inner = revert.args_by_name.get("reason") if revert.name == "TransferFailed" else None
    if isinstance(inner, bytes) and len(inner) >= 4:
        nested = decode_revert(inner)
        if nested.name != "UnknownRevert":
            shown = {**revert.args_by_name, "reason": str(nested)}
            return f"TransferFailed({', '.join(f'{k}={v}' for k, v in shown.items())})"
    return str(revert)


__all__ = ["CycleReport", "Keeper"]
