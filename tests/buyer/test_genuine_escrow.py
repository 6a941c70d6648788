"""The buyer signs only to the genuine X402Escrow (issue 11, "money can be taken from the buyer").

A ReceiveWithAuthorization can be redeemed by its `to` alone. A seller that names its own
wallet as `extra.escrow` redeems the buyer's signature itself; one that names a look-alike
contract deposits it and drains the contract. Every client form must refuse before anything
is signed, reserved or journaled. The thief is a real server (uvicorn) on the real chain.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import localhttp
import pytest
from fixtures.chain import Chain
from helpers import BUYER, STRANGER, address, dev
from web3 import HTTPProvider, Web3
from x402 import x402Client
from x402.http.clients.httpx import x402_httpx_transport

from escrow_devtools.artifacts import deploy
from escrow_py.buyer import (
    AsyncEscrowClient,
    DeliveryEscrowScheme,
    EscrowAuth,
    EscrowClient,
    EscrowNotGenuine,
    Journal,
    PaymentRefused,
    PaymentState,
)
from escrow_py.chain import genuine
from escrow_py.chain.genuine import ESCROW_CODE_HASH
from escrow_py.protocol.eip3009 import authorization_for, sign_authorization
from escrow_py.protocol.terms import Terms, request_hash
from escrow_py.protocol.wire import PAYMENT_REQUIRED_HEADER, EscrowPayload, decode_payment_required

from .shop import PRICE, Shop, serving
from .thief import NETWORK, Thief

KINDS = ["eoa", "token", "lookalike"]
CLIENTS = ["EscrowClient", "AsyncEscrowClient", "EscrowAuth", "DeliveryEscrowScheme"]
EXPECTED_CODE = {"eoa": "no_code", "token": "other_code", "lookalike": "other_code"}


@pytest.fixture
def thief_of(chain: Chain) -> Callable[[str], Thief]:
    chain.mine()  # a reverted snapshot leaves the chain's clock behind: let the thief's redemption be in time

    def make(kind: str) -> Thief:
        sender = chain.sender(STRANGER)
        if kind == "eoa":
            escrow = sender.address
        elif kind == "token":
            escrow = chain.token.address
        else:
            escrow = deploy(sender, "LookAlikeEscrow")
        return Thief(chain.w3, sender, chain.token, escrow, kind, PRICE)

    return make


def _sdk(chain: Chain, scheme: DeliveryEscrowScheme) -> x402Client:
    sdk = x402Client().register(NETWORK, scheme)
    allowed = {"network": NETWORK, "asset": chain.token.address, "max_amount_per_payment": str(PRICE)}
    sdk.set_spend_controls({"allowed_assets": [allowed]})  # type: ignore[arg-type]
    return sdk


def _cause(exc: BaseException, kind: type[BaseException]) -> BaseException | None:
    """`exc` or the first exception of type `kind` in its cause chain (the SDK wraps what a scheme raises)."""
    seen: BaseException | None = exc
    while seen is not None:
        if isinstance(seen, kind):
            return seen
        seen = seen.__cause__ or seen.__context__
    return None


def _pay(form: str, chain: Chain, journal: Path, url: str) -> BaseException | None:
    """Ask `url` with the buyer's client `form`; return what it raised, None if it paid."""
    rpc = chain.node.url
    try:
        if form == "EscrowClient":
            with EscrowClient(dev(BUYER), rpc, journal) as client:
                client.get(url)
        elif form == "EscrowAuth":
            auth = EscrowAuth(dev(BUYER), rpc, journal)
            with localhttp.Client(auth=auth) as http:
                http.get(url)
            auth.journal.close()
        elif form == "AsyncEscrowClient":

            async def run_async() -> None:
                async with AsyncEscrowClient(dev(BUYER), rpc, journal) as client:
                    await client.get(url)

            asyncio.run(run_async())
        else:
            scheme = DeliveryEscrowScheme(dev(BUYER), rpc, journal)

            async def run_sdk() -> None:
                transport = x402_httpx_transport(_sdk(chain, scheme), localhttp.AsyncHTTPTransport())
                async with httpx.AsyncClient(transport=transport) as http:
                    await http.get(url)

            try:
                asyncio.run(run_sdk())
            finally:
                scheme.core.journal.close()
    except Exception as exc:  # the caller asserts what it is
        return exc
    return None


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("form", CLIENTS)
def test_every_client_refuses_an_escrow_that_is_not_x402escrow(
    chain: Chain, thief_of: Callable[[str], Thief], tmp_path: Path, kind: str, form: str
) -> None:
    thief = thief_of(kind)
    journal = tmp_path / "buyer.sqlite"
    buyer_before = chain.token.balance_of(address(BUYER))
    thief_before = chain.token.balance_of(thief.sender.address)

    with serving(thief.app()) as base:
        raised = _pay(form, chain, journal, f"{base}/article/{form}")

    if raised is None:  # what main did: the client journals a delivery while the thief holds the money
        stored = Journal(journal)
        states = [entry.state.value for entry in stored.entries()]
        stolen = chain.token.balance_of(thief.sender.address) - thief_before
        pytest.fail(f"{form} paid the {kind} escrow: journal {states}, thief +{stolen}, redeemed in {thief.redeemed}")
    refused = _cause(raised, EscrowNotGenuine)
    assert isinstance(refused, EscrowNotGenuine), f"{form} raised {raised!r}"
    assert isinstance(refused, PaymentRefused) and refused.rule == "escrow_not_genuine"
    assert refused.code == EXPECTED_CODE[kind]
    assert (refused.escrow, refused.chain_id, refused.escrow_id) == (thief.escrow, 84532, None)
    assert refused.expected == ESCROW_CODE_HASH
    assert (refused.code_hash is None) == (kind == "eoa")
    # Nothing signed, sent, reserved or journaled; no money moved.
    assert thief.paid_requests == 0 and thief.redeemed == []
    assert chain.token.balance_of(address(BUYER)) == buyer_before
    assert chain.token.balance_of(thief.sender.address) == thief_before
    stored = Journal(journal)
    assert stored.entries() == [] and stored.ledger_rows() == []
    stored.close()


def test_the_sdk_plugin_refuses_before_signing(chain: Chain, thief_of: Callable[[str], Thief], tmp_path: Path) -> None:
    # The plugin as the SDK calls it, with the thief's own requirements.
    thief = thief_of("eoa")
    with serving(thief.app()) as base:
        offer = localhttp.get(f"{base}/article/direct")
    requirements = decode_payment_required(offer.headers[PAYMENT_REQUIRED_HEADER]).accepts[0]
    scheme = DeliveryEscrowScheme(dev(BUYER), chain.node.url, tmp_path / "buyer.sqlite")
    with pytest.raises(EscrowNotGenuine, match=r"no_code: escrow .* holds no code"):
        scheme.create_payment_payload(requirements)
    assert scheme.core.journal.entries() == [] and scheme.core.journal.ledger_rows() == []


@pytest.mark.parametrize("kind", ["eoa", "lookalike"])
def test_what_the_refusal_prevents_a_signature_to_such_an_escrow_is_stolen(
    chain: Chain, thief_of: Callable[[str], Thief], kind: str
) -> None:
    # The attack itself, with the signature the buyer would have produced: the money goes to the thief.
    thief = thief_of(kind)
    terms = Terms(
        buyer=address(BUYER),
        seller=thief.sender.address,
        operator=thief.sender.address,
        token=chain.token.address,
        amount=PRICE,
        deadline=chain.now() + 600,
        request_hash=request_hash("GET", "http://thief.test/article/1"),
        salt=Terms.new_salt(),
    )
    auth = authorization_for(terms, thief.escrow, 84532, 0, terms.deadline)
    signature = sign_authorization(dev(BUYER), chain.token.domain(), auth)
    before = chain.token.balance_of(thief.sender.address)
    thief._redeem(EscrowPayload(authorization=auth, signature=signature, terms=terms))
    assert chain.token.balance_of(thief.sender.address) == before + PRICE


class CountingProvider(HTTPProvider):
    """anvil's HTTP provider, counting the JSON-RPC methods it is asked."""

    def __init__(self, url: str) -> None:
        super().__init__(url)
        self.calls: dict[str, int] = {}

    def make_request(self, method: Any, params: Any) -> Any:
        self.calls[str(method)] = self.calls.get(str(method), 0) + 1
        return super().make_request(method, params)


@pytest.fixture
def counted(chain: Chain) -> Iterator[tuple[Web3, CountingProvider]]:
    provider = CountingProvider(chain.node.url)
    yield Web3(provider), provider


def test_the_genuine_escrow_is_paid_and_its_code_read_once(
    chain: Chain,
    served: str,
    shop: Shop,
    tmp_path: Path,
    counted: tuple[Web3, CountingProvider],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # The shipped registry names the chain's escrow (its one CREATE2 address), which needs no code read
    # at all; without that record the buyer reads the code, once.
    monkeypatch.setattr(genuine, "DEPLOYMENTS_DIR", tmp_path / "no-registry")
    w3, provider = counted
    with EscrowClient(dev(BUYER), chain.node.url, tmp_path / "buyer.sqlite", w3=w3) as client:
        for item in ("a", "b", "c"):
            assert client.get(f"{served}/report/{item}").status_code == 200
        entries = client.journal.entries()
    assert [e.state for e in entries] == [PaymentState.DELIVERED] * 3
    assert provider.calls.get("eth_getCode") == 1  # cached per chain and address after the first payment
