"""The README's main command: five stories over real HTTP, real processes and a real chain, and the books."""

from __future__ import annotations

import io
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from fixtures.cli import InProcessCli

from escrow_devtools.anvil import Anvil, dev_private_key, dev_signer
from escrow_devtools.artifacts import deploy
from escrow_devtools.demo import DemoOptions, run_demo
from escrow_devtools.demo import _run as demo_run
from escrow_py.chain.escrow import Escrow
from escrow_py.chain.token import Token
from escrow_py.chain.tx import TxSender
from escrow_py.protocol.errors import ConfigError

STORY_LINES = [
    r"1\. paid and delivered, hash verified\s+0x[0-9a-f]{12}…\s+ok",
    r"2\. the handler fails: instant refund\s+0x[0-9a-f]{12}…\s+ok",
    r"3\. buyer killed, seller never delivers: the keeper refunds\s+0x[0-9a-f]{12}…\s+ok",
    r"4\. buyer killed after paying, seller delivered: recover\(\)\s+0x[0-9a-f]{12}…\s+ok",
    r"5\. a burst served first, then one settleMany pays them all\s+0x[0-9a-f]{12}…\s+ok",
]


def _demo(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "escrow_py.cli", "demo", *args],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
        env=env,
    )


def _assert_every_story_told(stdout: str) -> None:
    for pattern in STORY_LINES:
        assert re.search(pattern, stdout), f"missing {pattern!r} in:\n{stdout}"
    assert "SIGKILL the buyer agent" in stdout and "exit -9" in stdout  # real processes, really killed
    assert "the keeper: True" in stdout
    assert "recover(): replayed, delivered: body matches the on-chain hash" in stdout
    assert "5 Settled events in 1 transaction(s); every hash matches its body: True" in stdout
    assert "recover(): 5 unsettled payments closed as delivered and spent: True" in stdout
    assert "sum of balances unchanged; the escrow holds 0.000000 more than before, Held is 0.000000" in stdout
    assert stdout.rstrip().endswith("every token accounted for")


@pytest.mark.slow
def test_demo_plays_every_story_on_a_fresh_anvil_and_accounts_for_every_token(tmp_path: Path) -> None:
    out = _demo("--workdir", str(tmp_path))
    assert out.returncode == 0, out.stdout + out.stderr
    _assert_every_story_told(out.stdout)
    # The buyer paid for stories 1, 4 and 5 (five quotes) only; the seller got exactly that.
    assert re.search(r"buyer\s+0x\w{40}\s+1\.000000\s+0\.970000\s+-0\.030000", out.stdout), out.stdout
    assert re.search(r"seller\s+0x\w{40}\s+0\.000000\s+0\.030000\s+\+0\.030000", out.stdout), out.stdout
    # Logs went to the work directory, not into the story; no key was written anywhere.
    assert {"seller.log", "keeper.log", "buyer.sqlite", "agent-3.sqlite", "agent-4.sqlite"} <= {
        p.name for p in tmp_path.iterdir()
    }
    for index in (1, 2, 3):
        key = dev_private_key(index).removeprefix("0x")
        assert key not in out.stdout + out.stderr
        for log in ("seller.log", "keeper.log", "agents.log"):
            path = tmp_path / log
            assert not path.exists() or key not in path.read_text(errors="replace")


@pytest.mark.slow
def test_demo_plays_the_same_stories_on_an_existing_chain_with_keys_from_the_environment(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, in_process_cli: InProcessCli
) -> None:
    buyer, seller, keeper = 5, 6, 7  # not the local defaults: the keys must come from the environment
    with Anvil(block_time=1) as node:
        w3 = node.web3()
        deployer = TxSender(w3, dev_signer(0))
        token = Token(w3, deploy(deployer, "TestUSDC", "USDC", "2"))
        escrow = Escrow(w3, deploy(deployer, "X402Escrow"))
        token.mint(deployer, dev_signer(buyer).address, 60_000)  # exactly what the stories need
        monkeypatch.setenv("X402_ESCROW_BUYER_KEY", dev_private_key(buyer))
        monkeypatch.setenv("X402_ESCROW_SELLER_KEY", dev_private_key(seller))
        monkeypatch.setenv("X402_ESCROW_KEEPER_KEY", dev_private_key(keeper))
        args = ("--rpc", node.url, "--escrow", escrow.address, "--token", token.address, "--workdir", str(tmp_path))
        out = in_process_cli("demo", *args)
        stdout = out.stdout
        assert out.returncode == 0, stdout + out.stderr
        _assert_every_story_told(stdout)
        assert "keeper process" in stdout and dev_signer(keeper).address in stdout
        assert token.balance_of(dev_signer(buyer).address) == 30_000
        assert token.balance_of(dev_signer(seller).address) == 30_000
        assert token.balance_of(escrow.address) == 0


def test_an_existing_chain_needs_a_funded_buyer(tmp_path: Path) -> None:
    with Anvil() as node:
        w3 = node.web3()
        deployer = TxSender(w3, dev_signer(0))
        token = Token(w3, deploy(deployer, "TestUSDC", "USDC", "2"))
        escrow = Escrow(w3, deploy(deployer, "X402Escrow"))
        env = {**os.environ, "X402_ESCROW_PRIVATE_KEY": dev_private_key(5)}
        out = _demo("--rpc", node.url, "--escrow", escrow.address, "--token", token.address, env=env)
    assert out.returncode == 2
    assert f"the buyer {dev_signer(5).address} holds 0.000000" in out.stderr
    assert "the stories need 0.060000" in out.stderr


def test_rpc_without_escrow_is_refused() -> None:
    with pytest.raises(ConfigError, match="both --rpc and --escrow"):
        DemoOptions(rpc_url="http://127.0.0.1:8545")


def test_a_token_that_leaves_the_books_fails_the_demo(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """The final check is real: a story that moves the buyer's tokens to an outsider makes the demo fail."""

    def leak(world: demo_run.World, display: demo_run.Display) -> demo_run.StoryResult:
        Token(world.w3, world.token.address).transfer(
            TxSender(world.w3, world.signers["buyer"]), dev_signer(9).address, 1
        )
        return demo_run.StoryResult(1, "a leak", ok=True, outcome="moved 1 unit out of the books")

    monkeypatch.setattr(demo_run, "STORIES", [("a leak", leak)])
    out = io.StringIO()
    assert run_demo(DemoOptions(workdir=tmp_path), out) is False
    assert "sum of balances CHANGED" in out.getvalue()
    assert out.getvalue().rstrip().endswith("ACCOUNTING FAILED")


@pytest.mark.slow
def test_demo_with_a_facilitator_plays_every_story_with_a_keyless_seller(
    tmp_path: Path, in_process_cli: InProcessCli
) -> None:
    out = in_process_cli("demo", "--facilitator", "--workdir", str(tmp_path))
    stdout = out.stdout
    assert out.returncode == 0, stdout + out.stderr
    # Every story, the serve-first burst included: the facilitator settles it in one settleMany with the hash
    # of each body its buyer got, and the books balance after it.
    _assert_every_story_told(stdout)
    assert "(FastAPI + FacilitatorMiddleware: no key, no RPC)" in stdout
    assert re.search(r"facilitator on http://127\.0\.0\.1:\d+ holds the operator key", stdout)
    # Stories 1 and 4 (0.01 each) and five quotes (0.002 each), as without a facilitator.
    assert re.search(r"buyer\s+0x\w{40}\s+1\.000000\s+0\.970000\s+-0\.030000", stdout), stdout
    assert re.search(r"seller\s+0x\w{40}\s+0\.000000\s+0\.030000\s+\+0\.030000", stdout), stdout
    assert (tmp_path / "facilitator.sqlite").exists()
