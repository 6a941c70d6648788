"""The deployment registry: escrow_py finds the escrow by CAIP-2 network id."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from escrow_py.chain.registry import (
    ADDRESS_ENV,
    CREATE2_PROXY,
    DEPLOYMENTS_DIR,
    DIR_ENV,
    ESCROW_ADDRESS,
    ESCROW_SALT,
    LOCAL_DEPLOYMENTS_DIR,
    USDC,
    Deployment,
    canonical_escrow_address,
    create2_address,
    record,
    resolve_escrow,
    trusted_escrows,
)
from escrow_py.protocol.errors import ConfigError

ESCROW = "0x" + "ab" * 20


def test_record_then_resolve_round_trips(tmp_path: Path) -> None:
    deployment = Deployment("eip155:84532", 84532, ESCROW, block=7, transaction="0x" + "cd" * 32)  # type: ignore[arg-type]
    path = record(deployment, tmp_path)
    assert path == tmp_path / "eip155_84532.json"
    assert json.loads(path.read_text())["escrow"] == deployment.escrow
    assert resolve_escrow("eip155:84532", directory=tmp_path) == deployment


def test_the_environment_chooses_the_registry_folder_and_overrides_the_address(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(DIR_ENV, str(tmp_path))
    record(Deployment("eip155:31337", 31337, ESCROW))  # type: ignore[arg-type]
    assert (tmp_path / "eip155_31337.json").is_file()
    assert resolve_escrow("eip155:31337").escrow.lower() == ESCROW
    other = "0x" + "12" * 20
    assert resolve_escrow("eip155:31337", override=other).escrow.lower() == other
    monkeypatch.setenv(ADDRESS_ENV, other)
    assert resolve_escrow("eip155:999").escrow.lower() == other


def test_unknown_networks_and_bad_entries_say_what_to_do(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"no X402Escrow deployment known for eip155:1 .*ape run deploy"):
        resolve_escrow("eip155:1", directory=tmp_path)
    with pytest.raises(ConfigError, match="not an EVM CAIP-2 network id"):
        resolve_escrow("solana:mainnet", directory=tmp_path)
    (tmp_path / "eip155_5.json").write_text('{"network": "eip155:5", "chain_id": 5, "escrow": "0xnope"}')
    with pytest.raises(ConfigError, match="malformed"):
        resolve_escrow("eip155:5", directory=tmp_path)
    with pytest.raises(ConfigError, match="override"):
        resolve_escrow("eip155:5", override="0xnope", directory=tmp_path)


def test_shipped_registry_files_are_valid_and_usdc_is_known() -> None:
    for path in DEPLOYMENTS_DIR.glob("*.json"):
        network = path.stem.replace("_", ":")
        assert resolve_escrow(network, directory=DEPLOYMENTS_DIR).network == network
    assert USDC["eip155:84532"].address == "0x036CbD53842c5426634e7929541eC2318f3dCF7e"
    assert (USDC["eip155:84532"].name, USDC["eip155:84532"].version, USDC["eip155:84532"].decimals) == ("USDC", "2", 6)


def test_the_escrow_address_is_the_create2_address_of_the_shipped_bytecode() -> None:
    computed = canonical_escrow_address()
    assert computed == ESCROW_ADDRESS, (
        f"the shipped X402Escrow bytecode changed, so its address did: set registry.ESCROW_ADDRESS and the "
        f"escrow of every shipped record in {DEPLOYMENTS_DIR} to {computed}"
    )
    # EIP-1014's own example: factory 0xdeadbeef00000000000000000000000000000000, salt 0, init code 0x00.
    example = create2_address(b"\x00", bytes(32), "0xdeadbeef00000000000000000000000000000000")
    assert example == "0xB928f69Bb1D91Cd65274e3c79d8986362984fDA3"


def test_buyers_trust_the_one_address_on_base_sepolia_and_base(monkeypatch: pytest.MonkeyPatch) -> None:
    for network in ("eip155:84532", "eip155:8453"):
        shipped = resolve_escrow(network, directory=DEPLOYMENTS_DIR)
        assert shipped.escrow == ESCROW_ADDRESS and shipped.factory == CREATE2_PROXY
        assert shipped.salt == "0x" + ESCROW_SALT.hex()
        assert trusted_escrows(shipped.chain_id) == {ESCROW_ADDRESS}
    # The environment's override names an escrow to use; it never makes one trusted.
    monkeypatch.setenv(ADDRESS_ENV, "0x" + "12" * 20)
    assert trusted_escrows(84532) == {ESCROW_ADDRESS}


def test_a_recorded_deployment_elsewhere_is_trusted_on_its_chain_only(tmp_path: Path) -> None:
    record(Deployment("eip155:31337", 31337, ESCROW), tmp_path)  # type: ignore[arg-type]
    assert trusted_escrows(31337, tmp_path) == {ESCROW_ADDRESS, Deployment("x", 1, ESCROW).escrow}  # type: ignore[arg-type]
    assert trusted_escrows(84532, tmp_path) == {ESCROW_ADDRESS}


def test_local_deployments_are_recorded_apart_from_the_shipped_registry(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv(DIR_ENV, raising=False)
    monkeypatch.chdir(tmp_path)
    local = Deployment("eip155:84532", 84532, ESCROW)  # type: ignore[arg-type]
    path = record(local, local=True)
    assert path == tmp_path / LOCAL_DEPLOYMENTS_DIR / "eip155_84532.json"
    assert resolve_escrow("eip155:84532", directory=DEPLOYMENTS_DIR).escrow == ESCROW_ADDRESS  # untouched
    with pytest.raises(ConfigError, match="refusing to record a local deployment in the shipped registry"):
        record(local, DEPLOYMENTS_DIR, local=True)
    monkeypatch.setenv(DIR_ENV, str(DEPLOYMENTS_DIR))
    with pytest.raises(ConfigError, match="refusing to record a local deployment"):
        record(local, local=True)
