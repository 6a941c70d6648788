"""Start-up checks: a keeper that cannot refund anything says so before its first cycle, not never.

Each failure is a ConfigError naming the setting at fault and the value found:
the RPC serves another chain than `network`, an `escrows` address holds no
X402Escrow, the token allowlist is empty, or the keeper's key cannot pay for gas.
An RPC that cannot be reached is an RpcError naming the URL.
"""

from __future__ import annotations

from eth_abi.abi import encode
from eth_utils.crypto import keccak

from escrow_py.chain import rpc
from escrow_py.chain.genuine import ESCROW_CODE_HASH, EscrowCode
from escrow_py.chain.port import EscrowChain
from escrow_py.keeper._batch import batch_gas
from escrow_py.keeper._config import KeeperConfig
from escrow_py.protocol.errors import ConfigError, RpcError


def _hex_int(value: object, what: str) -> int:
    try:
        return int(str(value), 16)
    except ValueError:
        raise RpcError(f"{what}: the node answered {value!r}, not a hex number") from None


# ERC-3009's view: a token that lacks it cannot have taken a deposit, so its escrows are not ours.
_AUTHORIZATION_STATE = keccak(text="authorizationState(address,bytes32)")[:4]


def _check_token(chain: EscrowChain, token: str, chain_id: int) -> None:
    """A configured token must be an ERC-3009 contract on this chain: a typo refunds nothing, silently."""
    code = chain.request("eth_getCode", [token, "latest"])
    if code in (None, "0x", "0x0", ""):
        raise ConfigError(f"tokens: {token} holds no contract code on chain {chain_id}")
    probe = "0x" + (_AUTHORIZATION_STATE + encode(["address", "bytes32"], [token, b"\0" * 32])).hex()
    try:
        answer = chain.request("eth_call", [{"to": token, "data": probe}, "latest"])
    except rpc.NodeError as exc:  # a revert; a node that is down stays an RpcError
        raise ConfigError(
            f"tokens: {token} on chain {chain_id} is not an ERC-3009 token: authorizationState() reverts ({exc})"
        ) from None
    if not isinstance(answer, str) or len(answer) != 66:
        raise ConfigError(
            f"tokens: {token} on chain {chain_id} is not an ERC-3009 token: authorizationState() answered {answer!r}"
        )


def check_startup(chain: EscrowChain, config: KeeperConfig, keeper_address: str) -> None:
    """Raise ConfigError (or RpcError) if this keeper could not refund anything as configured."""
    try:
        chain_id = _hex_int(chain.request("eth_chainId", []), "eth_chainId")
    except RpcError as exc:
        raise RpcError(f"rpc_url = {config.rpc_url!r}: the node does not answer ({exc})") from None
    if chain_id != config.chain_id:
        raise ConfigError(
            f"network = {config.network!r} (chain id {config.chain_id}), but the RPC at {config.rpc_url} serves "
            f"chain id {chain_id}: set network = 'eip155:{chain_id}' or point rpc_url at the right chain"
        )
    for address in config.escrows:
        # The one genuine-escrow check every role uses: the shipped runtime code, or a shipped deployment.
        check = chain.check_escrow(address)
        if check.verdict is EscrowCode.NO_CODE:
            raise ConfigError(f"escrows: {address} holds no contract code on chain {chain_id}")
        if not check.genuine:
            found = "?" if check.code_hash is None else "0x" + check.code_hash.hex()
            raise ConfigError(
                f"escrows: {address} on chain {chain_id} is not an X402Escrow: its runtime code hashes to "
                f"{found}, the shipped X402Escrow's to 0x{ESCROW_CODE_HASH.hex()}"
            )
    if config.allowed_tokens() == frozenset():
        raise ConfigError(
            f"tokens: the deployment registry knows no token on {config.network}, so no escrow would be refunded: "
            "set tokens (the addresses to refund) or tokens = '*' for every token"
        )
    for token in config.tokens:
        _check_token(chain, token, chain_id)
    balance = _hex_int(chain.request("eth_getBalance", [keeper_address, "latest"]), "eth_getBalance")
    block = chain.request("eth_getBlockByNumber", ["latest", False])
    base_fee = _hex_int(block.get("baseFeePerGas", "0x0"), "baseFeePerGas") if isinstance(block, dict) else 0
    need = batch_gas(1) * 2 * base_fee
    if balance == 0 or balance < need:
        raise ConfigError(
            f"keeper key {keeper_address}: balance {balance} wei on chain {chain_id}, and one refund needs up to "
            f"{need} wei of gas at the current base fee: fund it"
        )
