"""Circle's USDC (FiatToken v2.2 behind its proxy) on a local chain, deployed as Circle deploys it.

    usdc = deploy_fiat_token(admin, owner)           # library, implementation, proxy, V1-V2_2 initializers
    mint_fiat_token(owner, usdc, buyer, 10**12)      # `owner` is also the master minter and a minter

The artifacts are Circle's own code, built from its public sources (see
`escrow_devtools/artifacts/circle/NOTICE.md`): the second gas baseline of `bench gas`
and a real USDC to test the escrow against (blacklist, EIP-1271 wallets, the proxy's cost).
"""

from __future__ import annotations

from typing import Any

from eth_typing import ChecksumAddress
from eth_utils.address import to_checksum_address
from hexbytes import HexBytes
from web3 import Web3
from web3.types import TxReceipt

from escrow_devtools.artifacts import deploy, load_artifact
from escrow_py.chain.tx import TxSender

UINT256_MAX = 2**256 - 1


def linked_bytecode(artifact: dict[str, Any], libraries: dict[str, str]) -> str:
    """The artifact's creation bytecode with each library placeholder replaced by its address."""
    # The placeholders (`__$<hash>$__`) are hex text, not bytes: patch the text at each byte offset.
    text = str(artifact["bytecode"]).removeprefix("0x")
    for by_name in artifact.get("linkReferences", {}).values():
        for library, places in by_name.items():
            if library not in libraries:
                raise KeyError(f"{artifact['contractName']} links {library}: give its address")
            address = to_checksum_address(libraries[library])[2:].lower()
            for place in places:
                start, length = 2 * int(place["start"]), 2 * int(place["length"])
                text = text[:start] + address + text[start + length :]
    if "__" in text:
        raise ValueError(f"{artifact['contractName']}: a library placeholder is left unlinked")
    return "0x" + text


def _fiat(w3: Web3, address: str) -> Any:
    return w3.eth.contract(address=to_checksum_address(address), abi=load_artifact("FiatTokenV2_2")["abi"])


def _call(sender: TxSender, token: str, fn: str, *args: Any) -> TxReceipt:
    data = bytes(HexBytes(_fiat(sender.w3, token).encode_abi(fn, args=list(args))))
    return sender.transact(token, data)


def deploy_fiat_token(
    admin: TxSender,
    owner: TxSender,
    *,
    name: str = "USDC",
    symbol: str = "USDC",
    decimals: int = 6,
) -> ChecksumAddress:
    """Deploy FiatTokenV2_2 behind a FiatTokenProxy and initialise it through V2_2; returns the proxy.

    `admin` deploys and administers the proxy (a proxy admin may not call the token itself);
    `owner` becomes owner, master minter, pauser, blacklister and, for `mint_fiat_token`, a
    minter with an unlimited allowance. The EIP-712 domain is `name`, version "2" ("USDC"
    on Base Sepolia, "USD Coin" on Base).
    """
    library = deploy(admin, "SignatureChecker")
    implementation_artifact = load_artifact("FiatTokenV2_2")
    code = linked_bytecode(implementation_artifact, {"SignatureChecker": library})
    receipt = admin.transact(None, bytes.fromhex(code[2:]))
    implementation = receipt["contractAddress"]
    if implementation is None:
        raise RuntimeError("FiatTokenV2_2 deployment produced no contract address")
    proxy = deploy(admin, "FiatTokenProxy", to_checksum_address(implementation))
    who = owner.address
    _call(owner, proxy, "initialize", name, symbol, "USD", decimals, who, who, who, who)
    _call(owner, proxy, "initializeV2", name)
    _call(owner, proxy, "initializeV2_1", who)
    _call(owner, proxy, "initializeV2_2", [], symbol)
    _call(owner, proxy, "configureMinter", who, UINT256_MAX)
    return proxy


def mint_fiat_token(owner: TxSender, token: str, to: str, amount: int) -> TxReceipt:
    """Mint from the minter `deploy_fiat_token` configured."""
    return _call(owner, token, "mint", to_checksum_address(to), amount)


def blacklist(owner: TxSender, token: str, account: str) -> TxReceipt:
    """Freeze `account`, as Circle's blacklister does: it can neither send nor receive."""
    return _call(owner, token, "blacklist", to_checksum_address(account))


def unblacklist(owner: TxSender, token: str, account: str) -> TxReceipt:
    """Lift the freeze on `account`."""
    return _call(owner, token, "unBlacklist", to_checksum_address(account))
