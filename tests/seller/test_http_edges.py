"""The seller's HTTP edge over a real uvicorn and the session anvil: no method reaches a priced handler
for free, and no header gets a 500."""

from __future__ import annotations

import asyncio
import base64
import json
import time
from pathlib import Path
from typing import Any

import httpx
import localhttp
import pytest
from fastapi import FastAPI
from fixtures.chain import Chain
from rpc_proxy import RpcProxy
from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from escrow_py.protocol.reasons import Reason
from escrow_py.protocol.terms import State
from escrow_py.protocol.wire import PAYMENT_REQUIRED_HEADER, PAYMENT_SIGNATURE_HEADER, decode_payment_required
from escrow_py.seller import EscrowMiddleware, PricedRoute

from .payer import quote, sign_payment
from .shop import PRICE, deposits, make_config, make_shop, served


def _method_app(chain: Chain, store: Path, calls: dict[str, int]) -> FastAPI:
    """Priced GET routes whose handlers the framework also runs for other methods."""
    app = FastAPI()

    def counted(name: str) -> dict[str, Any]:
        calls[name] = calls.get(name, 0) + 1
        return {"secret": name}

    async def starlette_endpoint(request: Request) -> Response:
        # A plain Starlette Route: it answers HEAD with this GET endpoint on its own.
        return JSONResponse(counted("starlette"), headers={"x-secret": "starlette"})

    app.add_route("/starlette/{item}", starlette_endpoint, methods=["GET"])

    @app.api_route("/fastapi/{item}", methods=["GET", "HEAD"])
    async def fastapi_endpoint(item: str) -> Response:
        return JSONResponse(counted("fastapi"), headers={"x-secret": "fastapi"})

    @app.api_route("/both", methods=["GET", "POST"])
    async def both() -> dict[str, Any]:
        return counted("both")

    @app.get("/split")
    async def split_get() -> dict[str, Any]:
        return counted("split-get")

    @app.post("/split")
    async def split_post() -> dict[str, Any]:  # another handler: free, as configured
        return counted("split-post")

    routes = [PricedRoute("GET", p, amount=PRICE) for p in ("/starlette/{item}", "/fastapi/{item}", "/both", "/split")]
    app.add_middleware(EscrowMiddleware, config=make_config(chain, store, routes=routes))
    return app


@pytest.mark.parametrize(("method", "path"), [("HEAD", "/starlette/x"), ("HEAD", "/fastapi/x"), ("POST", "/both")])
def test_a_method_that_reaches_a_priced_handler_is_priced(chain: Chain, tmp_path: Path, method: str, path: str) -> None:
    chain.mine()
    calls: dict[str, int] = {}
    start = int(chain.w3.eth.block_number) + 1
    with served(_method_app(chain, tmp_path / "seller.sqlite", calls)) as (url, _):

        async def run() -> None:
            async with localhttp.AsyncClient(base_url=url) as client:
                unpaid = await client.request(method, path)
                assert unpaid.status_code == 402, (unpaid.status_code, unpaid.headers)
                assert "x-secret" not in unpaid.headers
                assert calls == {}, "the priced handler ran without a payment"
                # It is priced, not refused: paying for this method buys it.
                required = decode_payment_required(unpaid.headers[PAYMENT_REQUIRED_HEADER])
                payment = sign_payment(chain, required)
                paid = await client.request(method, path, headers={PAYMENT_SIGNATURE_HEADER: payment.header})
                assert paid.status_code == 200, paid.text
                assert chain.escrow.state_of(payment.escrow_id) == State.HELD

        asyncio.run(run())
    assert sum(calls.values()) == 1
    assert len(deposits(chain, start)) == 1


def test_another_handler_on_a_priced_path_stays_free(chain: Chain, tmp_path: Path) -> None:
    calls: dict[str, int] = {}
    with served(_method_app(chain, tmp_path / "seller.sqlite", calls)) as (url, _):
        free = localhttp.post(f"{url}/split")
        priced = localhttp.get(f"{url}/split")
    assert (free.status_code, free.json()) == (200, {"secret": "split-post"})
    assert priced.status_code == 402
    assert calls == {"split-post": 1}


def test_a_bare_asgi_app_prices_head_as_get(chain: Chain, tmp_path: Path) -> None:
    """No router to ask: HEAD is what every server answers with the GET handler, so it pays GET's price."""
    calls: list[str] = []

    async def bare(scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return
        calls.append(scope["method"])
        await send({"type": "http.response.start", "status": 200, "headers": [(b"x-secret", b"bare")]})
        await send({"type": "http.response.body", "body": b"" if scope["method"] == "HEAD" else b"secret"})

    config = make_config(chain, tmp_path / "seller.sqlite", routes=[PricedRoute("GET", "/bare", amount=PRICE)])
    app = EscrowMiddleware(bare, config)  # type: ignore[arg-type]
    with served(app) as (url, _):
        head = httpx.head(f"{url}/bare")
    assert head.status_code == 402
    assert "x-secret" not in head.headers
    assert calls == []


def _b64(raw: bytes) -> str:
    return base64.b64encode(raw).decode()


def test_deeply_nested_json_and_a_uint256_overflow_get_400_not_500(chain: Chain, tmp_path: Path) -> None:
    chain.mine()
    shop = make_shop(chain, tmp_path / "seller.sqlite")
    start = int(chain.w3.eth.block_number) + 1
    with served(shop.app) as (url, _):

        async def run() -> list[httpx.Response]:
            async with localhttp.AsyncClient(base_url=url) as client:
                nested = await client.get("/report/a", headers={PAYMENT_SIGNATURE_HEADER: _b64(b"[" * 2000)})
                payment = sign_payment(chain, await quote(client, "GET", "/report/a"))
                envelope = json.loads(base64.b64decode(payment.header))
                answers = [nested]
                for field in ("validBefore", "validAfter", "value"):
                    tampered = json.loads(json.dumps(envelope))
                    tampered["payload"]["authorization"][field] = str(2**256)
                    answers.append(
                        await client.get(
                            "/report/a", headers={PAYMENT_SIGNATURE_HEADER: _b64(json.dumps(tampered).encode())}
                        )
                    )
                big = json.loads(json.dumps(envelope))
                big["payload"]["terms"]["amount"] = 2**256
                answers.append(
                    await client.get("/report/a", headers={PAYMENT_SIGNATURE_HEADER: _b64(json.dumps(big).encode())})
                )
                return answers

        answers = asyncio.run(run())
    for answer in answers:
        assert answer.status_code == 400, answer.text
        assert answer.json()["error"] == Reason.INVALID_PAYLOAD
    assert deposits(chain, start) == []
    assert shop.calls == {}


def test_a_node_that_never_answers_gets_503_within_the_deadline_and_the_app_recovers(
    chain: Chain, tmp_path: Path
) -> None:
    chain.mine()
    proxy = RpcProxy(chain.node.url)
    deadline = 2.0
    shop = make_shop(chain, tmp_path / "seller.sqlite", rpc_url=proxy.url, rpc_timeout=deadline)
    start = int(chain.w3.eth.block_number) + 1
    try:
        with served(shop.app) as (url, _):

            async def run() -> None:
                async with localhttp.AsyncClient(base_url=url, timeout=60) as client:
                    payments = [sign_payment(chain, await quote(client, "GET", f"/report/h{i}")) for i in range(3)]
                    proxy.mode = "blackhole"
                    began = time.monotonic()
                    answers = await asyncio.gather(
                        *(
                            client.get(f"/report/h{i}", headers={PAYMENT_SIGNATURE_HEADER: p.header})
                            for i, p in enumerate(payments)
                        )
                    )
                    elapsed = time.monotonic() - began
                    # Still serving while the node hangs: free routes and new offers need no chain.
                    assert (await client.get("/free")).status_code == 200
                    assert (await client.get("/report/other")).status_code == 402
                    for answer in answers:
                        assert answer.status_code == 503, answer.text
                        assert answer.json()["error"] == Reason.CHAIN_UNAVAILABLE
                        assert int(answer.headers["retry-after"]) >= 1
                    # One deadline per chain call, web3's retries included: not 5 attempts of it.
                    assert elapsed < deadline + 3, f"503 after {elapsed:.1f}s with a {deadline}s deadline"
                    proxy.mode = "forward"
                    again = await client.get("/report/h0", headers={PAYMENT_SIGNATURE_HEADER: payments[0].header})
                    assert again.status_code == 200, again.text

            asyncio.run(run())
    finally:
        proxy.close()
    assert len(deposits(chain, start)) == 1
