"""A local anvil chain imitating Base Sepolia: the embedded default for the demo, benchmarks and tests.

The binary comes from the npm package `@foundry-rs/anvil` (`npm ci` in the
checkout), from `$X402_ESCROW_ANVIL`, or from PATH.
"""

from __future__ import annotations

import http.client
import os
import select
import shutil
import socket
import subprocess
import threading
import time
import weakref
from collections.abc import Iterator
from contextlib import contextmanager
from functools import cache
from pathlib import Path
from types import TracebackType
from typing import Any
from urllib.parse import urlsplit

import requests
from eth_account import Account
from web3 import HTTPProvider, Web3
from web3.types import RPCEndpoint

from escrow_py.chain.signer import LocalSigner
from escrow_py.protocol.errors import ConfigError, RpcError

BASE_SEPOLIA_CHAIN_ID = 84532

# anvil's well-known development mnemonic: its keys are public, for local chains only.
DEV_MNEMONIC = "test test test test test test test test test test test junk"
DEV_ACCOUNTS = 10

_REPO_ROOT = Path(__file__).resolve().parents[1]
_PORT_ATTEMPTS = 5


@cache
def dev_private_key(index: int) -> str:
    """The private key of anvil's dev account `index`: public knowledge, for handing to a local subprocess."""
    if not 0 <= index < DEV_ACCOUNTS:
        raise ValueError(f"anvil has dev accounts 0-{DEV_ACCOUNTS - 1}, not {index}")
    Account.enable_unaudited_hdwallet_features()
    account = Account.from_mnemonic(DEV_MNEMONIC, account_path=f"m/44'/60'/0'/0/{index}")
    return "0x" + bytes(account.key).hex()


@cache
def dev_signer(index: int) -> LocalSigner:
    """anvil's dev account `index` (0-9), funded with ETH on every anvil chain.

    Cached: a mnemonic derivation takes milliseconds, and tests ask for the same accounts often.
    """
    return LocalSigner.from_key(dev_private_key(index))


def find_anvil() -> str:
    """Path of an anvil binary; raises ConfigError saying how to get one."""
    if env := os.environ.get("X402_ESCROW_ANVIL"):
        return env
    # Prefer the platform binary over the npm `bin` shim: it skips a node start.
    for platform_dir in sorted((_REPO_ROOT / "node_modules" / "@foundry-rs").glob("anvil-*")):
        binary = platform_dir / "bin" / "anvil"
        if binary.is_file() and os.access(binary, os.X_OK):
            return str(binary)
    for candidate in (str(_REPO_ROOT / "node_modules" / ".bin" / "anvil"), shutil.which("anvil")):
        if candidate and Path(candidate).is_file():
            return candidate
    raise ConfigError("no anvil binary: run `make bootstrap` (npm install) in the checkout, or set X402_ESCROW_ANVIL")


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class Anvil:
    """A running anvil process on a loopback port; stop it with `stop()` or a `with` block."""

    def __init__(
        self,
        *,
        chain_id: int = BASE_SEPOLIA_CHAIN_ID,
        block_time: float | None = None,
        port: int | None = None,
        extra_args: list[str] | None = None,
        startup_timeout: float = 30.0,
    ) -> None:
        self.chain_id = chain_id
        # A free port can be taken between free_port() and anvil's bind (parallel test workers start
        # chains at once): with no port asked for, such a start is tried again on another port.
        for attempt in range(1 if port else _PORT_ATTEMPTS):
            self.port = port or free_port()
            self.url = f"http://127.0.0.1:{self.port}"
            args = [
                find_anvil(),
                "--host", "127.0.0.1",
                "--port", str(self.port),
                "--chain-id", str(chain_id),
                "--mnemonic", DEV_MNEMONIC,
                "--accounts", str(DEV_ACCOUNTS),
                "--silent",
            ]  # fmt: skip
            if block_time is not None:
                args += ["--block-time", str(block_time)]
            args += extra_args or []
            self._process = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
            try:
                self._wait_ready(startup_timeout)
                return
            except RpcError as exc:
                if port or attempt == _PORT_ATTEMPTS - 1 or "in use" not in str(exc).lower():
                    raise

    def _wait_ready(self, timeout: float) -> None:
        w3 = self.web3()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self._process.poll() is not None:
                err = self._process.stderr.read().decode(errors="replace") if self._process.stderr else ""
                raise RpcError(f"anvil exited with code {self._process.returncode}: {err.strip()}")
            try:
                if w3.eth.chain_id == self.chain_id:
                    return
            except Exception:  # noqa: BLE001 - not listening yet
                time.sleep(0.05)
        self.stop()
        raise RpcError(f"anvil did not answer on {self.url} within {timeout:.0f}s")

    def web3(self, timeout: float = 30.0) -> Web3:
        return Web3(LocalNodeProvider(self.url, timeout))

    def alive(self) -> bool:
        return self._process.poll() is None

    @property
    def pid(self) -> int:
        return self._process.pid

    def stop(self) -> None:
        if self._process.poll() is None:
            self._process.terminate()
            try:
                self._process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self._process.kill()
                self._process.wait()
        if self._process.stderr:
            self._process.stderr.close()

    def __enter__(self) -> Anvil:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()


@contextmanager
def running_anvil(**kwargs: object) -> Iterator[Anvil]:
    node = Anvil(**kwargs)  # type: ignore[arg-type]
    try:
        yield node
    finally:
        node.stop()


_JSON = {"Content-Type": "application/json"}


class LocalNodeProvider(HTTPProvider):
    """web3's HTTPProvider for a node on this machine (anvil), on keep-alive http.client connections.

    Through requests a call costs about 1 ms of CPU against anvil (the proxy settings looked up in the
    environment, cookie jars, adapters), ten times http.client's; the tests, the demo and the benchmarks make
    tens of thousands of calls. No proxy, TLS or redirect is ever involved on 127.0.0.1. The roles keep their
    own provider (escrow_py.chain.rpc.DeadlineHTTPProvider). Failures are raised as requests' exceptions, as
    HTTPProvider raises them; `timeout` applies to each connect and read, as requests' does.

    Each call takes an idle connection (or opens one) and puts it back once answered, so threads share them
    and none is left open by a thread that ended; they are closed with the provider (`close`).
    """

    def __init__(self, url: str, timeout: float = 30.0) -> None:
        super().__init__(url, request_kwargs={"timeout": timeout})
        parts = urlsplit(url)
        self._host, self._port, self._path = parts.hostname or "127.0.0.1", parts.port or 80, parts.path or "/"
        self._timeout = timeout
        self._idle: list[http.client.HTTPConnection] = []
        self._lock = threading.Lock()
        weakref.finalize(self, _close_all, self._idle, self._lock)

    def post(self, body: bytes, what: str = "post") -> bytes:
        """POST `body` to the node; the answer's body (requests' exceptions on failure, `what` in their message)."""
        connection = self._take()
        try:
            connection.request("POST", self._path, body=body, headers=_JSON)
            response = connection.getresponse()
            answer = response.read()
        except (OSError, http.client.HTTPException) as exc:
            connection.close()
            if isinstance(exc, TimeoutError):
                raise requests.exceptions.ReadTimeout(f"{what}: {exc}") from exc
            raise requests.exceptions.ConnectionError(f"{what}: {type(exc).__name__}: {exc}") from exc
        with self._lock:
            self._idle.append(connection)
        if response.status != 200:
            raise requests.exceptions.HTTPError(f"{what}: HTTP {response.status} {response.reason}")
        return answer

    def _make_request(self, method: RPCEndpoint, request_data: bytes) -> bytes:
        return self.post(request_data, method)

    def make_batch_request(self, batch_requests: list[tuple[RPCEndpoint, Any]]) -> Any:
        """As HTTPProvider's, on this provider's connections: the answers in the order of the requests."""
        answers = self.decode_rpc_response(self.post(self.encode_batch_rpc_request(batch_requests), "batch"))
        if not isinstance(answers, list):  # the node refused the batch with one error object
            return answers
        return sorted(answers, key=lambda answer: int(answer["id"]))

    def close(self) -> None:
        """Close the idle connections (a later call opens a new one)."""
        _close_all(self._idle, self._lock)

    def _take(self) -> http.client.HTTPConnection:
        with self._lock:
            connection = self._idle.pop() if self._idle else None
        if connection is None:
            return http.client.HTTPConnection(self._host, self._port, timeout=self._timeout)
        if connection.sock is not None and select.select([connection.sock], [], [], 0)[0]:
            # Readable while idle: the node closed it (or sent what nobody asked for). Reopened, as urllib3 does.
            connection.close()
        return connection


def _close_all(connections: list[http.client.HTTPConnection], lock: threading.Lock) -> None:
    with lock:
        closing, connections[:] = list(connections), []
    for connection in closing:
        connection.close()
