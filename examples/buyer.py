"""Pay for a URL: `python examples/buyer.py http://127.0.0.1:8000/report/7`."""

import os
import sys

from escrow_py.buyer import BuyerSettings, EscrowClient, PaymentError, recover
from escrow_py.chain.signer import LocalSigner

signer = LocalSigner.from_env()  # X402_ESCROW_PRIVATE_KEY, or LocalSigner.from_keystore("key.json")
# Who pays, on which chain, and where every payment is journaled: one settings object for every entry point.
settings = BuyerSettings(signer, os.environ["X402_ESCROW_RPC_URL"], "buyer.sqlite")

# First settle what an earlier run left unfinished (it died between paying and reading).
for item in recover(settings).items:
    print("recovered", item.escrow_id.hex(), item.action, item.outcome)

with EscrowClient(settings, timeout=60) as client:  # other keywords go to httpx.Client
    try:
        response = client.get(sys.argv[1])  # 402, sign, retry, check keccak256(body)
    except PaymentError as exc:  # its type and message say where the money is
        sys.exit(f"not delivered: {exc}")
print(response.json())
