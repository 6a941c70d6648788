"""A loopback JSON-RPC proxy in front of anvil that injects the faults a real node produces only by accident.

    proxy = FaultProxy(chain.node.url)
    proxy.fail("eth_blockNumber")                 # answer with a JSON-RPC error object (-32603)
    proxy.refuse_raw_over(6_000, "oversized data")  # eth_sendRawTransaction over N bytes: an error object
    proxy.drop_rate, proxy.http_error_rate = 0.1, 0.05  # connections closed unanswered, HTTP 502
    proxy.heal()                                   # back to a faithful proxy
    proxy.calls["eth_sendRawTransaction"]          # what the client asked for

It is the one fake in these tests: anvil itself never fails a request on demand.
"""

from __future__ import annotations

import json
import random
import threading
import urllib.request
from collections import Counter
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from escrow_py.chain.anvil import free_port

INTERNAL_ERROR = -32603


class FaultProxy:
    def __init__(self, upstream: str, *, seed: int = 7) -> None:
        self.upstream = upstream
        self.calls: Counter[str] = Counter()
        self.faults = 0
        self.drop_rate = 0.0
        self.http_error_rate = 0.0
        self._failing: dict[str, dict[str, Any]] = {}
        self._failing_if: list[tuple[str, Callable[[list[Any]], bool], dict[str, Any]]] = []
        self._raw_limit: tuple[int, str] | None = None
        self._rng = random.Random(seed)
        self._lock = threading.Lock()
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers["Content-Length"]))
                request = json.loads(body)
                with proxy._lock:
                    roll = proxy._rng.random()
                    requests = request if isinstance(request, list) else [request]
                    for item in requests:
                        proxy.calls[item.get("method", "")] += 1
                    if roll < proxy.drop_rate + proxy.http_error_rate:
                        proxy.faults += 1
                if roll < proxy.drop_rate:
                    self.close_connection = True
                    return  # no answer at all
                if roll < proxy.drop_rate + proxy.http_error_rate:
                    self._send(502, b"")
                    return
                if isinstance(request, dict) and (error := proxy._error_for(request)) is not None:
                    with proxy._lock:
                        proxy.faults += 1
                    answer = {"jsonrpc": "2.0", "id": request.get("id"), "error": error}
                    self._send(200, json.dumps(answer).encode())
                    return
                forward = urllib.request.Request(proxy.upstream, body, {"Content-Type": "application/json"})
                with urllib.request.urlopen(forward, timeout=30) as answer:
                    self._send(200, answer.read())

            def _send(self, status: int, data: bytes) -> None:
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, format: str, *args: object) -> None:
                return

        self.server = ThreadingHTTPServer(("127.0.0.1", free_port()), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def _error_for(self, request: dict[str, Any]) -> dict[str, Any] | None:
        method = request.get("method", "")
        with self._lock:
            if method in self._failing:
                return self._failing[method]
            for name, predicate, error in self._failing_if:
                if name == method and predicate(request.get("params") or []):
                    return error
            if method == "eth_sendRawTransaction" and self._raw_limit is not None:
                limit, message = self._raw_limit
                raw = str(request["params"][0])
                if (len(raw) - 2) // 2 > limit:
                    return {"code": -32000, "message": message}
        return None

    def fail(self, *methods: str, code: int = INTERNAL_ERROR, message: str = "internal error") -> None:
        """Answer these methods with a JSON-RPC error object until `heal()`."""
        with self._lock:
            for method in methods:
                self._failing[method] = {"code": code, "message": message}

    def fail_if(self, method: str, predicate: Callable[[list[Any]], bool], *, code: int = -32602,
                message: str = "invalid params") -> None:  # fmt: skip
        """Answer `method` with an error object whenever `predicate(params)` holds."""
        with self._lock:
            self._failing_if.append((method, predicate, {"code": code, "message": message}))

    def refuse_raw_over(self, size: int, message: str = "oversized data") -> None:
        """Refuse every eth_sendRawTransaction whose raw transaction is over `size` bytes."""
        with self._lock:
            self._raw_limit = (size, message)

    def heal(self) -> None:
        with self._lock:
            self._failing.clear()
            self._failing_if.clear()
            self._raw_limit = None
            self.drop_rate = self.http_error_rate = 0.0

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()
