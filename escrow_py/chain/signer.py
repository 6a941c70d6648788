"""Where keys come from, and the one thing every role asks of them: a signature.

A `Signer` signs EIP-712 messages and transactions; the key itself never leaves
it. Keys come from an encrypted keystore file (passphrase from the environment)
or from an environment variable, never from code or a config file in clear.
`repr()` of a signer shows the address only, so logs cannot leak a key.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

from eth_account import Account
from eth_account.messages import encode_typed_data
from eth_account.signers.local import LocalAccount
from eth_typing import ChecksumAddress

from escrow_py.protocol.eip3009 import TypedDataSigner
from escrow_py.protocol.errors import ConfigError

DEFAULT_KEY_ENV = "X402_ESCROW_PRIVATE_KEY"
DEFAULT_PASSPHRASE_ENV = "X402_ESCROW_KEYSTORE_PASSPHRASE"  # noqa: S105 - a variable name, not a secret


class KeyLoadError(ConfigError):
    """A key could not be loaded; the message says from where and why, never the key."""


@runtime_checkable
class Signer(TypedDataSigner, Protocol):
    """Signs for one address (EIP-712 messages, and transactions). Implement it to plug in a KMS or a
    hardware wallet."""

    def sign_transaction(self, tx: dict[str, Any]) -> bytes:
        """The raw signed transaction, ready for `eth_sendRawTransaction`."""
        ...


class LocalSigner:
    """A key held in this process's memory."""

    __slots__ = ("_account",)

    def __init__(self, account: LocalAccount) -> None:
        self._account = account

    @classmethod
    def from_key(cls, private_key: str | bytes) -> LocalSigner:
        try:
            return cls(Account.from_key(private_key))
        except (ValueError, TypeError):
            # The underlying message may quote the input: don't chain it.
            raise KeyLoadError("not a valid secp256k1 private key") from None

    @classmethod
    def from_env(cls, var: str = DEFAULT_KEY_ENV) -> LocalSigner:
        value = os.environ.get(var)
        if not value:
            raise KeyLoadError(f"environment variable {var} is not set (expected a 0x-prefixed private key)")
        try:
            return cls.from_key(value.strip())
        except KeyLoadError:
            raise KeyLoadError(f"environment variable {var} does not hold a valid private key") from None

    @classmethod
    def from_keystore(
        cls, path: str | Path, passphrase: str | None = None, passphrase_env: str = DEFAULT_PASSPHRASE_ENV
    ) -> LocalSigner:
        """Decrypt an Ethereum keystore (v3) JSON file; the passphrase defaults to `passphrase_env`."""
        file = Path(path).expanduser()
        try:
            keystore = json.loads(file.read_text())
        except OSError as exc:
            raise KeyLoadError(f"cannot read keystore {file}: {exc.strerror}") from None
        except json.JSONDecodeError:
            raise KeyLoadError(f"keystore {file} is not JSON") from None
        if passphrase is None:
            passphrase = os.environ.get(passphrase_env)
            if passphrase is None:
                raise KeyLoadError(f"keystore {file} needs a passphrase: set {passphrase_env}")
        try:
            key = Account.decrypt(keystore, passphrase)
        except ValueError:
            raise KeyLoadError(f"keystore {file}: wrong passphrase or corrupt file") from None
        return cls(Account.from_key(key))

    @property
    def address(self) -> ChecksumAddress:
        return self._account.address

    def sign_typed_data(self, typed_data: dict[str, Any]) -> bytes:
        signed = self._account.sign_message(encode_typed_data(full_message=typed_data))
        return bytes(signed.signature)

    def sign_transaction(self, tx: dict[str, Any]) -> bytes:
        return bytes(self._account.sign_transaction(tx).raw_transaction)

    def __repr__(self) -> str:
        return f"LocalSigner({self.address})"


def load_signer(
    *, keystore: str | Path | None = None, key_env: str = DEFAULT_KEY_ENV, passphrase_env: str = DEFAULT_PASSPHRASE_ENV
) -> LocalSigner:
    """The usual resolution for a command-line role: a keystore if given, else the environment."""
    if keystore is not None:
        return LocalSigner.from_keystore(keystore, passphrase_env=passphrase_env)
    return LocalSigner.from_env(key_env)
