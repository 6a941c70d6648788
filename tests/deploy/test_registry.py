"""The deployment registry: escrow_py finds the escrow by CAIP-2 network id."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from escrow_py.chain.registry import ADDRESS_ENV, DEPLOYMENTS_DIR, DIR_ENV, USDC, Deployment, record, resolve_escrow
from escrow_py.errors import ConfigError

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
