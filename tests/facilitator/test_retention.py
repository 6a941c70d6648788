"""The facilitator prunes its own idempotency records (FacilitatorConfig.idempotency_retention), at start and
hourly: a record past the window is gone, one within it still answers its replay."""

from __future__ import annotations

import os
from pathlib import Path

import localhttp
import pytest
from fixtures.chain import Chain
from helpers import SELLER, address
from seller.shop import served

from escrow_py.facilitator import Facilitator, KeyStore, create_app
from escrow_py.facilitator._tables import NAMESPACE
from escrow_py.protocol.errors import ConfigError
from escrow_py.storage import open_database

from .kit import fac_config
from .test_api import wait_for


def _claims(db: Path) -> set[str]:
    store = open_database(db, NAMESPACE)
    try:
        return {str(r[0]) for r in store.all("SELECT idempotency_key FROM idempotency")}
    finally:
        store.close()


def test_a_running_facilitator_prunes_idempotency_records_past_its_retention(chain: Chain, tmp_path: Path) -> None:
    chain.mine()
    db = tmp_path / "facilitator.sqlite"
    keys = KeyStore(db)
    _, key = keys.create("shop", [address(SELLER)])
    unknown = "/escrows/0x" + os.urandom(32).hex()
    auth = {"Authorization": f"Bearer {key}"}
    config = fac_config(chain, db, idempotency_retention=3600)
    try:
        facilitator = Facilitator(config)
        with served(create_app(facilitator, keys)) as (url, _server):
            for claim in ("old", "new"):  # any request may carry a key; its answer (404 here) is recorded
                assert localhttp.get(url + unknown, headers={**auth, "Idempotency-Key": claim}).status_code == 404
        facilitator.close()
        store = open_database(db, NAMESPACE)
        try:
            store.execute("UPDATE idempotency SET started_at = started_at - 7200 WHERE idempotency_key = 'old'")
        finally:
            store.close()
        assert _claims(db) == {"old", "new"}
        facilitator = Facilitator(config)  # a replica starting: it prunes at once, then hourly
        with served(create_app(facilitator, keys)) as (url, _server):
            wait_for(lambda: _claims(db) == {"new"}, timeout=30)
            replay = localhttp.get(url + unknown, headers={**auth, "Idempotency-Key": "new"})
            assert replay.status_code == 404 and replay.headers.get("idempotent-replayed") == "true"
        facilitator.close()
    finally:
        keys.close()


@pytest.mark.parametrize("retention", [-1, 10, 3599.9, True])
def test_a_retention_shorter_than_an_hour_is_refused(chain: Chain, tmp_path: Path, retention: object) -> None:
    with pytest.raises(ConfigError, match="idempotency_retention must be 0"):
        fac_config(chain, tmp_path / "f.sqlite", idempotency_retention=retention)
