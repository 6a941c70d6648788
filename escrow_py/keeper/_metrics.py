"""Prometheus metrics and the /metrics, /healthz, /readyz endpoints of a keeper.

The counters count what happened on chain, not what was attempted: `refunds_sent`
counts escrows in batches a node accepted, `refunds_confirmed` counts the `Refunded`
logs naming this keeper in its receipts once they are `reorg_depth` blocks deep.
"""

from __future__ import annotations

import json
import sqlite3
import threading
import time
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from escrow_py.console import CSP, Figures, render_fragment, render_page, static_file
from escrow_py.protocol.errors import ConfigError, EscrowError

# /readyz answers 503 once this many cycles in a row have failed.
FAILURES_BEFORE_UNREADY = 3


class KeeperMetrics:
    """One registry per keeper, so several keepers in one process (tests) don't collide."""

    def __init__(self) -> None:
        r = self.registry = CollectorRegistry()
        self.escrows = Gauge("x402_keeper_escrows", "Indexed escrows by state", ["state"], registry=r)
        self.refunds_sent = Counter(
            "x402_keeper_refunds_sent", "Escrows in refund batches a node accepted for broadcast", registry=r
        )
        self.refunds_confirmed = Counter(
            "x402_keeper_refunds_confirmed",
            "Refunded logs naming this keeper in its receipts, counted once reorg_depth blocks deep",
            registry=r,
        )
        self.refunds_failed = Counter(
            "x402_keeper_refunds_failed", "Escrows whose refund reverted in simulation", registry=r
        )
        self.quarantined = Counter(
            "x402_keeper_quarantined",
            "Escrows set aside for good: their refund reverted when mined on its own",
            registry=r,
        )
        self.quarantined_open = Gauge("x402_keeper_quarantined_open", "Quarantined escrows still Held", registry=r)
        self.payouts_refused = Counter(
            "x402_keeper_payouts_refused",
            "Refund payouts the token refused (stage: mined, a PayoutFailed in a receipt; simulation, seen before "
            "sending), each backing off its (token, buyer)",
            ["stage"],
            registry=r,
        )
        self.backoffs = Gauge(
            "x402_keeper_backoffs",
            "(token, buyer) pairs backed off after a refused payout, with escrows Held",
            registry=r,
        )
        self.covered = Counter(
            "x402_keeper_refunds_covered",
            "Due escrows not sent because the pending state showed them settled (another keeper's transaction)",
            registry=r,
        )
        self.transactions = Counter(
            "x402_keeper_transactions", "Refund transactions by outcome", ["outcome"], registry=r
        )
        self.gas_used = Counter("x402_keeper_gas_used", "Gas used by this keeper's mined transactions", registry=r)
        self.gas_wasted = Counter(
            "x402_keeper_gas_wasted",
            "Gas of this keeper's mined transactions that refunded nothing (reverted, or beaten to it)",
            registry=r,
        )
        self.refund_delay = Histogram(
            "x402_keeper_refund_delay_seconds", "Chain seconds from deadline to the refund's broadcast",
            buckets=(1, 2, 5, 10, 30, 60, 300, 900, 3600), registry=r,
        )  # fmt: skip
        self.last_indexed_block = Gauge("x402_keeper_last_indexed_block", "Checkpoint block", registry=r)
        self.rpc_errors = Counter("x402_keeper_rpc_errors", "RPC requests or cycles that failed", registry=r)
        self.cycle_failures = Counter(
            "x402_keeper_cycle_failures", "Cycles that failed, by kind (rpc, internal)", ["kind"], registry=r
        )
        self.consecutive_failures = Gauge(
            "x402_keeper_consecutive_failures", "Cycles failed in a row (0 after a good one)", registry=r
        )
        self.last_cycle = 0.0  # wall time of the last completed cycle, for /readyz
        self.failures_in_a_row = 0
        self.ready = False

    def cycle_ok(self) -> None:
        self.last_cycle = time.time()
        self.failures_in_a_row = 0
        self.consecutive_failures.set(0)
        self.ready = True

    def cycle_failed(self, kind: str) -> None:
        self.failures_in_a_row += 1
        self.consecutive_failures.set(self.failures_in_a_row)
        self.cycle_failures.labels(kind=kind).inc()
        if kind == "rpc":
            self.rpc_errors.inc()

    def is_ready(self, stale_after: float) -> bool:
        """A cycle completed recently, and the last few did not all fail."""
        return (
            self.ready
            and self.failures_in_a_row < FAILURES_BEFORE_UNREADY
            and time.time() - self.last_cycle < stale_after
        )


class MetricsServer:
    """/metrics (Prometheus text), /healthz (the process answers), /readyz (cycles are succeeding), and the
    operator console (/console) when `figures` is given: the same page as the facilitator's, from the keeper's
    index (the console shows public chain data only, so it needs no token here), its transactions linked to
    `explorer()` (console.Explorer), if any."""

    def __init__(
        self,
        metrics: KeeperMetrics,
        host: str,
        port: int,
        stale_after: float,
        figures: Callable[[], Figures] | None = None,
        *,
        explorer: Callable[[], str | None] = lambda: None,
    ) -> None:
        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                if figures is not None and self.path.split("?")[0].startswith("/console"):
                    self._console(self.path.split("?")[0], figures)
                elif self.path == "/metrics":
                    self._answer(200, generate_latest(metrics.registry), CONTENT_TYPE_LATEST)
                elif self.path == "/healthz":
                    self._answer(200, b"ok\n")
                elif self.path == "/readyz":
                    ready = metrics.is_ready(stale_after)
                    detail = f"{metrics.failures_in_a_row} failed cycles in a row\n".encode()
                    self._answer(200 if ready else 503, (b"ready\n" if ready else b"not ready: ") + detail)
                else:
                    self._answer(404, b"not found\n")

            def _console(self, path: str, figures: Callable[[], Figures]) -> None:
                if path.startswith("/console/static/"):
                    found = static_file(path.removeprefix("/console/static/"))
                    if found is None:
                        self._answer(404, b"not found\n")
                    else:
                        self._answer(200, found[0], found[1])
                    return
                pages = {"/console", "/console/fragment", "/console/data.json"}
                if path not in pages:
                    self._answer(404, b"not found\n")
                    return
                try:
                    shown = figures()
                except (
                    sqlite3.Error,
                    OSError,
                    ValueError,
                    EscrowError,
                ) as exc:  # not fatal
                    self._answer(503, f"console unavailable: {type(exc).__name__}\n".encode())
                    return
                if path == "/console/data.json":
                    self._answer(200, json.dumps(shown.to_json()).encode(), "application/json")
                elif path == "/console/fragment":
                    self._answer(200, render_fragment(shown, explorer=explorer()).encode(), "text/html; charset=utf-8")
                else:
                    page = render_page(shown, title="x402-escrow keeper", base="/console", explorer=explorer())
                    self._answer(200, page.encode(), "text/html; charset=utf-8")

            def _answer(self, status: int, body: bytes, content_type: str = "text/plain") -> None:
                self.send_response(status)
                self.send_header("Content-Type", content_type)
                self.send_header("Content-Security-Policy", CSP)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, format: str, *args: object) -> None:
                return

        try:
            self.server = ThreadingHTTPServer((host, port), Handler)
        except OSError as exc:
            raise ConfigError(f"metrics = '{host}:{port}': cannot listen there: {exc.strerror or exc}") from None
        self.port = int(self.server.server_address[1])
        self._thread = threading.Thread(target=self.server.serve_forever, name="keeper-metrics", daemon=True)
        self._thread.start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()
