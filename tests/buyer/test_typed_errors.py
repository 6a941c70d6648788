"""Every failure out of the buyer is a typed error; after the payment left, it names the escrow and the money.

Each fault is produced for real: an RPC with nothing listening, an RPC URL with a scheme
requests cannot speak, a seller (real uvicorn) whose asset has no code or reverts, and a node
that goes away or answers errors after the paid request left (a proxy in front of anvil).
"""

from __future__ import annotations

import asyncio
import threading
import time
from pathlib import Path
from typing import Any

import httpx
import localhttp
import pytest
from eth_utils.address import to_checksum_address
from fixtures.chain import Chain
from helpers import BUYER, STRANGER, address, dev
from rpc_proxy import RpcProxy
from x402 import x402Client
from x402.http.clients.httpx import x402_httpx_transport

from escrow_devtools.anvil import free_port
from escrow_py.buyer import (
    AsyncEscrowClient,
    ChainUnavailable,
    DeliveryEscrowScheme,
    EscrowAuth,
    EscrowClient,
    HandlerFailedRefunded,
    Journal,
    PaymentError,
    PaymentNotDelivered,
    PaymentRefused,
    PaymentState,
    recover,
)
from escrow_py.chain.rpc import DEFAULT_DEADLINE, NodeError
from escrow_py.chain.token import Token
from escrow_py.protocol.errors import ChainError, ConfigError, ContractRevert, RpcError, RpcTimeout
from escrow_py.protocol.terms import State
from escrow_py.protocol.wire import PAYMENT_REQUIRED_HEADER, PAYMENT_SIGNATURE_HEADER, decode_payment_required

from .shop import PRICE, Shop, serving
from .thief import NETWORK, Thief

FORMS = ["EscrowClient", "AsyncEscrowClient", "EscrowAuth", "DeliveryEscrowScheme"]
HTTP_FORMS = FORMS[:3]  # the clients that send the paid request themselves


def _get(form: str, rpc_url: str, journal: Path, url: str, **settings: Any) -> None:
    """GET `url` with one of the buyer's own HTTP forms; `event_hooks` go to the underlying httpx client."""
    hooks = settings.pop("event_hooks", None)
    if form == "EscrowClient":
        with EscrowClient(dev(BUYER), rpc_url, journal, event_hooks=hooks, **settings) as client:
            client.get(url)
    elif form == "EscrowAuth":
        auth = EscrowAuth(dev(BUYER), rpc_url, journal, **settings)
        try:
            with localhttp.Client(auth=auth, event_hooks=hooks, timeout=60) as http:
                http.get(url)
        finally:
            auth.journal.close()
    else:
        sync_hooks = hooks or {}

        async def run() -> None:
            async def call_each(response: httpx.Response) -> None:
                for hook in sync_hooks.get("response", []):
                    hook(response)

            async with AsyncEscrowClient(
                dev(BUYER), rpc_url, journal, event_hooks={"response": [call_each]}, **settings
            ) as client:
                await client.get(url)

        asyncio.run(run())


def _attempt(form: str, rpc_url: str, journal: Path, url: str) -> None:
    """Buy `url` with one of the buyer's clients, or hand its 402's requirements to the SDK plugin as the SDK would."""
    if form in HTTP_FORMS:
        _get(form, rpc_url, journal, url)
        return
    requirements = decode_payment_required(localhttp.get(url).headers[PAYMENT_REQUIRED_HEADER]).accepts[0]
    scheme = DeliveryEscrowScheme(dev(BUYER), rpc_url, journal)
    try:
        scheme.create_payment_payload(requirements)
    finally:
        scheme.core.journal.close()


def _nothing_happened(chain: Chain, journal: Path, buyer_before: int) -> None:
    stored = Journal(journal)
    assert stored.entries() == [] and stored.ledger_rows() == []
    stored.close()
    assert chain.token.balance_of(address(BUYER)) == buyer_before


@pytest.mark.parametrize("form", FORMS)
@pytest.mark.parametrize("rpc", ["nothing_listening", "bad_scheme"])
def test_an_rpc_that_cannot_be_used_refuses_before_signing(
    chain: Chain, served: str, shop: Shop, tmp_path: Path, form: str, rpc: str
) -> None:
    # main: requests.exceptions.ConnectionError / InvalidSchema, raw.
    rpc_url = {"nothing_listening": f"http://127.0.0.1:{free_port()}", "bad_scheme": "ftp://127.0.0.1:8545"}[rpc]
    journal = tmp_path / "buyer.sqlite"
    before = chain.token.balance_of(address(BUYER))
    with pytest.raises(ChainUnavailable) as refused:
        _attempt(form, rpc_url, journal, f"{served}/report/{rpc}")
    error = refused.value
    assert isinstance(error, PaymentRefused) and isinstance(error, ChainError)
    assert error.rule == "chain_unavailable" and error.escrow_id is None
    assert isinstance(error.__cause__, RpcError) and "reading the chain id" in str(error)
    assert "nothing signed, no money moved" in str(error)
    assert shop.calls == {}
    _nothing_happened(chain, journal, before)


@pytest.mark.parametrize("rpc_timeout", [None, 1.0])
def test_a_node_that_never_answers_refuses_before_signing_within_the_deadline(
    chain: Chain, served: str, shop: Shop, tmp_path: Path, rpc_timeout: float | None
) -> None:
    # main: a bare HTTPProvider with a 30 s timeout per attempt that web3 retries: minutes, then a raw error.
    journal = tmp_path / "buyer.sqlite"
    before = chain.token.balance_of(address(BUYER))
    deadline = DEFAULT_DEADLINE if rpc_timeout is None else rpc_timeout
    settings = {} if rpc_timeout is None else {"rpc_timeout": rpc_timeout}
    outcome: list[BaseException] = []
    with RpcProxy(chain.node.url) as proxy:
        proxy.mode = "blackhole"  # accepts the connection, reads the call, never answers

        def attempt() -> None:
            try:
                with EscrowClient(dev(BUYER), proxy.url, journal, **settings) as client:
                    client.get(f"{served}/report/hung")
            except BaseException as exc:
                outcome.append(exc)

        began = time.monotonic()
        worker = threading.Thread(target=attempt, daemon=True)
        worker.start()
        worker.join(deadline + 20)
        took = time.monotonic() - began
        assert not worker.is_alive(), f"the buyer still waits for a silent node after {took:.0f}s"
    (error,) = outcome
    assert isinstance(error, ChainUnavailable), repr(error)
    assert isinstance(error.__cause__, RpcTimeout) and "reading the chain id" in str(error)
    assert took < deadline + 10, f"{took:.1f}s for a {deadline:g}s deadline"
    assert shop.calls == {}
    _nothing_happened(chain, journal, before)


@pytest.mark.parametrize("bad", [0, -1.5, "5", True, None])
def test_a_bad_rpc_timeout_is_refused_naming_the_setting(tmp_path: Path, bad: object) -> None:
    with pytest.raises(ConfigError, match=f"rpc_timeout must be a number of seconds > 0, got {bad!r}"):
        EscrowClient(dev(BUYER), "http://127.0.0.1:1", tmp_path / "buyer.sqlite", rpc_timeout=bad)


@pytest.mark.parametrize("form", FORMS)
@pytest.mark.parametrize("asset", ["no_code", "reverts"])
def test_an_asset_that_does_not_answer_as_a_token_is_refused(
    chain: Chain, tmp_path: Path, form: str, asset: str
) -> None:
    # Before the EscrowChain port: web3's BadFunctionCallOutput and ContractLogicError leaked raw. Now the
    # chain's own ContractRevert: EmptyReturn (no code answers) or the revert the asset raised.
    chain.mine()
    bogus = {"no_code": "0x" + "ab" * 20, "reverts": chain.escrow.address}[asset]  # the escrow has no name()
    seller = Thief(chain.w3, chain.sender(STRANGER), Token(chain.w3, bogus), chain.escrow.address, "none", PRICE)
    journal = tmp_path / "buyer.sqlite"
    before = chain.token.balance_of(address(BUYER))
    with serving(seller.app()) as base, pytest.raises(PaymentRefused) as refused:
        _attempt(form, chain.node.url, journal, f"{base}/article/{asset}")
    assert refused.value.rule == "asset_not_erc3009" and to_checksum_address(bogus) in str(refused.value)
    cause = refused.value.__cause__
    assert isinstance(cause, ContractRevert)
    assert (cause.name == "EmptyReturn") is (asset == "no_code"), cause
    assert seller.paid_requests == 0
    _nothing_happened(chain, journal, before)


@pytest.mark.parametrize("form", HTTP_FORMS)
@pytest.mark.parametrize("fault", ["node_gone", "node_errors", "node_hangs"])
def test_a_chain_failure_after_the_payment_left_names_the_escrow_and_the_money(
    chain: Chain, served: str, tmp_path: Path, fault: str, form: str
) -> None:
    # The seller deposits, its handler fails, it refunds; the buyer must then read the escrow's state
    # and the node is gone (answers errors, or never answers). main: RpcError / NodeError, with no
    # escrow id; and a node that hangs held the buyer for minutes (30 s per attempt, retried).
    journal = tmp_path / "buyer.sqlite"
    failed_at: list[float] = []
    with RpcProxy(chain.node.url) as proxy:

        def after_each_response(response: httpx.Response) -> None:
            if PAYMENT_SIGNATURE_HEADER in response.request.headers:  # the paid request has left
                failed_at.append(time.monotonic())
                if fault == "node_gone":
                    proxy.stop()
                elif fault == "node_errors":
                    proxy.answer_errors()
                else:
                    proxy.mode = "blackhole"

        hooks = {"response": [after_each_response]}
        with pytest.raises(PaymentNotDelivered) as lost:
            _get(form, proxy.url, journal, f"{served}/fail", rpc_timeout=1.0, event_hooks=hooks)
        took = time.monotonic() - failed_at[0]
    (entry,) = Journal(journal).entries()
    error = lost.value
    assert (error.escrow_id, error.escrow) == (entry.escrow_id, chain.escrow.address)
    assert error.deadline == entry.terms.deadline
    assert "the escrow's state could not be read" in str(error) and str(entry.valid_before) in str(error)
    cause = {"node_gone": RpcError, "node_errors": NodeError, "node_hangs": RpcTimeout}[fault]
    assert isinstance(error.__cause__, cause)
    assert took < 1.0 + 5, f"the buyer waited {took:.1f}s for a failed node, its rpc_timeout is 1 s"
    assert entry.state is PaymentState.SIGNED  # journaled as no more than what is known
    # Where the money is, as the error says: the chain has it refunded; recover() records it.
    assert chain.escrow.state_of(entry.escrow_id) is State.REFUNDED
    item = recover(journal, dev(BUYER), chain.node.url).by_id(entry.escrow_id)
    assert item.journal_state is PaymentState.REFUNDED


def _sdk_get(chain: Chain, scheme: DeliveryEscrowScheme, url: str) -> httpx.Response:
    sdk = x402Client().register(NETWORK, scheme)
    allowed = {"network": NETWORK, "asset": chain.token.address, "max_amount_per_payment": str(PRICE)}
    sdk.set_spend_controls({"allowed_assets": [allowed]})  # type: ignore[arg-type]

    async def run() -> httpx.Response:
        async with localhttp.AsyncClient(transport=x402_httpx_transport(sdk, localhttp.AsyncHTTPTransport())) as http:
            return await http.get(url)

    return asyncio.run(run())


def test_the_sdk_plugin_judges_a_failed_handler_as_refunded(chain: Chain, served: str, tmp_path: Path) -> None:
    # main: DeliveryMismatch (it compared the body with a delivery hash the refund never had).
    scheme = DeliveryEscrowScheme(dev(BUYER), chain.node.url, tmp_path / "buyer.sqlite")
    response = _sdk_get(chain, scheme, f"{served}/fail")
    assert response.status_code == 503
    with pytest.raises(HandlerFailedRefunded) as refunded:
        scheme.verify_delivery(response)
    (entry,) = scheme.core.journal.entries()
    assert refunded.value.escrow_id == entry.escrow_id and entry.state is PaymentState.REFUNDED


def test_the_sdk_plugin_says_where_the_money_is_when_the_node_is_gone(
    chain: Chain, served: str, tmp_path: Path
) -> None:
    with RpcProxy(chain.node.url) as proxy:
        scheme = DeliveryEscrowScheme(dev(BUYER), proxy.url, tmp_path / "buyer.sqlite")
        response = _sdk_get(chain, scheme, f"{served}/fail")
        proxy.stop()
        with pytest.raises(PaymentNotDelivered) as lost:
            scheme.verify_delivery(response)
    (entry,) = scheme.core.journal.entries()
    assert (lost.value.escrow_id, lost.value.escrow) == (entry.escrow_id, chain.escrow.address)


def test_the_sdk_plugin_types_a_response_that_names_no_payment(chain: Chain, tmp_path: Path) -> None:
    # main: KeyError('payment-response').
    scheme = DeliveryEscrowScheme(dev(BUYER), chain.node.url, tmp_path / "buyer.sqlite")
    with pytest.raises(PaymentError, match="which payment it answers is unknown") as unknown:
        scheme.verify_delivery(httpx.Response(200, content=b"free?"))
    assert unknown.value.escrow_id is None


def test_a_url_with_credentials_is_refused_not_a_value_error(chain: Chain, served: str, tmp_path: Path) -> None:
    # main: ValueError from canonical_url (a requestHash cannot bind a URL with userinfo).
    journal = tmp_path / "buyer.sqlite"
    before = chain.token.balance_of(address(BUYER))
    with EscrowClient(dev(BUYER), chain.node.url, journal) as client, pytest.raises(PaymentRefused) as refused:
        client.get(served.replace("http://", "http://user:secret@") + "/report/1")
    assert refused.value.rule == "invalid_url" and "secret" not in str(refused.value)
    _nothing_happened(chain, journal, before)
