"""Property: whatever is done to a valid PAYMENT-SIGNATURE, the seller answers 400 or 402 with a reason.

Hypothesis mutates every part of a real, correctly signed header (each field's type, size,
encoding, nesting and numeric range; missing and extra keys; truncation of the JSON and of
the base64) and sends it through the real app (the ASGI stack) on the
session's anvil. Whatever comes back must be 400 or 402 with a machine-readable reason in
the body and in PAYMENT-REQUIRED, the handler must not run, and the operator must not have
sent a single transaction.

The payer is a dev account without tokens, so a mutation that changes nothing that matters
(an ignored key, the same value written back) still ends in a 402 `insufficient_balance`
after every off-chain rule and the signature check have run on it, and nothing can be
deposited even if a rule were missing: the operator's nonce is the witness.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import copy
import json
import os
import re
from collections.abc import Callable
from typing import Any

import httpx
import localhttp
import pytest
from fixtures.chain import Chain
from hypothesis import HealthCheck, given, reject, settings
from hypothesis import strategies as st

from escrow_py.protocol.wire import PAYMENT_REQUIRED_HEADER, PAYMENT_SIGNATURE_HEADER, decode_payment_required

from .payer import sign_payment
from .shop import Shop, deposits, served

# Thousands by default (about 20 s); X402_FUZZ_EXAMPLES=20000 for a long hunt.
EXAMPLES = int(os.environ.get("X402_FUZZ_EXAMPLES", "2000"))
ROUTE = "/report/fuzz"
STRANGER = 4  # a dev account that holds no tokens

Path = tuple[str | int, ...]
Mutation = Callable[[Any], Any]

# Numbers at and around every boundary the scheme has (uint64 deadlines, uint256 amounts and times).
EDGE_INTS = [0, 1, -1, 2**63, 2**64 - 1, 2**64, 2**255, 2**256 - 1, 2**256, 2**256 + 1, 10**78, -(2**255)]
# Unicode digits (fullwidth, Arabic-Indic, superscript) that str.isdigit() and int() accept.
ODD_STRINGS = ["", " ", "0x", "0x0", "\uff11\uff12", "\u0661\u0662", "\u00b2", "1e3", "1.5", "-1", "+1", " 1", "1_000"]
ODD_STRINGS += ["NaN", "null", "\u0000"]
NEST = "__nest_{}__"
_NEST_MARKER = re.compile(r'"__nest_(\d+)__"')


def _paths(node: Any, prefix: Path = ()) -> list[Path]:
    """Every position in the JSON tree, the root excluded."""
    found: list[Path] = []
    items: list[tuple[str | int, Any]] = []
    if isinstance(node, dict):
        items = list(node.items())
    elif isinstance(node, list):
        items = list(enumerate(node))
    for key, child in items:
        found.append((*prefix, key))
        found.extend(_paths(child, (*prefix, key)))
    return found


def _parent(tree: Any, path: Path) -> Any:
    node = tree
    for key in path[:-1]:
        node = node[key]
    return node


def _scalars() -> st.SearchStrategy[Any]:
    return st.one_of(
        st.none(),
        st.booleans(),
        st.integers(),
        st.sampled_from(EDGE_INTS),
        st.sampled_from(EDGE_INTS).map(str),
        st.floats(allow_nan=False, allow_infinity=False),
        st.text(max_size=40),
        st.sampled_from(ODD_STRINGS),
        st.binary(max_size=40).map(lambda b: "0x" + b.hex()),
    )


def _values() -> st.SearchStrategy[Any]:
    """Any JSON value, or a marker replaced by N nested arrays once serialised."""
    json_values = st.recursive(
        _scalars(),
        lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner, max_size=3),
        max_leaves=8,
    )
    nested = st.integers(min_value=1, max_value=3000).map(NEST.format)
    return st.one_of(json_values, nested)


def _edit_string(draw: st.DrawFn, value: str) -> str:
    edit = draw(st.integers(0, 6))
    if edit == 0:
        return value[: draw(st.integers(0, max(len(value) - 1, 0)))]  # truncated
    if edit == 1:
        return value.upper()
    if edit == 2:
        return value.removeprefix("0x")
    if edit == 3:
        return value + value
    if edit == 4:
        return value + draw(st.text(min_size=1, max_size=4))
    if edit == 5:
        return value + "0" * draw(st.integers(1, 5000))  # far too long
    return value.replace("0", "\u0660")  # a Unicode digit where an ASCII one was


VALUES = _values()


def _same_shape(draw: st.DrawFn, value: Any) -> Any:
    """Another value of the same kind: hex of the same length, a number of the same type, a decimal string."""
    if isinstance(value, str) and value.startswith("0x"):
        return "0x" + draw(st.binary(min_size=(len(value) - 2) // 2, max_size=(len(value) - 2) // 2)).hex()
    if isinstance(value, str) and value.isdigit():
        return str(draw(st.integers(0, 2**256 - 1) | st.integers(0, int(value) + 1000)))
    if isinstance(value, bool):
        return not value
    if isinstance(value, int):
        return draw(st.integers(0, 2**64))
    if isinstance(value, str):
        return draw(st.text(max_size=len(value) + 2))
    return value


@st.composite
def _mutation(draw: st.DrawFn, tree: dict[str, Any]) -> Mutation:
    paths = _paths(tree)
    path = draw(st.sampled_from(paths))
    original = copy.deepcopy(_parent(tree, path)[path[-1]])  # never alias the valid envelope
    kind = draw(st.sampled_from(["set", "delete", "extra", "edit", "wrap", "same-shape", "same-shape"]))
    if kind == "same-shape":  # still well-formed, so it reaches the rules (and the signature check) behind the decoder
        new: Any = _same_shape(draw, original)
    elif kind == "edit" and isinstance(original, str):
        new = _edit_string(draw, original)
    elif kind == "edit" and isinstance(original, int) and not isinstance(original, bool):
        new = draw(st.sampled_from([original + 1, original - 1, -original, str(original), float(original)]))
    elif kind == "wrap":
        new = draw(st.sampled_from([[original], {"value": original}, [original, original]]))
    else:
        new = draw(VALUES)
    extra_key = draw(st.text(max_size=12))

    def apply(envelope: Any) -> Any:
        try:
            parent = _parent(envelope, path)
            key = path[-1]
            if kind == "delete":
                del parent[key]
            elif kind == "extra":
                target = parent[key] if isinstance(parent[key], dict) else parent
                if isinstance(target, dict):
                    target[extra_key] = copy.deepcopy(new)
            else:
                parent[key] = copy.deepcopy(new)
        except (KeyError, IndexError, TypeError):
            pass  # an earlier mutation already removed or retyped this position
        return envelope

    return apply


def _serialise(envelope: Any) -> bytes:
    text = json.dumps(envelope, separators=(",", ":"))
    return _NEST_MARKER.sub(lambda m: "[" * int(m.group(1)) + "]" * int(m.group(1)), text).encode()


@st.composite
def _header(draw: st.DrawFn, envelope: dict[str, Any]) -> str:
    tree = json.loads(json.dumps(envelope))
    for mutation in draw(st.lists(_mutation(envelope), min_size=1, max_size=3)):
        tree = mutation(tree)
    raw = _serialise(tree)
    # Mostly well-formed JSON, so the mutations reach the rules behind the decoder.
    layer = draw(st.sampled_from(["json"] * 6 + ["cut-json", "bytes", "base64"]))
    if layer == "cut-json":
        raw = raw[: draw(st.integers(0, max(len(raw) - 1, 0)))]
    elif layer == "bytes":  # not UTF-8 at all, at a random place
        at = draw(st.integers(0, len(raw)))
        raw = raw[:at] + draw(st.binary(min_size=1, max_size=4).map(lambda b: bytes(x | 0x80 for x in b))) + raw[at:]
    header = base64.b64encode(raw).decode()
    if layer == "base64":
        edit = draw(st.sampled_from(["cut", "urlsafe", "char", "pad", "space"]))
        if edit == "cut":
            header = header[: draw(st.integers(0, max(len(header) - 1, 0)))]
        elif edit == "urlsafe":
            header = base64.urlsafe_b64encode(raw).decode().rstrip("=")
        elif edit == "char":
            at = draw(st.integers(0, len(header) - 1))
            header = header[:at] + draw(st.sampled_from(list("!*-_.~ %$A0"))) + header[at + 1 :]
        elif edit == "pad":
            header += "=" * draw(st.integers(1, 3))
        else:
            header = " " + header + " "
    return header


# The whole hunt goes through the ASGI stack (fast); a smaller one through a real uvicorn server checks that
# the HTTP server in front (header parsing, its own limits) does not turn a refusal into anything else.
@pytest.mark.parametrize("transport", [pytest.param("asgi", marks=pytest.mark.slow), "uvicorn"])
def test_no_mutation_of_a_valid_header_gets_anything_but_400_or_402_and_nothing_is_sent(
    chain: Chain, shop: Shop, transport: str
) -> None:
    operator = shop.config.operator.address
    start = int(chain.w3.eth.block_number) + 1
    loop = asyncio.new_event_loop()
    stack = contextlib.ExitStack()
    if transport == "asgi":
        client, examples = shop.client(), EXAMPLES
    else:
        url, _ = stack.enter_context(served(shop.app))
        client, examples = localhttp.AsyncClient(base_url=url, timeout=60), max(EXAMPLES // 10, 100)
    try:
        quote = loop.run_until_complete(client.get(ROUTE))
        assert quote.status_code == 402
        required = decode_payment_required(quote.headers[PAYMENT_REQUIRED_HEADER])
        payment = sign_payment(chain, required, buyer=STRANGER)
        envelope = json.loads(base64.b64decode(payment.header))
        nonce_before = chain.w3.eth.get_transaction_count(operator)
        seen: dict[tuple[int, str], int] = {}

        @settings(
            max_examples=examples,
            deadline=None,
            database=None,
            print_blob=True,
            suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.filter_too_much],
        )
        @given(header=_header(envelope))
        def every_mutation_is_refused_with_a_reason(header: str) -> None:
            if transport == "uvicorn":
                # On the wire a header has no surrounding whitespace (HTTP strips it) and no control bytes
                # (the client refuses to send them): what cannot be sent is not a case for the server.
                header = header.strip(" \t")
                try:
                    response = loop.run_until_complete(client.get(ROUTE, headers={PAYMENT_SIGNATURE_HEADER: header}))
                except httpx.LocalProtocolError:
                    reject()
            else:
                response = loop.run_until_complete(client.get(ROUTE, headers={PAYMENT_SIGNATURE_HEADER: header}))
            assert response.status_code in (400, 402), (response.status_code, response.text[:300])
            error = response.json().get("error")
            assert isinstance(error, str) and error, response.text[:300]
            assert decode_payment_required(response.headers[PAYMENT_REQUIRED_HEADER]).error == error
            reason = error.split(":", 1)[0]
            seen[(response.status_code, reason)] = seen.get((response.status_code, reason), 0) + 1

        every_mutation_is_refused_with_a_reason()
    finally:
        loop.run_until_complete(client.aclose())
        loop.close()
        stack.close()
    assert chain.w3.eth.get_transaction_count(operator) == nonce_before, "the operator sent a transaction"
    assert deposits(chain, start) == []
    assert shop.calls == {}, "a handler ran for a refused payment"
    # The mutations reached deep: refused for undecodable input, for broken rules, and on chain.
    reasons = {reason for _, reason in seen}
    assert {"invalid_payload", "insufficient_balance"} <= reasons, seen
    assert len(reasons) >= (12 if transport == "asgi" else 6), seen
