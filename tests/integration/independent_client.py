"""A minimal delivery-escrow buyer written only from DESIGN.md sections 1 and 3 and the README's
"The wire format", with eth-account.

It deliberately imports nothing from escrow_py: if it can pay the seller middleware,
the wire format is what the design says, not just what our own client happens to send.
It computes the canonical URL and the requestHash itself, from the documented rule, and
refuses a 402 whose `resource.url` or `extra.requestHash` is not what it computed.
"""

from __future__ import annotations

import base64
import json
import os
import re
from dataclasses import dataclass
from typing import Any

import httpx
from eth_abi.abi import encode
from eth_account import Account
from eth_account.messages import encode_typed_data
from eth_utils.crypto import keccak

TERMS_TYPE = (
    "Terms(address buyer,address seller,address operator,address token,"
    "uint256 amount,uint64 deadline,bytes32 requestHash,bytes32 salt)"
)


# README, "The wire format": bytes that are never percent-encoded, and the others a path or query keeps.
UNRESERVED = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-._~")
KEPT = UNRESERVED | frozenset("!$&'()*+,;=:@/?")
DEFAULT_PORT = {"http": 80, "https": 443}


class Refused(Exception):
    """The 402 is not for the request this client is about to pay for."""


def _normalised(component: str) -> str:
    """One rule per character: %XX of an unreserved byte decoded, any other %XX upper-cased, anything else
    outside the kept set (a lone %, a space, a non-ASCII character) percent-encoded as UTF-8."""

    def one(match: re.Match[str]) -> str:
        if match.group(1) is not None:
            char = chr(int(match.group(1), 16))
            return char if char in UNRESERVED else "%" + match.group(1).upper()
        char = match.group(2)
        return char if char in KEPT else "".join(f"%{b:02X}" for b in char.encode())

    return re.sub(r"%([0-9A-Fa-f]{2})|(.)", one, component, flags=re.DOTALL)


def _without_dot_segments(path: str) -> str:
    """RFC 3986 section 5.2.4, as its steps are written (input buffer to output buffer)."""
    source, out = path, ""
    while source:
        if source.startswith(("../", "./")):
            source = source[source.index("/") + 1 :]
        elif source.startswith("/./") or source == "/.":
            source = "/" + source[3:]
        elif source.startswith("/../") or source == "/..":
            source = "/" + source[4:]
            out = out[: out.rfind("/")] if "/" in out else ""
        elif source in (".", ".."):
            source = ""
        else:
            cut = source.find("/", 1)
            segment, source = (source, "") if cut == -1 else (source[:cut], source[cut:])
            out += segment
    return out


def canonical_url(url: str) -> str:
    """The URL as the seller must advertise and hash it, derived from what this client sends."""
    sent = httpx.URL(url)  # httpx percent-encodes the target before it goes over the wire
    scheme, host = sent.scheme.lower(), sent.host.lower()
    authority = host if sent.port in (None, DEFAULT_PORT.get(scheme)) else f"{host}:{sent.port}"
    path, _, query = sent.raw_path.decode("ascii").partition("?")
    path = _without_dot_segments(_normalised(path or "/")) or "/"
    query = _normalised(query)
    return f"{scheme}://{authority}{path}" + (f"?{query}" if query else "")


def request_hash(method: str, url: str, body: bytes) -> bytes:
    """keccak256(abi.encode(keccak256("Request(string method,string url,bytes body)"), ...)) of the README."""
    return keccak(
        encode(
            ["bytes32", "bytes32", "bytes32", "bytes32"],
            [
                keccak(text="Request(string method,string url,bytes body)"),
                keccak(text=method.upper()),
                keccak(text=canonical_url(url)),
                keccak(body),
            ],
        )
    )


def _b64json(value: str) -> Any:
    return json.loads(base64.b64decode(value))


def _header(data: dict[str, Any]) -> str:
    return base64.b64encode(json.dumps(data).encode()).decode()


@dataclass
class Paid:
    status: int
    body: bytes
    settlement: dict[str, Any]
    resource_url: str = ""


def chain_time(rpc_url: str) -> int:
    """The timestamp the next block will carry: deadlines are judged by the chain's clock, not ours.

    The latest block's alone is stale on an idle chain (automine makes no blocks while nothing is
    sent); the node stamps its `pending` block with what the next block will get.
    """
    for tag in ("pending", "latest"):
        request = {"jsonrpc": "2.0", "id": 1, "method": "eth_getBlockByNumber", "params": [tag, False]}
        block = httpx.post(rpc_url, json=request, timeout=30).json().get("result")
        if isinstance(block, dict) and block.get("timestamp"):
            return int(block["timestamp"], 16)
    raise RuntimeError(f"{rpc_url} answered no block")


def pay(url: str, private_key: str, chain_id: int, rpc_url: str, *, method: str = "GET", body: bytes = b"") -> Paid:
    """Request `url`, pay its delivery-escrow 402, and return the paid response."""
    account = Account.from_key(private_key)
    with httpx.Client(timeout=60) as http:
        first = http.request(method, url, content=body)
        assert first.status_code == 402, first.status_code
        required = _b64json(first.headers["PAYMENT-REQUIRED"])
        accepted = next(r for r in required["accepts"] if r["scheme"] == "delivery-escrow")
        extra = accepted["extra"]
        expected_url = canonical_url(url)
        if required["resource"]["url"] != expected_url:
            raise Refused(f"resource.url {required['resource']['url']!r} is not {expected_url!r}")
        if extra["requestHash"] != "0x" + request_hash(method, url, body).hex():
            raise Refused(f"requestHash {extra['requestHash']} is not this request's")
        deadline = chain_time(rpc_url) + int(accepted["maxTimeoutSeconds"]) - 5
        terms = {
            "buyer": account.address,
            "seller": accepted["payTo"],
            "operator": extra["operator"],
            "token": accepted["asset"],
            "amount": accepted["amount"],
            "deadline": deadline,
            "requestHash": extra["requestHash"],
            "salt": "0x" + os.urandom(32).hex(),
        }
        terms_hash = keccak(
            encode(
                ["bytes32", "address", "address", "address", "address", "uint256", "uint64", "bytes32", "bytes32"],
                [
                    keccak(text=TERMS_TYPE),
                    terms["buyer"],
                    terms["seller"],
                    terms["operator"],
                    terms["token"],
                    int(terms["amount"]),
                    deadline,
                    bytes.fromhex(str(terms["requestHash"])[2:]),
                    bytes.fromhex(str(terms["salt"])[2:]),
                ],
            )
        )
        escrow_id = keccak(encode(["uint256", "address", "bytes32"], [chain_id, extra["escrow"], terms_hash]))
        authorization = {
            "from": account.address,
            "to": extra["escrow"],
            "value": int(accepted["amount"]),
            "validAfter": 0,
            "validBefore": deadline,
            "nonce": escrow_id,
        }
        typed = {
            "types": {
                "EIP712Domain": [
                    {"name": "name", "type": "string"},
                    {"name": "version", "type": "string"},
                    {"name": "chainId", "type": "uint256"},
                    {"name": "verifyingContract", "type": "address"},
                ],
                "ReceiveWithAuthorization": [
                    {"name": "from", "type": "address"},
                    {"name": "to", "type": "address"},
                    {"name": "value", "type": "uint256"},
                    {"name": "validAfter", "type": "uint256"},
                    {"name": "validBefore", "type": "uint256"},
                    {"name": "nonce", "type": "bytes32"},
                ],
            },
            "primaryType": "ReceiveWithAuthorization",
            "domain": {
                "name": extra["name"],
                "version": extra["version"],
                "chainId": chain_id,
                "verifyingContract": accepted["asset"],
            },
            "message": authorization,
        }
        signature = account.sign_message(encode_typed_data(full_message=typed)).signature
        payload = {
            "x402Version": 2,
            "resource": required.get("resource"),
            "accepted": accepted,
            "payload": {
                "authorization": {
                    **{k: str(v) for k, v in authorization.items() if k in ("value", "validAfter", "validBefore")},
                    "from": account.address,
                    "to": extra["escrow"],
                    "nonce": "0x" + escrow_id.hex(),
                },
                "signature": "0x" + bytes(signature).hex(),
                "terms": terms,
            },
        }
        paid = http.request(method, url, content=body, headers={"PAYMENT-SIGNATURE": _header(payload)})
        settlement = _b64json(paid.headers["PAYMENT-RESPONSE"]) if "PAYMENT-RESPONSE" in paid.headers else {}
        return Paid(paid.status_code, paid.content, settlement, expected_url)
