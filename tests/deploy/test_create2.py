"""The Python deploy path (tests, demo, benchmarks) puts the escrow at its one address, via the CREATE2 proxy."""

from __future__ import annotations

import pytest
from eth_utils.crypto import keccak
from fixtures.chain import Chain
from web3.types import RPCEndpoint

from escrow_py.chain.escrow import deploy_escrow
from escrow_py.chain.registry import CREATE2_PROXY, ESCROW_ADDRESS, canonical_escrow_address
from escrow_py.protocol.errors import ConfigError

# The deterministic deployment proxy's runtime code, the same on every chain that has it.
PROXY_RUNTIME = bytes.fromhex(
    "7fffffffffffffffffffffffffffffffffffffffffffffffffffffffffffffffe03601600081602082378035828234f58015156039578182fd5b8082525050506014600cf3"
)


def test_anvil_has_the_create2_proxy_from_the_first_block(chain: Chain) -> None:
    code = bytes(chain.w3.eth.get_code(CREATE2_PROXY, block_identifier=0))
    assert keccak(code) == keccak(PROXY_RUNTIME)


def test_the_python_deploy_path_lands_at_the_one_address_and_is_idempotent(chain: Chain) -> None:
    assert chain.escrow.address == ESCROW_ADDRESS  # fixtures/chain.py deployed it with `deploy(..., "X402Escrow")`
    nonce = chain.w3.eth.get_transaction_count(chain.deployer.address)
    assert deploy_escrow(chain.deployer) == ESCROW_ADDRESS
    assert chain.w3.eth.get_transaction_count(chain.deployer.address) == nonce  # already there: nothing sent
    other = deploy_escrow(chain.deployer, salt=b"\x02" * 32)
    assert other == canonical_escrow_address(b"\x02" * 32) != ESCROW_ADDRESS


def test_foreign_code_at_the_address_or_no_proxy_is_refused(chain: Chain) -> None:
    salt = b"\x03" * 32
    squatted = canonical_escrow_address(salt)
    chain.w3.provider.make_request(RPCEndpoint("anvil_setCode"), [squatted, "0x6001600055"])
    with pytest.raises(ConfigError, match="is not the shipped X402Escrow runtime"):
        deploy_escrow(chain.deployer, salt=salt)
    chain.w3.provider.make_request(RPCEndpoint("anvil_setCode"), [CREATE2_PROXY, "0x"])
    with pytest.raises(ConfigError, match="no CREATE2 deployment proxy"):
        deploy_escrow(chain.deployer, salt=b"\x04" * 32)
