"""Prometheus metrics of a facilitator: requests, transactions, queues, held value."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram


class FacilitatorMetrics:
    """One registry per app, so several facilitators in one process (tests) don't collide."""

    def __init__(self) -> None:
        r = self.registry = CollectorRegistry()
        self.requests = Counter(
            "x402_facilitator_requests", "HTTP requests by endpoint and status", ["endpoint", "status"], registry=r
        )
        self.latency = Histogram(
            "x402_facilitator_request_seconds", "HTTP request latency by endpoint", ["endpoint"], registry=r
        )
        self.transactions = Counter(
            "x402_facilitator_transactions",
            "Transactions by kind (deposit, deliver, refund) and outcome (mined, failed, rejected)",
            ["kind", "outcome"],
            registry=r,
        )
        self.queue = Gauge(
            "x402_facilitator_queue_depth",
            "Queued work by queue (deliveries pending, refunds pending)",
            ["queue"],
            registry=r,
        )
        self.held = Gauge(
            "x402_facilitator_held_value", "Value held in escrow by token (atomic units)", ["token"], registry=r
        )
        self.escrows = Gauge("x402_facilitator_escrows", "Escrows by state", ["state"], registry=r)
