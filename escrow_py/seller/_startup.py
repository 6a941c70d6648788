"""Start-up checks: fail when the app starts, naming the setting and the value found, not at the first sale.

A seller configured with a wrong escrow address, a token that is not ERC-3009 (or
has another EIP-712 name or version than configured), the wrong network, or an
operator without gas money would otherwise start, answer 402s, and never sell.
"""

from __future__ import annotations

from eth_utils.crypto import keccak
from web3 import Web3

from escrow_py.chain import rpc
from escrow_py.chain.genuine import ESCROW_CODE_HASH, EscrowCode
from escrow_py.chain.port import EscrowChain
from escrow_py.protocol.eip3009 import TokenDomain
from escrow_py.protocol.errors import ChainError, ConfigError, ContractRevert
from escrow_py.seller._chain import seller_chain
from escrow_py.seller._config import SellerConfig

# Gas the operator must be able to pay for at current fees: one deposit with its margin
# (a deposit measures about 100k gas; the limit sent is the estimate plus 20%).
OPERATOR_MIN_GAS = 150_000

_DOMAIN_SEPARATOR = keccak(text="DOMAIN_SEPARATOR()")[:4]
_AUTHORIZATION_STATE = keccak(text="authorizationState(address,bytes32)")[:4]
_NAME = keccak(text="name()")[:4]
_VERSION = keccak(text="version()")[:4]


def check_seller(config: SellerConfig, *, w3: Web3 | None = None) -> None:
    """The start-up checks the middleware runs when the app starts, callable on their own (a deploy script).

    Raises ConfigError naming the setting at fault and the value found (see check_chain).
    """
    check_chain(config, seller_chain(config, w3))


def check_chain(config: SellerConfig, chain: EscrowChain) -> None:
    """Raise ConfigError for the first of these that fails, naming the setting and the value found.

    - `rpc_url` answers, and its chain id is the one of `network`;
    - `escrow` holds the X402Escrow runtime code shipped with this package;
    - `token` answers ERC-3009's `authorizationState`, and its EIP-712 DOMAIN_SEPARATOR is the
      one `token_name`, `token_version`, the chain id and its address give;
    - `operator` can pay the gas of one deposit at current fees.
    """
    try:
        _check(config, chain)
    except ChainError as exc:
        raise ConfigError(f"SellerConfig.rpc_url {rpc.redact_url(config.rpc_url)} cannot be used: {exc}") from None


def _check(config: SellerConfig, chain: EscrowChain) -> None:
    chain_id = chain.chain_id
    if chain_id != config.chain_id:
        raise ConfigError(
            f"SellerConfig.network is {config.network}, but the node at rpc_url "
            f"{rpc.redact_url(config.rpc_url)} is on chain {chain_id} (eip155:{chain_id})"
        )

    # The buyer's own check (chain.genuine): a buyer would refuse to sign for anything else.
    escrow = chain.check_escrow(config.escrow)
    if not escrow.genuine:
        what = "no code (an account, or nothing deployed there on this chain)"
        if escrow.verdict is EscrowCode.OTHER_CODE and escrow.code_hash is not None:
            what = f"other code (keccak 0x{escrow.code_hash.hex()}, expected 0x{ESCROW_CODE_HASH.hex()})"
        raise ConfigError(f"SellerConfig.escrow {config.escrow} is not an X402Escrow: it holds {what}")

    _check_token(config, chain)

    balance = chain.gas_balance()
    max_fee, _ = chain.fees()
    needed = OPERATOR_MIN_GAS * max_fee
    if balance < needed:
        raise ConfigError(
            f"SellerConfig.operator {chain.sender_address} has {balance} wei of gas money, less than one deposit "
            f"needs at current fees ({OPERATOR_MIN_GAS} gas at {max_fee} wei = {needed} wei)"
        )


def _check_token(config: SellerConfig, chain: EscrowChain) -> None:
    token = config.token
    if not chain.code_at(token):
        raise ConfigError(f"SellerConfig.token {token} has no code: not a token on chain {config.chain_id}")
    try:
        chain.call(token, _AUTHORIZATION_STATE + bytes(64))
        separator = chain.call(token, _DOMAIN_SEPARATOR)
    except (ContractRevert, rpc.NodeError) as exc:
        raise ConfigError(
            f"SellerConfig.token {token} is not an ERC-3009 token with an EIP-712 domain "
            f"(authorizationState or DOMAIN_SEPARATOR failed: {exc})"
        ) from None
    domain = TokenDomain(
        name=config.token_name,
        version=config.token_version,
        chain_id=config.chain_id,
        verifying_contract=token,  # checksummed by SellerConfig
    )
    if separator != domain.separator():
        name, version = _text(chain, token, _NAME), _text(chain, token, _VERSION)
        raise ConfigError(
            f"SellerConfig.token_name/token_version are {config.token_name!r}/{config.token_version!r}, but the "
            f"token {token} signs in another EIP-712 domain (its name() is {name!r}, its version() is {version!r}): "
            "every payment would fail at the token"
        )


def _text(chain: EscrowChain, token: str, selector: bytes) -> str | None:
    """A string-returning view of the token, or None if it has none."""
    try:
        raw = chain.call(token, selector)
        length = int.from_bytes(raw[32:64], "big")
        return raw[64 : 64 + length].decode("utf-8", errors="replace")
    except (ChainError, ValueError):
        return None
