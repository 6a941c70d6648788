"""The reentrancy guard: set during every state-changing call, clear again between calls of one transaction."""

from __future__ import annotations

from fixtures.chain import Chain
from helpers import make_terms, sign_deposit

from escrow_devtools.artifacts import deploy, load_artifact
from escrow_py.chain.escrow import Delivered, Deposited
from escrow_py.protocol.terms import State, delivery_hash


def test_the_guard_is_cleared_between_two_escrow_calls_in_one_transaction(chain: Chain) -> None:
    """A smart account or router calling the escrow twice in one transaction: the second call must not
    find the guard still set (a transient guard left set would last until the end of the transaction)."""
    multicall = deploy(chain.deployer, "EscrowMulticall")
    first = make_terms(chain, amount=1_000).with_(operator=multicall)
    second = make_terms(chain, amount=2_000).with_(operator=multicall)
    calls = []
    for terms in (first, second):
        auth, signature = sign_deposit(chain, terms)
        calls.append(chain.escrow.deposit_data(terms, auth, signature))
    calls.append(chain.escrow.deliver_data(first, delivery_hash(b"first")))
    helper = chain.w3.eth.contract(abi=load_artifact("EscrowMulticall")["abi"])
    data = helper.encode_abi("multicall", args=[chain.escrow.address, calls])
    receipt = chain.sender(0).transact(multicall, bytes.fromhex(data.removeprefix("0x")))
    events = chain.escrow.events_in(receipt)
    assert [type(e) for e in events] == [Deposited, Deposited, Delivered]
    assert chain.escrow.state_of(chain.escrow.id_of(first)) is State.RELEASED
    assert chain.escrow.state_of(chain.escrow.id_of(second)) is State.HELD
    assert chain.token.balance_of(chain.escrow.address) == 2_000
