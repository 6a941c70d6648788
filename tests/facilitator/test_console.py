"""The operator console in headless Chromium (Debian's `chromium`, driven by Playwright; no browser download).

A scripted run on the real chain (a payment delivered, one refunded, one held) must show on
the page exactly what the chain and the database hold; the page must load with no console
error, and update by itself after a new payment. One test writes a screenshot.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import localhttp
import pytest
from eth_typing import HexStr
from fixtures.chain import Chain
from helpers import SELLER, address
from playwright.sync_api import Browser, sync_playwright
from seller.shop import served

from escrow_py.console import Explorer, Figures, explorer_for, render_fragment
from escrow_py.facilitator import Facilitator, KeyStore, create_app
from escrow_py.protocol.terms import State, delivery_hash

from .kit import CONSOLE_TOKEN, Fac, fac_config, idem, requirements, signed
from .test_api import wait_for

CHROMIUM = "/usr/bin/chromium"


def _chromium() -> str:
    """Debian's chromium, installed if missing (as root, from the distribution); never skipped."""
    if not Path(CHROMIUM).exists():
        if os.geteuid() != 0:
            pytest.fail(f"{CHROMIUM} is missing: run `apt-get install -y chromium` as root (or `make test-console`)")
        subprocess.run(["apt-get", "install", "-y", "chromium"], check=True, capture_output=True, timeout=900)
    assert shutil.which(CHROMIUM), f"{CHROMIUM} is not executable"
    return CHROMIUM


@pytest.fixture
def browser() -> Iterator[Browser]:

    executable = _chromium()
    with sync_playwright() as pw:
        launched = pw.chromium.launch(executable_path=executable, args=["--no-sandbox"])
        debian = subprocess.run([executable, "--version"], capture_output=True, text=True, check=True).stdout
        assert launched.version.split(".")[0] in debian  # the system browser, not a downloaded one
        try:
            yield launched
        finally:
            launched.close()


def _scripted_run(chain: Chain, fac: Fac) -> dict[str, bytes]:
    """Three payments: one delivered (released), one refunded, one held."""
    ids = {}
    with fac.client(fac.key) as http:
        for name in ("delivered", "refunded", "held"):
            payment, body = signed(chain, requirements(chain))
            assert http.post("/settle", json=body).json()["success"]
            ids[name] = payment.escrow_id
        entry = {"escrowId": "0x" + ids["delivered"].hex(), "deliveryHash": "0x" + delivery_hash(b"r").hex()}
        assert (
            http.post("/deliver", json={"deliveries": [entry]}, headers={"Idempotency-Key": idem()}).status_code == 202
        )
        refund = http.post(
            "/refund", json={"escrowId": "0x" + ids["refunded"].hex()}, headers={"Idempotency-Key": idem()}
        )
        assert refund.status_code == 200
    wait_for(lambda: chain.escrow.state_of(ids["delivered"]) == State.RELEASED)
    wait_for(lambda: fac.facilitator.ledger.figures().by_state.get("released") == 1)
    return ids


def _gas_of(chain: Chain, txs: list[str]) -> int:
    total = 0
    for tx in txs:
        receipt = chain.w3.eth.get_transaction_receipt(HexStr(tx))
        total += int(receipt["gasUsed"]) * int(receipt["effectiveGasPrice"])
    return total


def test_console_shows_what_the_chain_and_database_hold_and_updates(
    chain: Chain, fac: Fac, browser: Browser, tmp_path: Path
) -> None:
    ids = _scripted_run(chain, fac)
    page = browser.new_page()
    errors: list[str] = []
    page.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
    page.on("pageerror", lambda e: errors.append(str(e)))
    page.goto(f"{fac.url}/console?token={CONSOLE_TOKEN}")
    page.wait_for_selector("#chart canvas")  # uPlot drew, from the locally served library
    token = chain.token.address
    held_on_chain = sum(chain.escrow.state_of(i) == State.HELD for i in ids.values()) * 10_000
    assert page.inner_text(f'[data-held="{token}"]') == str(held_on_chain) == "10000"
    assert page.inner_text('[data-state="released"]') == "1"
    assert page.inner_text('[data-state="refunded"]') == "1"
    assert page.inner_text('[data-state="held"]') == "1"
    shown: list[str] = page.eval_on_selector_all("#recent [data-tx]", "els => els.map(e => e.dataset.tx)")
    db_txs = [str(r["tx"]) for r in fac.facilitator.ledger.figures().recent]
    assert sorted(shown) == sorted(db_txs) and len(shown) == 5  # 3 deposits, 1 deliverMany, 1 refund
    # A local anvil under Base Sepolia's id: Basescan never saw these transactions, so they show unlinked.
    assert page.locator("#recent a").count() == 0 and "basescan" not in page.content()
    assert page.locator("#recent code[data-tx]").count() == 5
    assert int(page.get_attribute("#gas-total", "data-wei") or "0") == _gas_of(chain, shown)
    # A new payment: the page shows it without a reload.
    _, body = signed(chain, requirements(chain))
    with fac.client(fac.key) as http:
        assert http.post("/settle", json=body).json()["success"]
    wait_for(lambda: page.inner_text(f'[data-held="{token}"]') == "20000")
    assert page.inner_text('[data-state="held"]') == "2"
    assert errors == []
    # X402_ESCROW_CONSOLE_SCREENSHOT keeps the picture somewhere to look at; by default it goes in tmp_path.
    shot = Path(os.environ.get("X402_ESCROW_CONSOLE_SCREENSHOT") or tmp_path / "console.png")
    page.screenshot(path=str(shot), full_page=True)
    assert shot.stat().st_size > 10_000 and shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert address(0) != token


def test_console_is_hidden_without_its_token(fac: Fac) -> None:
    with fac.client() as http:
        assert http.get("/console").status_code == 404
        assert http.get("/console?token=wrong").status_code == 404
        assert http.get("/console/data.json").status_code == 404
        assert http.get(f"/console?token={CONSOLE_TOKEN}").status_code == 200


def test_the_shipped_chart_library_is_the_pinned_npm_package() -> None:
    root = Path(__file__).resolve().parents[2]
    for name in ("uPlot.iife.min.js", "uPlot.min.css"):
        shipped = root / "escrow_py" / "console" / "static" / name
        assert shipped.read_bytes() == (root / "node_modules" / "uplot" / "dist" / name).read_bytes(), name


def test_the_keepers_console_shows_its_index_and_lag(chain: Chain, browser: Browser, tmp_path: Path) -> None:
    """The same page on the keeper's HTTP server: held escrows, a refund with its gas, and the lag."""
    import threading

    from helpers import deposit, make_terms
    from keeper.kit import make_keeper, wait_until

    from escrow_devtools.anvil import free_port

    due, held = make_terms(chain, window=60), make_terms(chain, window=3600)
    deposit(chain, due)
    deposit(chain, held)
    chain.mine(due.deadline)
    port = free_port()
    keeper = make_keeper(chain, tmp_path / "k.sqlite", poll_interval=0.1, reorg_depth=0, metrics=f"127.0.0.1:{port}")
    stop = threading.Event()
    thread = threading.Thread(target=keeper.run, args=(stop,), kwargs={"check": False})
    thread.start()
    try:
        wait_until(lambda: chain.escrow.state_of(chain.escrow.id_of(due)) is State.REFUNDED, "the keeper's refund")
        page = browser.new_page()
        errors: list[str] = []
        page.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
        page.on("pageerror", lambda e: errors.append(str(e)))
        page.goto(f"http://127.0.0.1:{port}/console")
        page.wait_for_selector("#chart canvas")
        wait_for(lambda: page.inner_text('[data-state="refunded"]') == "1")
        assert page.inner_text('[data-state="held"]') == "1"
        assert page.inner_text(f'[data-held="{chain.token.address.lower()}"]') == str(held.amount)
        refund_tx = page.eval_on_selector_all("#recent [data-tx]", "els => els.map(e => e.dataset.tx)")
        assert len(refund_tx) == 1
        receipt = chain.w3.eth.get_transaction_receipt(HexStr(refund_tx[0]))
        wait_for(lambda: page.get_attribute("#gas-total", "data-wei") == str(receipt["gasUsed"]))
        assert page.inner_text("#keeper-lag").endswith("blocks")
        assert errors == []
    finally:
        stop.set()
        thread.join(timeout=30)


def test_explorer_links_follow_the_chain_id_and_never_a_development_node() -> None:
    assert explorer_for(84532, "op-geth/v1.101503.4-stable/linux-amd64/go1.23") == "https://sepolia.basescan.org"
    assert explorer_for(8453, "Geth/v1.101503.4-stable") == "https://basescan.org"
    for dev_node in ("anvil/v1.4.3", "HardhatNetwork/2.22.0/@ethereumjs/vm/6.4.0", "Ganache/v7.9.2/EthereumJS TestRPC"):
        assert explorer_for(84532, dev_node) is None, dev_node  # a local chain under Base Sepolia's id
    assert explorer_for(31337, "Geth/v1.14") is None  # an unknown chain
    assert explorer_for(8453, None) is None  # the node never said what it is
    # The operator's own explorer wins, on any chain and node.
    assert explorer_for(31337, "anvil/v1.4.3", configured="https://scan.local/") == "https://scan.local"
    tx = "0x" + "ab" * 32
    figures = Figures(recent=[{"tx": tx, "kind": "deposit", "escrows": 1, "amount": 1, "gasWei": 1, "at": 0}])
    linked = render_fragment(figures, explorer=explorer_for(84532, "op-geth/v1"))
    assert f'href="https://sepolia.basescan.org/tx/{tx}"' in linked
    unlinked = render_fragment(figures, explorer=explorer_for(84532, "anvil/v1.4.3"))
    assert "href" not in unlinked and f'data-tx="{tx}"' in unlinked


def test_the_node_is_asked_what_it_is_until_it_answers() -> None:
    answers: list[object] = [OSError("connection refused"), "op-geth/v1"]

    def ask() -> object:
        answer = answers.pop(0)
        if isinstance(answer, Exception):
            raise answer
        return answer

    explorer = Explorer(84532, ask)
    assert explorer() is None  # no answer yet: no link rather than a guess
    assert explorer() == "https://sepolia.basescan.org"
    assert explorer() == "https://sepolia.basescan.org" and answers == []  # asked once it answered


def test_the_console_links_to_the_operators_explorer_when_one_is_configured(
    chain: Chain, browser: Browser, tmp_path: Path
) -> None:
    chain.mine()
    db = tmp_path / "facilitator.sqlite"
    keys = KeyStore(db)
    _, key = keys.create("shop", [address(SELLER)])
    facilitator = Facilitator(fac_config(chain, db, explorer_url="https://scan.example/"))
    try:
        with served(create_app(facilitator, keys, console_token=CONSOLE_TOKEN)) as (url, _server):
            _, body = signed(chain, requirements(chain))
            answer = localhttp.post(f"{url}/settle", json=body, headers={"Authorization": f"Bearer {key}"}, timeout=60)
            deposit = answer.json()["transaction"]
            page = browser.new_page()
            page.goto(f"{url}/console?token={CONSOLE_TOKEN}")
            page.wait_for_selector("#chart canvas")
            wait_for(lambda: page.locator("#recent a").count() == 1)
            assert page.get_attribute("#recent a", "href") == f"https://scan.example/tx/{deposit}"
    finally:
        facilitator.close()
        keys.close()
