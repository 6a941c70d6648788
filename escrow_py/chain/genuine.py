"""Is the contract at an address the genuine X402Escrow? One answer for every role.

A buyer signs a ReceiveWithAuthorization whose `to` is the escrow. The token lets only
`to` itself redeem it (`to == msg.sender`), so whoever controls that address controls the
money: a wallet (an EOA) named as the escrow simply takes it, and so does any contract
that looks like the escrow but is not. The only proof is the code: the runtime code at the
address must hash to the X402Escrow shipped in this package (it has no immutables, so
every deployment of one compile holds the same bytes), or the address must be one of the
deployments shipped in the package's registry (escrow_py/chain/deployments/, e.g. one made
from an earlier compile).

    check = check_escrow_code(w3, address, chain_id=84532)
    if not check.genuine: ...    # check.verdict says why: no_code, other_code

The seller runs the same check at start-up, the buyer before every signature.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from enum import StrEnum

from eth_typing import ChecksumAddress
from eth_utils.address import to_checksum_address
from eth_utils.crypto import keccak
from web3 import Web3

from escrow_py.chain import rpc
from escrow_py.chain.artifacts import load_artifact
from escrow_py.chain.registry import DEPLOYMENTS_DIR, Deployment, registry_path
from escrow_py.protocol.errors import ConfigError

# keccak256 of the runtime code X402Escrow leaves at its address, from the shipped artifact.
ESCROW_CODE_HASH: bytes = keccak(hexstr=load_artifact("X402Escrow")["deployedBytecode"])


class EscrowCode(StrEnum):
    """What is at an address named as the escrow."""

    GENUINE = "genuine"  # runtime code hashes to ESCROW_CODE_HASH
    REGISTERED = "registered"  # a deployment in the shipped registry for this chain
    NO_CODE = "no_code"  # nothing: an EOA (someone's wallet) or an empty address
    OTHER_CODE = "other_code"  # a contract, but not X402Escrow (a token, a look-alike, ...)


@dataclass(frozen=True, slots=True)
class EscrowCodeCheck:
    """The verdict on one address of one chain; `code_hash` is None when no code was read or found."""

    address: ChecksumAddress
    chain_id: int
    verdict: EscrowCode
    code_hash: bytes | None

    @property
    def genuine(self) -> bool:
        return self.verdict in (EscrowCode.GENUINE, EscrowCode.REGISTERED)


def shipped_escrow(chain_id: int) -> ChecksumAddress | None:
    """The X402Escrow deployment shipped in the package's registry for `chain_id`, if any.

    Only the package's own folder counts: neither X402_ESCROW_ADDRESS nor
    X402_ESCROW_DEPLOYMENTS_DIR can make an address trusted. A malformed shipped entry raises ConfigError.
    """
    path = registry_path(f"eip155:{chain_id}", DEPLOYMENTS_DIR)
    if not path.is_file():
        return None
    try:
        deployment = Deployment.from_json(json.loads(path.read_text()), str(path))
    except json.JSONDecodeError:
        raise ConfigError(f"deployment registry {path} is not JSON") from None
    return deployment.escrow if deployment.chain_id == chain_id else None


def check_escrow_code(w3: Web3, address: str, *, chain_id: int) -> EscrowCodeCheck:
    """Judge the escrow at `address` on the chain behind `w3` (one eth_getCode unless it is registered).

    Raises RpcError (or NodeError) when the node cannot answer; never caches, so a caller
    keeps the genuine verdicts it wants to reuse (code at an address cannot change once
    X402Escrow is there: it has no selfdestruct).
    """
    escrow = to_checksum_address(address)
    if shipped_escrow(chain_id) == escrow:
        return EscrowCodeCheck(escrow, chain_id, EscrowCode.REGISTERED, None)
    code = rpc.request(w3, "eth_getCode", [escrow, "latest"])
    raw = bytes.fromhex(str(code).removeprefix("0x"))
    if not raw:
        return EscrowCodeCheck(escrow, chain_id, EscrowCode.NO_CODE, None)
    code_hash = keccak(raw)
    verdict = EscrowCode.GENUINE if code_hash == ESCROW_CODE_HASH else EscrowCode.OTHER_CODE
    return EscrowCodeCheck(escrow, chain_id, verdict, code_hash)


def is_genuine_escrow(w3: Web3, address: str, *, chain_id: int | None = None) -> bool:
    """True if `address` holds the genuine X402Escrow (or is a shipped deployment) on the chain behind `w3`."""
    chain = int(rpc.request(w3, "eth_chainId", []), 16) if chain_id is None else chain_id
    return check_escrow_code(w3, address, chain_id=chain).genuine
