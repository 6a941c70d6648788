"""`ape run deploy` against a local anvil with chain id 84532: the one address, the record, the refusals."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from web3 import Web3

from escrow_devtools import build
from escrow_devtools.anvil import Anvil, dev_signer
from escrow_py.chain.artifacts import load_artifact
from escrow_py.chain.escrow import deploy_local
from escrow_py.chain.registry import (
    CREATE2_PROXY,
    DEPLOYMENTS_DIR,
    ESCROW_ADDRESS,
    ESCROW_SALT,
    canonical_escrow_address,
    resolve_escrow,
)
from escrow_py.chain.tx import TxSender

REPO = Path(__file__).resolve().parents[2]
APE = Path(sys.executable).parent / "ape"

pytestmark = pytest.mark.ape


def _ape_deploy(node: Anvil, tmp_path: Path, *args: str) -> subprocess.CompletedProcess[str]:
    # The solc-js wrapper's cache stays the checkout's (shared with the artifacts test); its
    # hits and misses are logged, by key, to compare Ape's input with build.py's.
    solcx = tmp_path / "solcx"
    if not solcx.exists():
        solcx.mkdir()
        (solcx / "solc-v0.8.30").symlink_to(REPO / "scripts" / "solc-js.cjs")
    env = {
        **os.environ,
        "APE_DATA_FOLDER": str(tmp_path / "ape"),
        "SOLCX_BINARY_PATH": str(solcx),
        "X402_ESCROW_ANVIL_URL": node.url,
        "X402_ESCROW_DEPLOYMENTS_DIR": str(tmp_path / "deployments"),
        "X402_ESCROW_SOLC_CACHE_LOG": str(tmp_path / "solc-cache.log"),
    }
    return subprocess.run(
        [str(APE), "run", "deploy", "--network", "base:anvil:node", "--account", "TEST::0", *args],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=600, check=False,
    )  # fmt: skip


def _shipped_records() -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in DEPLOYMENTS_DIR.glob("*.json")}


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_ape_deploy_script_deploys_at_the_one_address_verifies_and_records(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    assert APE.is_file(), "the Ape tooling is missing: run `make ape`"
    shipped = _shipped_records()
    registry = tmp_path / "deployments"
    with Anvil() as node:
        out = _ape_deploy(node, tmp_path)
        assert out.returncode == 0, out.stdout + out.stderr
        assert "Ape's compile reproduces the shipped artifact" in out.stdout
        # Ape compiled the very input build.py compiles the escrow from, so one compile serves both.
        apes = (tmp_path / "solc-cache.log").read_text().split()
        monkeypatch.setenv("X402_ESCROW_SOLC_CACHE_LOG", str(tmp_path / "build-cache.log"))
        build.compile_input(build.deployed_input(), build.SOLCJS_WRAPPER)
        ours = (tmp_path / "build-cache.log").read_text().split()
        assert ours[:2] == ["cache", "hit"] and ours[2] in apes, (apes, ours)
        entry = json.loads((registry / "eip155_84532.json").read_text())
        deployment = resolve_escrow("eip155:84532", directory=registry)
        assert deployment.escrow == ESCROW_ADDRESS  # through the CREATE2 proxy, with the fixed salt
        assert (entry["factory"], entry["salt"]) == (CREATE2_PROXY, "0x" + ESCROW_SALT.hex())
        assert deployment.chain_id == 84532 and entry["deployer"] == "0xf39Fd6e51aad88F6F4ce6aB8827279cffFb92266"
        w3: Web3 = node.web3()
        code = "0x" + bytes(w3.eth.get_code(deployment.escrow)).hex()
        assert code == load_artifact("X402Escrow")["deployedBytecode"]
        receipt = w3.eth.get_transaction_receipt(entry["transaction"])
        assert receipt["to"] == CREATE2_PROXY and receipt["blockNumber"] == entry["block"]
        token_code = "0x" + bytes(w3.eth.get_code(entry["token"])).hex()
        assert token_code == load_artifact("TestUSDC")["deployedBytecode"]
        with Anvil() as fresh:  # `x402-escrow dev` and the demo deploy in the same order: the same addresses
            local = deploy_local(TxSender(fresh.web3(), dev_signer(0)))
        assert local == (deployment.escrow, entry["token"])

        # Deployed already (by anyone): verified and recorded, nothing sent for the escrow.
        again = _ape_deploy(node, tmp_path, "--skip-compile-check")
        assert again.returncode == 0, again.stdout + again.stderr
        assert f"X402Escrow is already at {ESCROW_ADDRESS}" in again.stdout
        assert "transaction" not in json.loads((registry / "eip155_84532.json").read_text())

        # Anywhere else is refused unless asked for, before anything is sent.
        salt = "0x" + "01" * 32
        elsewhere = canonical_escrow_address(bytes.fromhex(salt[2:]))
        refused = _ape_deploy(node, tmp_path, "--skip-compile-check", "--salt", salt)
        assert refused.returncode != 0
        assert f"refusing to deploy X402Escrow anywhere but {ESCROW_ADDRESS}" in refused.stdout + refused.stderr
        assert bytes(w3.eth.get_code(elsewhere)) == b""
        allowed = _ape_deploy(node, tmp_path, "--skip-compile-check", "--salt", salt, "--allow-elsewhere")
        assert allowed.returncode == 0, allowed.stdout + allowed.stderr
        assert resolve_escrow("eip155:84532", directory=registry).escrow == elsewhere
        assert "0x" + bytes(w3.eth.get_code(elsewhere)).hex() == load_artifact("X402Escrow")["deployedBytecode"]
    assert _shipped_records() == shipped  # a local deployment never touches the shipped records
