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

from escrow_py.keeper._config import KeeperConfig
from escrow_py.keeper._daemon import CycleReport, Keeper
from escrow_py.keeper._decide import Action, Refund, Skip, Wait, next_action
from escrow_py.keeper._store import KeeperStore, OpenEscrow

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
