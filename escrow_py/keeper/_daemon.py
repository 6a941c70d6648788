"""The keeper loop: fetch (index events), decide (`next_action`), act (refundMany), repeat.

Crash safety: every refund transaction is signed, then recorded with its raw
bytes, then broadcast. After a crash the recorded transaction is broadcast again
as it was (same nonce), never a new one; and `refundMany` skips escrows settled
meanwhile, so a refund can be neither lost nor paid twice.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

from web3 import HTTPProvider, Web3

from escrow_py.chain.escrow import Escrow, EscrowEvent
from escrow_py.chain.signer import Signer
from escrow_py.chain.tx import SentTx, TxSender
from escrow_py.errors import ChainError, ContractRevert, RpcError
from escrow_py.keeper._config import MAX_LOG_CHUNK, KeeperConfig
from escrow_py.keeper._decide import Refund, next_action
from escrow_py.keeper._metrics import KeeperMetrics, MetricsServer
from escrow_py.keeper._store import OPEN_ATTEMPTS, Attempt, KeeperStore, OpenEscrow

log = logging.getLogger("x402_escrow.keeper")

# A refund batch that fails in simulation is split to isolate the entries at fault
# (a token that blacklists the buyer); those wait this long before another try.
FAILURE_RETRY_SECONDS = 300.0


@dataclass
class CycleReport:
    """What one cycle did, for logs and tests."""

    indexed_to: dict[str, int] = field(default_factory=dict)
    refunds_sent: int = 0
    batches_sent: int = 0
    failed: int = 0
    confirmed: int = 0
    replaced: int = 0


class Keeper:
    """Refunds every Held escrow past its deadline on the configured escrow contracts."""

    def __init__(self, config: KeeperConfig, signer: Signer, *, store: KeeperStore | None = None) -> None:
        self.config = config
        self.w3 = Web3(HTTPProvider(config.rpc_url, request_kwargs={"timeout": 30}))
        self.sender = TxSender(self.w3, signer)
        self.store = store or KeeperStore(config.database)
        self.escrows = {address: Escrow(self.w3, address) for address in config.escrows}
        self.metrics = KeeperMetrics()
        self._server: MetricsServer | None = None

    # -- fetch -------------------------------------------------------------------------------

    def index(self) -> dict[str, int]:
        """Bring every escrow's events up to the confirmed head; returns the new checkpoints."""
        latest = int(self.w3.eth.block_number)
        head = latest - self.config.confirmations + 1
        done: dict[str, int] = {}
        for address, escrow in self.escrows.items():
            done[address] = self._index_one(address, escrow, head)
        return done

    def _index_one(self, address: str, escrow: Escrow, head: int) -> int:
        start = self.config.start_block
        checkpoint = self.store.checkpoint(address)
        rewind = start - 1 if checkpoint is None else max(start - 1, checkpoint - self.config.reorg_depth)
        rewind = self._below_reorg(rewind, start)
        if head <= rewind:
            return checkpoint if checkpoint is not None else rewind
        events = self._fetch(escrow, rewind + 1, head)
        head_hash = bytes(self.w3.eth.get_block(head)["hash"])
        self.store.apply(address, rewind_to=rewind, events=events, checkpoint=head, block_hashes=[(head, head_hash)])
        self.metrics.last_indexed_block.set(head)
        return head

    def _below_reorg(self, rewind: int, start: int) -> int:
        """Move `rewind` down until the block we last saw there is still on the chain."""
        while rewind >= start:
            stored = self.store.block_hash(rewind)
            if stored is None:
                return rewind
            if bytes(self.w3.eth.get_block(rewind)["hash"]) == stored:
                return rewind
            log.warning("reorg below the re-scan window at block %d: re-indexing further back", rewind)
            rewind = max(start - 1, rewind - max(self.config.reorg_depth, 1) * 2)
        return rewind

    def _fetch(self, escrow: Escrow, first: int, last: int) -> list[EscrowEvent]:
        """eth_getLogs in chunks of at most MAX_LOG_CHUNK blocks, halving the chunk on provider errors."""
        events: list[EscrowEvent] = []
        chunk = MAX_LOG_CHUNK
        block = first
        while block <= last:
            end = min(last, block + chunk - 1)
            try:
                events.extend(escrow.events(block, end))
            except Exception as exc:
                self.metrics.rpc_errors.inc()
                if chunk == 1:
                    raise RpcError(f"eth_getLogs failed for block {block}: {exc}") from exc
                chunk = max(1, chunk // 2)
                continue
            block = end + 1
        return events

    # -- decide and act ------------------------------------------------------------------------

    def act(self, report: CycleReport) -> None:
        chain_time = int(self.w3.eth.get_block("latest")["timestamp"])
        for address, escrow in self.escrows.items():
            self._reconcile(address, report)
            due = [
                e
                for e in self.store.open_escrows(address, deadline_before=chain_time)
                if isinstance(
                    next_action(e, chain_time, wall_time=time.time(), buyers=self.config.buyers,
                                sellers=self.config.sellers),
                    Refund,
                )
            ]  # fmt: skip
            # Sorted by (token, buyer): the contract pays consecutive same-recipient entries at once.
            due.sort(key=lambda e: (e.terms.token, e.terms.buyer, e.terms.deadline))
            for i in range(0, len(due), self.config.batch_size):
                self._refund_batch(address, escrow, due[i : i + self.config.batch_size], chain_time, report)
            counts = self.store.counts(address)
            for state, n in counts.items():
                self.metrics.escrows.labels(state=state).set(n)

    def _refund_batch(
        self, address: str, escrow: Escrow, batch: Sequence[OpenEscrow], chain_time: int, report: CycleReport
    ) -> None:
        batch, would_refund = self._simulated(address, escrow, list(batch), report)
        # refundMany returns how many it refunded: zero means another keeper (or the seller) got
        # there first and the index has not caught up; sending would only burn gas.
        if not batch or would_refund == 0:
            return
        data = escrow.refund_many_data([e.terms for e in batch])
        signed = self.sender.sign(address, data)
        # Durable before it leaves the process: a crash after this line re-broadcasts this exact transaction.
        self.store.record_attempt(address, [e.id for e in batch], signed)
        self._broadcast(signed)
        report.refunds_sent += len(batch)
        report.batches_sent += 1
        self.metrics.refunds_sent.inc(len(batch))
        for entry in batch:
            self.metrics.refund_delay.observe(max(0, chain_time - entry.terms.deadline))
        log.info("refund batch sent", extra={"tx": "0x" + signed.tx_hash.hex(), "escrows": len(batch)})

    def _simulated(
        self, address: str, escrow: Escrow, batch: list[OpenEscrow], report: CycleReport
    ) -> tuple[list[OpenEscrow], int]:
        """The entries whose refund goes through in an eth_call, and how many of them it would refund.

        The entries whose refund reverts are recorded as failed.
        """
        try:
            result = self.sender.call(address, escrow.refund_many_data([e.terms for e in batch]))
        except ContractRevert as revert:
            if len(batch) == 1:
                entry = batch[0]
                self.store.record_failure(address, entry.id, str(revert), time.time() + FAILURE_RETRY_SECONDS)
                self.metrics.refunds_failed.inc()
                report.failed += 1
                log.warning("refund of 0x%s fails in simulation: %s", entry.id.hex(), revert)
                return [], 0
            middle = len(batch) // 2
            left, left_count = self._simulated(address, escrow, batch[:middle], report)
            right, right_count = self._simulated(address, escrow, batch[middle:], report)
            return left + right, left_count + right_count
        return batch, int.from_bytes(result[:32], "big")

    def _broadcast(self, signed: SentTx) -> None:
        try:
            self.sender.broadcast(signed)
        except RpcError as exc:
            self.metrics.rpc_errors.inc()
            log.warning("broadcast of 0x%s failed: %s", signed.tx_hash.hex(), exc)
            return
        self.store.set_attempt_status(signed.tx_hash, "sent")

    def _reconcile(self, address: str, report: CycleReport) -> None:
        """Follow up recorded attempts: mined, re-broadcast after a crash, or replaced when stuck."""
        confirmed_nonce = int(self.w3.eth.get_transaction_count(self.sender.address, "latest"))
        for attempt in self.store.open_attempts(address):
            receipt = self.sender.receipt(attempt.tx_hash)
            if receipt is not None:
                ok = receipt["status"] == 1
                self.store.set_attempt_status(attempt.tx_hash, "mined" if ok else "failed")
                if ok:
                    self.metrics.refunds_confirmed.inc(len(attempt.ids))
                    report.confirmed += len(attempt.ids)
                continue
            if attempt.nonce < confirmed_nonce:
                # Its nonce was used by another transaction (a replacement of it, mined): this one is dead.
                self.store.set_attempt_status(attempt.tx_hash, "dropped")
                continue
            if attempt.status == "signed":
                self._broadcast(_as_sent(attempt))
            elif time.time() - attempt.updated_at > self.config.replace_after:
                self._replace(address, attempt, report)

    def _replace(self, address: str, attempt: Attempt, report: CycleReport) -> None:
        replacement = self.sender.replace(_as_sent(attempt))
        self.store.record_attempt(address, attempt.ids, replacement)
        self.store.set_attempt_status(attempt.tx_hash, "replaced")
        self._broadcast(replacement)
        report.replaced += 1
        log.info("stuck refund 0x%s replaced by 0x%s", attempt.tx_hash.hex(), replacement.tx_hash.hex())

    # -- loop ----------------------------------------------------------------------------------

    def run_once(self) -> CycleReport:
        report = CycleReport()
        report.indexed_to = self.index()
        self.act(report)
        self.metrics.last_cycle = time.time()
        self.metrics.ready = True
        return report

    def run(self, stop: threading.Event) -> None:
        """Cycle until `stop` is set; RPC failures are logged and retried next cycle."""
        address = self.config.metrics_address
        if address is not None:
            self._server = MetricsServer(self.metrics, *address, stale_after=max(30.0, 10 * self.config.poll_interval))
        try:
            while not stop.is_set():
                try:
                    report = self.run_once()
                    if report.batches_sent or report.confirmed or report.failed:
                        log.info("cycle", extra={"report": report.__dict__})
                except (ChainError, OSError, ValueError) as exc:
                    self.metrics.rpc_errors.inc()
                    self.sender.resync_nonce()
                    log.warning("cycle failed, retrying: %s", exc)
                stop.wait(self.config.poll_interval)
        finally:
            if self._server is not None:
                self._server.close()

    def close(self) -> None:
        self.store.close()


def _as_sent(attempt: Attempt) -> SentTx:
    return SentTx(attempt.tx_hash, attempt.nonce, dict(attempt.tx), attempt.raw)


class JsonFormatter(logging.Formatter):
    """One JSON object per line, with any `extra` fields."""

    _standard = set(logging.LogRecord("", 0, "", 0, "", None, None).__dict__) | {"message"}

    def format(self, record: logging.LogRecord) -> str:
        data = {"ts": round(record.created, 3), "level": record.levelname, "msg": record.getMessage()}
        data.update({k: v for k, v in record.__dict__.items() if k not in self._standard})
        return json.dumps(data, default=str)


__all__ = ["OPEN_ATTEMPTS", "CycleReport", "JsonFormatter", "Keeper"]
