"""The buyer's HTTP clients: an httpx.Auth hook that runs the one payment flow (escrow_py.buyer._flow),
and the sync and async clients built on it, which differ only in the httpx client they wrap."""

from __future__ import annotations

from collections.abc import AsyncGenerator, Generator
from types import TracebackType
from typing import Any, Generic, Self, TypeVar

import httpx

from escrow_py.buyer._core import PaymentCore
from escrow_py.buyer._flow import (
    adrive,
    akeep_payment_on_its_url,
    drive,
    keep_payment_on_its_url,
    lost_in_flight,
    payment_flow,
)
from escrow_py.buyer._journal import Journal
from escrow_py.buyer._recover import RecoveryReport, arecover_with, recover_with
from escrow_py.buyer._settings import BuyerSettings, JournalLike, no_other_options, settings_of
from escrow_py.chain.signer import Signer
from escrow_py.protocol.tls import client_options

# The clients' default pool. httpcore 1.0.9 closes an idle connection whenever the pool
# holds more than max_keepalive_connections in all, and under many threads it can close
# one it has just handed to a waiting request, whose read then fails with EBADF
# (encode/httpcore#1110). With keep-alive equal to the connection limit it never does.
POOL_LIMITS = httpx.Limits(max_connections=100, max_keepalive_connections=100)

_Http = TypeVar("_Http", httpx.Client, httpx.AsyncClient)


class EscrowAuth(httpx.Auth):
    """Pays delivery-escrow 402s for an existing httpx client: `httpx.Client(auth=EscrowAuth(settings))`
    (or `EscrowAuth(signer, rpc_url, journal, **BuyerSettings keywords)`).

    A 402 that offers no delivery-escrow option is returned as it is. The paid request
    is sent once, and again with the same PAYMENT-SIGNATURE only after a 503 of the
    seller's own side (within the settings' ResendPolicy); its answer is returned only
    when the body's hash is the one the seller committed to, otherwise a PaymentError
    subclass is raised. httpx does not tell an Auth about a connection that fails after
    the paid request went out: the caller gets httpx's TransportError (EscrowClient turns
    it into PaymentNotDelivered, and `lost_in_flight(exc)` does the same for any client);
    the journal holds the payment.

    A client that follows redirects must run `request_hook` (httpx.AsyncClient: `async_request_hook`) as its
    first request event hook, as EscrowClient and AsyncEscrowClient do: httpx follows a redirect inside the
    auth flow's send, with the paid request's headers, and the hook keeps PAYMENT-SIGNATURE off every hop to
    another URL. A paid request answered with a redirect is judged by that answer (what the seller charged
    for); the hops after it are other requests, and the response httpx returns is the last hop's, with the
    judged one in its `history`.
    """

    requires_request_body = True
    requires_response_body = True
    request_hook = staticmethod(keep_payment_on_its_url)
    async_request_hook = staticmethod(akeep_payment_on_its_url)

    def __init__(
        self,
        settings: BuyerSettings | Signer,
        rpc_url: str | None = None,
        journal: JournalLike | None = None,
        **options: Any,
    ) -> None:
        self.settings = settings_of(settings, rpc_url, journal, options)
        no_other_options("EscrowAuth", options)
        self.core = PaymentCore(self.settings)

    @property
    def journal(self) -> Journal:
        return self.core.journal

    def sync_auth_flow(self, request: httpx.Request) -> Generator[httpx.Request, httpx.Response, None]:
        return drive(payment_flow(self.core, request))

    def async_auth_flow(self, request: httpx.Request) -> AsyncGenerator[httpx.Request, httpx.Response]:
        return adrive(payment_flow(self.core, request))


class _EscrowClientBase(Generic[_Http]):
    """What EscrowClient and AsyncEscrowClient share: the settings, the auth hook, and the httpx client
    (`_http_type`) built with every keyword that is not BuyerSettings'."""

    _http_type: type[_Http]

    def __init__(
        self,
        settings: BuyerSettings | Signer,
        rpc_url: str | None = None,
        journal: JournalLike | None = None,
        **options: Any,
    ) -> None:
        self.auth = EscrowAuth(settings_of(settings, rpc_url, journal, options))
        options.setdefault("limits", POOL_LIMITS)
        hooks: dict[str, list[Any]] = dict(options.pop("event_hooks", None) or {})
        keep: Any = EscrowAuth.request_hook if self._http_type is httpx.Client else EscrowAuth.async_request_hook
        hooks["request"] = [keep, *hooks.get("request", [])]  # first: a hook of the caller's never sees it
        options["event_hooks"] = hooks
        self.http: _Http = self._http_type(auth=self.auth, **client_options(options))  # what is left is httpx's

    @property
    def settings(self) -> BuyerSettings:
        return self.auth.settings

    @property
    def journal(self) -> Journal:
        return self.auth.journal


class EscrowClient(_EscrowClientBase[httpx.Client]):
    """An httpx.Client that pays delivery-escrow 402s; every keyword that is not BuyerSettings' goes to
    httpx.Client.

    with EscrowClient(signer, rpc_url, "buyer.sqlite") as client:     # or EscrowClient(settings)
        body = client.get("https://api.example/report/1").content   # hash-verified
        client.recover()                                            # after a crash
    """

    _http_type = httpx.Client

    def request(self, method: str, url: str, **kwargs: Any) -> httpx.Response:
        try:
            return self.http.request(method, url, **kwargs)
        except httpx.TransportError as exc:
            raise (lost_in_flight(exc) or exc) from exc

    def get(self, url: str, **kwargs: Any) -> httpx.Response:
        return self.request("GET", url, **kwargs)

    def post(self, url: str, **kwargs: Any) -> httpx.Response:
        return self.request("POST", url, **kwargs)

    def recover(self, *, refund_expired: bool = True) -> RecoveryReport:
        """Settle every unfinished journaled payment (see escrow_py.buyer.recover)."""
        return recover_with(self.auth.core, self.http, refund_expired=refund_expired)

    def close(self) -> None:
        self.http.close()
        self.auth.core.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None) -> None:
        self.close()


class AsyncEscrowClient(_EscrowClientBase[httpx.AsyncClient]):
    """The httpx.AsyncClient form of EscrowClient."""

    _http_type = httpx.AsyncClient

    async def request(self, method: str, url: str, **kwargs: Any) -> httpx.Response:
        try:
            return await self.http.request(method, url, **kwargs)
        except httpx.TransportError as exc:
            raise (lost_in_flight(exc) or exc) from exc

    async def get(self, url: str, **kwargs: Any) -> httpx.Response:
        return await self.request("GET", url, **kwargs)

    async def post(self, url: str, **kwargs: Any) -> httpx.Response:
        return await self.request("POST", url, **kwargs)

    async def recover(self, *, refund_expired: bool = True) -> RecoveryReport:
        return await arecover_with(self.auth.core, self.http, refund_expired=refund_expired)

    async def aclose(self) -> None:
        await self.http.aclose()
        self.auth.core.close()

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.aclose()
