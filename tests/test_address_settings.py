"""The facilitator, the keeper and the deployment registry read address settings by the seller's rule.

One rule for every address a role is configured with (`codec.setting_address`): `0x` and 40 hex
digits, any case, a mixed-case spelling with a wrong EIP-55 checksum refused; a ConfigError naming
the setting otherwise. These used eth_utils' `is_address`, which also took an address without `0x`,
with `0X`, or as 20 raw bytes.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from helpers import SELLER, address, dev

from escrow_py.chain.registry import Deployment, resolve_escrow
from escrow_py.facilitator import FacilitatorConfig, KeyStore
from escrow_py.keeper import KeeperConfig
from escrow_py.protocol.errors import ConfigError

GOOD = address(SELLER)
WRONG_SPELLINGS: list[Any] = [
    GOOD[2:],  # no 0x
    "0X" + GOOD[2:].upper(),  # 0X
    bytes.fromhex(GOOD[2:]),  # 20 raw bytes
    GOOD[:-1] + ("a" if GOOD[-1] != "a" else "b"),  # a typo the checksum catches
]
SPELLINGS = ["no-0x", "0X", "raw-bytes", "bad-checksum"]


@pytest.mark.parametrize("spelling", WRONG_SPELLINGS, ids=SPELLINGS)
def test_the_facilitators_escrow_and_token_must_be_0x_addresses(spelling: Any, tmp_path: Path) -> None:
    settings: dict[str, Any] = {"rpc_url": "http://127.0.0.1:1", "escrow": GOOD, "token": GOOD, "operator": dev(0),
                                "network": "eip155:84532", "store": tmp_path / "f.sqlite"}  # fmt: skip
    for setting in ("escrow", "token"):
        with pytest.raises(ConfigError, match=f"FacilitatorConfig.{setting} is not an address"):
            FacilitatorConfig(**{**settings, setting: spelling})
    assert FacilitatorConfig(**{**settings, "escrow": GOOD.lower()}).escrow == GOOD


@pytest.mark.parametrize("spelling", WRONG_SPELLINGS, ids=SPELLINGS)
def test_an_api_keys_pay_to_must_be_0x_addresses(spelling: Any, tmp_path: Path) -> None:
    keys = KeyStore(f"sqlite:///{tmp_path / 'keys.sqlite'}")
    try:
        with pytest.raises(ConfigError, match="payTo is not an address"):
            keys.create("shop", [GOOD, spelling])
        assert keys.list() == []  # nothing half-created
        keys.create("shop", [GOOD.lower()])
        [key] = keys.list()
        assert key.pay_to == frozenset({GOOD})
    finally:
        keys.close()


@pytest.mark.parametrize(
    "spelling", [s for s in WRONG_SPELLINGS if isinstance(s, str)], ids=SPELLINGS[:2] + SPELLINGS[3:]
)
def test_the_keepers_address_lists_must_be_0x_addresses(spelling: str) -> None:
    for setting in ("escrows", "buyers", "sellers"):
        flags = {"rpc_url": "http://x", "escrows": GOOD, setting: f"{GOOD},{spelling}"}
        with pytest.raises(ConfigError, match=f"{setting} is not an address"):
            KeeperConfig.load(flags, environ={})
    assert KeeperConfig.load({"rpc_url": "http://x", "escrows": GOOD.lower()}, environ={}).escrows == (GOOD,)


@pytest.mark.parametrize(
    "spelling", [s for s in WRONG_SPELLINGS if isinstance(s, str)], ids=SPELLINGS[:2] + SPELLINGS[3:]
)
def test_a_deployment_and_an_escrow_override_must_be_0x_addresses(spelling: Any, tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="escrow is not an address"):
        Deployment(network="eip155:84532", chain_id=84532, escrow=spelling)
    with pytest.raises(ConfigError, match="the escrow override is not an address"):
        resolve_escrow("eip155:84532", spelling, directory=tmp_path)
    assert resolve_escrow("eip155:84532", GOOD.lower(), directory=tmp_path).escrow == GOOD
