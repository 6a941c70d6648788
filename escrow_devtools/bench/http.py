"""`x402-escrow bench http`: latency and throughput of a paid route, escrow against the x402 SDK's `exact`.

One run per chain (an automining anvil, and one with `--block-time 2`, Base's cadence, where a
transaction's wait is real), one token, one handler served these ways on loopback uvicorn:

- `unpaid`: the route with no payment at all (the floor);
- `escrow`: behind EscrowMiddleware in hold mode, paid by AsyncEscrowClient (402, sign, deposit,
  serve, hash check; the poster posts deliveries in the background, as in production);
- `serve_first`: the same route in serve-first mode (402, sign, off-chain checks and an eth_call
  of the pull, serve, hash check; the poster settles in settleMany batches in the background);
- `sdk_exact`: behind the official SDK's FastAPI middleware with the `exact` scheme, paid by
  the SDK's httpx client, settled by the SDK's facilitator running as a local HTTP server
  against the same anvil and token (how a seller talks to a facilitator);
- `sdk_exact_inprocess`: the same, with the facilitator in the seller's process (no HTTP
  hop): the cheapest the SDK can be, reported so the comparison can be read both ways;
- `facilitator`: the escrow route behind FacilitatorMiddleware (no key, no RPC), whose
  deposits and deliveries go through this project's facilitator on its own loopback server
  (its own operator key); target p50 <= 1.25x `escrow`'s.

Latency: requests one at a time, round-robin over the variants so that machine noise hits
all of them alike. On a chain with blocks every few seconds each request starts after a random
pause (not counted) of up to one block time: a request's wait for a block depends on where in
the block interval it starts, and back-to-back requests would otherwise start at a phase the
previous variant's block wait set (a variant that follows one ending just after a block waits
almost a whole block, the one after a quick variant less), which biases the p50s by up to a
block time. Throughput: `concurrency` workers per variant, variants in turn.
Every paid request is checked: status 200, and on chain exactly one payment per request.
`variants` picks which run (`unpaid` and the SDK `exact` baseline are the usual companions).
"""

from __future__ import annotations

import asyncio
import random
import statistics
import tempfile
import time
from collections.abc import Awaitable, Callable
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
from eth_account import Account
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse

from escrow_devtools.anvil import Anvil, dev_private_key, dev_signer
from escrow_devtools.artifacts import deploy
from escrow_devtools.harness import serving
from escrow_py.buyer import AsyncEscrowClient
from escrow_py.chain.escrow import Deposited, Escrow
from escrow_py.chain.token import Token
from escrow_py.chain.tx import TxSender
from escrow_py.seller import EscrowMiddleware, PricedRoute, SellerConfig

PRICE = 10_000
NETWORK = "eip155:84532"
# Anvil dev accounts: who plays which part (each seller its own operator key: one sender per key).
DEPLOYER, BUYER, ESCROW_SELLER, OPERATOR, FACILITATOR, EXACT_SELLER, ESCROW_FACILITATOR, KEYLESS_SELLER = range(8)
FIRST_SELLER, FIRST_OPERATOR = range(8, 10)
# Targets (issue 14): p50 as a multiple of the SDK exact p50, per chain.
# Issue 17: the keyless seller through the facilitator at most 1.25x the in-process seller's p50, on any chain.
_FACILITATOR_TARGET = {"ratio_p50_facilitator_vs_escrow": 1.25}
TARGETS = {
    "automine": {"ratio_p50_serve_first_vs_sdk_exact": 0.5, **_FACILITATOR_TARGET},
    "2s blocks": {
        "ratio_p50_serve_first_vs_sdk_exact": 0.05,
        "ratio_p50_escrow_vs_sdk_exact": 1.10,
        **_FACILITATOR_TARGET,
    },
}
VARIANTS = ("unpaid", "escrow", "serve_first", "sdk_exact", "sdk_exact_inprocess", "facilitator")

Progress = Callable[[str], None]


def _report_app() -> FastAPI:
    app = FastAPI()

    @app.get("/report/{item}")
    async def report(item: str) -> dict[str, Any]:
        return {"item": item, "summary": f"everything about {item}"}

    return app


def _facilitator_app(facilitator: Any) -> FastAPI:
    """The SDK's facilitator behind the HTTP API its HTTPFacilitatorClient speaks."""
    from x402.schemas import PaymentPayload, PaymentRequirements

    app = FastAPI()

    @app.get("/supported")
    async def supported() -> JSONResponse:
        return JSONResponse(facilitator.get_supported().model_dump(by_alias=True, exclude_none=True))

    async def _body(request: Request) -> tuple[Any, Any]:
        data = await request.json()
        return (
            PaymentPayload.model_validate(data["paymentPayload"]),
            PaymentRequirements.model_validate(data["paymentRequirements"]),
        )

    @app.post("/verify")
    async def verify(request: Request) -> JSONResponse:
        payload, requirements = await _body(request)
        result = await facilitator.verify(payload, requirements)
        return JSONResponse(result.model_dump(by_alias=True, exclude_none=True))

    @app.post("/settle")
    async def settle(request: Request) -> JSONResponse:
        payload, requirements = await _body(request)
        result = await facilitator.settle(payload, requirements)
        return JSONResponse(result.model_dump(by_alias=True, exclude_none=True))

    return app


def _exact_app(token: str, facilitator_client: Any) -> FastAPI:
    from x402 import x402ResourceServer
    from x402.http.middleware.fastapi import PaymentMiddlewareASGI
    from x402.mechanisms.evm.exact import register_exact_evm_server

    server = x402ResourceServer(facilitator_client)
    register_exact_evm_server(server, NETWORK)
    price = {"amount": str(PRICE), "asset": token, "extra": {"name": "USDC", "version": "2"}}
    accepts = {"scheme": "exact", "payTo": dev_signer(EXACT_SELLER).address, "network": NETWORK, "price": price}
    app = _report_app()
    routes: Any = {"GET /report/*": {"accepts": accepts}}  # the SDK's RouteConfig, as the JSON it documents
    app.add_middleware(PaymentMiddlewareASGI, routes=routes, server=server)
    return app


def _sdk_client(token: str) -> Any:
    from x402 import x402Client
    from x402.mechanisms.evm import EthAccountSigner
    from x402.mechanisms.evm.exact import register_exact_evm_client

    client = x402Client()
    register_exact_evm_client(client, EthAccountSigner(Account.from_key(dev_private_key(BUYER))), networks=NETWORK)
    # The SDK pays only assets it knows, unless told: the local TestUSDC, capped at the price.
    client.set_spend_controls(
        {"allowed_assets": [{"network": NETWORK, "asset": token, "max_amount_per_payment": str(PRICE)}]}
    )
    return client


def _keyless_app(rpc_url: str, escrow: str, token: str, tmp: Path, serve: Callable[[Any], str]) -> FastAPI:
    """The report route sold by a seller with no key and no RPC, through a facilitator served on loopback."""
    from escrow_py.facilitator import Facilitator, FacilitatorConfig, KeyStore, create_app
    from escrow_py.seller import FacilitatorMiddleware, FacilitatorSellerConfig

    database = tmp / "facilitator.sqlite"
    config = FacilitatorConfig(
        rpc_url=rpc_url, escrow=escrow, token=token, network=NETWORK, operator=dev_signer(ESCROW_FACILITATOR),
        store=database, rate=10_000.0, burst=10_000,
    )  # fmt: skip
    keys = KeyStore(database)
    _, api_key = keys.create("bench", [dev_signer(KEYLESS_SELLER).address])
    url = serve(create_app(Facilitator(config), keys))
    app = _report_app()
    seller = FacilitatorSellerConfig(
        facilitator_url=url, api_key=api_key, network=NETWORK, token=token, pay_to=dev_signer(KEYLESS_SELLER).address,
        routes=[PricedRoute("GET", "/report/{item}", amount=PRICE, max_timeout_seconds=300)],
        store=tmp / "keyless-seller.sqlite",
    )  # fmt: skip
    app.add_middleware(FacilitatorMiddleware, config=seller)
    return app


@dataclass
class Variant:
    name: str
    url: str
    get: Callable[[str], Awaitable[httpx.Response]]
    latencies: list[float] = field(default_factory=list)
    paid: int = 0
    rps: float = 0.0

    def summary(self) -> dict[str, Any]:
        ordered = sorted(self.latencies)
        p95 = ordered[min(len(ordered) - 1, round(0.95 * (len(ordered) - 1)))]
        return {
            "p50_ms": round(statistics.median(ordered) * 1000, 2),
            "p95_ms": round(p95 * 1000, 2),
            "rps": round(self.rps, 1),
            "requests": self.paid,
        }


async def _one(variant: Variant, item: str) -> float:
    start = time.perf_counter()
    response = await variant.get(f"{variant.url}/report/{item}")
    elapsed = time.perf_counter() - start
    if response.status_code != 200:
        raise RuntimeError(f"{variant.name}: {response.status_code} {response.text[:200]}")
    variant.paid += 1
    return elapsed


async def _measure(
    variants: list[Variant],
    requests: int,
    concurrency: int,
    warmup: int,
    progress: Progress,
    *,
    block_time: float | None,
) -> None:
    for variant in variants:
        for i in range(warmup):
            await _one(variant, f"warm-{i}")
    progress(f"latency: {requests} sequential requests per variant, interleaved")
    phase = random.Random(14)  # seeded: the same pauses in every run
    for i in range(requests):
        for variant in variants:
            if block_time is not None:
                await asyncio.sleep(phase.uniform(0, block_time))  # start at a random point of the block interval
            variant.latencies.append(await _one(variant, f"lat-{i}"))
    progress(f"throughput: {requests} requests per variant over {concurrency} concurrent workers")
    for variant in variants:
        queue = list(range(requests))

        async def worker(v: Variant = variant, q: list[int] = queue) -> None:
            while q:
                await _one(v, f"tput-{q.pop()}")

        start = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        variant.rps = requests / (time.perf_counter() - start)


def measure_http(
    *, requests: int = 100, concurrency: int = 8, warmup: int = 5, block_time: float | None = None,
    variants: tuple[str, ...] = VARIANTS, progress: Progress = lambda _: None,
) -> dict[str, Any]:  # fmt: skip
    """Run the benchmark on the chosen `variants` (all by default); the JSON-ready result (see the module docstring)."""
    unknown = sorted(set(variants) - set(VARIANTS))
    if unknown or not variants:
        raise ValueError(f"variants must be some of {', '.join(VARIANTS)}; got {', '.join(unknown) or 'none'}")
    chosen = [name for name in VARIANTS if name in variants]
    with ExitStack() as stack, tempfile.TemporaryDirectory(prefix="x402-bench-http-") as tmp:
        progress(f"anvil ({'automine' if block_time is None else f'{block_time}s blocks'}), deploying")
        node = stack.enter_context(Anvil(block_time=block_time))
        w3 = node.web3()
        deployer = TxSender(w3, dev_signer(DEPLOYER))
        token = Token(w3, deploy(deployer, "TestUSDC", "USDC", "2"))
        escrow = Escrow(w3, deploy(deployer, "X402Escrow"))
        token.mint(deployer, dev_signer(BUYER).address, 10**12)
        start_block = int(w3.eth.block_number)

        def serve(app: Any) -> str:
            return stack.enter_context(serving(app, timeout_graceful_shutdown=None)).url

        urls = _servers(chosen, node.url, escrow.address, token.address, Path(tmp), serve=serve)
        progress(f"servers up: {', '.join(chosen)}")

        async def run() -> list[Variant]:
            async with (
                httpx.AsyncClient(timeout=60) as plain,
                AsyncEscrowClient(dev_signer(BUYER), node.url, Path(tmp) / "buyer.sqlite", timeout=60) as buyer,
                AsyncEscrowClient(dev_signer(BUYER), node.url, Path(tmp) / "buyer-sf.sqlite", timeout=60) as first,
                _sdk_http(token.address) as sdk,
            ):
                clients: dict[str, Callable[[str], Awaitable[httpx.Response]]] = {
                    "unpaid": plain.get,
                    "escrow": buyer.get,
                    "serve_first": first.get,
                    "sdk_exact": sdk.get,
                    "sdk_exact_inprocess": sdk.get,
                    "facilitator": buyer.get,
                }
                measured = [Variant(name, urls[name], clients[name]) for name in chosen]
                await _measure(measured, requests, concurrency, warmup, progress, block_time=block_time)
                return measured

        measured = {v.name: v for v in asyncio.run(run())}
        progress("waiting for the serve-first settlements, then checking every payment on chain")
        paid = {name: measured[name].paid if name in measured else 0 for name in VARIANTS}
        _wait_settled(token, paid["serve_first"], deadline=time.monotonic() + 120)
        _check_payments(w3, escrow, token, start_block, paid)
        result: dict[str, Any] = {name: v.summary() for name, v in measured.items()}
        result.update(_ratios(result))
        chain = "automine" if block_time is None else f"{block_time:g}s blocks"
        targets = {key: limit for key, limit in TARGETS.get(chain, {}).items() if key in result}
        result["targets"] = targets
        result["met"] = {key: result[key] <= limit for key, limit in targets.items()}
        result["settings"] = {
            "requests": requests, "concurrency": concurrency, "warmup": warmup, "anvil": chain, "variants": chosen,
        }  # fmt: skip
        return result


def _servers(
    chosen: list[str], rpc_url: str, escrow: str, token: str, tmp: Path, *, serve: Callable[[Any], str]
) -> dict[str, str]:
    """Start the loopback server of each chosen variant; their URLs by variant."""
    urls: dict[str, str] = {}
    if "unpaid" in chosen:
        urls["unpaid"] = serve(_report_app())
    if "escrow" in chosen:
        app = _report_app()
        config = _seller_config(rpc_url, escrow, token, tmp / "seller.sqlite", payee=ESCROW_SELLER, operator=OPERATOR)
        app.add_middleware(EscrowMiddleware, config=config)
        urls["escrow"] = serve(app)
    if "serve_first" in chosen:
        app = _report_app()
        app.add_middleware(
            EscrowMiddleware, config=_serve_first_config(rpc_url, escrow, token, tmp / "seller-first.sqlite")
        )
        urls["serve_first"] = serve(app)
    if "sdk_exact" in chosen or "sdk_exact_inprocess" in chosen:
        from x402 import x402Facilitator
        from x402.http import HTTPFacilitatorClient
        from x402.mechanisms.evm import FacilitatorWeb3Signer
        from x402.mechanisms.evm.exact import register_exact_evm_facilitator

        facilitator = x402Facilitator()
        register_exact_evm_facilitator(
            facilitator, FacilitatorWeb3Signer(dev_private_key(FACILITATOR), rpc_url), NETWORK
        )
        if "sdk_exact" in chosen:
            facilitator_url = serve(_facilitator_app(facilitator))
            urls["sdk_exact"] = serve(_exact_app(token, HTTPFacilitatorClient({"url": facilitator_url})))
        if "sdk_exact_inprocess" in chosen:
            urls["sdk_exact_inprocess"] = serve(_exact_app(token, facilitator))
    if "facilitator" in chosen:
        urls["facilitator"] = serve(_keyless_app(rpc_url, escrow, token, tmp, serve))
    return urls


def _sdk_http(token: str) -> httpx.AsyncClient:
    """The SDK's httpx client, paying `exact` 402s as the buyer."""
    from x402.http.clients.httpx import x402_httpx_transport

    return httpx.AsyncClient(transport=x402_httpx_transport(_sdk_client(token), httpx.AsyncHTTPTransport()), timeout=60)


def _ratios(result: dict[str, Any]) -> dict[str, float]:
    """Each p50 (and req/s) ratio whose two variants both ran."""
    ratios: dict[str, float] = {}
    for name in ("escrow", "serve_first"):
        for exact in ("sdk_exact", "sdk_exact_inprocess"):
            if name in result and exact in result:
                ratios[f"ratio_p50_{name}_vs_{exact}"] = round(result[name]["p50_ms"] / result[exact]["p50_ms"], 3)
        if name in result and "sdk_exact" in result:
            ratios[f"ratio_rps_{name}_vs_sdk_exact"] = round(result[name]["rps"] / result["sdk_exact"]["rps"], 3)
    if "facilitator" in result and "escrow" in result:
        ratios["ratio_p50_facilitator_vs_escrow"] = round(
            result["facilitator"]["p50_ms"] / result["escrow"]["p50_ms"], 3
        )
    return ratios


def _seller_config(
    rpc_url: str, escrow: str, token: str, store: Path, *, payee: int, operator: int, **settings: Any
) -> SellerConfig:
    """A seller of the report route (hold mode unless `settings` say otherwise), paid to dev account `payee`,
    its own `operator` key (one sender per key)."""
    settlement = settings.pop("settlement", "hold")
    route = PricedRoute("GET", "/report/{item}", amount=PRICE, max_timeout_seconds=300, settlement=settlement)
    return SellerConfig(
        rpc_url=rpc_url,
        escrow=escrow,
        token=token,
        network=NETWORK,
        pay_to=dev_signer(payee).address,
        operator=dev_signer(operator),
        routes=[route],
        store=store,
        **settings,
    )


def _serve_first_config(rpc_url: str, escrow: str, token: str, store: Path) -> SellerConfig:
    """The serve-first seller: its own payee and operator key, limits that one buyer's whole run fits in."""
    return _seller_config(
        rpc_url, escrow, token, store, payee=FIRST_SELLER, operator=FIRST_OPERATOR,
        settlement="serve-first",
        serve_first_max_price=PRICE,
        serve_first_max_per_buyer=PRICE * 100_000,
        serve_first_max_total=PRICE * 100_000,
        # Settlements wait up to 5 s for each other: bigger settleMany batches, fewer transactions.
        settle_batch_wait=5.0,
        min_time_left=10,
    )  # fmt: skip


def measure_http_chains(
    *, block_times: tuple[float | None, ...] = (None, 2.0), progress: Progress = lambda _: None, **options: Any
) -> dict[str, Any]:
    """measure_http on each chain in turn (default: automine, then 2-second blocks), keyed by chain."""
    results = {}
    for block_time in block_times:
        result = measure_http(block_time=block_time, progress=progress, **options)
        results[result["settings"]["anvil"]] = result
    return results


def _wait_settled(token: Token, paid: int, *, deadline: float) -> None:
    """The serve-first poster settles in the background: wait until the seller has been paid for all."""
    seller = dev_signer(FIRST_SELLER).address
    while token.balance_of(seller) < paid * PRICE and time.monotonic() < deadline:
        time.sleep(0.2)


def _check_payments(w3: Any, escrow: Escrow, token: Token, start_block: int, paid: dict[str, int]) -> None:
    """Exactly one on-chain payment per paid request: deposits by the buyer, and the exact seller's income."""
    buyer = dev_signer(BUYER).address
    deposits = [
        e
        for e in escrow.events(start_block, int(w3.eth.block_number))
        if isinstance(e, Deposited) and e.terms.buyer == buyer
    ]
    escrow_paid = paid["escrow"] + paid["facilitator"]
    if len(deposits) != escrow_paid or len({d.id for d in deposits}) != len(deposits):
        raise RuntimeError(f"{escrow_paid} escrow requests but {len(deposits)} deposits")
    settled = token.balance_of(dev_signer(FIRST_SELLER).address)
    if settled != paid["serve_first"] * PRICE:
        raise RuntimeError(f"{paid['serve_first']} serve-first requests but the seller received {settled}")
    exact_paid = paid["sdk_exact"] + paid["sdk_exact_inprocess"]
    income = token.balance_of(dev_signer(EXACT_SELLER).address)
    if income != exact_paid * PRICE:
        raise RuntimeError(f"{exact_paid} exact requests but the exact seller received {income}")
