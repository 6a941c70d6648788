"""The middleware behind a real uvicorn on 127.0.0.1: the lifespan runs the poster, which posts on its own."""

from __future__ import annotations

import asyncio
import threading
import time
from pathlib import Path

import localhttp
import uvicorn
from fixtures.chain import Chain

from escrow_devtools.anvil import free_port
from escrow_py.protocol.terms import State

from .payer import buy
from .shop import make_shop


def test_over_real_http_the_lifespan_poster_releases_the_payment(chain: Chain, tmp_path: Path) -> None:
    chain.mine()
    shop = make_shop(chain, tmp_path / "seller.sqlite", poster_interval=0.1)
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(shop.app, host="127.0.0.1", port=port, lifespan="on", log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    try:
        deadline = time.monotonic() + 10
        while not server.started:
            assert time.monotonic() < deadline, "uvicorn did not start"
            time.sleep(0.02)

        async def run() -> bytes:
            async with localhttp.AsyncClient(base_url=f"http://127.0.0.1:{port}") as client:
                response, payment = await buy(client, chain, "GET", "/report/live")
            assert response.status_code == 200, response.text
            return payment.escrow_id

        escrow_id = asyncio.run(run())
        # Nobody calls flush(): the poster started by the lifespan posts the delivery.
        deadline = time.monotonic() + 10
        while chain.escrow.state_of(escrow_id) != State.RELEASED:
            assert time.monotonic() < deadline, "the lifespan poster did not post the delivery"
            time.sleep(0.05)
    finally:
        server.should_exit = True
        thread.join(10)
    assert not thread.is_alive()
