"""A loopback JSON-RPC proxy in front of anvil that produces node faults on demand.

    with RpcProxy(chain.node.url) as proxy:  # proxy.url forwards everything to anvil
        proxy.mode = "blackhole"             # accepts connections, reads the request, never answers
        proxy.mode = "forward"               # the node is back (held connections are released unanswered)
        proxy.fail("eth_sendRawTransaction", {"code": -32003, "message": "nonce too low"}, times=1)
        proxy.answer_errors()                # every method answers a JSON-RPC error object (NODE_ERROR)
        proxy.stop()                         # the node is gone: every later call fails to connect

A real node hangs, errs or goes away only when it is broken; this is the fault-injecting
stand-in the charter allows for that. Everything it forwards is anvil's own answer.
"""

from __future__ import annotations

import json
import threading
import urllib.request
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from types import TracebackType
from typing import Any

from escrow_py.chain.anvil import free_port

# What a load-balanced public RPC answers when the backend behind it lags: a real error, not a revert.
NODE_ERROR = {"code": -32000, "message": "header not found"}

_EVERY_METHOD = "*"


class RpcProxy:
    def __init__(self, upstream: str) -> None:
        self.mode = "forward"
        self.requests: list[str] = []  # methods seen, in order
        self._errors: dict[str, tuple[dict[str, Any], int | None]] = {}
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
                proxy.requests.append(method)
                if proxy.mode == "blackhole":
                    proxy._release.wait(120)  # hold the connection, answer nothing
                    self.close_connection = True
                    return
                error = proxy._take_error(method)
                if error is not None and isinstance(request, dict):
                    self._answer(json.dumps({"jsonrpc": "2.0", "id": request.get("id"), "error": error}).encode())
                    return
                forwarded = urllib.request.Request(upstream, body, {"Content-Type": "application/json"})
                with urllib.request.urlopen(forwarded, timeout=30) as answer:
                    self._answer(answer.read())

            def _answer(self, data: bytes) -> None:
                self.send_response(200)
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

    def answer_errors(self, error: dict[str, Any] | None = NODE_ERROR) -> None:
        """Answer every method with `error` from now on (None: forward again, unless a method has its own)."""
        self.fail(_EVERY_METHOD, error)

    def _take_error(self, method: str) -> dict[str, Any] | None:
        with self._lock:
            key = method if method in self._errors else _EVERY_METHOD
            entry = self._errors.get(key)
            if entry is None:
                return None
            error, times = entry
            if times is not None:
                if times <= 1:
                    del self._errors[key]
                else:
                    self._errors[key] = (error, times - 1)
            return error

    def stop(self) -> None:
        """The node goes away: the listening socket closes, kept-alive connections are dropped unanswered."""
        if self._stopped:
            return
        self._stopped = True
        self._release.set()
        self.server.shutdown()
        self.server.server_close()
        self._thread.join(timeout=10)

    close = stop

    def __enter__(self) -> RpcProxy:
        return self

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None) -> None:
        self.stop()
