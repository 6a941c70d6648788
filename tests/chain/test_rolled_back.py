"""The chain fixture's isolation: nothing a test leaves behind reaches the next test's chain."""

from __future__ import annotations

from eth_account import Account
from fixtures.chain import STRANGER, Chain, rolled_back

from escrow_devtools.anvil import dev_private_key


def _send_pending(chain: Chain, nonce: int) -> None:
    account = Account.from_key(dev_private_key(STRANGER))
    tx = account.sign_transaction(
        {"to": account.address, "value": 1, "gas": 21_000, "gasPrice": 10**10, "nonce": nonce, "chainId": 84532}
    )
    chain.w3.eth.send_raw_transaction(tx.raw_transaction)


def test_a_transaction_left_in_the_pool_is_not_mined_into_the_next_test(chain: Chain) -> None:
    stranger = Account.from_key(dev_private_key(STRANGER)).address
    nonce = chain.w3.eth.get_transaction_count(stranger)
    start = chain.w3.eth.block_number
    with rolled_back(chain):
        chain.w3.provider.make_request("evm_setAutomine", [False])  # type: ignore[arg-type]
        _send_pending(chain, nonce)  # pending: its nonce is valid again after the revert
        _send_pending(chain, nonce + 1)
        _send_pending(chain, nonce + 3)  # queued behind a gap until the next test fills it
    assert chain.w3.eth.block_number == start
    # The next test's own transactions: with the old pool kept, each would let a left-over one through.
    for n in (nonce, nonce + 1, nonce + 2):
        _send_pending(chain, n)
    chain.mine()
    assert chain.w3.eth.get_transaction_count(stranger) == nonce + 3, "a left-over transaction was mined"
    for number in range(start + 1, chain.w3.eth.block_number + 1):
        block = chain.w3.eth.get_block(number, full_transactions=True)
        assert len(block["transactions"]) <= 1  # automine is back on: one transaction, one block
