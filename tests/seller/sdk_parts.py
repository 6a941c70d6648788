"""The x402 SDK's own parts for the ecosystem tests: its `exact` facilitator over real HTTP, its stock client.

The SDK ships the facilitator logic (x402Facilitator + the exact EVM scheme settling by
transferWithAuthorization) but no HTTP server for it; `exact_facilitator` puts it behind the
three endpoints its HTTPFacilitatorClient speaks (the bench's `facilitator_app`), on uvicorn,
against the test's anvil.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from eth_account import Account
from fixtures.chain import Chain
from x402 import x402Client, x402Facilitator
from x402.http import FacilitatorConfig, HTTPFacilitatorClient
from x402.mechanisms.evm import EthAccountSigner, FacilitatorWeb3Signer
from x402.mechanisms.evm.exact import register_exact_evm_client, register_exact_evm_facilitator

from escrow_devtools.anvil import dev_private_key
from escrow_devtools.bench.http import _facilitator_app as facilitator_app

from .shop import served

NETWORK = "eip155:84532"
FACILITATOR = 7  # the anvil dev account that sends the exact settlements


@contextmanager
def exact_facilitator(chain: Chain, network: str = NETWORK) -> Iterator[HTTPFacilitatorClient]:
    """The SDK's exact facilitator on uvicorn (settling on `network`), and the SDK's HTTP client for it."""
    facilitator = x402Facilitator()
    signer = FacilitatorWeb3Signer(dev_private_key(FACILITATOR), chain.node.url)
    register_exact_evm_facilitator(facilitator, signer, network)
    with served(facilitator_app(facilitator)) as (url, _):
        yield HTTPFacilitatorClient(FacilitatorConfig(url=url, timeout=30))


def stock_client(chain: Chain, buyer: int, **spend: Any) -> x402Client:
    """The SDK's client with only its exact EVM plugin, allowed to pay the local TestUSDC."""
    client = x402Client()
    register_exact_evm_client(client, EthAccountSigner(Account.from_key(dev_private_key(buyer))), networks=NETWORK)
    client.set_spend_controls(
        {"allowed_assets": [{"network": NETWORK, "asset": chain.token.address, "max_amount_per_payment": "1000000"}]}
    )
    return client
