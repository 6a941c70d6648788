"""Binding to an ERC-3009 token (USDC, EURC, or the shipped TestUSDC)."""

from __future__ import annotations

from typing import Any

from eth_abi.abi import decode
from eth_typing import ChecksumAddress
from eth_utils.address import to_checksum_address
from eth_utils.crypto import keccak
from hexbytes import HexBytes
from web3 import Web3
from web3.types import TxReceipt

from escrow_py.chain import rpc
from escrow_py.chain.artifacts import load_artifact
from escrow_py.chain.tx import TxSender, revert_or_node_error
from escrow_py.protocol.eip3009 import Authorization, TokenDomain
from escrow_py.protocol.errors import ContractRevert

TOKEN_ABI: list[dict[str, Any]] = load_artifact("TestUSDC")["abi"]


def split_signature(signature: bytes) -> tuple[int, bytes, bytes]:
    """(v, r, s) of a 65-byte (r, s, v) signature."""
    if len(signature) != 65:
        raise ValueError(f"expected a 65-byte signature, got {len(signature)} bytes")
    return signature[64], signature[:32], signature[32:64]


# The two reads on every payment, encoded by hand: web3's contract machinery costs more than the node.
_BALANCE_OF = keccak(text="balanceOf(address)")[:4]
_AUTHORIZATION_STATE = keccak(text="authorizationState(address,bytes32)")[:4]
_NAME = keccak(text="name()")[:4]
_VERSION = keccak(text="version()")[:4]
_CHAIN_ID = rpc.Request("eth_chainId", [])


def _word(address: str) -> bytes:
    return bytes(12) + bytes.fromhex(to_checksum_address(address)[2:])


class Token:
    """An ERC-3009 token at `address`."""

    def __init__(self, w3: Web3, address: str) -> None:
        self.w3 = w3
        self.address = to_checksum_address(address)
        self.contract = w3.eth.contract(address=self.address, abi=TOKEN_ABI)

    def balance_of(self, account: str, block: str | int = "latest") -> int:
        return self.balance_from(rpc.send(self.w3, self.balance_request(account, block)))

    def balance_request(self, account: str, block: str | int = "latest") -> rpc.Request:
        """balance_of as a request to batch with others; `balance_from` reads its result."""
        return rpc.call_request(self.address, _BALANCE_OF + _word(account), block=block)

    @staticmethod
    def balance_from(result: object) -> int:
        return int.from_bytes(rpc.call_output(result), "big")

    def authorization_state(self, authorizer: str, nonce: bytes) -> bool:
        """True once the nonce was used or cancelled."""
        return self.authorization_state_from(rpc.send(self.w3, self.authorization_state_request(authorizer, nonce)))

    def authorization_state_request(self, authorizer: str, nonce: bytes) -> rpc.Request:
        """authorization_state as a request to batch with others; `authorization_state_from` reads its result."""
        return rpc.call_request(self.address, _AUTHORIZATION_STATE + _word(authorizer) + nonce)

    @staticmethod
    def authorization_state_from(result: object) -> bool:
        return int.from_bytes(rpc.call_output(result), "big") != 0

    def domain(self, chain_id: int | None = None) -> TokenDomain:
        """The token's EIP-712 domain, read from its `name()` and `version()` (and the chain id unless given) in
        one round trip (rpc.batch); ContractRevert when the token reverts or answers nothing (no code there).

        Raw calls: through web3's contract machinery the three reads cost about 12 ms of CPU.
        """
        reads = [rpc.call_request(self.address, _NAME), rpc.call_request(self.address, _VERSION)]
        answers = rpc.batch(self.w3, reads if chain_id is not None else [*reads, _CHAIN_ID])
        name, version = (self._text(answer) for answer in answers[:2])
        if chain_id is None:
            chain_id = int(str(rpc.value(answers[2])), 16)
        return TokenDomain(name=name, version=version, chain_id=chain_id, verifying_contract=self.address)

    def _text(self, answer: object) -> str:
        """A string view's answer, as `domain` reads it."""
        try:
            raw = rpc.call_output(rpc.value(answer))
        except rpc.NodeError as exc:
            failure = revert_or_node_error(exc)
            if isinstance(failure, ContractRevert):
                raise failure from None
            raise
        try:
            (text,) = decode(["string"], raw)
        except Exception:  # noqa: BLE001 - eth_abi raises several kinds for data that is not a string
            raise ContractRevert("EmptyReturn", {"token": self.address, "answer": raw}) from None
        return str(text)

    def _data(self, fn: str, *args: Any) -> bytes:
        return bytes(HexBytes(self.contract.encode_abi(fn, args=list(args))))

    def mint(self, sender: TxSender, to: str, amount: int) -> TxReceipt:
        """TestUSDC only: anyone may mint."""
        return sender.transact(self.address, self._data("mint", to_checksum_address(to), amount))

    def transfer(self, sender: TxSender, to: str, amount: int) -> TxReceipt:
        return sender.transact(self.address, self._data("transfer", to_checksum_address(to), amount))

    def transfer_with_authorization_data(self, authorization: Authorization, signature: bytes) -> bytes:
        """Calldata of the x402 `exact` payment: transferWithAuthorization in the (v, r, s) form."""
        v, r, s = split_signature(signature)
        fn = self.contract.get_function_by_signature(
            "transferWithAuthorization(address,address,uint256,uint256,uint256,bytes32,uint8,bytes32,bytes32)"
        )
        return bytes(HexBytes(fn(*authorization.as_tuple(), v, r, s)._encode_transaction_data()))

    def cancel_authorization_data(self, authorizer: ChecksumAddress, nonce: bytes, signature: bytes) -> bytes:
        v, r, s = split_signature(signature)
        fn = self.contract.get_function_by_signature("cancelAuthorization(address,bytes32,uint8,bytes32,bytes32)")
        return bytes(HexBytes(fn(authorizer, nonce, v, r, s)._encode_transaction_data()))
