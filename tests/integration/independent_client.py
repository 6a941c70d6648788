"""A minimal delivery-escrow buyer written only from DESIGN.md sections 1 and 3, with eth-account.

It deliberately imports nothing from escrow_py: if it can pay the seller middleware,
the wire format is what the design says, not just what our own client happens to send.
"""

from __future__ import annotations

import base64
import json
import os
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


def _b64json(value: str) -> Any:
    return json.loads(base64.b64decode(value))


def _header(data: dict[str, Any]) -> str:
    return base64.b64encode(json.dumps(data).encode()).decode()


@dataclass
class Paid:
    status: int
    body: bytes
    settlement: dict[str, Any]


def chain_time(rpc_url: str) -> int:
    """The latest block's timestamp: deadlines are judged by the chain's clock, not ours (DESIGN.md section 1)."""
    request = {"jsonrpc": "2.0", "id": 1, "method": "eth_getBlockByNumber", "params": ["latest", False]}
    return int(httpx.post(rpc_url, json=request, timeout=30).json()["result"]["timestamp"], 16)


def pay(url: str, private_key: str, chain_id: int, rpc_url: str, *, method: str = "GET", body: bytes = b"") -> Paid:
    """Request `url`, pay its delivery-escrow 402, and return the paid response."""
    account = Account.from_key(private_key)
    with httpx.Client(timeout=60) as http:
        first = http.request(method, url, content=body)
        assert first.status_code == 402, first.status_code
        required = _b64json(first.headers["PAYMENT-REQUIRED"])
        accepted = next(r for r in required["accepts"] if r["scheme"] == "delivery-escrow")
        extra = accepted["extra"]
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
        return Paid(paid.status_code, paid.content, settlement)
