"""`ape run deploy` against a local anvil with chain id 84532: registry entry and bytecode on chain."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from web3 import Web3

from escrow_py.chain.anvil import Anvil
from escrow_py.chain.artifacts import load_artifact
from escrow_py.chain.registry import resolve_escrow

REPO = Path(__file__).resolve().parents[2]
APE = Path(sys.executable).parent / "ape"

pytestmark = pytest.mark.ape


def test_ape_deploy_script_deploys_verifies_and_records(tmp_path: Path) -> None:
    assert APE.is_file(), "the Ape tooling is missing: run `make ape`"
    solcx = tmp_path / "solcx"
    solcx.mkdir()
    (solcx / "solc-v0.8.30").symlink_to(REPO / "scripts" / "solc-js.cjs")
    registry = tmp_path / "deployments"
    with Anvil() as node:
        env = {
            **os.environ,
            "APE_DATA_FOLDER": str(tmp_path / "ape"),
            "SOLCX_BINARY_PATH": str(solcx),
            "X402_ESCROW_ANVIL_URL": node.url,
            "X402_ESCROW_DEPLOYMENTS_DIR": str(registry),
        }
        out = subprocess.run(
            [str(APE), "run", "deploy", "--network", "base:anvil:node", "--account", "TEST::0"],
            cwd=REPO, env=env, capture_output=True, text=True, timeout=600, check=False,
        )  # fmt: skip
        assert out.returncode == 0, out.stdout + out.stderr
        assert "Ape's compile reproduces the shipped artifact" in out.stdout
        entry = json.loads((registry / "eip155_84532.json").read_text())
        deployment = resolve_escrow("eip155:84532", directory=registry)
        assert deployment.chain_id == 84532 and entry["deployer"] == "0xf39Fd6e51aad88F6F4ce6aB8827279cffFb92266"
        w3: Web3 = node.web3()
        code = "0x" + bytes(w3.eth.get_code(deployment.escrow)).hex()
        assert code == load_artifact("X402Escrow")["deployedBytecode"]
        receipt = w3.eth.get_transaction_receipt(entry["transaction"])
        assert receipt["contractAddress"] == deployment.escrow and receipt["blockNumber"] == entry["block"]
        token_code = "0x" + bytes(w3.eth.get_code(entry["token"])).hex()
        assert token_code == load_artifact("TestUSDC")["deployedBytecode"]
    assert not list((REPO / "escrow_py" / "chain" / "deployments").glob("eip155_84532.json"))  # package untouched
