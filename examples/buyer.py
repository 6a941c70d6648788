"""Pay for a URL: `python examples/buyer.py http://127.0.0.1:8000/report/7`."""

import os
import sys

from escrow_py.buyer import EscrowClient, PaymentError, recover
from escrow_py.chain.signer import LocalSigner

signer = LocalSigner.from_env()  # X402_ESCROW_PRIVATE_KEY, or LocalSigner.from_keystore("key.json")
rpc_url = os.environ["X402_ESCROW_RPC_URL"]

# First settle what an earlier run left unfinished (it died between paying and reading).
for item in recover("buyer.sqlite", signer, rpc_url).items:
    print("recovered", item.escrow_id.hex(), item.action, item.outcome)

with EscrowClient(signer, rpc_url, "buyer.sqlite", timeout=60) as client:
    try:
        response = client.get(sys.argv[1])  # 402, sign, retry, check keccak256(body)
    except PaymentError as exc:  # its type and message say where the money is
        sys.exit(f"not delivered: {exc}")
print(response.json())
