"""Stateful property test of X402Escrow against a Python model (DESIGN.md section 1, invariants 1-5, and section 8).

Actors (two buyers, two sellers, the operator, a stranger) deposit, deliver, refund, settle
serve-first and batch all of these on random escrows over two honest TestUSDC tokens and three
hostile ones, while time jumps around the deadlines. Every transaction is mined at an explicit
timestamp, so the model knows the exact block time and predicts each outcome: success with its
balance moves and events, or the exact custom error with its values. After every step:

1. each token's escrow balance equals the sum of the Held amounts in it;
2. every id is settled at most once (one settlement event: Delivered, Refunded or Settled) and
   never goes back to Held; a serve-first settled id is never Held, never deposited, refunded or
   settled again, and the token holds its nonce spent;
3. releases and settlements are mined strictly before the deadline, third-party refunds at or after it;
4. refunds reach only the buyer and releases only the seller (every actor's balance equals the
   model's, which pays nobody else), and no token leaves the escrow for a seller without a
   committed hash in the same transaction: each transaction's transfers out of the escrow equal,
   per (token, recipient), the amounts of the Delivered, Settled and Refunded events it emitted;
5. the hostile tokens (re-entering, returning false, blocking one party) leave 1-4 intact for
   every other token, since the checks cover all five tokens at once.

On a failure the test prints the hypothesis seed; rerun with X402_ESCROW_INVARIANT_SEED=<seed>.
"""

from __future__ import annotations

import os
import random
from collections import Counter
from dataclasses import dataclass
from typing import Any

import pytest
from eth_abi.abi import encode
from eth_typing import ChecksumAddress
from eth_utils.address import to_checksum_address
from eth_utils.crypto import keccak
from fixtures.chain import BUYER, BUYER2, DEPLOYER, OPERATOR, SELLER, SELLER2, STRANGER, Chain
from helpers import address, dev, mine_at
from hypothesis import HealthCheck, seed, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    Bundle,
    RuleBasedStateMachine,
    initialize,
    invariant,
    precondition,
    rule,
    run_state_machine_as_test,
)
from web3.types import TxReceipt

from escrow_devtools.artifacts import load_artifact
from escrow_py.chain import rpc
from escrow_py.chain.escrow import Delivered, Deposited, Refunded, Settled, Settlement, SettlementSkipped
from escrow_py.chain.token import Token
from escrow_py.chain.tx import TxSender
from escrow_py.protocol.eip3009 import Authorization, TokenDomain, authorization_for, sign_authorization
from escrow_py.protocol.errors import ContractRevert
from escrow_py.protocol.terms import MAX_DEADLINE_WINDOW, State, Terms, delivery_hash, request_hash

ACTORS = (BUYER, BUYER2, SELLER, SELLER2, OPERATOR, STRANGER)
TOKENS = ("usdc", "usdc2", "reentrant", "false", "blocking")
ZERO = "0x0000000000000000000000000000000000000000"
# Deadline offsets from the deposit's block time: closed, at the edges, open, too far.
DEADLINE_OFFSETS = (-1, 0, 1, 3_600, 3_600, 86_400, 86_400, 86_400, MAX_DEADLINE_WINDOW, MAX_DEADLINE_WINDOW + 1)

BALANCE_OF = keccak(text="balanceOf(address)")[:4]
STATE_OF = keccak(text="stateOf(bytes32)")[:4]
AUTHORIZATION_STATE = keccak(text="authorizationState(address,bytes32)")[:4]
TRANSFER = keccak(text="Transfer(address,address,uint256)")

# A run is replayed from its seed: the test prints it on any failure.
SEED_ENV = "X402_ESCROW_INVARIANT_SEED"

# What the runs did, by selector of each successful call or name of each revert: the
# test fails if the sequences never got past the guards (a vacuous pass).
OUTCOMES: Counter[str] = Counter()

Expected = tuple[str, dict[str, Any]] | None  # None: the transaction succeeds


@dataclass
class Record:
    terms: Terms
    state: State


class Tokens:
    """The five tokens, deployed once per test run (the machine rolls back to this point)."""

    def __init__(self, chain: Chain) -> None:
        self.by_name: dict[str, Token] = {
            "usdc": chain.token,
            "usdc2": chain.deploy_token(),
            "reentrant": chain.deploy_token("ReentrantToken"),
            "false": chain.deploy_token("FalseReturningToken"),
            "blocking": chain.deploy_token("BlockingToken"),
        }
        self.domains: dict[str, TokenDomain] = {n: t.domain() for n, t in self.by_name.items()}
        self.name_of = {t.address: n for n, t in self.by_name.items()}


def make_machine(chain: Chain, tokens: Tokens) -> type[RuleBasedStateMachine]:
    escrow = chain.escrow
    signers = {i: dev(i) for i in range(7)}

    def _balance_call(key: tuple[str, str]) -> tuple[str, bytes]:
        name, who = key
        return tokens.by_name[name].address, BALANCE_OF + bytes(12) + bytes.fromhex(who[2:])

    def _read(calls: list[tuple[str, bytes]]) -> list[int]:
        """Raw eth_calls (to, data) in one batched round trip (rpc.batch), each answer as an integer: web3's
        contract-call machinery costs milliseconds of CPU per call."""
        answers = rpc.batch(chain.w3, [rpc.call_request(to, data) for to, data in calls])
        return [int.from_bytes(rpc.call_output(rpc.value(answer)), "big") for answer in answers]

    # The hostile tokens' set-up calls, encoded with their ABIs (built once, not for every step).
    reentrant = chain.w3.eth.contract(abi=load_artifact("ReentrantToken")["abi"])
    blocking = chain.w3.eth.contract(abi=load_artifact("BlockingToken")["abi"])

    class EscrowMachine(RuleBasedStateMachine):
        escrows = Bundle("escrows")
        served_bundle = Bundle("served")

        def __init__(self) -> None:
            super().__init__()
            self.snapshot = chain.w3.provider.make_request("evm_snapshot", [])["result"]  # type: ignore[arg-type]
            self.t = chain.now()
            self.records: dict[bytes, Record] = {}  # deposited ids
            self.served: dict[bytes, Terms] = {}  # ids settled serve-first: never Held, no storage
            self.pending_serve: dict[bytes, Terms] = {}  # the terms of the settlement being mined
            self.salt_count = 0
            keys = [(name, who) for name in tokens.by_name for who in [*(address(i) for i in ACTORS), escrow.address]]
            initial = _read([_balance_call(key) for key in keys])
            self.balances: dict[tuple[str, str], int] = dict(zip(keys, initial, strict=True))
            self.settlements: Counter[bytes] = Counter()
            self.ever_settled: set[bytes] = set()
            self.bubble: bool | None = None  # the ReentrantToken's hook: None disarmed
            self.blocked: str | None = None  # the BlockingToken's blocked recipient
            self.senders = {i: _FixedFeeSender(chain.w3, signers[i]) for i in (DEPLOYER, *ACTORS)}

        def teardown(self) -> None:
            chain.w3.provider.make_request("evm_revert", [self.snapshot])  # type: ignore[arg-type]

        # -- execution ------------------------------------------------------------------------

        def _exec(self, who: int, data: bytes, expected: Expected, *, to: str | None = None) -> TxReceipt | None:
            """Mine `data` one second after the model's clock and check the outcome is `expected`."""
            self.t += 1
            receipt, revert = mine_at(chain, self.senders[who], data, self.t, to=to, check_time=False)
            OUTCOMES[data[:4].hex() if revert is None else revert.name] += 1
            if expected is None:
                assert revert is None, f"expected success, got {revert}"
                self._check_events(receipt)
                return receipt
            assert revert is not None, f"expected {expected[0]}{expected[1]}, but the transaction succeeded"
            _assert_revert(revert, *expected)
            return None

        def _check_events(self, receipt: TxReceipt) -> None:
            """Invariants 2, 3 and 4 on what the chain itself emitted."""
            lifecycle = escrow.events_in(receipt)
            served = [e for e in escrow.settlements_in(receipt) if isinstance(e, Settled)]
            # The chain's own block time, not the model's clock.
            block_time = int(chain.w3.eth.get_block(receipt["blockNumber"])["timestamp"])
            committed: Counter[tuple[str, str]] = Counter()  # (token, recipient) -> amount the events account for
            for event in lifecycle:
                OUTCOMES[type(event).__name__] += 1
                if isinstance(event, Deposited):
                    assert event.id not in self.served, f"0x{event.id.hex()} deposited after a serve-first settlement"
                    continue
                self.settlements[event.id] += 1
                assert self.settlements[event.id] == 1, f"0x{event.id.hex()} settled twice"
                terms = self.records[event.id].terms
                if isinstance(event, Delivered):
                    assert event.delivery_hash != bytes(32), "a release without a committed hash"
                    assert block_time < terms.deadline, "release at or after the deadline"
                    committed[(terms.token, terms.seller)] += terms.amount
                if isinstance(event, Refunded):
                    if event.caller not in (terms.seller, terms.operator):
                        assert block_time >= terms.deadline, "third-party refund before the deadline"
                    committed[(terms.token, terms.buyer)] += terms.amount
            for settled in served:
                OUTCOMES["Settled"] += 1
                self.settlements[settled.id] += 1
                assert self.settlements[settled.id] == 1, f"0x{settled.id.hex()} settled twice"
                assert settled.id not in self.records, f"0x{settled.id.hex()} settled serve-first after a deposit"
                terms = self.pending_serve[settled.id]
                assert settled.delivery_hash != bytes(32), "a settlement without a committed hash"
                assert block_time < terms.deadline, "settlement at or after the deadline"
                committed[(terms.token, terms.seller)] += terms.amount
            for outcome in escrow.settlements_in(receipt):
                if isinstance(outcome, SettlementSkipped):
                    OUTCOMES[f"SettlementSkipped.{outcome.reason.name}"] += 1
            # Invariant 4: nothing leaves the escrow but what the emitted events account for.
            assert _transfers_out(receipt, escrow.address) == {k: v for k, v in committed.items() if v}, (
                "tokens left the escrow without a matching Delivered, Settled or Refunded event"
            )

        def _payout_failure(self, token: str, to: str) -> bytes | None:
            """The token's revert data for a payout it refuses (TransferFailed.reason), None if it pays."""
            if token == "false":
                return b""
            if token == "reentrant" and self.bubble is True:
                return keccak(text="Reentrancy()")[:4]
            if token == "blocking" and to == self.blocked:
                return keccak(text="RecipientBlocked(address)")[:4] + encode(["address"], [to])
            return None

        def _salt(self) -> bytes:
            """Salts numbered within the run: with the seed, a failing run replays with the same escrow ids."""
            self.salt_count += 1
            return keccak(self.salt_count.to_bytes(32, "big"))

        def _state(self, escrow_id: bytes) -> State:
            record = self.records.get(escrow_id)
            return record.state if record else State.NONE

        def _nonce_spent(self, terms: Terms) -> bool:
            """Whether the buyer's authorization nonce (the id) was used: by a deposit or a settlement."""
            escrow_id = escrow.id_of(terms)
            return escrow_id in self.records or escrow_id in self.served

        def _sign(self, terms: Terms) -> tuple[Authorization, bytes]:
            auth = authorization_for(terms, escrow.address, escrow.chain_id, 0, self.t + 10 * MAX_DEADLINE_WINDOW)
            buyer = next(i for i in (BUYER, BUYER2) if address(i) == terms.buyer)
            return auth, sign_authorization(signers[buyer], tokens.domains[tokens.name_of[terms.token]], auth)

        # -- rules ---------------------------------------------------------------------------

        @rule(
            target=escrows,
            buyer=st.sampled_from([BUYER, BUYER2]),
            seller=st.sampled_from([SELLER, SELLER2]),
            token=st.sampled_from(TOKENS),
            amount=st.sampled_from([0, 1, 999, 10_000, 123_456, 500_000]),
            offset=st.sampled_from(DEADLINE_OFFSETS),
            submitter=st.sampled_from([SELLER, OPERATOR, STRANGER]),
        )
        def deposit(self, buyer: int, seller: int, token: str, amount: int, offset: int, submitter: int) -> Terms:
            block_time = self.t + 1
            terms = _terms(buyer, seller, tokens.by_name[token].address, amount, block_time + offset, self._salt())
            escrow_id = escrow.id_of(terms)
            auth, signature = self._sign(terms)
            expected: Expected = None
            if amount == 0:
                expected = ("ZeroAmount", {})
            elif offset <= 0:
                expected = ("DeadlinePassed", {"deadline": terms.deadline, "now_": block_time})
            elif offset > MAX_DEADLINE_WINDOW:
                expected = (
                    "DeadlineTooFar",
                    {"deadline": terms.deadline, "maxDeadline": block_time + MAX_DEADLINE_WINDOW},
                )
            elif token == "reentrant" and self.bubble is True:
                expected = ("Reentrancy", {})
            self._exec(submitter, escrow.deposit_data(terms, auth, signature), expected)
            if expected is None:
                self.records[escrow_id] = Record(terms, State.HELD)
                self.balances[(token, terms.buyer)] -= amount
                self.balances[(token, escrow.address)] += amount
            return terms

        @rule(terms=escrows, submitter=st.sampled_from([SELLER, STRANGER]))
        def deposit_again(self, terms: Terms, submitter: int) -> None:
            """The same authorization submitted again (deposited or settled serve-first): refused whatever the state."""
            escrow_id = escrow.id_of(terms)
            if not self._nonce_spent(terms) or terms.amount == 0:
                return
            auth, signature = self._sign(terms)
            block_time = self.t + 1
            expected: Expected
            if block_time >= terms.deadline:
                expected = ("DeadlinePassed", {"deadline": terms.deadline, "now_": block_time})
            elif terms.deadline > block_time + MAX_DEADLINE_WINDOW:
                expected = (
                    "DeadlineTooFar",
                    {"deadline": terms.deadline, "maxDeadline": block_time + MAX_DEADLINE_WINDOW},
                )
            elif escrow_id in self.records:
                expected = ("AlreadyDeposited", {"id": escrow_id, "state": self.records[escrow_id].state})
            else:  # settled serve-first: no state, and the token refuses the spent nonce
                expected = ("AuthorizationUsedOrCanceled", {"authorizer": terms.buyer, "nonce": escrow_id})
            self._exec(submitter, escrow.deposit_data(terms, auth, signature), expected)

        @rule(terms=escrows, who=st.sampled_from([SELLER, SELLER2, OPERATOR, OPERATOR, STRANGER, BUYER]))
        def deliver(self, terms: Terms, who: int) -> None:
            self._settle_one(terms, who, release=True)

        @rule(terms=escrows, who=st.sampled_from([SELLER, OPERATOR, STRANGER, BUYER]))
        def refund(self, terms: Terms, who: int) -> None:
            self._settle_one(terms, who, release=False)

        @precondition(lambda self: any(r.state is State.HELD for r in self.records.values()))
        @rule(data=st.data(), release=st.booleans(), seller_side=st.booleans())
        def settle_held_escrows(self, data: st.DataObject, release: bool, seller_side: bool) -> None:
            """Aim at up to three escrows still held, so that successful settlements are frequent."""
            held = [r.terms for r in self.records.values() if r.state is State.HELD]
            for terms in data.draw(st.lists(st.sampled_from(held), min_size=1, max_size=3, unique=True)):
                if release:
                    who = OPERATOR if seller_side else next(i for i in (SELLER, SELLER2) if address(i) == terms.seller)
                else:
                    who = OPERATOR if seller_side else STRANGER
                self._settle_one(terms, who, release=release)

        def _settle_one(self, terms: Terms, who: int, *, release: bool) -> None:
            escrow_id = escrow.id_of(terms)
            block_time = self.t + 1
            caller = address(who)
            state = self._state(escrow_id)
            expected: Expected = None
            payout = (tokens.name_of[terms.token], terms.seller if release else terms.buyer, terms.amount)
            if state is not State.HELD:
                expected = ("NotHeld", {"id": escrow_id, "state": state})
            elif release and caller not in (terms.seller, terms.operator):
                expected = (
                    "NotSellerOrOperator",
                    {"caller": caller, "seller": terms.seller, "operator": terms.operator},
                )
            elif release and block_time >= terms.deadline:
                expected = ("DeadlinePassed", {"deadline": terms.deadline, "now_": block_time})
            elif not release and block_time < terms.deadline and caller not in (terms.seller, terms.operator):
                expected = ("RefundBeforeDeadline", {"deadline": terms.deadline, "now_": block_time, "caller": caller})
            elif (reason := self._payout_failure(payout[0], payout[1])) is not None:
                expected = (
                    "TransferFailed",
                    {"token": terms.token, "to": payout[1], "amount": payout[2], "reason": reason},
                )
            data = escrow.deliver_data(terms, delivery_hash(b"one")) if release else escrow.refund_data(terms)
            self._exec(who, data, expected)
            if expected is None:
                self._apply([escrow_id], [payout], release=release)

        @rule(batch=st.lists(escrows, max_size=5), who=st.sampled_from([SELLER, SELLER2, OPERATOR, STRANGER]))
        def deliver_many(self, batch: list[Terms], who: int) -> None:
            self._settle_many(batch, who, release=True)

        @rule(batch=st.lists(escrows, max_size=5), who=st.sampled_from([SELLER, OPERATOR, STRANGER, BUYER2]))
        def refund_many(self, batch: list[Terms], who: int) -> None:
            self._settle_many(batch, who, release=False)

        def _settle_many(self, batch: list[Terms], who: int, *, release: bool) -> None:
            # Raw order, not the binding's sorted one: interleaved tokens and recipients on purpose.
            if release:
                data = escrow.contract.encode_abi(
                    "deliverMany", args=[[t.as_tuple() for t in batch], [delivery_hash(b"many")] * len(batch)]
                )
            else:
                data = escrow.contract.encode_abi("refundMany", args=[[t.as_tuple() for t in batch]])
            expected, done, payouts = self._plan_batch(batch, who, release=release)
            self._exec(who, bytes.fromhex(data.removeprefix("0x")), expected)
            if expected is None:
                self._apply(done, payouts, release=release)

        def _plan_batch(
            self, batch: list[Terms], who: int, *, release: bool
        ) -> tuple[Expected, list[bytes], list[tuple[str, str, int]]]:
            """deliverMany/refundMany step by step as the contract runs them.

            Returns the revert (only a delivery by someone else than the seller's side), or the ids
            settled and the payouts made; a refused payout puts its run of entries back to Held.
            """
            block_time = self.t + 1
            caller = address(who)
            states = {escrow.id_of(t): self._state(escrow.id_of(t)) for t in batch}
            done: list[bytes] = []
            payouts: list[tuple[str, str, int]] = []
            run: list[Any] = []  # [token, to, amount, [ids]] of the pending payout

            def flush() -> None:
                if not run:
                    return
                token, to, amount, ids = run.pop()
                if self._payout_failure(token, to) is None:
                    payouts.append((token, to, amount))
                    done.extend(ids)
                else:
                    for escrow_id in ids:
                        states[escrow_id] = State.HELD

            for terms in batch:
                escrow_id = escrow.id_of(terms)
                seller_side = caller in (terms.seller, terms.operator)
                if release and not seller_side:
                    return (
                        ("NotSellerOrOperator", {"caller": caller, "seller": terms.seller, "operator": terms.operator}),
                        [],
                        [],
                    )
                if states[escrow_id] is not State.HELD:
                    continue
                if release and block_time >= terms.deadline:
                    continue
                if not release and block_time < terms.deadline and not seller_side:
                    continue
                states[escrow_id] = State.RELEASED if release else State.REFUNDED
                token = tokens.name_of[terms.token]
                to = terms.seller if release else terms.buyer
                if not (run and run[0][:2] == [token, to]):
                    flush()
                    run.append([token, to, 0, []])
                run[0][2] += terms.amount
                run[0][3].append(escrow_id)
            flush()
            return None, done, payouts

        def _apply(self, ids: list[bytes], payouts: list[tuple[str, str, int]], *, release: bool) -> None:
            for escrow_id in ids:
                self.records[escrow_id].state = State.RELEASED if release else State.REFUNDED
                self.ever_settled.add(escrow_id)
            for token, to, amount in payouts:
                self.balances[(token, escrow.address)] -= amount
                self.balances[(token, to)] += amount

        # -- serve-first ----------------------------------------------------------------------

        @rule(
            target=served_bundle,
            buyer=st.sampled_from([BUYER, BUYER2]),
            seller=st.sampled_from([SELLER, SELLER2]),
            token=st.sampled_from(TOKENS),
            amount=st.sampled_from([0, 1, 10_000, 500_000]),
            offset=st.sampled_from(DEADLINE_OFFSETS),
            who=st.sampled_from([SELLER, SELLER2, OPERATOR, OPERATOR, STRANGER]),
        )
        def settle(self, buyer: int, seller: int, token: str, amount: int, offset: int, who: int) -> Terms:
            """A fresh serve-first payment settled at once; its terms go to `served_bundle`, where
            `reuse_settled` tries to deposit, deliver, refund and settle it again."""
            terms = _terms(buyer, seller, tokens.by_name[token].address, amount, self.t + 1 + offset, self._salt())
            self._settle_serve_first(terms, who)
            return terms

        @rule(
            terms=served_bundle,
            action=st.sampled_from(["deposit", "deliver", "refund", "settle"]),
            who=st.sampled_from([SELLER, OPERATOR, STRANGER]),
        )
        def reuse_settled(self, terms: Terms, action: str, who: int) -> None:
            """A serve-first id (settled, or refused) used again: a settled one is never deposited,
            released, refunded or settled a second time; the model says which revert each must meet."""
            if action == "deposit":
                self.deposit_again(terms, who if who != OPERATOR else SELLER)
            elif action == "settle":
                self._settle_serve_first(terms, who)
            else:
                self._settle_one(terms, who, release=action == "deliver")

        @rule(terms=escrows, who=st.sampled_from([SELLER, OPERATOR]))
        def settle_known_terms(self, terms: Terms, who: int) -> None:
            """Terms deposited, settled serve-first before, or whose deposit failed: only the last may settle."""
            self._settle_serve_first(terms, who)

        def _settle_serve_first(self, terms: Terms, who: int) -> None:
            escrow_id = escrow.id_of(terms)
            block_time = self.t + 1
            caller = address(who)
            token = tokens.name_of[terms.token]
            expected: Expected = None
            if terms.amount == 0:
                expected = ("ZeroAmount", {})
            elif caller not in (terms.seller, terms.operator):
                expected = (
                    "NotSellerOrOperator",
                    {"caller": caller, "seller": terms.seller, "operator": terms.operator},
                )
            elif block_time >= terms.deadline:
                expected = ("DeadlinePassed", {"deadline": terms.deadline, "now_": block_time})
            elif self._nonce_spent(terms):
                expected = ("AuthorizationUsedOrCanceled", {"authorizer": terms.buyer, "nonce": escrow_id})
            elif token == "reentrant" and self.bubble is True:
                expected = ("Reentrancy", {})
            elif (reason := self._payout_failure(token, terms.seller)) is not None:
                expected = (
                    "TransferFailed",
                    {"token": terms.token, "to": terms.seller, "amount": terms.amount, "reason": reason},
                )
            auth, signature = self._sign(terms)
            entry = Settlement(terms, auth, signature, delivery_hash(terms.salt))
            self.pending_serve = {escrow_id: terms}
            self._exec(who, escrow.settle_data(entry), expected)
            if expected is None:
                self._serve([terms], [(token, terms.seller, terms.amount)])

        @rule(
            known=st.lists(escrows, max_size=3),
            fresh=st.lists(
                st.tuples(
                    st.sampled_from([BUYER, BUYER2]),
                    st.sampled_from([SELLER, SELLER2]),
                    st.sampled_from(TOKENS),
                    st.sampled_from([1, 10_000]),
                    st.sampled_from([-1, 0, 1, 3_600]),
                ),
                max_size=3,
            ),
            data=st.data(),
            who=st.sampled_from([SELLER, OPERATOR, OPERATOR, STRANGER]),
        )
        def settle_many(
            self, known: list[Terms], fresh: list[tuple[int, int, str, int, int]], data: st.DataObject, who: int
        ) -> None:
            """A batch of serve-first settlements, fresh or replayed, across tokens and sellers, in raw order."""
            batch = known + [
                _terms(b, s, tokens.by_name[n].address, a, self.t + 1 + o, self._salt()) for b, s, n, a, o in fresh
            ]
            self._settle_batch(data.draw(st.permutations(batch)), who)

        @initialize()
        def settle_many_with_a_stale_entry(self) -> None:
            """Every run starts with a batch whose first entry is already past its deadline: the skip path
            (SettlementSkipped, the rest of the batch still paid) is exercised in every example, not only
            when the random rules happen to build such a batch."""
            usdc = tokens.by_name["usdc"].address
            stale = _terms(BUYER, SELLER, usdc, 10_000, self.t + 1, self._salt())
            live = _terms(BUYER2, SELLER, usdc, 10_000, self.t + 3_601, self._salt())
            self._settle_batch([stale, live], OPERATOR)

        @initialize(target=escrows)
        def a_held_escrow(self) -> Terms:
            """Every run also starts with one valid escrow Held: most random deposits are refused (a zero amount,
            a deadline out of range), and a seed whose runs never held one long enough to deliver it left the
            deliver path unexercised (seen with seeds 16806325916716216280 and 10919657846914992117)."""
            terms = self.deposit(BUYER, SELLER, "usdc", 10_000, 86_400, OPERATOR)
            assert isinstance(terms, Terms)
            return terms

        def _settle_batch(self, batch: list[Terms], who: int) -> None:
            entries = []
            for terms in batch:
                auth, signature = self._sign(terms)
                entries.append(Settlement(terms, auth, signature, delivery_hash(terms.salt)))
            encoded = escrow.contract.encode_abi("settleMany", args=[[e.as_tuple() for e in entries]])
            expected, served, payouts = self._plan_settle_many(batch, who)
            self.pending_serve = {escrow.id_of(t): t for t in batch}
            self._exec(who, bytes.fromhex(encoded.removeprefix("0x")), expected)
            if expected is None:
                self._serve(served, payouts)

        def _plan_settle_many(
            self, batch: list[Terms], who: int
        ) -> tuple[Expected, list[Terms], list[tuple[str, str, int]]]:
            """settleMany step by step: a revert, or the entries pulled and the payouts (all-or-nothing)."""
            block_time = self.t + 1
            caller = address(who)
            spent = {escrow.id_of(t) for t in batch if self._nonce_spent(t)}
            served: list[Terms] = []
            payouts: list[tuple[str, str, int]] = []
            run: list[list[Any]] = []

            def flush() -> Expected:
                if run:
                    token, to, amount = run.pop()
                    if (reason := self._payout_failure(token, to)) is not None:
                        address_of = tokens.by_name[token].address
                        return ("TransferFailed", {"token": address_of, "to": to, "amount": amount, "reason": reason})
                    payouts.append((token, to, amount))
                return None

            for terms in batch:
                escrow_id = escrow.id_of(terms)
                if terms.amount == 0:
                    return ("ZeroAmount", {}), [], []
                if caller not in (terms.seller, terms.operator):
                    return (
                        ("NotSellerOrOperator", {"caller": caller, "seller": terms.seller, "operator": terms.operator}),
                        [],
                        [],
                    )
                token = tokens.name_of[terms.token]
                if block_time >= terms.deadline or escrow_id in spent or (token == "reentrant" and self.bubble is True):
                    continue  # skipped: deadline passed, nonce spent, or the token's own pull refused
                spent.add(escrow_id)
                served.append(terms)
                if not (run and run[0][:2] == [token, terms.seller]):
                    if (failure := flush()) is not None:
                        return failure, [], []
                    run.append([token, terms.seller, 0])
                run[0][2] += terms.amount
            if (failure := flush()) is not None:
                return failure, [], []
            return None, served, payouts

        def _serve(self, served: list[Terms], payouts: list[tuple[str, str, int]]) -> None:
            for terms in served:
                self.served[escrow.id_of(terms)] = terms
                self.balances[(tokens.name_of[terms.token], terms.buyer)] -= terms.amount
            for token, to, amount in payouts:
                self.balances[(token, to)] += amount

        # -- time and hostile tokens ----------------------------------------------------------

        @rule(seconds=st.sampled_from([1, 30, 600]))
        def wait(self, seconds: int) -> None:
            self.t += seconds

        @rule(terms=escrows, edge=st.sampled_from([-1, 0, 1]))
        def wait_until_deadline(self, terms: Terms, edge: int) -> None:
            """The next transaction lands at the deadline minus one, at it, or one after."""
            self.t = max(self.t, terms.deadline + edge - 1)

        @rule(terms=escrows, kind=st.sampled_from(["refund", "deliver"]), bubble=st.sampled_from([True, False, None]))
        def arm_reentrant_token(self, terms: Terms, kind: str, bubble: bool | None) -> None:
            """Point the ReentrantToken's transfer hook at a settlement call into the escrow (None: disarm)."""
            callback = escrow.refund_data(terms) if kind == "refund" else escrow.deliver_data(terms, b"\x01" * 32)
            target = escrow.address if bubble is not None else ZERO
            data = reentrant.encode_abi("setHook", args=[target, callback, bool(bubble)])
            self._exec(DEPLOYER, bytes.fromhex(data.removeprefix("0x")), None, to=tokens.by_name["reentrant"].address)
            self.bubble = bubble

        @rule(who=st.sampled_from([None, BUYER, BUYER2, SELLER, SELLER2]))
        def block_recipient(self, who: int | None) -> None:
            blocked = address(who) if who is not None else ZERO
            data = blocking.encode_abi("setBlocked", args=[blocked])
            self._exec(DEPLOYER, bytes.fromhex(data.removeprefix("0x")), None, to=tokens.by_name["blocking"].address)
            self.blocked = blocked if who is not None else None

        # -- invariants ----------------------------------------------------------------------

        @invariant()
        def invariants_1_to_5(self) -> None:
            # One round trip (_read) reads every balance, state and spent nonce the checks need.
            balance_keys = list(self.balances)
            ids = list(self.records)
            served = list(self.served.items())
            calls = [_balance_call(key) for key in balance_keys]
            calls += [(escrow.address, STATE_OF + escrow_id) for escrow_id in ids]
            calls += [(escrow.address, STATE_OF + escrow_id) for escrow_id, _ in served]
            calls += [
                (terms.token, AUTHORIZATION_STATE + bytes(12) + bytes.fromhex(terms.buyer[2:]) + escrow_id)
                for escrow_id, terms in served
            ]
            results = _read(calls)
            balances = dict(zip(balance_keys, results[: len(balance_keys)], strict=True))
            rest = results[len(balance_keys) :]
            states = dict(zip(ids, (State(r) for r in rest[: len(ids)]), strict=True))
            served_states = rest[len(ids) : len(ids) + len(served)]
            spent_nonces = rest[len(ids) + len(served) :]
            self._escrow_balance_is_the_sum_of_held_amounts(balances)
            self._states_match_and_settled_ids_never_return(states)
            # A serve-first settled id is never Held (it has no state at all) and its nonce stays spent.
            assert all(State(s) is State.NONE for s in served_states), served_states
            assert all(spent_nonces), "a serve-first settlement whose nonce the token does not hold spent"
            self._money_reaches_only_buyers_and_sellers(balances)

        def _escrow_balance_is_the_sum_of_held_amounts(self, balances: dict[tuple[str, str], int]) -> None:
            held: Counter[str] = Counter()
            for record in self.records.values():
                if record.state is State.HELD:
                    held[tokens.name_of[record.terms.token]] += record.terms.amount
            for name in tokens.by_name:
                assert balances[(name, escrow.address)] == held[name], name

        def _states_match_and_settled_ids_never_return(self, states: dict[bytes, State]) -> None:
            for escrow_id, record in self.records.items():
                on_chain = states[escrow_id]
                assert on_chain is record.state, f"0x{escrow_id.hex()}: chain {on_chain}, model {record.state}"
                if escrow_id in self.ever_settled:
                    assert on_chain.settled

        def _money_reaches_only_buyers_and_sellers(self, balances: dict[tuple[str, str], int]) -> None:
            # The model credits refunds to the buyer and releases to the seller only; any
            # other movement shows up as a mismatch on some actor or on the escrow.
            for key, expected in self.balances.items():
                assert balances[key] == expected, key

    return EscrowMachine


def _terms(buyer: int, seller: int, token: ChecksumAddress, amount: int, deadline: int, salt: bytes) -> Terms:
    return Terms(
        buyer=address(buyer),
        seller=address(seller),
        operator=address(OPERATOR),
        token=token,
        amount=amount,
        deadline=deadline,
        request_hash=request_hash("POST", "https://api.example/x", amount.to_bytes(8, "big")),
        salt=salt,
    )


def _transfers_out(receipt: TxReceipt, source: str) -> dict[tuple[str, str], int]:
    """(token, recipient) -> amount of every Transfer log out of `source` in the receipt."""
    out: Counter[tuple[str, str]] = Counter()
    word = bytes(12) + bytes.fromhex(source[2:])
    for log in receipt["logs"]:
        topics = [bytes(t) for t in log["topics"]]
        if len(topics) == 3 and topics[0] == TRANSFER and topics[1] == word:
            to = to_checksum_address(topics[2][12:])
            out[(to_checksum_address(log["address"]), to)] += int.from_bytes(bytes(log["data"]), "big")
    return dict(out)


class _FixedFeeSender(TxSender):
    """Fixed fees: anvil's base fee stays far below them, so signing reads the key's pending nonce only, where
    reading the fees too costs two more RPCs per transaction (sent one by one on the test's plain provider)."""

    def fees(self, base_fee: int | None = None) -> tuple[int, int]:
        return 100 * 10**9, 10**9

    def _fees_and_pending_nonce(self, base_fee: int | None = None) -> tuple[int, int, int]:
        pending = rpc.request(self.w3, "eth_getTransactionCount", [self.address, "pending"])
        return *self.fees(), int(str(pending), 16)


def _assert_revert(revert: ContractRevert, name: str, args: dict[str, Any]) -> None:
    assert revert.name == name, f"expected {name}{args}, got {revert}"
    got = {
        k: to_checksum_address(v) if isinstance(v, str) and v.startswith("0x") else v
        for k, v in revert.args_by_name.items()
    }
    assert got == args, f"{name}: expected {args}, got {got}"


@pytest.mark.slow
def test_escrow_invariants_hold_over_random_sequences(chain: Chain) -> None:
    OUTCOMES.clear()
    chosen = os.environ.get(SEED_ENV)
    seed_value = int(chosen) if chosen else random.SystemRandom().getrandbits(64)
    machine = seed(seed_value)(make_machine(chain, Tokens(chain)))
    try:
        run_state_machine_as_test(
            machine,
            settings=settings(
                max_examples=20,
                stateful_step_count=30,
                deadline=None,
                database=None,  # the seed alone replays a run
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
            ),
        )
    except BaseException as failure:
        message = f"hypothesis seed {seed_value}: rerun with {SEED_ENV}={seed_value}"
        print(message)
        failure.add_note(message)
        raise
    # Settlements actually happened (events seen), and the guards were exercised.
    seen = f"{OUTCOMES} (seed {seed_value})"
    assert OUTCOMES["Delivered"] > 0 and OUTCOMES["Refunded"] > 0 and OUTCOMES["Settled"] > 0, seen
    reverts = {"ZeroAmount", "DeadlinePassed", "DeadlineTooFar", "NotHeld", "NotSellerOrOperator", "TransferFailed"}
    assert len(reverts & set(OUTCOMES)) >= 4, seen
    assert any(key.startswith("SettlementSkipped.") for key in OUTCOMES), seen
