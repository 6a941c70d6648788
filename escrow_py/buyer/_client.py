"""The buyer's HTTP clients: an httpx.Auth hook, and sync/async clients built on it."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncGenerator, Generator
from pathlib import Path
from types import TracebackType
from typing import Any, Self

import httpx
from web3 import Web3

from escrow_py.buyer._core import PaymentCore, PaymentPolicy, Prepared, ResendPolicy, find_offer
from escrow_py.buyer._errors import PaymentNotDelivered
from escrow_py.buyer._journal import Journal
from escrow_py.buyer._policy import Policy
from escrow_py.buyer._recover import RecoveryReport, arecover_with, recover_with
from escrow_py.buyer._validate import Validator
from escrow_py.chain.rpc import DEFAULT_DEADLINE
from escrow_py.chain.signer import Signer
from escrow_py.protocol.wire import PAYMENT_SIGNATURE_HEADER

# The paid request carries its payment here, so a transport failure can say which payment it left in flight.
PAYMENT_EXTENSION = "x402_escrow_payment"

# The clients' default pool. httpcore 1.0.9 closes an idle connection whenever the pool
# holds more than max_keepalive_connections in all, and under many threads it can close
# one it has just handed to a waiting request, whose read then fails with EBADF
# (encode/httpcore#1110). With keep-alive equal to the connection limit it never does.
POOL_LIMITS = httpx.Limits(max_connections=100, max_keepalive_connections=100)


def lost_in_flight(exc: httpx.TransportError) -> PaymentNotDelivered | None:
    """The typed error for a connection that failed after a signed payment was sent; None if none was."""
    try:
        request = exc.request
    except RuntimeError:  # httpx raises when the error carries no request
        return None
    prepared = request.extensions.get(PAYMENT_EXTENSION)
    if not isinstance(prepared, Prepared):
        return None
    return PaymentNotDelivered(
        prepared.escrow_id,
        prepared.terms.deadline,
        f"the connection failed after the signed payment was sent ({type(exc).__name__}: {exc}); "
        "the journal has it: recover() replays it or refunds it",
        escrow=prepared.escrow,
    )


class EscrowAuth(httpx.Auth):
    """Pays delivery-escrow 402s for an existing httpx client: `httpx.Client(auth=EscrowAuth(...))`.

    A 402 that offers no delivery-escrow option is returned as it is. The paid request
    is sent once, and again with the same PAYMENT-SIGNATURE only after a 503 of the
    seller's own side (within `resend`, a ResendPolicy); its answer is returned only
    when the body's hash is the one the seller committed to, otherwise a PaymentError
    subclass is raised. httpx does not tell an Auth about a connection that fails after
    the paid request went out: the caller gets httpx's TransportError (EscrowClient turns
    it into PaymentNotDelivered, and `lost_in_flight(exc)` does the same for any client);
    the journal holds the payment.
    """

    requires_request_body = True
    requires_response_body = True

    def __init__(
        self,
        signer: Signer,
        rpc_url: str,
        journal: str | Path | Journal,
        *,
        policy: Policy | PaymentPolicy | None = None,
        task: str = "default",
        validator: Validator | None = None,
        w3: Web3 | None = None,
        rpc_timeout: float = DEFAULT_DEADLINE,
        resend: ResendPolicy | None = None,
    ) -> None:
        self.core = PaymentCore(
            signer,
            rpc_url,
            journal,
            policy=policy,
            task=task,
            validator=validator,
            w3=w3,
            rpc_timeout=rpc_timeout,
            resend=resend,
        )

    @property
    def journal(self) -> Journal:
        return self.core.journal

    def sync_auth_flow(self, request: httpx.Request) -> Generator[httpx.Request, httpx.Response, None]:
        if PAYMENT_SIGNATURE_HEADER in request.headers:
            yield request  # already paid (a replay): not ours to pay again
            return
        response = yield request
        response.read()  # overriding sync_auth_flow skips httpx's own read for requires_response_body
        offer = find_offer(response)
        if offer is None:
            return
        prepared = self.core.prepare(request, offer)
        request.headers[PAYMENT_SIGNATURE_HEADER] = prepared.header
        request.extensions[PAYMENT_EXTENSION] = prepared
        response = yield request
        response.read()
        resent = 0
        while (wait := self.core.resend_after(prepared, response, resent)) is not None:
            time.sleep(wait)  # the seller's own 503: the same request, the same signed payment, again
            resent += 1
            response = yield request
            response.read()
        self.core.settle(prepared, response)
        self.core.validate(prepared.escrow_id, request, response)

    async def async_auth_flow(self, request: httpx.Request) -> AsyncGenerator[httpx.Request, httpx.Response]:
        if PAYMENT_SIGNATURE_HEADER in request.headers:
            yield request
            return
        response = yield request
        await response.aread()
        offer = find_offer(response)
        if offer is None:
            return
        # Chain reads, signing and the journal's fsync block: keep them off the event loop.
        prepared = await asyncio.to_thread(self.core.prepare, request, offer)
        request.headers[PAYMENT_SIGNATURE_HEADER] = prepared.header
        request.extensions[PAYMENT_EXTENSION] = prepared
        response = yield request
        await response.aread()
        resent = 0
        while (wait := await asyncio.to_thread(self.core.resend_after, prepared, response, resent)) is not None:
            await asyncio.sleep(wait)
            resent += 1
            response = yield request
            await response.aread()
        await asyncio.to_thread(self.core.settle, prepared, response)
        await asyncio.to_thread(self.core.validate, prepared.escrow_id, request, response)


class EscrowClient:
    """An httpx.Client that pays delivery-escrow 402s; every other keyword goes to httpx.Client.

    with EscrowClient(signer, rpc_url, "buyer.sqlite") as client:
        body = client.get("https://api.example/report/1").content   # hash-verified
        client.recover()                                            # after a crash
    """

    def __init__(
        self,
        signer: Signer,
        rpc_url: str,
        journal: str | Path | Journal,
        *,
        policy: Policy | PaymentPolicy | None = None,
        task: str = "default",
        validator: Validator | None = None,
        w3: Web3 | None = None,
        rpc_timeout: float = DEFAULT_DEADLINE,
        resend: ResendPolicy | None = None,
        **httpx_kwargs: Any,
    ) -> None:
        self.auth = EscrowAuth(
            signer,
            rpc_url,
            journal,
            policy=policy,
            task=task,
            validator=validator,
            w3=w3,
            rpc_timeout=rpc_timeout,
            resend=resend,
        )
        httpx_kwargs.setdefault("limits", POOL_LIMITS)
        self.http = httpx.Client(auth=self.auth, **httpx_kwargs)

    @property
    def journal(self) -> Journal:
        return self.auth.journal

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
        self.journal.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None) -> None:
        self.close()


class AsyncEscrowClient:
    """The httpx.AsyncClient form of EscrowClient."""

    def __init__(
        self,
        signer: Signer,
        rpc_url: str,
        journal: str | Path | Journal,
        *,
        policy: Policy | PaymentPolicy | None = None,
        task: str = "default",
        validator: Validator | None = None,
        w3: Web3 | None = None,
        rpc_timeout: float = DEFAULT_DEADLINE,
        resend: ResendPolicy | None = None,
        **httpx_kwargs: Any,
    ) -> None:
        self.auth = EscrowAuth(
            signer,
            rpc_url,
            journal,
            policy=policy,
            task=task,
            validator=validator,
            w3=w3,
            rpc_timeout=rpc_timeout,
            resend=resend,
        )
        httpx_kwargs.setdefault("limits", POOL_LIMITS)
        self.http = httpx.AsyncClient(auth=self.auth, **httpx_kwargs)

    @property
    def journal(self) -> Journal:
        return self.auth.journal

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
        self.journal.close()

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.aclose()
