"""Pay for an MCP tool call: `python examples/mcp_client.py http://127.0.0.1:8001/mcp abc`."""

import asyncio
import os
import sys

from mcp import ClientSession
from mcp.client.streamable_http import streamablehttp_client

from escrow_py.buyer import PaymentError
from escrow_py.chain.signer import LocalSigner
from escrow_py.mcp import EscrowToolClient

signer = LocalSigner.from_env()  # X402_ESCROW_PRIVATE_KEY, or LocalSigner.from_keystore("key.json")
rpc_url = os.environ["X402_ESCROW_RPC_URL"]


async def main(url: str, item: str) -> None:
    async with streamablehttp_client(url) as (read, write, _), ClientSession(read, write) as session:
        await session.initialize()
        async with EscrowToolClient(session, signer, rpc_url, "buyer.sqlite") as tools:
            # First settle what an earlier run left unfinished (it died between paying and reading).
            for item_ in (await tools.recover()).items:
                print("recovered", item_.escrow_id.hex(), item_.action, item_.outcome)
            try:
                result = await tools.call_tool("score", {"item": item})  # 402, sign, retry, check the hash
            except PaymentError as exc:  # its type and message say where the money is
                sys.exit(f"not delivered: {exc}")
    print(result.content[0].text)  # type: ignore[union-attr]


asyncio.run(main(sys.argv[1], sys.argv[2]))
