"""A loopback JSON-RPC proxy in front of anvil that produces node faults on demand.

    with RpcProxy(chain.node.url) as proxy:  # proxy.url forwards everything to anvil
        proxy.mode = "blackhole"             # accepts connections, reads the request, never answers
        proxy.mode = "forward"               # the node is back (held connections are released unanswered)
        proxy.fail("eth_sendRawTransaction", {"code": -32003, "message": "nonce too low"}, times=1)
        proxy.fail_if("eth_call", lambda params: "gas" in params[0], INTERNAL_ERROR)  # errors for some params
        proxy.refuse_raw_over(6_000)         # eth_sendRawTransaction over N bytes: an error object
        proxy.drop_rate, proxy.http_error_rate = 0.1, 0.05  # connections closed unanswered, HTTP 502
        proxy.answer_errors()                # every method answers a JSON-RPC error object (NODE_ERROR)
        proxy.refuse_batches = True          # a JSON-RPC batch gets one error object (faults by method apply in one)
        proxy.seen_up_to = 41                # eth_getLogs and eth_getBlockByNumber(n) answered by a backend at block 41
        proxy.heal()                         # a faithful proxy again
        proxy.calls["eth_call"]              # how often each method was asked for; proxy.faults: faults made
        proxy.stop()                         # the node is gone: every later call fails to connect

A real node hangs, errs or goes away only when it is broken; this is the fault-injecting
stand-in the charter allows for that. Everything it forwards is anvil's own answer. It is the
one such proxy for every suite.
"""

from __future__ import annotations

import json
import random
import threading
from collections import Counter
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from types import TracebackType
from typing import Any

from escrow_devtools.anvil import LocalNodeProvider, free_port

# What a load-balanced public RPC answers when the backend behind it lags: a real error, not a revert.
NODE_ERROR = {"code": -32000, "message": "header not found"}
# A node's generic failure (-32603), e.g. on eth_getTransactionCount when its state is not ready.
INTERNAL_ERROR = {"code": -32603, "message": "internal error"}

# What a provider that takes no JSON-RPC batches answers one with.
BATCH_REFUSED = {"code": -32600, "message": "batch requests are not supported"}

_EVERY_METHOD = "*"


class RpcProxy:
    def __init__(self, upstream: str, *, seed: int = 7) -> None:
        self.upstream = upstream
        # Forwarded on kept-alive connections: a new connection (and urllib's proxy look-ups) per request cost
        # the test's process more CPU than the node spent answering.
        self._node = LocalNodeProvider(upstream)
        self.mode = "forward"
        self.requests: list[str] = []  # methods seen, in order
        self.calls: Counter[str] = Counter()  # methods seen, counted (each item of a JSON-RPC batch)
        self.faults = 0  # requests answered with an injected fault
        self.drop_rate = 0.0  # share of requests whose connection is closed unanswered
        self.http_error_rate = 0.0  # share answered with HTTP 502
        self.refuse_batches = False  # answer every JSON-RPC batch with one error object, as some providers do
        # A load-balanced endpoint's backend that has seen blocks up to this one only (None: the node's head): the
        # logs of later blocks are left out with no error, and a later block by number is null. "latest" is not.
        self.seen_up_to: int | None = None
        self._errors: dict[str, tuple[dict[str, Any], int | None]] = {}
        self._errors_if: list[tuple[str, Callable[[list[Any]], bool], dict[str, Any]]] = []
        self._raw_limit: tuple[int, str] | None = None
        self._rng = random.Random(seed)
        self._release = threading.Event()
        self._lock = threading.Lock()
        self._stopped = False
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def do_POST(self) -> None:
                if proxy._stopped:
                    # A kept-alive connection outlives the listening socket: drop it unanswered, as a dead node would.
                    self.close_connection = True
                    return
                body = self.rfile.read(int(self.headers.get("Content-Length", "0")))
                try:
                    request = json.loads(body)
                    method = str(request.get("method")) if isinstance(request, dict) else "batch"
                except ValueError:
                    request, method = None, "?"
                roll = proxy._seen(request, method)
                if proxy.mode == "blackhole":
                    proxy._release.wait(120)  # hold the connection, answer nothing
                    self.close_connection = True
                    return
                if roll < proxy.drop_rate:
                    self.close_connection = True
                    return  # no answer at all
                if roll < proxy.drop_rate + proxy.http_error_rate:
                    self._answer(b"", status=502)
                    return
                if isinstance(request, list):
                    self._answer(proxy._batch(request))
                    return
                error = proxy._take_error(method, request)
                if error is not None and isinstance(request, dict):
                    self._answer(json.dumps({"jsonrpc": "2.0", "id": request.get("id"), "error": error}).encode())
                    return
                self._answer(proxy._lagged(request, proxy._node.post(body, "forward")))

            def _answer(self, data: bytes, status: int = 200) -> None:
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, format: str, *args: object) -> None:
                return

        self.server = ThreadingHTTPServer(("127.0.0.1", free_port()), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self._thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self._thread.start()

    @property
    def mode(self) -> str:
        return self._mode

    @mode.setter
    def mode(self, value: str) -> None:
        if value not in ("forward", "blackhole"):
            raise ValueError(value)
        self._mode = value
        if value == "forward" and hasattr(self, "_release"):
            self._release.set()  # let held connections go (unanswered)
            self._release = threading.Event()

    def fail(self, method: str, error: dict[str, Any] | None, *, times: int | None = None) -> None:
        """Answer `method` calls with this JSON-RPC error object, the next `times` ones or all (None: forward)."""
        with self._lock:
            if error is None:
                self._errors.pop(method, None)
            else:
                self._errors[method] = (error, times)

    def fail_if(self, method: str, predicate: Callable[[list[Any]], bool], error: dict[str, Any]) -> None:
        """Answer `method` with `error` whenever `predicate(params)` holds, until `heal()`."""
        with self._lock:
            self._errors_if.append((method, predicate, error))

    def refuse_raw_over(self, size: int, message: str = "oversized data") -> None:
        """Refuse every eth_sendRawTransaction whose raw transaction is over `size` bytes (geth: 128 KiB)."""
        with self._lock:
            self._raw_limit = (size, message)

    def answer_errors(self, error: dict[str, Any] | None = NODE_ERROR) -> None:
        """Answer every method with `error` from now on (None: forward again, unless a method has its own)."""
        self.fail(_EVERY_METHOD, error)

    def heal(self) -> None:
        """Back to a faithful proxy: no errors, drops or refusals (held connections are released)."""
        with self._lock:
            self._errors.clear()
            self._errors_if.clear()
            self._raw_limit = None
            self.drop_rate = self.http_error_rate = 0.0
            self.refuse_batches = False
            self.seen_up_to = None
        self.mode = "forward"

    def _batch(self, items: list[Any]) -> bytes:
        """A JSON-RPC batch: refused whole (`refuse_batches`), or each item faulted as it would be alone
        and the rest forwarded to the node as one batch, the answers merged back."""
        if self.refuse_batches:
            with self._lock:
                self.faults += 1
            return json.dumps({"jsonrpc": "2.0", "id": None, "error": BATCH_REFUSED}).encode()
        answers: dict[Any, Any] = {}
        forward = []
        for item in items:
            method = str(item.get("method")) if isinstance(item, dict) else "?"
            error = self._take_error(method, item)
            if error is not None and isinstance(item, dict):
                answers[item.get("id")] = {"jsonrpc": "2.0", "id": item.get("id"), "error": error}
            else:
                forward.append(item)
        if forward:
            asked = {item.get("id"): item for item in forward if isinstance(item, dict)}
            for answer in json.loads(self._node.post(json.dumps(forward).encode(), "forward")):
                item = asked.get(answer.get("id"))
                answers[answer.get("id")] = json.loads(self._lagged(item, json.dumps(answer).encode()))
        return json.dumps([answers[i.get("id")] for i in items if isinstance(i, dict)]).encode()

    def _lagged(self, request: Any, answer: bytes) -> bytes:
        """`answer` as a backend at block `seen_up_to` would give it."""
        last = self.seen_up_to
        if last is None or not isinstance(request, dict):
            return answer
        method, params, parsed = request.get("method"), request.get("params") or [], json.loads(answer)
        if method == "eth_getLogs" and isinstance(parsed.get("result"), list):
            parsed["result"] = [log for log in parsed["result"] if int(log["blockNumber"], 16) <= last]
        elif method == "eth_getBlockByNumber" and str(params[0]).startswith("0x") and int(params[0], 16) > last:
            parsed["result"] = None
        else:
            return answer
        with self._lock:
            self.faults += 1
        return json.dumps(parsed).encode()

    def _seen(self, request: Any, method: str) -> float:
        """Count the request; the roll that decides whether it is dropped or answered 502."""
        with self._lock:
            self.requests.append(method)
            for item in request if isinstance(request, list) else [request]:
                self.calls[str(item.get("method", "")) if isinstance(item, dict) else "?"] += 1
            roll = self._rng.random()
            if roll < self.drop_rate + self.http_error_rate:
                self.faults += 1
            return roll

    def _take_error(self, method: str, request: Any) -> dict[str, Any] | None:
        params = (request.get("params") or []) if isinstance(request, dict) else []
        with self._lock:
            error = self._error_for(method, params)
            if error is not None:
                self.faults += 1
            return error

    def _error_for(self, method: str, params: list[Any]) -> dict[str, Any] | None:
        key = method if method in self._errors else _EVERY_METHOD
        entry = self._errors.get(key)
        if entry is not None:
            error, times = entry
            if times is not None:
                if times <= 1:
                    del self._errors[key]
                else:
                    self._errors[key] = (error, times - 1)
            return error
        for name, predicate, conditional in self._errors_if:
            if name == method and predicate(params):
                return conditional
        if method == "eth_sendRawTransaction" and self._raw_limit is not None and params:
            limit, message = self._raw_limit
            if (len(str(params[0])) - 2) // 2 > limit:
                return {"code": -32000, "message": message}
        return None

    def stop(self) -> None:
        """The node goes away: the listening socket closes, kept-alive connections are dropped unanswered."""
        if self._stopped:
            return
        self._stopped = True
        self._release.set()
        self.server.shutdown()
        self.server.server_close()
        self._thread.join(timeout=10)
        self._node.close()

    close = stop

    def __enter__(self) -> RpcProxy:
        return self

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None) -> None:
        self.stop()
