"""The quickstart and the MCP examples, run as a newcomer runs them: real processes, real HTTP, real anvil."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import httpx
import localhttp
import pytest
from fixtures.chain import Chain
from helpers import BUYER, OPERATOR, SELLER, address, until

from escrow_devtools.anvil import dev_private_key, free_port
from escrow_devtools.harness import wait_until_answering
from escrow_py.chain.registry import DEPLOYMENTS_DIR, ESCROW_ADDRESS

REPO = Path(__file__).resolve().parents[1]
EXAMPLES = REPO / "examples"


def _shipped_records() -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in DEPLOYMENTS_DIR.glob("*.json")}


@pytest.mark.integration  # its own anvil, seller and buyer processes
def test_the_quickstart_script_starts_a_chain_and_pays_a_first_request(tmp_path: Path) -> None:
    shipped = _shipped_records()
    env = {
        **os.environ,
        "CHAIN_PORT": str(free_port()),
        "SELLER_PORT": str(free_port()),
        "STATE_DIR": str(tmp_path / "state"),
    }
    run = subprocess.run(
        ["sh", str(EXAMPLES / "quickstart.sh")], env=env, capture_output=True, text=True, timeout=300, check=False
    )
    assert run.returncode == 0, run.stdout + run.stderr
    lines = run.stdout.splitlines()
    assert "{'item': '7', 'report': 'all about 7'}" in lines  # examples/buyer.py's print(response.json())
    for step in range(1, 5):  # a progress line per step of `x402-escrow dev`
        assert any(line.startswith(f"[{step}/4] ") and "done (" in line for line in lines), run.stdout
    settings = dict(
        line.removeprefix("export ").split("=", 1) for line in (tmp_path / "state" / "dev.env").read_text().splitlines()
    )
    assert settings["X402_ESCROW_ADDRESS"] == ESCROW_ADDRESS
    assert settings["X402_ESCROW_PRIVATE_KEY"] == dev_private_key(1)
    record = json.loads((tmp_path / "state" / "deployments" / "eip155_84532.json").read_text())
    assert (record["escrow"], record["token"]) == (ESCROW_ADDRESS, settings["X402_ESCROW_TOKEN"])
    assert _shipped_records() == shipped  # the local record went to the state folder, not over the shipped one
    # The script ended `dev` with SIGTERM, as Ctrl-C would: its anvil went with it.
    assert "stopping anvil" in lines
    with pytest.raises(httpx.TransportError):
        localhttp.post(
            settings["X402_ESCROW_RPC_URL"], json={"jsonrpc": "2.0", "id": 1, "method": "eth_chainId"}, timeout=5
        )


def test_the_mcp_examples_pay_for_a_tool_call_over_streamable_http(chain: Chain, tmp_path: Path) -> None:
    port = free_port()
    env = {
        **os.environ,
        "X402_ESCROW_RPC_URL": chain.node.url,
        "X402_ESCROW_ADDRESS": chain.escrow.address,
        "X402_ESCROW_TOKEN": chain.token.address,
        "SELLER_ADDRESS": address(SELLER),
        "SELLER_OPERATOR_KEY": dev_private_key(OPERATOR),
        "X402_ESCROW_PRIVATE_KEY": dev_private_key(BUYER),
        "PORT": str(port),
    }
    server = subprocess.Popen(
        [sys.executable, str(EXAMPLES / "mcp_server.py")],
        cwd=tmp_path,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    url = f"http://127.0.0.1:{port}/mcp"
    try:
        wait_until_answering(
            url,
            process=server,
            output=lambda: server.stderr.read() if server.stderr else "",
            timeout=60,
            what="the example MCP server",
        )
        seller_before = chain.token.balance_of(address(SELLER))
        client = subprocess.run(
            [sys.executable, str(EXAMPLES / "mcp_client.py"), url, "widget"],
            cwd=tmp_path,
            env=env,
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
        )
        assert client.returncode == 0, client.stdout + client.stderr
        printed = json.loads(client.stdout.strip().splitlines()[-1])
        assert printed == {"item": "widget", "score": sum(map(ord, "widget")) % 100}
        until("the seller's payment", lambda: chain.token.balance_of(address(SELLER)) == seller_before + 10_000)
    finally:
        server.terminate()
        server.communicate(timeout=30)
