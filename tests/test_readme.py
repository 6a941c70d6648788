"""The README's examples are the files in examples/, verbatim, and those files run against a real chain."""

from __future__ import annotations

import ast
import os
import re
import subprocess
import sys
import time
from pathlib import Path

from fixtures.chain import Chain
from helpers import BUYER, OPERATOR, SELLER, STRANGER, address, deposit, make_terms

from escrow_devtools.anvil import dev_private_key, free_port
from escrow_devtools.harness import wait_until_answering
from escrow_py.protocol.terms import State

REPO = Path(__file__).resolve().parents[1]
README = (REPO / "README.md").read_text()
EXAMPLES = ["seller_app.py", "buyer.py", "keeper.py", "mcp_server.py", "mcp_client.py"]


def _python_blocks(text: str) -> list[str]:
    return [m.group(1) for m in re.finditer(r"```python\n(.*?)```", text, re.DOTALL)]


def test_every_example_is_in_the_readme_verbatim() -> None:
    blocks = _python_blocks(README)
    for name in EXAMPLES:
        source = (REPO / "examples" / name).read_text()
        assert source in blocks, f"examples/{name} differs from every python block of README.md"


def _env(chain: Chain, **extra: str) -> dict[str, str]:
    return {
        **os.environ,
        "X402_ESCROW_RPC_URL": chain.node.url,
        "X402_ESCROW_ADDRESS": chain.escrow.address,
        "X402_ESCROW_TOKEN": chain.token.address,
        **extra,
    }


def test_the_seller_and_buyer_examples_pay_and_deliver_over_http(chain: Chain, tmp_path: Path) -> None:
    port = free_port()
    seller_env = _env(chain, SELLER_ADDRESS=address(SELLER), SELLER_OPERATOR_KEY=dev_private_key(OPERATOR))
    server = subprocess.Popen(
        [sys.executable, "-m", "uvicorn", "examples.seller_app:app", "--app-dir", str(REPO), "--port", str(port)],
        cwd=tmp_path,
        env=seller_env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    url = f"http://127.0.0.1:{port}/report/readme"
    try:
        wait_until_answering(  # a loaded machine takes long to import web3
            url,
            ready=lambda answer: answer.status_code == 402,
            process=server,
            output=lambda: server.stderr.read() if server.stderr else "",
            timeout=120,
            what="the example seller",
        )
        seller_before = chain.token.balance_of(address(SELLER))
        buyer = subprocess.run(
            [sys.executable, str(REPO / "examples" / "buyer.py"), url],
            cwd=tmp_path,
            env=_env(chain, X402_ESCROW_PRIVATE_KEY=dev_private_key(BUYER)),
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
        )
        assert buyer.returncode == 0, buyer.stderr
        printed = buyer.stdout.strip().splitlines()[-1]
        assert ast.literal_eval(printed) == {"item": "readme", "report": "all about readme"}  # print(response.json())
        deadline = time.monotonic() + 30
        while chain.token.balance_of(address(SELLER)) == seller_before:  # the example's poster delivers
            assert time.monotonic() < deadline, "the example seller never posted the delivery"
            time.sleep(0.1)
        assert chain.token.balance_of(address(SELLER)) - seller_before == 10_000
    finally:
        server.terminate()
        server.communicate(timeout=15)  # also closes its stderr pipe (an open one is a ResourceWarning, an error)
    assert (tmp_path / "seller.sqlite").exists() and (tmp_path / "buyer.sqlite").exists()


def test_the_keeper_example_refunds_an_expired_escrow(chain: Chain, tmp_path: Path) -> None:
    # The session chain may have idled (the demo runs its own chain for minutes): its latest block is then
    # older than the time the next one gets, and a 60-second window counted from it would be over already.
    chain.mine()
    terms = make_terms(chain, window=60)
    deposit(chain, terms)
    chain.mine(terms.deadline)
    out = subprocess.run(
        [sys.executable, str(REPO / "examples" / "keeper.py")],
        cwd=tmp_path,
        env=_env(chain, X402_ESCROW_PRIVATE_KEY=dev_private_key(STRANGER)),
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "refunds sent: 1"
    assert chain.escrow.state_of(chain.escrow.id_of(terms)) is State.REFUNDED
