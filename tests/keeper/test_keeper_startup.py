"""Fail at start, not at the first refund; and never a traceback for a fault of the surroundings.

`x402-escrow keeper run` checks, before its first cycle, that the RPC serves the configured
network, that every escrow address holds X402Escrow's code, that some token is allowed,
and that the key can pay for gas. Each failure exits 2 with one line naming the setting
and the value found. So do a busy metrics port, an RPC that is down, a database that cannot
be opened and a setting of the wrong type.
"""

from __future__ import annotations

import os
import socket
from pathlib import Path

import pytest
from eth_account import Account
from fixtures.chain import Chain

from escrow_devtools.anvil import Anvil, dev_signer, free_port
from escrow_devtools.artifacts import deploy
from escrow_py.chain.tx import TxSender
from escrow_py.keeper import KeeperConfig
from escrow_py.protocol.errors import ConfigError, RpcError

from .kit import cli, keeper_env, make_keeper


def _run(chain: Chain, *args: str, env: dict[str, str] | None = None, rpc: str | None = None) -> tuple[int, str]:
    out = cli("keeper", "run", "--rpc", rpc or chain.node.url, "--escrow", chain.escrow.address, "--token",
              chain.token.address, *args, env=env or keeper_env())  # fmt: skip
    assert "Traceback" not in out.stderr + out.stdout, out.stderr
    return out.returncode, out.stderr.strip().splitlines()[-1] if out.stderr.strip() else ""


def test_a_wrong_network_is_refused_naming_both_chain_ids(chain: Chain, tmp_path: Path) -> None:
    code, message = _run(chain, "--network", "eip155:8453", "--database", str(tmp_path / "k.sqlite"))
    assert code == 2
    assert "network = 'eip155:8453' (chain id 8453)" in message and "serves chain id 84532" in message


def test_an_escrow_address_without_x402escrow_code_is_refused(chain: Chain, tmp_path: Path) -> None:
    eoa = dev_signer(5).address
    keeper = make_keeper(chain, tmp_path / "k.sqlite", escrows=eoa)
    with pytest.raises(ConfigError, match=f"escrows: {eoa} holds no contract code on chain 84532"):
        keeper.check()
    token = make_keeper(chain, tmp_path / "k.sqlite", escrows=chain.token.address)
    with pytest.raises(ConfigError, match=f"escrows: {chain.token.address} on chain 84532 is not an X402Escrow: its "
                       "runtime code hashes to 0x[0-9a-f]{64}, the shipped X402Escrow's to 0x"):  # fmt: skip
        token.check()
    code, message = cli_escrow = _run(chain, "--escrow", eoa, "--database", str(tmp_path / "k.sqlite"))
    assert code == 2 and "holds no contract code" in message, cli_escrow


def test_a_configured_token_that_is_not_erc3009_is_refused(chain: Chain, tmp_path: Path) -> None:
    """A typo in `tokens` would refund nothing, silently: an address with no code or without ERC-3009 fails."""
    eoa = dev_signer(5).address
    nothing = make_keeper(chain, tmp_path / "k.sqlite", tokens=eoa)
    with pytest.raises(ConfigError, match=f"tokens: {eoa} holds no contract code on chain 84532"):
        nothing.check()
    # The escrow itself has code but no authorizationState(): not a token anyone could have deposited.
    not_a_token = make_keeper(chain, tmp_path / "k.sqlite", tokens=chain.escrow.address)
    with pytest.raises(ConfigError, match=f"tokens: {chain.escrow.address} on chain 84532 is not an ERC-3009 token"):
        not_a_token.check()
    make_keeper(chain, tmp_path / "k.sqlite", tokens=chain.token.address).check()  # the real token passes
    code, message = _run(chain, "--token", eoa, "--database", str(tmp_path / "k.sqlite"))
    assert code == 2 and f"tokens: {eoa} holds no contract code" in message, message


def test_a_key_with_no_gas_is_refused_naming_its_balance(chain: Chain, tmp_path: Path) -> None:
    key = Account.create()
    env = {**keeper_env(), "X402_ESCROW_PRIVATE_KEY": "0x" + bytes(key.key).hex()}
    code, message = _run(chain, "--database", str(tmp_path / "k.sqlite"), env=env)
    assert code == 2
    assert f"keeper key {key.address}: balance 0 wei on chain 84532" in message and "fund it" in message
    assert bytes(key.key).hex() not in message


def test_an_empty_token_allowlist_is_refused(tmp_path: Path) -> None:
    """On a chain the deployment registry knows no token for, a keeper with no `tokens` would refund nothing."""
    with Anvil(chain_id=31337) as node:
        escrow = deploy(TxSender(node.web3(), dev_signer(0)), "X402Escrow")
        out = cli("keeper", "run", "--rpc", node.url, "--escrow", escrow, "--network", "eip155:31337",
                  "--database", str(tmp_path / "k.sqlite"), env=keeper_env())  # fmt: skip
    assert out.returncode == 2 and "Traceback" not in out.stderr
    assert "tokens: the deployment registry knows no token on eip155:31337" in out.stderr


def test_a_busy_metrics_port_is_a_message_not_a_traceback(chain: Chain, tmp_path: Path) -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        code, message = _run(chain, "--metrics", f"127.0.0.1:{port}", "--database", str(tmp_path / "k.sqlite"))
    assert code == 2
    assert f"metrics = '127.0.0.1:{port}': cannot listen there" in message


def test_an_rpc_that_is_down_is_a_message_not_a_traceback(chain: Chain, tmp_path: Path) -> None:
    down = f"http://127.0.0.1:{free_port()}"
    code, message = _run(chain, "--database", str(tmp_path / "k.sqlite"), rpc=down)
    assert code == 2 and f"rpc_url = '{down}': the node does not answer" in message
    status = cli("keeper", "status", "--rpc", down, "--escrow", chain.escrow.address,
                 "--database", str(tmp_path / "k.sqlite"))  # fmt: skip
    assert status.returncode == 2 and "Traceback" not in status.stderr
    assert f"rpc_url = '{down}': the node does not answer" in status.stderr
    keeper = make_keeper(chain, tmp_path / "k.sqlite", rpc_url=down)
    with pytest.raises(RpcError, match="the node does not answer"):
        keeper.check()


@pytest.mark.parametrize(
    ("toml", "expected"),
    [
        ('poll_interval = "fast"', 'poll_interval = "fast": expected a number of seconds above 0'),
        ("poll_interval = -1", "poll_interval = -1: expected a number of seconds above 0"),
        ("batch_size = 10000", "batch_size = 10000: expected an integer from 1 to 468"),
        ("batch_size = 2.5", "batch_size = 2.5: expected an integer from 1 to 468"),
        ("confirmations = true", "confirmations = true: expected an integer of at least 1"),
        ('start_block = "soon"', 'start_block = "soon": expected an integer of at least 0'),
        ("escrows = 5", "escrows = 5: expected a list of addresses or a comma-separated string"),
        ('log_json = "maybe"', 'log_json = "maybe": expected true or false'),
        ('rpc_timeout = "nan"', 'rpc_timeout = "nan": expected a number of seconds above 0'),
        ('network = "base"', "network = 'base': expected a CAIP-2 id such as eip155:84532"),
    ],
)
def test_a_setting_of_the_wrong_type_is_named_with_its_value(tmp_path: Path, toml: str, expected: str) -> None:
    config = tmp_path / "keeper.toml"
    escrows = "" if toml.startswith("escrows") else 'escrows = "0x' + "11" * 20 + '"\n'
    config.write_text(f'[keeper]\nrpc_url = "http://127.0.0.1:1"\n{escrows}{toml}\n')
    with pytest.raises(ConfigError) as info:
        KeeperConfig.load({}, config_file=str(config), environ={})
    assert str(info.value) == expected
    out = cli("keeper", "run", "--config", str(config), env=keeper_env())
    assert out.returncode == 2 and out.stderr.strip() == f"x402-escrow: {expected}"


def test_settings_from_the_environment_are_checked_the_same_way(tmp_path: Path) -> None:
    env = {**keeper_env(), "X402_KEEPER_BATCH_SIZE": "lots", "X402_KEEPER_POLL_INTERVAL": "2"}
    out = cli("keeper", "run", "--rpc", "http://127.0.0.1:1", "--escrow", "0x" + "11" * 20, env=env)
    assert out.returncode == 2 and 'batch_size = "lots": expected an integer from 1 to 468' in out.stderr
    out = cli("keeper", "run", "--rpc", "http://127.0.0.1:1", "--escrow", "0x" + "11" * 20, "--poll-interval",
              "fast", env=keeper_env())  # fmt: skip
    assert out.returncode == 2 and 'poll_interval = "fast": expected a number of seconds above 0' in out.stderr


def test_a_database_that_cannot_be_opened_is_a_message_not_a_traceback(chain: Chain, tmp_path: Path) -> None:
    directory = tmp_path / "a-directory"
    directory.mkdir()
    code, message = _run(chain, "--database", str(directory))
    assert code == 2 and f"database = '{directory}': cannot open it as SQLite" in message
    assert os.path.isdir(directory)
