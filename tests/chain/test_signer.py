"""Key loading: clear errors that never contain the key, and a repr that shows only the address."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from eth_account import Account
from eth_typing import HexStr

from escrow_py.chain.signer import DEFAULT_KEY_ENV, KeyLoadError, LocalSigner, Signer, load_signer
from escrow_py.protocol.errors import ConfigError, EscrowError

# anvil's public dev key 8: a test key only.
KEY = "0xdbda1821b80551c9d65939329250298aa3472ba22feea921c0cf5d620ea67b97"
ADDRESS = Account.from_key(KEY).address


def test_from_env_loads_the_key(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TEST_KEY", f"  {KEY}\n")
    signer = LocalSigner.from_env("TEST_KEY")
    assert signer.address == ADDRESS
    assert isinstance(signer, Signer)


def test_from_env_missing_variable_names_it(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("TEST_KEY", raising=False)
    with pytest.raises(KeyLoadError, match="TEST_KEY is not set"):
        LocalSigner.from_env("TEST_KEY")


@pytest.mark.parametrize("bad", [KEY[:-2], KEY + "00", "0x" + "zz" * 32, "0x" + "00" * 32])
def test_from_env_invalid_key_error_never_contains_it(monkeypatch: pytest.MonkeyPatch, bad: str) -> None:
    monkeypatch.setenv("TEST_KEY", bad)
    with pytest.raises(KeyLoadError) as info:
        LocalSigner.from_env("TEST_KEY")
    error = info.value
    assert "TEST_KEY" in str(error)
    for text in (str(error), repr(error), str(error.__cause__), str(error.__context__)):
        assert bad.removeprefix("0x")[:16] not in text
    assert error.__cause__ is None and error.__suppress_context__
    assert isinstance(error, ConfigError) and isinstance(error, EscrowError)


def test_load_signer_defaults_to_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(DEFAULT_KEY_ENV, KEY)
    assert load_signer().address == ADDRESS


def _keystore(tmp_path: Path, passphrase: str) -> Path:
    path = tmp_path / "key.json"
    path.write_text(json.dumps(Account.encrypt(HexStr(KEY), passphrase, iterations=2)))
    return path


def test_from_keystore_with_passphrase_argument_and_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = _keystore(tmp_path, "correct horse")
    assert LocalSigner.from_keystore(path, "correct horse").address == ADDRESS
    monkeypatch.setenv("TEST_PASS", "correct horse")
    assert LocalSigner.from_keystore(path, passphrase_env="TEST_PASS").address == ADDRESS
    assert load_signer(keystore=path, passphrase_env="TEST_PASS").address == ADDRESS


def test_from_keystore_wrong_passphrase(tmp_path: Path) -> None:
    path = _keystore(tmp_path, "correct horse")
    with pytest.raises(KeyLoadError, match="wrong passphrase") as info:
        LocalSigner.from_keystore(path, "battery staple")
    assert "correct horse" not in str(info.value) and "battery staple" not in str(info.value)
    assert KEY[2:18] not in str(info.value)


def test_from_keystore_missing_passphrase_names_the_variable(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("TEST_PASS", raising=False)
    with pytest.raises(KeyLoadError, match="set TEST_PASS"):
        LocalSigner.from_keystore(_keystore(tmp_path, "x"), passphrase_env="TEST_PASS")


def test_from_keystore_unreadable_or_not_json(tmp_path: Path) -> None:
    with pytest.raises(KeyLoadError, match="cannot read keystore"):
        LocalSigner.from_keystore(tmp_path / "absent.json", "x")
    garbage = tmp_path / "garbage.json"
    garbage.write_text("not json")
    with pytest.raises(KeyLoadError, match="is not JSON"):
        LocalSigner.from_keystore(garbage, "x")


def test_repr_shows_only_the_address() -> None:
    signer = LocalSigner.from_key(KEY)
    assert repr(signer) == f"LocalSigner({ADDRESS})"
    assert KEY[2:] not in repr(signer) and KEY[2:] not in str(signer)
    assert not hasattr(signer, "__dict__")  # nothing else to dump


def test_from_key_invalid_error_never_contains_it() -> None:
    with pytest.raises(KeyLoadError) as info:
        LocalSigner.from_key("0x" + "ab" * 31)
    assert "ab" * 8 not in str(info.value)
