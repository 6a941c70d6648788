"""One verifying TLS context per process for every HTTP client the package builds.

httpx builds a new `ssl.SSLContext` for each client it creates, and building one loads certifi's
~150 root certificates: about 50 ms of CPU. A buyer that recovers in a loop, a seller's facilitator
client (one per event loop) and every tool that polls a server paid it per client. The shared
context is exactly the one httpx builds by default (`httpx.create_ssl_context()`: certifi's roots,
or SSL_CERT_FILE / SSL_CERT_DIR, read once when the first client is built) and verifies
certificates and host names as that one does.
"""

from __future__ import annotations

import functools
import ssl
from collections.abc import Mapping
from typing import Any

import httpx

# A caller who sets any of these chose its own TLS (or HTTP/2, whose ALPN list httpcore writes onto the
# context): its client gets what httpx builds for those settings, not the shared context.
_TLS_OPTIONS = frozenset({"verify", "cert", "trust_env", "http2"})


@functools.cache
def tls_context() -> ssl.SSLContext:
    """The process's verifying TLS context, built on first use."""
    return httpx.create_ssl_context()


def client_options(options: Mapping[str, Any]) -> dict[str, Any]:
    """httpx client keywords with `verify` set to the shared context, unless the caller chose TLS settings."""
    if _TLS_OPTIONS.isdisjoint(options):
        return {**options, "verify": tls_context()}
    return dict(options)
