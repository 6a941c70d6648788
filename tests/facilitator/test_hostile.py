"""Hostile and unauthorised requests to the facilitator: each refused with its status, none acted on.

One facilitator holds three escrows: A (the shop's, delivered), B (the shop's, held) and C
(another seller's, held), and a fresh signed payment F that nobody has settled. After
every request the chain states, the buyer's balance and the escrow rows of the
database must be what they were: nothing was deposited, delivered, refunded or queued.
"""

from __future__ import annotations

import json
import sqlite3
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import httpx
import localhttp
import pytest
from fixtures.chain import Chain
from helpers import BUYER, SELLER2, address

from escrow_py.protocol.terms import State, delivery_hash

from .kit import Fac, idem, requirements, signed
from .test_api import wait_for


@dataclass
class Scene:
    chain: Chain
    fac: Fac
    a: bytes
    b: bytes
    c: bytes
    fresh: bytes
    fresh_body: dict[str, Any]
    b_body: dict[str, Any]
    revoked: str
    limited: str


def _hex(i: bytes) -> str:
    return "0x" + i.hex()


@pytest.fixture
def scene(chain: Chain, fac: Fac) -> Iterator[Scene]:
    with fac.client(fac.key) as mine, fac.client(fac.other_key) as theirs:
        a, a_body = signed(chain, requirements(chain))
        b, b_body = signed(chain, requirements(chain))
        c, c_body = signed(chain, requirements(chain, pay_to=SELLER2))
        assert mine.post("/settle", json=a_body).json()["success"]
        assert mine.post("/settle", json=b_body).json()["success"]
        assert theirs.post("/settle", json=c_body).json()["success"]
        entry = {"escrowId": _hex(a.escrow_id), "deliveryHash": _hex(delivery_hash(b"a"))}
        assert mine.post("/deliver", json={"deliveries": [entry]}, headers={"Idempotency-Key": "a"}).status_code == 202
    wait_for(lambda: chain.escrow.state_of(a.escrow_id) == State.RELEASED)
    fresh, fresh_body = signed(chain, requirements(chain))
    revoked_id, revoked = fac.keys.create("gone", [chain.escrow.address])
    fac.keys.revoke(revoked_id)
    _, limited = fac.keys.create("busy", [address(SELLER2)])
    yield Scene(
        chain, fac, a.escrow_id, b.escrow_id, c.escrow_id, fresh.escrow_id, fresh_body, b_body, revoked, limited
    )


def _snapshot(s: Scene) -> tuple[object, ...]:
    states = tuple(s.chain.escrow.state_of(i) for i in (s.a, s.b, s.c, s.fresh))
    db = sqlite3.connect(s.fac.db)
    try:
        payments = db.execute("SELECT escrow_id, status, deposit_tx, refund_tx FROM payments ORDER BY 1").fetchall()
        deliveries = db.execute("SELECT escrow_id, delivery_hash FROM deliveries ORDER BY 1").fetchall()
        txs = db.execute("SELECT COUNT(*) FROM facilitator_txs").fetchone()
    finally:
        db.close()
    return states, s.chain.token.balance_of(address(BUYER)), payments, deliveries, txs


Case = Callable[[Scene, httpx.Client], httpx.Response]


def _post(path: str, body: Any = None, *, key: str | None = "mine", **headers: str) -> Case:
    def run(s: Scene, http: httpx.Client) -> httpx.Response:
        chosen = {"mine": s.fac.key, "other": s.fac.other_key, "revoked": s.revoked}.get(key or "", key)
        auth = {"Authorization": f"Bearer {chosen}"} if chosen else {}
        content = body(s) if callable(body) else body
        raw = content if isinstance(content, bytes) else json.dumps(content).encode()
        return http.post(path, content=raw, headers={"content-type": "application/json", **auth, **headers})

    return run


def _deliver(escrow: str, hashed: bytes = b"x") -> Callable[[Scene], dict[str, Any]]:
    def body(s: Scene) -> dict[str, Any]:
        return {"deliveries": [{"escrowId": _hex(getattr(s, escrow)), "deliveryHash": _hex(delivery_hash(hashed))}]}

    return body


def _refund(escrow: str) -> Callable[[Scene], dict[str, Any]]:
    return lambda s: {"escrowId": _hex(getattr(s, escrow))}


def _fresh(change: Callable[[dict[str, Any]], None] | None = None) -> Callable[[Scene], dict[str, Any]]:
    def body(s: Scene) -> dict[str, Any]:
        copy: dict[str, Any] = json.loads(json.dumps(s.fresh_body))
        if change is not None:
            change(copy)
        return copy

    return body


def _reuse_key(path1: str, body1: Any, path2: str, body2: Any) -> Case:
    """The first request under a key is answered (refused for its own reason, and recorded); the same key
    with another body must get 422."""

    def run(s: Scene, http: httpx.Client) -> httpx.Response:
        key = idem()
        _post(path1, body1, **{"Idempotency-Key": key})(s, http)
        return _post(path2, body2, **{"Idempotency-Key": key})(s, http)

    return run


def _rate_limited(s: Scene, http: httpx.Client) -> httpx.Response:
    auth = {"Authorization": f"Bearer {s.limited}"}
    last = http.get(f"/escrows/{_hex(s.c)}", headers=auth)
    for _ in range(400):
        last = http.get(f"/escrows/{_hex(s.c)}", headers=auth)
        if last.status_code == 429:
            break
    return last


def _streamed_oversize(s: Scene, http: httpx.Client) -> httpx.Response:
    def chunks() -> Iterator[bytes]:
        for _ in range(100):
            yield b" " * 1024

    auth = {"Authorization": f"Bearer {s.fac.key}", "Idempotency-Key": idem()}
    return http.post("/deliver", content=chunks(), headers=auth)


def _set(path: list[str], value: Any) -> Callable[[dict[str, Any]], None]:
    def change(body: dict[str, Any]) -> None:
        node = body
        for part in path[:-1]:
            node = node[part]
        node[path[-1]] = value

    return change


CASES: dict[str, tuple[Case, int]] = {
    "no key": (_post("/settle", _fresh(), key=None), 401),
    "not a bearer key": (lambda s, h: h.post("/settle", json=_fresh()(s), headers={"Authorization": s.fac.key}), 401),
    "unknown key": (_post("/settle", _fresh(), key="x4f_0123456789abcdef_" + "A" * 43), 401),
    "right id, wrong secret": (
        lambda s, h: _post("/settle", _fresh(), key=s.fac.key[:-4] + "AAAA")(s, h), 401),
    "revoked key": (_post("/settle", _fresh(), key="revoked"), 401),
    "garbage key": (_post("/settle", _fresh(), key="' OR 1=1 --"), 401),
    "settle another seller's payTo": (_post("/settle", _fresh(), key="other"), 403),
    "deliver another seller's escrow": (_post("/deliver", _deliver("c"), **{"Idempotency-Key": "k1"}), 403),
    "refund another seller's escrow": (_post("/refund", _refund("c"), **{"Idempotency-Key": "k2"}), 403),
    "read another seller's escrow": (
        lambda s, h: h.get(f"/escrows/{_hex(s.c)}", headers={"Authorization": f"Bearer {s.fac.key}"}), 403),
    "deliver an escrow never settled here": (_post("/deliver", _deliver("fresh"), **{"Idempotency-Key": "k3"}), 404),
    "idempotency key replayed with another body (deliver)": (
        _reuse_key("/deliver", _deliver("c"), "/deliver", _deliver("b")), 422),
    "idempotency key replayed with another body (refund)": (
        _reuse_key("/refund", _refund("c"), "/refund", _refund("b")), 422),
    "idempotency key replayed on another endpoint": (
        _reuse_key("/deliver", _deliver("c"), "/refund", _refund("c")), 422),
    "a settled payment replayed with other requirements": (
        lambda s, h: _post("/settle", dict(s.b_body, x402Version=2, paymentRequirements={
            **s.b_body["paymentRequirements"], "maxTimeoutSeconds": 119}))(s, h), 200),
    "idempotency key replayed with another body (settle)": (
        _reuse_key("/settle", _fresh(_set(["paymentRequirements", "extra", "operator"], address(BUYER))),
                   "/settle", _fresh()), 422),
    "malformed JSON": (_post("/settle", b"{not json"), 422),
    "settle body missing paymentRequirements": (
        _post("/settle", lambda s: {"x402Version": 2, "paymentPayload": s.fresh_body["paymentPayload"]}), 422),
    "deliver with a bad escrow id": (
        _post("/deliver", {"deliveries": [{"escrowId": "0x12", "deliveryHash": "0x" + "00" * 32}]},
              **{"Idempotency-Key": "k4"}), 422),
    "deliver with an unknown field": (
        _post("/deliver", lambda s: {**_deliver("b")(s), "payTo": address(BUYER)}, **{"Idempotency-Key": "k5"}), 422),
    "deliver with the same escrow twice": (
        _post("/deliver", lambda s: {"deliveries": _deliver("b")(s)["deliveries"] * 2}, **{"Idempotency-Key": "k6"}),
        422),
    "oversized body by Content-Length": (_post("/settle", b" " * (65 * 1024)), 413),
    "oversized body streamed": (_streamed_oversize, 413),
    "deliver without an idempotency key": (_post("/deliver", _deliver("b")), 400),
    "idempotency key too long": (_post("/deliver", _deliver("b"), **{"Idempotency-Key": "k" * 201}), 400),
    "a second, different delivery hash": (_post("/deliver", _deliver("a", b"other"), **{"Idempotency-Key": "k7"}), 409),
    "rate limit": (_rate_limited, 429),
    "settle through another escrow contract": (
        _post("/settle", _fresh(_set(["paymentRequirements", "extra", "escrow"], address(SELLER2)))), 200),
    "settle naming another operator": (
        _post("/settle", _fresh(_set(["paymentRequirements", "extra", "operator"], address(BUYER)))), 200),
    "settle a payment whose terms were altered after signing": (
        _post("/settle", _fresh(_set(["paymentPayload", "payload", "terms", "amount"], "1"))), 200),
    "GET on /settle": (lambda s, h: h.get("/settle", headers={"Authorization": f"Bearer {s.fac.key}"}), 405),
    "malformed escrow id in the path": (
        lambda s, h: h.get("/escrows/0xzz", headers={"Authorization": f"Bearer {s.fac.key}"}), 422),
}  # fmt: skip


def test_hostile_requests_are_refused_and_never_acted_on(scene: Scene) -> None:
    assert len(CASES) >= 25
    failures = []
    with localhttp.Client(base_url=scene.fac.url, timeout=60) as http:
        for name, (case, expected) in CASES.items():
            before = _snapshot(scene)
            response = case(scene, http)
            after = _snapshot(scene)
            if response.status_code != expected:
                failures.append(f"{name}: HTTP {response.status_code}, expected {expected}: {response.text[:200]}")
            if expected == 200 and response.json().get("success") is not False:
                failures.append(f"{name}: settled: {response.text[:200]}")
            if after != before:
                failures.append(f"{name}: acted on: {before} -> {after}")
    assert not failures, "\n".join(failures)
    assert scene.chain.escrow.state_of(scene.b) == State.HELD
