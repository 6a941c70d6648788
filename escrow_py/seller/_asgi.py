"""The seller middleware's ASGI plumbing, with no payment logic: what EscrowMiddleware (_middleware.py) needs
from ASGI and Starlette around a paid request.

Read top-down: which priced route a request reaches (asking the app's Starlette/FastAPI router when a
framework sends another method to the same handler), the lifespan wrapper, reading the body, running the
handler with that body and capturing its whole response, and sending the plain, 503 and stored responses.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from typing import Any

from starlette.routing import BaseRoute, Host, Match, Mount
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from escrow_py.protocol.wire import PAYMENT_RESPONSE_HEADER, UNAVAILABLE_STATUS
from escrow_py.protocol.wire import Unavailable as UnavailableBody
from escrow_py.seller._config import PricedRoute, SellerConfig
from escrow_py.seller._store import StoredResponse

log = logging.getLogger("escrow_py.seller")

_OWN_HEADERS = frozenset({PAYMENT_RESPONSE_HEADER.lower().encode(), b"cache-control"})

# -- routing ---------------------------------------------------------------------------------


def priced_route(config: SellerConfig, app: ASGIApp, scope: Scope) -> PricedRoute | None:
    """The priced route this request reaches, whatever its method.

    A PricedRoute names a method, but frameworks send other methods to the same handler:
    Starlette's Route answers HEAD with the GET endpoint, FastAPI takes methods=["GET",
    "HEAD"], an api_route may take GET and POST. The rule: a request is priced if its own
    method is priced on its path, or if the app's router sends it to the same endpoint as
    a priced method on that path (then it pays that route's price). Without a router to
    ask (a bare ASGI app), HEAD is priced as GET, the way every server answers it.
    """
    method, path = str(scope["method"]).upper(), str(scope["path"])
    route = config.route_for(method, path)
    if route is not None:
        return route
    others = [r for r in config.routes if r.matches_path(path)]
    if not others:
        return None
    routes = _router_routes(scope, app)
    if routes is None:
        return next((r for r in others if r.method == "GET"), None) if method == "HEAD" else None
    reached = _endpoint(routes, scope)
    if reached is None:
        return None
    return next((r for r in others if _endpoint(routes, {**scope, "method": r.method}) is reached), None)


def _router_routes(scope: Scope, app: ASGIApp) -> list[BaseRoute] | None:
    """The routes of the Starlette/FastAPI router behind this middleware, if there is one."""
    candidates: list[Any] = [scope.get("app")]
    node: Any = app
    while node is not None:  # the middleware stack down to the router
        candidates.append(node)
        node = getattr(node, "app", None)
    for candidate in candidates:
        router = getattr(candidate, "router", candidate)
        routes = getattr(router, "routes", None)
        if isinstance(routes, list) and all(isinstance(r, BaseRoute) for r in routes):
            return routes
    return None


def _endpoint(routes: list[BaseRoute], scope: Scope) -> Any:
    """The endpoint the router would run for `scope` (None: no full match), looking into mounts."""
    for route in routes:
        match, child = route.matches(scope)
        if match is Match.FULL:
            inner = getattr(route, "routes", None)
            if isinstance(route, (Mount, Host)) and inner:
                return _endpoint(list(inner), {**scope, **child})
            return child.get("endpoint", route)
    return None


# -- lifespan ----------------------------------------------------------------------------------


async def lifespan(
    app: ASGIApp,
    scope: Scope,
    receive: Receive,
    send: Send,
    *,
    startup: Callable[[], Awaitable[str | None]],
    shutdown: Callable[[], Awaitable[None]],
) -> None:
    """Pass the app's lifespan through, running `startup` once the app has started (a message it returns
    fails the start-up instead) and `shutdown` when the server asks the app to stop."""

    async def on_receive() -> Message:
        message = await receive()
        if message["type"] == "lifespan.shutdown":
            await shutdown()
        return message

    async def on_send(message: Message) -> None:
        if message["type"] == "lifespan.startup.complete":
            failure = await startup()
            if failure is not None:
                await send({"type": "lifespan.startup.failed", "message": failure})
                return
        await send(message)

    await app(scope, on_receive, on_send)


# -- the request's body and its handler ---------------------------------------------------------


async def read_body(receive: Receive, max_bytes: int) -> bytes | None:
    """The whole request body; None if it is longer than `max_bytes`."""
    chunks: list[bytes] = []
    size = 0
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            break
        chunk = bytes(message.get("body", b""))
        size += len(chunk)
        if size > max_bytes:
            return None
        chunks.append(chunk)
        if not message.get("more_body", False):
            break
    return b"".join(chunks)


async def run_handler(app: ASGIApp, scope: Scope, receive: Receive, body: bytes) -> StoredResponse:
    """Run the app with the buffered body and capture its whole response; an exception is a 500."""
    delivered = False

    async def replay_receive() -> Message:
        nonlocal delivered
        if not delivered:
            delivered = True
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive()

    status: int | None = None
    headers: list[tuple[bytes, bytes]] = []
    chunks: list[bytes] = []

    async def capture(message: Message) -> None:
        nonlocal status, headers
        if message["type"] == "http.response.start":
            status = int(message["status"])
            headers = [(bytes(k), bytes(v)) for k, v in message.get("headers", [])]
        elif message["type"] == "http.response.body":
            chunks.append(bytes(message.get("body", b"")))

    try:
        await app(scope, replay_receive, capture)
    except Exception:
        log.exception("handler for %s %s raised", scope["method"], scope["path"])
        return StoredResponse(500, [(b"content-type", b"text/plain; charset=utf-8")], b"Internal Server Error")
    if status is None:
        return StoredResponse(500, [(b"content-type", b"text/plain; charset=utf-8")], b"no response")
    return StoredResponse(status, headers, b"".join(chunks))


# -- sending responses ------------------------------------------------------------------------


async def send_plain(send: Send, status: int, body: bytes) -> None:
    headers = [(b"content-type", b"text/plain"), (b"content-length", str(len(body)).encode())]
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body, "more_body": False})


async def send_unavailable(send: Send, unavailable: UnavailableBody) -> None:
    """503 with Retry-After: `{"error": reason, "message": ...}`; no new offer (the same payment is to be resent)."""
    body = unavailable.body()
    headers = [
        (b"content-type", b"application/json"),
        (b"content-length", str(len(body)).encode()),
        (b"cache-control", b"no-store"),
        (b"retry-after", str(unavailable.retry_after).encode()),
    ]
    await send({"type": "http.response.start", "status": UNAVAILABLE_STATUS, "headers": headers})
    await send({"type": "http.response.body", "body": body, "more_body": False})


async def send_response(send: Send, response: StoredResponse, settle: str | None) -> None:
    """The response with its PAYMENT-RESPONSE header (`settle`, the header's value; None: not charged)."""
    headers = [(k, v) for k, v in response.headers if k.lower() not in _OWN_HEADERS]
    headers.append((b"cache-control", b"no-store"))
    if settle is not None:  # None: an exact payment whose handler failed, not charged
        headers.append((PAYMENT_RESPONSE_HEADER.encode(), settle.encode()))
    await send({"type": "http.response.start", "status": response.status, "headers": headers})
    await send({"type": "http.response.body", "body": response.body, "more_body": False})
