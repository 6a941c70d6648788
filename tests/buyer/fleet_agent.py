"""One agent of a buyer fleet, in its own process: `count` threads each buy one report at `start` (wall time).

    python fleet_agent.py RPC_URL JOURNAL_URL SHOP_URL PREFIX COUNT BUDGET START

Prints the outcomes as one JSON object (`paid`, or the policy's reason code, or the error).
"""

from __future__ import annotations

import json
import sys
import threading
import time
from collections import Counter

import httpx

from escrow_devtools.anvil import dev_signer
from escrow_py.buyer import EscrowClient, Policy, PolicyDenied

BUYER = 1  # the anvil dev account the tests' buyer uses


def main() -> None:
    rpc_url, journal, shop, prefix, count, budget, start = sys.argv[1:]
    outcomes: Counter[str] = Counter()
    lock = threading.Lock()
    policy = Policy(total_budget=int(budget))
    with EscrowClient(dev_signer(BUYER), rpc_url, journal, policy=policy, timeout=120) as client:

        def buy(i: int) -> None:
            time.sleep(max(0.0, float(start) - time.time()))
            try:
                response = client.get(f"{shop}/report/{prefix}{i}")
                result = "paid" if response.status_code == 200 else f"status {response.status_code}"
            except PolicyDenied as denied:
                result = denied.code
            except httpx.HTTPError as exc:
                result = repr(exc)
            with lock:
                outcomes[result] += 1

        threads = [threading.Thread(target=buy, args=(i,)) for i in range(int(count))]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(300)
    print(json.dumps(dict(outcomes)))


if __name__ == "__main__":
    main()
