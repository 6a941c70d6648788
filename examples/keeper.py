"""One keeper cycle from Python (for cron); `x402-escrow keeper run` loops until SIGTERM."""

import os

from escrow_py.chain.signer import LocalSigner
from escrow_py.keeper import Keeper, KeeperConfig

config = KeeperConfig.load(
    {
        "rpc_url": os.environ["X402_ESCROW_RPC_URL"],
        "escrows": os.environ["X402_ESCROW_ADDRESS"],
        "tokens": os.environ.get("X402_ESCROW_TOKEN"),  # refunded besides the registry's USDC (None: just USDC)
    },
)
keeper = Keeper(config, LocalSigner.from_env())  # any funded key: refunds need no role
keeper.check()  # the RPC serves the network, the escrow is an X402Escrow, each token is ERC-3009, the key has gas
report = keeper.run_once()  # index events, refund every Held escrow past its deadline
print(f"refunds sent: {report.refunds_sent}")
keeper.close()
