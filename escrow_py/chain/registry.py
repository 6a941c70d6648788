"""Where the escrow is deployed, by CAIP-2 network id, so nobody pastes addresses around.

The escrow has no constructor arguments, so it is deployed through the standard CREATE2
deployment proxy (`CREATE2_PROXY`, present on Base, Base Sepolia and anvil) with a fixed
salt, and lives at one address on every chain: `ESCROW_ADDRESS`, computed from the shipped
bytecode (`canonical_escrow_address()`; a test checks they agree). That address can only
ever hold the genuine contract, so a buyer may sign to it before looking at its code:
`trusted_escrows(chain_id)`.

`scripts/deploy.py` (run with Ape) records each public deployment in
`escrow_py/chain/deployments/eip155_<chainid>.json`, which ships with the package;
deployments on a local chain go to `.x402-escrow/deployments/` in the working directory,
never over a shipped record. `resolve_escrow("eip155:84532")` reads a record back. For a
custom deployment pass `override=` or set `X402_ESCROW_ADDRESS`; to keep deployment
records elsewhere, point `X402_ESCROW_DEPLOYMENTS_DIR` at another folder.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from eth_typing import ChecksumAddress
from eth_utils.address import to_checksum_address
from eth_utils.crypto import keccak

from escrow_py.chain.artifacts import load_artifact
from escrow_py.protocol.codec import parse_address, setting_address
from escrow_py.protocol.errors import ConfigError

DEPLOYMENTS_DIR = Path(__file__).resolve().parent / "deployments"
# Where the deploy script records deployments on a local chain (relative to the working directory).
LOCAL_DEPLOYMENTS_DIR = Path(".x402-escrow") / "deployments"
DIR_ENV = "X402_ESCROW_DEPLOYMENTS_DIR"
ADDRESS_ENV = "X402_ESCROW_ADDRESS"

# The deterministic deployment proxy (Arachnid's): calldata = salt ++ init code, creates with CREATE2
# and returns the address. It is at this address on Base, Base Sepolia and most EVM chains, and anvil
# has it from the first block.
CREATE2_PROXY = to_checksum_address("0x4e59b44847b379578588920ca78fbf26c0b4956c")
# The fixed salt of every X402Escrow deployment.
ESCROW_SALT = keccak(text="x402-escrow")
# Where X402Escrow lives on every chain: CREATE2_PROXY, ESCROW_SALT and the shipped creation bytecode.
# A change to the contract changes it: tests/deploy/test_registry.py says the new value.
ESCROW_ADDRESS = to_checksum_address("0x298E30EBFc0717cA9EA00fec7ac862D461745214")


def create2_address(init_code: bytes, salt: bytes = ESCROW_SALT, factory: str = CREATE2_PROXY) -> ChecksumAddress:
    """The address CREATE2 gives `init_code` created by `factory` with `salt` (EIP-1014)."""
    if len(salt) != 32:
        raise ValueError(f"a CREATE2 salt is 32 bytes, not {len(salt)}")
    digest = keccak(b"\xff" + bytes.fromhex(to_checksum_address(factory)[2:]) + salt + keccak(init_code))
    return to_checksum_address(digest[12:])


def escrow_init_code() -> bytes:
    """The creation bytecode of the shipped X402Escrow (it takes no constructor arguments)."""
    return bytes.fromhex(str(load_artifact("X402Escrow")["bytecode"]).removeprefix("0x"))


def canonical_escrow_address(salt: bytes = ESCROW_SALT) -> ChecksumAddress:
    """Where the shipped X402Escrow lands through CREATE2_PROXY with `salt`: `ESCROW_ADDRESS` for the fixed salt."""
    return create2_address(escrow_init_code(), salt)


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
    factory: str | None = None  # the CREATE2 factory it was created through (None: a plain CREATE)
    salt: str | None = None  # the CREATE2 salt, 0x hex

    def __post_init__(self) -> None:
        object.__setattr__(self, "escrow", setting_address(self.escrow, "escrow"))

    def to_json(self) -> dict[str, Any]:
        return {k: v for k, v in asdict(self).items() if v is not None}

    @classmethod
    def from_json(cls, data: dict[str, Any], source: str) -> Deployment:
        try:
            return cls(
                network=str(data["network"]),
                chain_id=int(data["chain_id"]),
                escrow=parse_address(data["escrow"], "escrow"),
                block=data.get("block"),
                transaction=data.get("transaction"),
                deployer=data.get("deployer"),
                deployed_at=data.get("deployed_at"),
                token=data.get("token"),
                factory=data.get("factory"),
                salt=data.get("salt"),
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


def local_registry_dir() -> Path:
    """Where deployments on a local chain are recorded: $X402_ESCROW_DEPLOYMENTS_DIR, else LOCAL_DEPLOYMENTS_DIR."""
    return Path(os.environ[DIR_ENV]).expanduser() if os.environ.get(DIR_ENV) else Path.cwd() / LOCAL_DEPLOYMENTS_DIR


def record(deployment: Deployment, directory: Path | None = None, *, local: bool = False) -> Path:
    """Write the registry entry of `deployment.network` (one deployment per network: the latest).

    `local`: a deployment on a local chain (anvil imitating Base Sepolia shares its chain id),
    recorded in `local_registry_dir()` and never in the package's shipped registry.
    """
    if local:
        directory = directory or local_registry_dir()
        if directory.resolve() == DEPLOYMENTS_DIR.resolve():
            raise ConfigError(
                f"refusing to record a local deployment in the shipped registry {DEPLOYMENTS_DIR}: "
                f"it would replace the {deployment.network} record buyers trust; set {DIR_ENV} elsewhere"
            )
    path = registry_path(deployment.network, directory)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(deployment.to_json(), indent=2, sort_keys=True) + "\n")
    tmp.replace(path)  # atomic: a reader sees the old entry or the new one, never half of one
    return path


def trusted_escrows(chain_id: int, directory: Path | None = None) -> frozenset[ChecksumAddress]:
    """The escrow addresses a buyer may sign to on `chain_id` without reading their code.

    `ESCROW_ADDRESS` everywhere (CREATE2 makes it hold the genuine contract or nothing),
    plus the escrow of the chain's record in the shipped registry (or in `directory`).
    Any other address must hold the genuine runtime code.
    """
    trusted = {ESCROW_ADDRESS}
    network = f"eip155:{int(chain_id)}"
    path = registry_path(network, directory or DEPLOYMENTS_DIR)
    if path.is_file():
        trusted.add(_read_record(path, network).escrow)
    return frozenset(trusted)


def resolve_escrow(network: str, override: str | None = None, directory: Path | None = None) -> Deployment:
    """The escrow for `network`: `override`, else $X402_ESCROW_ADDRESS, else the registry."""
    chosen = override or os.environ.get(ADDRESS_ENV)
    path = registry_path(network, directory)
    if chosen:
        escrow = setting_address(chosen, "the escrow override")
        return Deployment(network=network, chain_id=int(network[7:]), escrow=escrow)
    if not path.is_file():
        raise ConfigError(
            f"no X402Escrow deployment known for {network} ({path} does not exist): deploy it with "
            f"`ape run deploy --network ...`, or pass the address (override=..., or {ADDRESS_ENV})"
        )
    return _read_record(path, network)


def _read_record(path: Path, network: str) -> Deployment:
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError:
        raise ConfigError(f"deployment registry {path} is not JSON") from None
    deployment = Deployment.from_json(data, str(path))
    if deployment.network != network:
        raise ConfigError(f"deployment registry {path} is for {deployment.network}, not {network}")
    return deployment
