"""The buyer's side of paid MCP tools: pay a tool's delivery-escrow offer over an MCP ClientSession,
accept its result only if it hashes to what the seller committed to, and recover after a crash.

Every step is the HTTP buyer's own: the one payment flow of escrow_py.buyer (the requestHash check,
the genuine-escrow check, the policy and ledger, the journal written before the payment leaves, the
resend of the same payment after the seller's own failure, and the judgement of the answer), driven
here by tool calls instead of HTTP requests. A
tool call is journaled as `POST mcp://tool/<name>` with its canonical arguments, so `recover()`
finds it like any other payment and replays it over an MCP session.
"""

from __future__ import annotations

from collections.abc import Mapping
from contextlib import aclosing
from datetime import timedelta
from typing import Any, Self

import httpx
from mcp import ClientSession, types

from escrow_py.buyer._core import PaymentCore
from escrow_py.buyer._flow import adrive, lost_payment, payment_flow
from escrow_py.buyer._journal import Journal
from escrow_py.buyer._recover import RecoveryReport, arecover_flows
from escrow_py.buyer._settings import BuyerSettings, JournalLike, no_other_options, settings_of
from escrow_py.chain.signer import Signer
from escrow_py.mcp._wire import (
    TOOL_METHOD,
    canonical_arguments,
    payment_meta,
    to_http_response,
    tool_name_of,
    tool_url,
)
from escrow_py.protocol.errors import ProtocolError
from escrow_py.protocol.wire import PAYMENT_SIGNATURE_HEADER


def tool_request(name: str, arguments: Mapping[str, Any] | None) -> httpx.Request:
    """The request a tool call stands for: what its requestHash binds and its journal row holds."""
    return httpx.Request(TOOL_METHOD, tool_url(name), content=canonical_arguments(arguments))


class EscrowToolClient:
    """Calls MCP tools over `session`, paying delivery-escrow offers; settings as EscrowClient's (a
    BuyerSettings, or the signer, RPC URL and journal with its keywords).

        async with ClientSession(read, write) as session:
            await session.initialize()
            tools = EscrowToolClient(session, signer, rpc_url, "buyer.sqlite")
            result = await tools.call_tool("score", {"item": "abc"})   # paid, hash-verified
            await tools.recover()                                       # after a crash, in a new session

    A result with no offer (a free tool, or an offer of another scheme) comes back as it is. A
    paid call returns the result only when keccak256 of its one text item's UTF-8 bytes equals
    the committed deliveryHash; otherwise it raises the buyer's PaymentError subclasses
    (DeliveryMismatch, HandlerFailedRefunded, PaymentNotDelivered, ...), which say where the
    money is. A session that fails after the payment left raises PaymentNotDelivered: the
    journal has the payment, and `recover()` replays it or refunds it.
    """

    def __init__(
        self,
        session: ClientSession,
        settings: BuyerSettings | Signer,
        rpc_url: str | None = None,
        journal: JournalLike | None = None,
        *,
        read_timeout: timedelta | None = None,
        **options: Any,
    ) -> None:
        self.session = session
        self.read_timeout = read_timeout
        self.settings = settings_of(settings, rpc_url, journal, options)
        no_other_options("EscrowToolClient", options)
        self.core = PaymentCore(self.settings)

    @property
    def journal(self) -> Journal:
        return self.core.journal

    async def call_tool(self, name: str, arguments: Mapping[str, Any] | None = None) -> types.CallToolResult:
        args = dict(arguments or {})
        request = tool_request(name, args)  # refuses arguments JSON cannot carry, before anything is sent
        async with aclosing(adrive(payment_flow(self.core, request))) as flow:
            await anext(flow)  # the unpaid call
            result = await self.session.call_tool(name, args, read_timeout_seconds=self.read_timeout)
            try:
                response = to_http_response(result)
            except ProtocolError:
                return result  # not an x402 answer this client can read: the caller sees it as it is
            while True:
                try:
                    paid = await flow.asend(response)
                except StopAsyncIteration:
                    return result  # no offer to pay, or a verified delivery
                meta = payment_meta(paid.headers[PAYMENT_SIGNATURE_HEADER])
                try:
                    result = await self.session.call_tool(name, args, read_timeout_seconds=self.read_timeout, meta=meta)
                    response = to_http_response(result)
                except Exception as exc:  # whatever broke the session, the payment has left
                    raise (lost_payment(paid, "MCP call", exc) or exc) from exc

    async def recover(self, *, refund_expired: bool = True) -> RecoveryReport:
        """Finish every unfinished journaled tool call (escrow_py.buyer.recover's rules), replaying over
        this session; HTTP payments in the same journal are left to the HTTP clients' recover()."""

        async def replay(request: httpx.Request) -> httpx.Response:
            name = tool_name_of(str(request.url))
            if name is None:
                raise ValueError(f"not a tool call: {request.url}")
            arguments = httpx.Response(200, content=request.content).json()
            header = request.headers[PAYMENT_SIGNATURE_HEADER]
            result = await self.session.call_tool(
                name, arguments, read_timeout_seconds=self.read_timeout, meta=payment_meta(header)
            )
            return to_http_response(result)

        return await arecover_flows(
            self.core, replay, refund_expired=refund_expired, include=lambda entry: tool_name_of(entry.url) is not None
        )

    def close(self) -> None:
        self.core.close()

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(self, *exc: object) -> None:
        self.close()
