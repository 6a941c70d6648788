"""A JSON-RPC proxy in front of anvil that can fail on demand: the fault a real node cannot be told to make.

    with RpcProxy(chain.node.url) as proxy:     # proxy.url forwards every request to anvil
        proxy.answer_errors()                    # from now on: {"error": {...}} for every request
        proxy.stop()                             # from now on: connection refused

One connection per request (HTTP/1.0), so a stopped proxy refuses the very next call.
"""

from __future__ import annotations

import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from types import TracebackType
from typing import Any

import httpx

# What a load-balanced public RPC answers when the backend behind it lags: a real error, not a revert.
NODE_ERROR = {"code": -32000, "message": "header not found"}


class RpcProxy:
    def __init__(self, upstream: str) -> None:
        self.upstream = upstream
        self.failing = False
        self.calls: list[str] = []
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers["Content-Length"]))
                request: Any = json.loads(body)
                proxy.calls.append(str(request.get("method")) if isinstance(request, dict) else "batch")
                if proxy.failing and isinstance(request, dict):
                    answer = json.dumps({"jsonrpc": "2.0", "id": request.get("id"), "error": NODE_ERROR}).encode()
                else:
                    headers = {"content-type": "application/json"}
                    answer = httpx.post(proxy.upstream, content=body, headers=headers).content
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(answer)))
                self.end_headers()
                self.wfile.write(answer)

            def log_message(self, format: str, *args: Any) -> None:
                return

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self._server.server_address[1]}"
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)
        self._thread.start()
        self._stopped = False

    def answer_errors(self) -> None:
        self.failing = True

    def stop(self) -> None:
        """Close the listening socket: every later connection is refused."""
        if not self._stopped:
            self._stopped = True
            self._server.shutdown()
            self._server.server_close()
            self._thread.join(timeout=10)

    def __enter__(self) -> RpcProxy:
        return self

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None) -> None:
        self.stop()
