"""Prometheus metrics and the /metrics, /healthz, /readyz endpoints of a keeper."""

from __future__ import annotations

import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest


class KeeperMetrics:
    """One registry per keeper, so several keepers in one process (tests) don't collide."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.escrows = Gauge("x402_keeper_escrows", "Indexed escrows by state", ["state"], registry=self.registry)
        self.refunds_sent = Counter(
            "x402_keeper_refunds_sent", "Escrows in broadcast refund batches", registry=self.registry
        )
        self.refunds_confirmed = Counter(
            "x402_keeper_refunds_confirmed", "Escrows in refund batches mined successfully", registry=self.registry
        )
        self.refunds_failed = Counter(
            "x402_keeper_refunds_failed",
            "Escrows whose refund failed in simulation or on chain",
            registry=self.registry,
        )
        self.refund_delay = Histogram(
            "x402_keeper_refund_delay_seconds", "Chain seconds from deadline to the refund's broadcast",
            buckets=(1, 2, 5, 10, 30, 60, 300, 900, 3600), registry=self.registry,
        )  # fmt: skip
        self.last_indexed_block = Gauge("x402_keeper_last_indexed_block", "Checkpoint block", registry=self.registry)
        self.rpc_errors = Counter("x402_keeper_rpc_errors", "RPC calls that failed", registry=self.registry)
        self.last_cycle = 0.0  # wall time of the last completed cycle, for /readyz
        self.ready = False


class MetricsServer:
    """/metrics (Prometheus text), /healthz (the process answers), /readyz (a cycle completed recently)."""

    def __init__(self, metrics: KeeperMetrics, host: str, port: int, stale_after: float) -> None:
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                if self.path == "/metrics":
                    self._answer(200, generate_latest(metrics.registry), CONTENT_TYPE_LATEST)
                elif self.path == "/healthz":
                    self._answer(200, b"ok\n")
                elif self.path == "/readyz":
                    fresh = metrics.ready and time.time() - metrics.last_cycle < stale_after
                    self._answer(200 if fresh else 503, b"ready\n" if fresh else b"not ready\n")
                else:
                    self._answer(404, b"not found\n")

            def _answer(self, status: int, body: bytes, content_type: str = "text/plain") -> None:
                self.send_response(status)
                self.send_header("Content-Type", content_type)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, format: str, *args: object) -> None:
                return

        self.server = ThreadingHTTPServer((host, port), Handler)
        self.port = int(self.server.server_address[1])
        self._thread = threading.Thread(target=self.server.serve_forever, name="keeper-metrics", daemon=True)
        outer._thread.start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()
