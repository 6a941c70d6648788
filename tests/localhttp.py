"""httpx's entry points for the tests, on the process's one TLS context (escrow_py.protocol.tls).

    async with localhttp.AsyncClient(base_url=url) as client: ...
    answer = localhttp.get(f"{url}/report/x", timeout=30)

Same names and keywords as httpx's. httpx builds a TLS context for every client it creates, even
for http:// URLs, loading certifi's roots each time: about 50 ms of CPU, and the suite builds
hundreds of clients while other workers need the cores.
"""

from __future__ import annotations

from typing import Any

import httpx

from escrow_py.protocol.tls import client_options


def Client(**options: Any) -> httpx.Client:
    return httpx.Client(**client_options(options))


def AsyncClient(**options: Any) -> httpx.AsyncClient:
    return httpx.AsyncClient(**client_options(options))


def AsyncHTTPTransport(**options: Any) -> httpx.AsyncHTTPTransport:
    return httpx.AsyncHTTPTransport(**client_options(options))


def get(url: str, **options: Any) -> httpx.Response:
    return httpx.get(url, **client_options(options))


def post(url: str, **options: Any) -> httpx.Response:
    return httpx.post(url, **client_options(options))


__all__ = ["AsyncClient", "AsyncHTTPTransport", "Client", "get", "post"]
