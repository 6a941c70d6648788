"""A misconfigured seller fails when uvicorn starts it, naming the setting and the value found.

Before, a seller with a wrong escrow, a token that is not ERC-3009 (or signs in another
EIP-712 domain), the wrong network or an operator without gas started fine and never sold.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from pathlib import Path

import localhttp
import pytest
import uvicorn
from fixtures.chain import Chain
from helpers import OPERATOR, STRANGER, address

from escrow_devtools.anvil import free_port
from escrow_py.chain.genuine import ESCROW_CODE_HASH
from escrow_py.protocol.errors import ConfigError
from escrow_py.seller import check_seller

from .shop import make_config, make_shop, served, set_gas_money

Overrides = Callable[[Chain], dict[str, object]]

CASES: list[tuple[str, Overrides, list[str]]] = [
    (
        "escrow-is-an-account",
        lambda c: {"escrow": address(STRANGER)},
        ["SellerConfig.escrow", address(STRANGER), "no code"],
    ),
    (
        "escrow-is-the-token",
        lambda c: {"escrow": c.token.address},
        ["SellerConfig.escrow", "{token}", "other code", ESCROW_CODE_HASH.hex()],
    ),
    (
        "wrong-network",
        lambda c: {"network": "eip155:8453"},
        ["SellerConfig.network is eip155:8453", "chain 84532"],
    ),
    (
        "token-is-not-erc3009",
        lambda c: {"token": c.escrow.address},
        ["SellerConfig.token", "{escrow}", "not an ERC-3009 token"],
    ),
    ("token-is-an-account", lambda c: {"token": address(STRANGER)}, ["SellerConfig.token", "has no code"]),
    (
        "wrong-eip712-name",
        lambda c: {"token_name": "USD Coin"},
        ["SellerConfig.token_name/token_version", "'USD Coin'", "name() is 'USDC'"],
    ),
    (
        "wrong-eip712-version",
        lambda c: {"token_version": "1"},
        ["SellerConfig.token_name/token_version", "'1'", "version() is '2'"],
    ),
    ("rpc-down", lambda c: {"rpc_url": "http://127.0.0.1:9/v2/SECRET"}, ["SellerConfig.rpc_url", "127.0.0.1:9"]),
]


def _expected(chain: Chain, fragments: list[str]) -> list[str]:
    return [f.format(token=chain.token.address, escrow=chain.escrow.address) for f in fragments]


def _failed_start(app: object) -> tuple[bool, uvicorn.Server]:
    """Run uvicorn until it gives up starting; (whether it exited with its start-up failure code, the server)."""
    config = uvicorn.Config(app, host="127.0.0.1", port=free_port(), lifespan="on", log_level="info")  # type: ignore[arg-type]
    server = uvicorn.Server(config)
    exit_codes: list[object] = []

    def run() -> None:
        try:
            server.run()
        except SystemExit as exc:  # uvicorn exits the process (here: the thread) when start-up fails
            exit_codes.append(exc.code)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    thread.join(60)
    if thread.is_alive():
        server.should_exit = True
        thread.join(30)
    return exit_codes == [3], server


@pytest.mark.parametrize(("overrides", "fragments"), [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_a_misconfigured_seller_does_not_start_and_says_which_setting(
    chain: Chain, tmp_path: Path, caplog: pytest.LogCaptureFixture, overrides: Overrides, fragments: list[str]
) -> None:
    caplog.set_level(logging.INFO)
    shop = make_shop(chain, tmp_path / "seller.sqlite", **overrides(chain))
    stopped, server = _failed_start(shop.app)
    assert stopped, "uvicorn kept running a seller that cannot sell"
    assert not server.started
    failures = [r.getMessage() for r in caplog.records if r.name == "escrow_py.seller" and r.levelno >= logging.ERROR]
    assert failures, caplog.text
    for fragment in _expected(chain, fragments):
        assert fragment in failures[0], failures[0]
    assert "SECRET" not in caplog.text, "the RPC URL's path (an API key) must not be logged"


def test_an_operator_without_gas_does_not_start(chain: Chain, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO)
    set_gas_money(chain, OPERATOR, 0)
    stopped, _ = _failed_start(make_shop(chain, tmp_path / "seller.sqlite").app)
    assert stopped
    assert f"SellerConfig.operator {address(OPERATOR)} has 0 wei of gas money" in caplog.text


def test_a_well_configured_seller_starts_and_the_checks_can_run_on_their_own(chain: Chain, tmp_path: Path) -> None:
    check_seller(make_config(chain, tmp_path / "a.sqlite"))  # no error
    with pytest.raises(ConfigError, match=r"SellerConfig\.escrow"):
        check_seller(make_config(chain, tmp_path / "b.sqlite", escrow=chain.token.address))
    with served(make_shop(chain, tmp_path / "c.sqlite").app) as (url, _):
        assert localhttp.get(f"{url}/report/x").status_code == 402
    # startup_checks=False is the escape hatch (e.g. a node that is down at boot): it starts anyway.
    unchecked = make_shop(chain, tmp_path / "d.sqlite", escrow=address(STRANGER), startup_checks=False)
    with served(unchecked.app) as (url, _):
        assert localhttp.get(f"{url}/report/x").status_code == 402
