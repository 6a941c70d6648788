"""Where the escrow is deployed, by CAIP-2 network id, so nobody pastes addresses around.

`scripts/deploy.py` (run with Ape) records each deployment in
`escrow_py/chain/deployments/eip155_<chainid>.json`, which ships with the package.
`resolve_escrow("eip155:84532")` reads it back. For a custom deployment pass
`override=` or set `X402_ESCROW_ADDRESS`; to keep local deployments out of the
package (tests, the demo), point `X402_ESCROW_DEPLOYMENTS_DIR` at another folder.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from eth_typing import ChecksumAddress
from eth_utils.address import is_address, to_checksum_address

from escrow_py.errors import ConfigError

DEPLOYMENTS_DIR = Path(__file__).resolve().parent / "deployments"
DIR_ENV = "X402_ESCROW_DEPLOYMENTS_DIR"
ADDRESS_ENV = "X402_ESCROW_ADDRESS"


@dataclass(frozen=True, slots=True)
class KnownToken:
    """An ERC-3009 token and its EIP-712 domain."""

    address: ChecksumAddress
    name: str
    version: str
    decimals: int


# Circle's USDC (DESIGN.md section 3).
USDC: dict[str, KnownToken] = {
    "eip155:84532": KnownToken(to_checksum_address("0x036CbD53842c5426634e7929541eC2318f3dCF7e"), "USDC", "2", 6),
    "eip155:8453": KnownToken(to_checksum_address("0x833589fCD6eDb6E08f4c7C32D4f71b54bdA02913"), "USD Coin", "2", 6),
}


@dataclass(frozen=True, slots=True)
class Deployment:
    """One deployment of X402Escrow (and, on local chains, of the TestUSDC token)."""

    network: str
    chain_id: int
    escrow: ChecksumAddress
    block: int | None = None
    transaction: str | None = None
    deployer: str | None = None
    deployed_at: int | None = None
    token: str | None = None  # the TestUSDC deployed beside it on local networks

    def __post_init__(self) -> None:
        if not is_address(self.escrow):
            raise ConfigError(f"escrow {self.escrow!r} is not an address")
        object.__setattr__(self, "escrow", to_checksum_address(self.escrow))

    def to_json(self) -> dict[str, Any]:
        return {k: v for k, v in asdict(self).items() if v is not None}

    @classmethod
    def from_json(cls, data: dict[str, Any], source: str) -> Deployment:
        try:
            escrow = data["escrow"]
            if not is_address(escrow):
                raise ValueError(f"escrow {escrow!r} is not an address")
            return cls(
                network=str(data["network"]),
                chain_id=int(data["chain_id"]),
                escrow=to_checksum_address(escrow),
                block=data.get("block"),
                transaction=data.get("transaction"),
                deployer=data.get("deployer"),
                deployed_at=data.get("deployed_at"),
                token=data.get("token"),
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise ConfigError(f"deployment registry {source} is malformed: {exc}") from None


def registry_dir() -> Path:
    return Path(os.environ[DIR_ENV]).expanduser() if os.environ.get(DIR_ENV) else DEPLOYMENTS_DIR


def registry_path(network: str, directory: Path | None = None) -> Path:
    """eip155:84532 -> <dir>/eip155_84532.json"""
    if not network.startswith("eip155:") or not network[7:].isdigit():
        raise ConfigError(f"not an EVM CAIP-2 network id: {network!r} (expected eip155:<chain id>)")
    return (directory or registry_dir()) / f"{network.replace(':', '_')}.json"


def record(deployment: Deployment, directory: Path | None = None) -> Path:
    """Write the registry entry of `deployment.network` (one deployment per network: the latest)."""
    path = registry_path(deployment.network, directory)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(deployment.to_json(), indent=2, sort_keys=True) + "\n")
    tmp.replace(path)  # atomic: a reader sees the old entry or the new one, never half of one
    return path


def resolve_escrow(network: str, override: str | None = None, directory: Path | None = None) -> Deployment:
    """The escrow for `network`: `override`, else $X402_ESCROW_ADDRESS, else the registry."""
    chosen = override or os.environ.get(ADDRESS_ENV)
    path = registry_path(network, directory)
    if chosen:
        if not is_address(chosen):
            raise ConfigError(f"escrow override {chosen!r} is not an address")
        return Deployment(network=network, chain_id=int(network[7:]), escrow=to_checksum_address(chosen))
    if not path.is_file():
        raise ConfigError(
            f"no X402Escrow deployment known for {network} ({path} does not exist): deploy it with "
            f"`ape run deploy --network ...`, or pass the address (override=..., or {ADDRESS_ENV})"
        )
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError:
        raise ConfigError(f"deployment registry {path} is not JSON") from None
    deployment = Deployment.from_json(data, str(path))
    if deployment.network != network:
        raise ConfigError(f"deployment registry {path} is for {deployment.network}, not {network}")
    return deployment
