"""The connection to the node, with one total deadline per call, and plain JSON-RPC reads for the hot paths.

`connect(url, deadline=...)` is the Web3 every role should use. web3's own
HTTPProvider retries a timed-out call five times with its timeout applying to each
attempt, so a node that accepts connections and never answers held a paid request
for about 152 s with a 30 s timeout. `DeadlineHTTPProvider` gives every call one
deadline for the whole of it (connecting, waiting, reading; no retry past it) and
raises `RpcTimeout` when it passes.

web3.py's `w3.eth.call` runs every request through its middleware and formatters,
which costs about four times the node's own answer time on a local chain (3.8 ms
against 0.9 ms, measured with anvil). The per-payment reads (balances,
authorization states, escrow states, simulations, chain time) go straight to the
provider instead; everything else keeps using web3. Independent reads of one payment
go as one JSON-RPC batch (`batch`): one HTTP round trip and one worker thread, where
sending them side by side cost a thread and a connection each.
"""

from __future__ import annotations

import concurrent.futures
import json
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar
from urllib.parse import urlsplit

import requests
from eth_utils.address import to_checksum_address
from web3 import HTTPProvider, Web3
from web3.types import RPCEndpoint

from escrow_py.protocol.errors import RpcError, RpcTimeout

DEFAULT_DEADLINE = 5.0

_T = TypeVar("_T")
_U = TypeVar("_U")
# Independent reads of one request, sent at once (`gather`): one round trip instead of several.
_GATHER = concurrent.futures.ThreadPoolExecutor(16, thread_name_prefix="escrow-gather")


class DeadlineHTTPProvider(HTTPProvider):
    """An HTTP JSON-RPC provider whose every call ends within `deadline` seconds, whatever the node does.

    The request runs on a worker thread and the caller waits for it at most `deadline`:
    a read timeout alone is per socket read, so a node trickling bytes could outlast it.
    A worker left behind by a hung node ends with its own socket timeout (the same
    deadline); at most `max_workers` calls are in progress at once.
    """

    def __init__(self, endpoint_uri: str, deadline: float = DEFAULT_DEADLINE, *, max_workers: int = 64) -> None:
        if not deadline > 0:
            raise ValueError(f"deadline must be > 0 seconds, got {deadline!r}")
        super().__init__(endpoint_uri, request_kwargs={"timeout": deadline}, exception_retry_configuration=None)
        self.deadline = deadline
        self._shown = redact_url(endpoint_uri)
        self._max_workers = max_workers
        self._pool: concurrent.futures.ThreadPoolExecutor | None = None
        self._pool_lock = threading.Lock()

    def _workers(self) -> concurrent.futures.ThreadPoolExecutor:
        with self._pool_lock:
            if self._pool is None:
                self._pool = concurrent.futures.ThreadPoolExecutor(self._max_workers, thread_name_prefix="escrow-rpc")
            return self._pool

    def _make_request(self, method: RPCEndpoint, request_data: bytes) -> bytes:
        future = self._workers().submit(super()._make_request, method, request_data)
        try:
            return future.result(timeout=self.deadline)
        except concurrent.futures.TimeoutError:
            future.cancel()
            raise RpcTimeout(f"{method}: no answer from {self._shown} within {self.deadline:g}s") from None
        except requests.exceptions.Timeout:
            # requests' own timeout (the same deadline) can fire first on a loaded machine: the same fault.
            raise RpcTimeout(f"{method}: no answer from {self._shown} within {self.deadline:g}s") from None
        except OSError as exc:  # refused, reset, HTTP error status: requests' exceptions are OSErrors
            raise RpcError(f"{method}: {self._shown} unreachable: {type(exc).__name__}") from None


def gather(*calls: Callable[[], _T]) -> list[_T | BaseException]:
    """Run independent blocking calls (chain reads) at once; each one's result, or the exception it raised,
    in order. The caller decides in its own order which failure counts first."""
    futures = [_GATHER.submit(call) for call in calls]
    results: list[_T | BaseException] = []
    for future in futures:
        try:
            results.append(future.result())
        except Exception as exc:  # noqa: BLE001 - handed back; the caller raises it in its own order
            results.append(exc)
    return results


def value(result: _T | BaseException) -> _T:
    """A gathered or batched read's value; the exception it met (the node failed) raised as it was."""
    if isinstance(result, BaseException):
        raise result
    return result


def both(first: Callable[[], _T], second: Callable[[], _U]) -> tuple[_T, _U]:
    """Two independent blocking reads at once; raises the first one's exception, else the second's."""
    a, b = gather(first, second)
    return value(a), value(b)  # type: ignore[return-value]


def redact_url(url: str) -> str:
    """scheme://host[:port] of an RPC URL: providers put API keys in the path or query, never shown."""
    parts = urlsplit(url)
    host = parts.hostname or "?"
    return f"{parts.scheme}://{host}{f':{parts.port}' if parts.port else ''}" + (
        "/..." if parts.path.strip("/") else ""
    )


def connect(url: str, *, deadline: float = DEFAULT_DEADLINE) -> Web3:
    """A Web3 on `url` whose every call ends within `deadline` seconds (DeadlineHTTPProvider)."""
    return Web3(DeadlineHTTPProvider(url, deadline))


def request(w3: Web3, method: str, params: list[Any]) -> Any:
    """One JSON-RPC request; its `result`, or RpcError carrying the node's error object."""
    try:
        response = w3.provider.make_request(RPCEndpoint(method), params)
    except RpcError:
        raise  # DeadlineHTTPProvider's own, already typed (an RpcTimeout is an OSError too: keep it one)
    except OSError as exc:
        raise RpcError(f"{method} failed: {exc}") from exc
    error = response.get("error")
    if error is not None:
        raise NodeError(method, error)
    return response.get("result")


class NodeError(RpcError):
    """The node answered with an error object; `revert_data` is set when it is an EVM revert."""

    def __init__(self, method: str, error: Any) -> None:
        self.error = error
        data = error.get("data") if isinstance(error, dict) else None
        if isinstance(data, dict):  # some nodes nest it: {"data": {"data": "0x..."}}
            data = data.get("data")
        self.revert_data: bytes | None = (
            bytes.fromhex(data[2:]) if isinstance(data, str) and data.startswith("0x") else None
        )
        message = error.get("message", error) if isinstance(error, dict) else error
        super().__init__(f"{method} failed: {message}")

    @property
    def is_revert(self) -> bool:
        message = str(self.error.get("message", "")) if isinstance(self.error, dict) else ""
        return self.revert_data is not None or "revert" in message.lower()


@dataclass(frozen=True, slots=True)
class Request:
    """One JSON-RPC request, to send alone (`send`) or with others in one round trip (`batch`)."""

    method: str
    params: list[Any]


def send(w3: Web3, one: Request) -> Any:
    return request(w3, one.method, one.params)


def batch(w3: Web3, requests: Sequence[Request]) -> list[Any]:
    """Independent requests in one round trip (a JSON-RPC batch, within the provider's deadline): each
    one's `result`, or the RpcError it met (NodeError for the node's error object), in order; the caller
    decides in its own order which failure counts first.

    A plain HTTPProvider (the development tools' and tests' own) batches too, its transport errors typed
    as DeadlineHTTPProvider types them. A node that refuses batches (some providers answer a batch with one
    error object), or a provider that is not HTTP, gets the requests one by one, at once (`gather`).
    """
    provider = w3.provider
    if len(requests) == 1 or not isinstance(provider, HTTPProvider):
        return _one_by_one(w3, requests)
    body = [{"jsonrpc": "2.0", "id": i, "method": r.method, "params": r.params} for i, r in enumerate(requests)]
    try:
        raw = provider._make_request(RPCEndpoint("batch"), json.dumps(body).encode())
        answers = json.loads(raw)
    except RpcError as exc:  # the whole round trip failed: every request met it
        return [exc] * len(requests)
    except OSError as exc:  # the same, from a plain HTTPProvider (requests' errors are OSErrors)
        shown = redact_url(str(provider.endpoint_uri))
        return [RpcError(f"batch: {shown} unreachable: {type(exc).__name__}")] * len(requests)
    except ValueError as exc:  # not JSON: the same for every request
        return [RpcError(f"batch of {len(requests)}: unreadable answer ({exc})")] * len(requests)
    if not isinstance(answers, list):  # refused as a batch: ask one by one
        return _one_by_one(w3, requests)
    return _matched(requests, answers)


def _one_by_one(w3: Web3, requests: Sequence[Request]) -> list[Any]:
    """Each request on its own, as `batch` answers: one in this thread, several at once (`gather`)."""
    if len(requests) != 1:
        return gather(*(lambda one=one: send(w3, one) for one in requests))
    try:
        return [send(w3, requests[0])]
    except Exception as exc:  # noqa: BLE001 - handed back, as a batch's failures are
        return [exc]


def _matched(requests: Sequence[Request], answers: list[Any]) -> list[Any]:
    """A batch's answers in the order of its requests (a node may answer in any order), errors as NodeError."""
    by_id = {a.get("id"): a for a in answers if isinstance(a, dict)}
    results: list[Any] = []
    for i, one in enumerate(requests):
        answer = by_id.get(i)
        if answer is None:
            results.append(RpcError(f"{one.method}: no answer in the batch"))
        elif answer.get("error") is not None:
            results.append(NodeError(one.method, answer["error"]))
        else:
            results.append(answer.get("result"))
    return results


def _block(block: str | int) -> str:
    return block if isinstance(block, str) else hex(block)


def call_request(to: str, data: bytes, *, sender: str | None = None, block: str | int = "latest") -> Request:
    tx: dict[str, str] = {"to": to_checksum_address(to), "data": "0x" + data.hex()}
    if sender is not None:
        tx["from"] = to_checksum_address(sender)
    return Request("eth_call", [tx, _block(block)])


def call_output(result: Any) -> bytes:
    """The return data of an eth_call's `result`."""
    return bytes.fromhex(str(result)[2:])


def call(w3: Web3, to: str, data: bytes, *, sender: str | None = None, block: str | int = "latest") -> bytes:
    """eth_call; raises NodeError (`is_revert`, `revert_data`) when the call reverts."""
    return call_output(send(w3, call_request(to, data, sender=sender, block=block)))


def estimate_gas_request(to: str | None, data: bytes, *, sender: str) -> Request:
    tx: dict[str, str] = {"from": to_checksum_address(sender), "data": "0x" + data.hex()}
    if to is not None:
        tx["to"] = to_checksum_address(to)
    return Request("eth_estimateGas", [tx])
