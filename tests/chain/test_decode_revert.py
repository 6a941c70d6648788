"""decode_revert: custom errors of every shipped contract by name and values; anything else raw."""

from __future__ import annotations

from eth_abi.abi import encode
from eth_utils.crypto import keccak

from escrow_py.chain.tx import decode_revert
from escrow_py.protocol.errors import ContractRevert


def _selector(signature: str) -> bytes:
    return keccak(text=signature)[:4]


def test_escrow_error_with_values() -> None:
    data = _selector("DeadlinePassed(uint64,uint256)") + encode(["uint64", "uint256"], [100, 250])
    revert = decode_revert(data)
    assert isinstance(revert, ContractRevert)
    assert revert.name == "DeadlinePassed"
    assert revert.args_by_name == {"deadline": 100, "now_": 250}
    assert revert.data == data
    assert str(revert) == "DeadlinePassed(deadline=100, now_=250)"


def test_escrow_error_with_bytes_and_enum() -> None:
    escrow_id = b"\x07" * 32
    revert = decode_revert(_selector("NotHeld(bytes32,uint8)") + encode(["bytes32", "uint8"], [escrow_id, 2]))
    assert revert.name == "NotHeld"
    assert revert.args_by_name == {"id": escrow_id, "state": 2}
    assert "0x0707" in str(revert)


def test_error_without_arguments() -> None:
    assert decode_revert(_selector("Reentrancy()")).name == "Reentrancy"
    assert decode_revert(_selector("ZeroAmount()")).args_by_name == {}


def test_token_and_hostile_token_errors_are_known() -> None:
    who = "0x" + "ab" * 20
    used = decode_revert(
        _selector("AuthorizationUsedOrCanceled(address,bytes32)") + encode(["address", "bytes32"], [who, b"\x01" * 32])
    )
    assert used.name == "AuthorizationUsedOrCanceled"
    assert used.args_by_name["authorizer"].lower() == who
    blocked = decode_revert(_selector("RecipientBlocked(address)") + encode(["address"], [who]))
    assert blocked.name == "RecipientBlocked"


def test_standard_error_string_and_panic() -> None:
    message = decode_revert(_selector("Error(string)") + encode(["string"], ["nope"]))
    assert message.name == "Error" and message.args_by_name == {"message": "nope"}
    panic = decode_revert(_selector("Panic(uint256)") + encode(["uint256"], [0x11]))
    assert panic.name == "Panic" and panic.args_by_name == {"code": 0x11}


def test_unknown_and_malformed_data_are_reported_raw() -> None:
    for data in (b"", b"\x01\x02", _selector("SomethingElse(uint256)") + bytes(32)):
        revert = decode_revert(data)
        assert revert.name == "UnknownRevert"
        assert revert.args_by_name == {"data": data}
    # A known selector with a truncated body cannot be decoded: raw, not a crash.
    truncated = _selector("DeadlinePassed(uint64,uint256)") + bytes(10)
    assert decode_revert(truncated).name == "UnknownRevert"
