"""The operator console: one server-rendered HTML page of the money an operator is responsible for.

Served by the facilitator (`/console`) and by the keeper's HTTP server (`/console`). The
server renders every figure; the page's script (static/console.js) swaps in a freshly
rendered fragment every few seconds and redraws the chart of held value and settlements
over time with uPlot, a pinned npm package shipped in static/ (no CDN: the page loads
nothing from outside its server). Tests hold the shipped files equal to node_modules'.
"""

from __future__ import annotations

import html
import logging
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from importlib import resources

from escrow_py.protocol.errors import EscrowError

log = logging.getLogger("escrow_py.console")

# Block explorers of the public chains by chain id; any other chain shows transaction hashes unlinked.
EXPLORERS = {84532: "https://sepolia.basescan.org", 8453: "https://basescan.org"}
# Development nodes (by web3_clientVersion) run a local chain even under a public chain's id (the demo's and the
# tests' `anvil --chain-id 84532`): the public explorer has never seen their transactions.
DEV_NODES = ("anvil", "hardhat", "ganache")
STATIC = {
    "uPlot.iife.min.js": "text/javascript; charset=utf-8",
    "uPlot.min.css": "text/css; charset=utf-8",
    "console.js": "text/javascript; charset=utf-8",
}
# The page loads only its own server's files; inline style attributes are uPlot's.
CSP = "default-src 'self'; style-src 'self' 'unsafe-inline'; img-src 'self' data:"


@dataclass
class Figures:
    """Everything the console shows, as plain data (the page and data.json are both built from it)."""

    held_by_token: dict[str, int] = field(default_factory=dict)
    by_state: dict[str, int] = field(default_factory=dict)
    next_deadlines: list[dict[str, object]] = field(default_factory=list)
    recent: list[dict[str, object]] = field(default_factory=list)  # {tx, kind, escrows, amount, gasWei, block, at}
    gas_wei_by_kind: dict[str, int] = field(default_factory=dict)
    serve_first_losses: int | None = None  # None: serve-first is not offered here
    keeper_lag: int | None = None  # blocks between the chain head and the keeper's checkpoint; None: no keeper
    series: dict[str, list[float]] = field(default_factory=dict)  # t (unix s, or block numbers), held, settled
    series_x_is_time: bool = True
    gas_unit: str = "wei"  # the facilitator knows each transaction's price; a keeper counts gas units

    def to_json(self) -> dict[str, object]:
        return {
            "heldByToken": {k: str(v) for k, v in self.held_by_token.items()},
            "byState": self.by_state,
            "nextDeadlines": self.next_deadlines,
            "recent": self.recent,
            "gasWeiByKind": {k: str(v) for k, v in self.gas_wei_by_kind.items()},
            "gasWeiTotal": str(sum(self.gas_wei_by_kind.values())),
            "serveFirstLosses": None if self.serve_first_losses is None else str(self.serve_first_losses),
            "keeperLag": self.keeper_lag,
            "series": self.series,
            "seriesXIsTime": self.series_x_is_time,
            "gasUnit": self.gas_unit,
        }


# The chart keeps at most this many points (evenly spaced, the last always in).
CHART_POINTS = 120


def running_totals(events: Iterable[tuple[float, str, int]]) -> dict[str, list[float]]:
    """The chart's series from money movements in order: (x, kind, amount), kind `deposit` (held grows),
    `released` (held shrinks, settled grows), `settled` (serve-first: settled grows, nothing was held)
    or anything else (held shrinks: a refund). Events at one x make one point."""
    held = settled = 0
    points: dict[float, tuple[int, int]] = {}
    for x, kind, amount in events:
        if kind == "deposit":
            held += amount
        elif kind == "settled":  # serve-first: paid to the seller in one move, never held
            settled += amount
        else:
            held -= amount
            settled += amount if kind == "released" else 0
        points[x] = (held, settled)
    xs = list(points)
    step = max(1, len(xs) // CHART_POINTS)
    keep = sorted({*range(0, len(xs), step), len(xs) - 1}) if xs else []
    return {
        "t": [xs[i] for i in keep],
        "held": [points[xs[i]][0] for i in keep],
        "settled": [points[xs[i]][1] for i in keep],
    }


def explorer_for(chain_id: int, client_version: str | None, *, configured: str | None = None) -> str | None:
    """Where transaction links point: the operator's own explorer if one is `configured`; else the public explorer of
    `chain_id` (Base Sepolia, Base), unless the node is a development node or its client is unknown (None: a link
    to a public explorer for a transaction it never saw is worse than none); else None, and hashes show unlinked."""
    if configured:
        return configured.rstrip("/")
    if client_version is None or client_version.lower().startswith(DEV_NODES):
        return None
    return EXPLORERS.get(chain_id)


class Explorer:
    """`explorer_for` a chain whose node is asked its client version once (`ask`: web3_clientVersion), and asked
    again at the next call while it has not answered (meanwhile: no link)."""

    def __init__(self, chain_id: int, ask: Callable[[], object], *, configured: str | None = None) -> None:
        self.chain_id, self._ask, self.configured = chain_id, ask, configured
        self._client: str | None = None

    def __call__(self) -> str | None:
        if self.configured is None and self._client is None:
            try:
                self._client = str(self._ask())
            except (EscrowError, OSError, ValueError) as exc:
                log.warning("web3_clientVersion failed; transactions are shown unlinked for now: %s", exc)
        return explorer_for(self.chain_id, self._client, configured=self.configured)


def static_file(name: str) -> tuple[bytes, str] | None:
    """A shipped static file and its content type; None for any other name."""
    if name not in STATIC:
        return None
    return resources.files("escrow_py.console").joinpath("static", name).read_bytes(), STATIC[name]


def _e(value: object) -> str:
    return html.escape(str(value), quote=True)


def _tx_link(tx: str, explorer: str | None) -> str:
    short = f"{tx[:10]}…{tx[-6:]}"
    if explorer is None:
        return f'<code title="{_e(tx)}" data-tx="{_e(tx)}">{_e(short)}</code>'
    return f'<a href="{_e(explorer)}/tx/{_e(tx)}" data-tx="{_e(tx)}" rel="noopener">{_e(short)}</a>'


def _time(at: object) -> str:
    return datetime.fromtimestamp(float(str(at)), UTC).strftime("%Y-%m-%d %H:%M:%S")


def _table(headers: list[str], rows: list[list[str]], table_id: str) -> str:
    head = "".join(f"<th>{_e(h)}</th>" for h in headers)
    if not rows:
        body = f'<tr><td colspan="{len(headers)}" class="empty">none</td></tr>'
    else:
        body = "".join("<tr>" + "".join(f"<td>{c}</td>" for c in row) + "</tr>" for row in rows)
    return f'<table id="{table_id}"><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>'


def render_fragment(figures: Figures, *, explorer: str | None) -> str:
    """The figures block (what the page refreshes); every value is escaped."""
    held = _table(
        ["token", "held (atomic units)"],
        [
            [f"<code>{_e(t)}</code>", f'<span data-held="{_e(t)}">{_e(v)}</span>']
            for t, v in figures.held_by_token.items()
        ],
        "held",
    )
    states = _table(
        ["state", "escrows"],
        [[_e(s), f'<span data-state="{_e(s)}">{_e(n)}</span>'] for s, n in sorted(figures.by_state.items())],
        "states",
    )
    deadlines = _table(
        ["deadline (UTC)", "escrow", "state", "amount"],
        [
            [_time(d["deadline"]), f"<code>{_e(str(d['escrowId'])[:18])}…</code>", _e(d["state"]), _e(d["amount"])]
            for d in figures.next_deadlines
        ],
        "deadlines",
    )
    recent = _table(
        ["when (UTC)", "kind", "transaction", "escrows", "amount", f"gas ({_e(figures.gas_unit)})"],
        [
            [_time(r["at"]), _e(r["kind"]), _tx_link(str(r["tx"]), explorer), _e(r["escrows"]), _e(r["amount"]),
             _e(r["gasWei"])]
            for r in figures.recent
        ],
        "recent",
    )  # fmt: skip
    gas_total = sum(figures.gas_wei_by_kind.values())
    gas = ", ".join(f"{_e(k)} {_e(v)}" for k, v in sorted(figures.gas_wei_by_kind.items())) or "none"
    losses = "serve-first not offered" if figures.serve_first_losses is None else _e(figures.serve_first_losses)
    lag = "no keeper here" if figures.keeper_lag is None else f"{_e(figures.keeper_lag)} blocks"
    return (
        '<section class="cards">'
        f'<div class="card"><h2>Gas spent</h2><p id="gas-total" data-wei="{gas_total}">'
        f"{gas_total} {_e(figures.gas_unit)}</p>"
        f"<small>{gas}</small></div>"
        f'<div class="card"><h2>Serve-first losses</h2><p id="losses">{losses}</p></div>'
        f'<div class="card"><h2>Keeper lag</h2><p id="keeper-lag">{lag}</p></div>'
        "</section>"
        f"<section><h2>Money held, by token</h2>{held}</section>"
        f"<section><h2>Escrows by state</h2>{states}</section>"
        f"<section><h2>Next deadlines</h2>{deadlines}</section>"
        f"<section><h2>Recent deliveries, deposits and refunds</h2>{recent}</section>"
    )


_STYLE = """
body{font-family:system-ui,sans-serif;margin:1.5rem;color:#222;background:#fafafa}
h1{font-size:1.4rem}h2{font-size:1rem;margin:.4rem 0}
table{border-collapse:collapse;margin-bottom:1rem;background:#fff}
td,th{border:1px solid #ddd;padding:.25rem .6rem;text-align:left;font-size:.9rem}
.cards{display:flex;gap:1rem;flex-wrap:wrap;margin-bottom:1rem}
.card{background:#fff;border:1px solid #ddd;padding:.5rem 1rem;min-width:12rem}
.card p{font-size:1.2rem;margin:.2rem 0}.empty{color:#888}#chart{background:#fff;margin-bottom:1rem}
"""


def render_page(figures: Figures, *, title: str, base: str, explorer: str | None, query: str = "") -> str:
    """The whole page; `base` is the console's path ("/console"), `query` the token query string, if any."""
    suffix = f"?{query}" if query else ""
    return (
        "<!doctype html><html lang=en><head><meta charset=utf-8>"
        f'<link rel="icon" href="data:,"><title>{_e(title)}</title>'
        f'<link rel="stylesheet" href="{_e(base)}/static/uPlot.min.css"><style>{_STYLE}</style></head>'
        f'<body data-base="{_e(base)}" data-query="{_e(suffix)}"><h1>{_e(title)}</h1>'
        '<p><small>Updated <span id="updated"></span></small></p>'
        '<div id="chart"></div>'
        f'<div id="figures">{render_fragment(figures, explorer=explorer)}</div>'
        f'<script src="{_e(base)}/static/uPlot.iife.min.js"></script>'
        f'<script src="{_e(base)}/static/console.js"></script>'
        "</body></html>"
    )


__all__ = [
    "CSP",
    "DEV_NODES",
    "EXPLORERS",
    "Explorer",
    "Figures",
    "explorer_for",
    "render_fragment",
    "render_page",
    "running_totals",
    "static_file",
]
