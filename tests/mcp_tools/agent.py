"""A buyer agent in its own process: pays one call of a tool and prints its text (the crash tests SIGKILL it).

python agent.py URL TOOL ITEM JOURNAL RPC_URL      (the buyer's key in X402_ESCROW_PRIVATE_KEY)
"""

from __future__ import annotations

import asyncio
import sys

from mcp import ClientSession
from mcp.client.streamable_http import streamablehttp_client

from escrow_py.chain.signer import LocalSigner
from escrow_py.mcp import EscrowToolClient


async def main(url: str, tool: str, item: str, journal: str, rpc_url: str) -> None:
    async with streamablehttp_client(url) as (read, write, _), ClientSession(read, write) as session:
        await session.initialize()
        async with EscrowToolClient(session, LocalSigner.from_env(), rpc_url, journal) as client:
            result = await client.call_tool(tool, {"item": item})
    print(result.content[0].text, flush=True)  # type: ignore[union-attr]


if __name__ == "__main__":
    asyncio.run(main(*sys.argv[1:6]))
