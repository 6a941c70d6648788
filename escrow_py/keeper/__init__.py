"""The keeper: refunds every Held escrow whose deadline has passed, whoever else is alive.

    keeper = Keeper(KeeperConfig.load({"rpc_url": ..., "escrows": "0x..."}), signer)
    keeper.run_once()            # index, decide, refund: one cycle
    keeper.run(stop_event)       # until stopped (`x402-escrow keeper run`)

Errors are those of escrow_py.errors: ConfigError for bad settings (the CLI exits
2 with the message), ChainError subclasses for RPC and contract failures, which
the loop logs and retries on its next cycle.
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
