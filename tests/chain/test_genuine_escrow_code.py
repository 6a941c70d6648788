"""escrow_py.chain.genuine: the one check, shared by buyer and seller, that an address holds X402Escrow."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
from eth_utils.crypto import keccak
from fixtures.chain import Chain
from helpers import BUYER, STRANGER, address

from escrow_devtools.artifacts import deploy
from escrow_py.chain import genuine
from escrow_py.chain.escrow import deploy_escrow
from escrow_py.chain.genuine import (
    ESCROW_CODE_HASH,
    EscrowCode,
    check_escrow_code,
    is_genuine_escrow,
    shipped_escrow,
)
from escrow_py.chain.registry import ADDRESS_ENV, DIR_ENV, ESCROW_ADDRESS, Deployment, record


def test_the_shipped_code_hash_is_what_a_deployment_leaves_on_chain(chain: Chain) -> None:
    # Another salt: the genuine code at an address the shipped registry does not name.
    fresh = deploy_escrow(chain.sender(STRANGER), salt=b"\x07" * 32)
    assert keccak(bytes(chain.w3.eth.get_code(fresh))) == ESCROW_CODE_HASH
    check = check_escrow_code(chain.w3, fresh.lower(), chain_id=84532)
    assert (check.address, check.verdict, check.code_hash, check.genuine) == (
        fresh,
        EscrowCode.GENUINE,
        ESCROW_CODE_HASH,
        True,
    )
    assert is_genuine_escrow(chain.w3, fresh)  # reads the chain id itself


@pytest.mark.parametrize("what", ["eoa", "empty", "token", "lookalike"])
def test_anything_else_is_not_genuine(chain: Chain, what: str) -> None:
    targets: dict[str, Callable[[], str]] = {
        "eoa": lambda: address(BUYER),
        "empty": lambda: "0x" + "ab" * 20,
        "token": lambda: chain.token.address,
        "lookalike": lambda: deploy(chain.sender(STRANGER), "LookAlikeEscrow"),
    }
    target = targets[what]()
    check = check_escrow_code(chain.w3, target, chain_id=84532)
    assert not check.genuine and not is_genuine_escrow(chain.w3, target)
    if what in ("eoa", "empty"):
        assert (check.verdict, check.code_hash) == (EscrowCode.NO_CODE, None)
    else:
        assert check.verdict is EscrowCode.OTHER_CODE
        assert check.code_hash == keccak(bytes(chain.w3.eth.get_code(check.address))) != ESCROW_CODE_HASH


def test_a_shipped_registry_entry_is_trusted_and_nothing_else_makes_an_address_trusted(
    chain: Chain, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    lookalike = deploy(chain.sender(STRANGER), "LookAlikeEscrow")
    elsewhere = tmp_path / "local"
    record(Deployment(network="eip155:84532", chain_id=84532, escrow=lookalike), elsewhere)
    # The user's own settings name it: still judged by its code.
    monkeypatch.setenv(ADDRESS_ENV, lookalike)
    monkeypatch.setenv(DIR_ENV, str(elsewhere))
    assert shipped_escrow(84532) == ESCROW_ADDRESS  # the package's record: the one CREATE2 address
    assert check_escrow_code(chain.w3, lookalike, chain_id=84532).verdict is EscrowCode.OTHER_CODE
    # In the package's own registry (e.g. a deployment from an earlier compile): trusted, for that chain only.
    monkeypatch.setattr(genuine, "DEPLOYMENTS_DIR", elsewhere)
    assert shipped_escrow(84532) == lookalike
    check = check_escrow_code(chain.w3, lookalike, chain_id=84532)
    assert (check.verdict, check.genuine, check.code_hash) == (EscrowCode.REGISTERED, True, None)
    assert check_escrow_code(chain.w3, lookalike, chain_id=8453).verdict is EscrowCode.OTHER_CODE
