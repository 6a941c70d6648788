"""`x402-escrow demo`: the escrow's promise, told in five stories over real HTTP on a real chain.

By default it starts anvil (chain id 84532, one block per second), deploys TestUSDC and
X402Escrow, funds a buyer, serves a priced FastAPI app behind the seller middleware on
loopback, and starts a keeper process. Then:

1. paid and delivered: the buyer client pays, receives, and the body's hash matches
   the one the seller posts on chain;
2. the handler fails: the seller's operator refunds at once;
3. a buyer agent (its own process) is SIGKILLed once its payment is deposited, and
   the seller never answers: the keeper refunds at the deadline, no buyer alive;
4. a buyer agent is SIGKILLed after paying while the seller works; the seller
   delivers; a new buyer process runs recover() and gets the exact bytes, checked
   against the on-chain hash;
5. a burst of serve-first quotes is answered before any money moves, then one
   settleMany pays them all, each with the hash of the bytes its buyer got.

After each story and at the end: the sum of balances is unchanged and the escrow
holds exactly what is Held. `run_demo` returns False (the command exits 1) otherwise.
With `DemoOptions(rpc_url=..., escrow=...)` (`--rpc`, `--escrow`) it plays the same
stories on an existing chain, with keys from the environment. With `facilitator=True`
(`--facilitator`) the seller holds no key and no RPC: a facilitator on loopback holds the
seller's key, deposits, delivers, refunds and settles the serve-first burst.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from escrow_devtools.demo._run import DemoOptions, run_demo

__all__ = ["DemoOptions", "run_demo"]


def __getattr__(name: str) -> Any:
    # Loaded on first use, not with the package: `python -m escrow_devtools.demo.agent` (a buyer process
    # the demo and the integration tests start several times) must not pay for the seller, FastAPI and
    # the shop that `_run` imports (about a second of CPU per process).
    if name in __all__:
        from escrow_devtools.demo import _run

        return getattr(_run, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
