"""The app of one seller replica of `bench scale`, in a module of its own: each replica process imports only
this (`uvicorn --factory escrow_devtools.bench.replica:replica_app`), not the benchmark's load generator,
balancers and httpx (httpx with its CLI's rich and click is about 0.2 s of CPU per replica process).

`replica_app()` is configured from the environment (`X402_SCALE_CONFIG` JSON, the operator key in
`X402_ESCROW_PRIVATE_KEY`). Its handler records every run in `runs_dir` (one line per run, written with
O_APPEND, so a SIGKILLed replica's runs are counted too) and answers bytes that differ on every run, so a
second run of one payment cannot hide.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import secrets
import time
from pathlib import Path
from typing import Any

from starlette.requests import Request
from starlette.responses import Response
from starlette.types import ASGIApp

from escrow_py.chain.signer import LocalSigner
from escrow_py.protocol.wire import PAYMENT_SIGNATURE_HEADER

CONFIG_ENV = "X402_SCALE_CONFIG"
KEY_ENV = "X402_ESCROW_PRIVATE_KEY"
PRICE = 10_000
NETWORK = "eip155:84532"


def run_key(header: str) -> str:
    """The name a payment's handler runs are counted under: the same for every copy of one payment."""
    return hashlib.sha256(header.encode()).hexdigest()[:24]


def replica_app() -> ASGIApp:
    """The app of one replica, from `X402_SCALE_CONFIG` (an ASGI factory for `uvicorn --factory`)."""
    from fastapi import FastAPI

    from escrow_py.seller import EscrowMiddleware, PricedRoute, SellerConfig

    settings: dict[str, Any] = json.loads(os.environ[CONFIG_ENV])
    runs_dir = Path(settings["runs_dir"])
    work = float(settings.get("work_seconds", 0.0))
    # A handler whose work blocks its event loop (sync code in an async handler): the case that
    # starves anything else the replica schedules on that loop while it runs.
    blocking = bool(settings.get("blocking_work", False))
    config = SellerConfig(
        rpc_url=settings["rpc_url"],
        escrow=settings["escrow"],
        token=settings["token"],
        network=NETWORK,
        pay_to=settings["pay_to"],
        operator=LocalSigner.from_env(KEY_ENV),
        routes=[
            PricedRoute("GET", "/report/{item}", amount=PRICE, max_timeout_seconds=120),
            PricedRoute("GET", "/fail/{item}", amount=PRICE, max_timeout_seconds=120),
        ],
        store=settings["store"],
        poster_interval=float(settings.get("poster_interval", 0.2)),
        **settings.get("seller", {}),
    )
    app = FastAPI()

    def record_run(request: Request, route: str) -> None:
        line = f"{run_key(request.headers.get(PAYMENT_SIGNATURE_HEADER, ''))} {route} {os.getpid()}\n"
        fd = os.open(runs_dir / f"runs-{os.getpid()}.log", os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            os.write(fd, line.encode())
        finally:
            os.close(fd)

    @app.get("/report/{item}")
    async def report(item: str, request: Request) -> Response:
        record_run(request, "report")
        if blocking:
            time.sleep(work)
        else:
            await asyncio.sleep(work)
        # Bytes unique to this run: two runs of one payment can never serve the same body.
        body = json.dumps({"item": item, "pid": os.getpid(), "run": secrets.token_hex(8), "at": time.time()})
        return Response(body.encode(), media_type="application/json")

    @app.get("/fail/{item}")
    async def fail(item: str, request: Request) -> Response:
        record_run(request, "fail")
        return Response(b'{"error": "upstream down"}', status_code=502, media_type="application/json")

    app.add_middleware(EscrowMiddleware, config=config)
    return app
