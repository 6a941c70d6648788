#!/bin/sh
# The README's quickstart as one script (after `make quickstart`): a local chain with the escrow and a
# funded buyer (`x402-escrow dev`), the example seller, and one paid request from the example buyer.
# Ports and the state folder can be moved: CHAIN_PORT (8545), SELLER_PORT (8000), STATE_DIR (.x402-escrow).
set -eu
REPO=$(cd "$(dirname "$0")/.." && pwd)
CHAIN_PORT=${CHAIN_PORT:-8545}
SELLER_PORT=${SELLER_PORT:-8000}
STATE_DIR=${STATE_DIR:-$REPO/.x402-escrow}
mkdir -p "$STATE_DIR" && cd "$STATE_DIR" && rm -f dev.env
chain= seller=
# The seller first (its poster talks to the chain), then the chain.
trap 'set +e; for p in $seller $chain; do kill "$p" 2>/dev/null; wait "$p" 2>/dev/null; done' EXIT

"$REPO/.venv/bin/x402-escrow" dev --port "$CHAIN_PORT" --dir "$STATE_DIR" &
chain=$!
while [ ! -s dev.env ]; do kill -0 "$chain"; sleep 0.2; done  # written once the chain is ready
. ./dev.env

"$REPO/.venv/bin/uvicorn" examples.seller_app:app --app-dir "$REPO" --port "$SELLER_PORT" --log-level warning &
seller=$!
"$REPO/.venv/bin/python" -c "
import sys, time, httpx
for _ in range(150):
    try:
        sys.exit(0 if httpx.get('http://127.0.0.1:$SELLER_PORT/report/7').status_code == 402 else 1)
    except httpx.TransportError:
        time.sleep(0.2)
sys.exit('the example seller did not start')"

"$REPO/.venv/bin/python" "$REPO/examples/buyer.py" "http://127.0.0.1:$SELLER_PORT/report/7"
