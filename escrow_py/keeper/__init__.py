"""The keeper: refunds every Held escrow whose deadline has passed, whoever else is alive.

    keeper = Keeper(KeeperConfig.load({"rpc_url": ..., "escrows": "0x..."}), signer)
    keeper.check()               # start-up checks: chain id, escrow code, token allowlist, gas
    keeper.run_once()            # index, follow up sent refunds, decide, refund: one cycle
    keeper.run(stop_event)       # checks, then cycles until stopped (`x402-escrow keeper run`)

Errors are those of escrow_py.protocol.errors: ConfigError for bad settings and failed
start-up checks (the CLI exits 2 with the message), ChainError subclasses for RPC
and contract failures. `run` never dies of a failed cycle: it logs, counts and
backs off.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from escrow_py._lazy import lazy_names
from escrow_py.keeper._config import KeeperConfig

if TYPE_CHECKING:
    from escrow_py.keeper._daemon import CycleReport, Keeper
    from escrow_py.keeper._decide import Action, Refund, Skip, Wait, next_action
    from escrow_py.keeper._store import KeeperStore, OpenEscrow

# The module of each name below, imported when the name is first used (PEP 562): they bring the chain
# stack (web3, about 0.6 s of CPU), which `x402-escrow keeper` imports only once its settings are read
# and checked, so that a bad setting ends the command at once.
_LAZY = {
    "CycleReport": "_daemon",
    "Keeper": "_daemon",
    "Action": "_decide",
    "Refund": "_decide",
    "Skip": "_decide",
    "Wait": "_decide",
    "next_action": "_decide",
    "KeeperStore": "_store",
    "OpenEscrow": "_store",
}

__getattr__ = lazy_names(__name__, _LAZY)


__all__ = [
    "Action",
    "CycleReport",
    "Keeper",
    "KeeperConfig",
    "KeeperStore",
    "OpenEscrow",
    "Refund",
    "Skip",
    "Wait",
    "next_action",
]
