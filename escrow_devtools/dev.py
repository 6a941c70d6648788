"""`x402-escrow dev`: a local chain ready for a first paid request, in one command.

It starts anvil (chain id 84532, imitating Base Sepolia), deploys X402Escrow and TestUSDC in the
order `ape run deploy` uses (so the addresses are the same), mints USDC to a buyer, records the
deployment under `.x402-escrow/deployments/` (never over the shipped Base Sepolia record),
writes the settings the examples read to `.x402-escrow/dev.env`, prints them, and keeps the
chain running until Ctrl-C. Every key it prints is one of anvil's public dev keys.
"""

from __future__ import annotations

import argparse
import signal
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import IO, TypeVar

from escrow_devtools.anvil import BASE_SEPOLIA_CHAIN_ID, Anvil, dev_private_key, dev_signer
from escrow_py.chain.escrow import deploy_local
from escrow_py.chain.registry import Deployment, record
from escrow_py.chain.signer import LocalSigner
from escrow_py.chain.token import Token
from escrow_py.chain.tx import TxSender
from escrow_py.protocol.errors import ConfigError, RpcError

# anvil's dev accounts by role; the deployer is account 0, as in `ape run deploy --account TEST::0`.
DEPLOYER, BUYER, SELLER, OPERATOR = 0, 1, 2, 3
DEFAULT_PORT = 8545
DEFAULT_FUNDING = 100  # USDC
USDC_DECIMALS = 6
STATE_DIR = Path(".x402-escrow")

_T = TypeVar("_T")


@dataclass(frozen=True, slots=True)
class DevChain:
    """What `dev` set up: where the chain is, what is deployed, who holds what."""

    rpc_url: str
    escrow: str
    token: str
    buyer_key: str
    seller: str
    operator_key: str
    funding: int  # atomic units minted to the buyer

    def settings(self) -> dict[str, str]:
        """The environment the examples read (examples/seller_app.py, buyer.py, keeper.py, mcp_*.py)."""
        return {
            "X402_ESCROW_RPC_URL": self.rpc_url,
            "X402_ESCROW_ADDRESS": self.escrow,
            "X402_ESCROW_TOKEN": self.token,
            "X402_ESCROW_PRIVATE_KEY": self.buyer_key,
            "SELLER_ADDRESS": self.seller,
            "SELLER_OPERATOR_KEY": self.operator_key,
        }


def _step(out: IO[str], number: int, total: int, what: str, action: Callable[[], _T]) -> _T:
    """One step with its progress line: what is happening, then how long it took."""
    out.write(f"[{number}/{total}] {what} ... ")
    out.flush()
    started = time.monotonic()
    result = action()
    out.write(f"done ({time.monotonic() - started:.1f}s)\n")
    out.flush()
    return result


def set_up(node: Anvil, *, funding: int, state_dir: Path, out: IO[str]) -> DevChain:
    """Deploy, fund and record on a running anvil; write dev.env; returns what was set up."""
    w3 = node.web3()
    deployer = TxSender(w3, LocalSigner.from_key(dev_private_key(DEPLOYER)))
    escrow, token = _step(out, 2, 4, "deploying X402Escrow (CREATE2) and TestUSDC", lambda: deploy_local(deployer))
    buyer = dev_signer(BUYER).address
    _step(
        out,
        3,
        4,
        f"minting {funding / 10**USDC_DECIMALS:g} USDC to the buyer",
        lambda: Token(w3, token).mint(deployer, buyer, funding),
    )
    deployment = Deployment(
        network=f"eip155:{node.chain_id}",
        chain_id=node.chain_id,
        escrow=escrow,
        block=int(w3.eth.block_number),
        deployer=deployer.address,
        deployed_at=int(time.time()),
        token=token,
    )
    recorded = _step(
        out, 4, 4, "recording the deployment", lambda: record(deployment, state_dir / "deployments", local=True)
    )
    chain = DevChain(
        rpc_url=node.url,
        escrow=escrow,
        token=token,
        buyer_key=dev_private_key(BUYER),
        seller=dev_signer(SELLER).address,
        operator_key=dev_private_key(OPERATOR),
        funding=funding,
    )
    env = state_dir / "dev.env"
    env.write_text("".join(f"export {k}={v}\n" for k, v in chain.settings().items()))
    out.write(f"      {recorded}\n      {env}\n")
    return chain


def greeting(chain: DevChain, env_file: Path) -> str:
    usdc = chain.funding / 10**USDC_DECIMALS
    lines = [
        "",
        "Accounts (anvil's public dev keys: for this local chain only)",
        f"  buyer     {dev_signer(BUYER).address}  holds {usdc:g} USDC, key in X402_ESCROW_PRIVATE_KEY",
        f"  seller    {chain.seller}  receives the payments (payTo)",
        f"  operator  {dev_signer(OPERATOR).address}  the seller's gas key, key in SELLER_OPERATOR_KEY",
        "",
        f"Contracts on chain {BASE_SEPOLIA_CHAIN_ID} (eip155:{BASE_SEPOLIA_CHAIN_ID}) at {chain.rpc_url}",
        f"  X402Escrow  {chain.escrow}",
        f"  TestUSDC    {chain.token}   (anyone may mint: TestUSDC.mint(to, amount))",
        "",
        f"Settings for the examples: in another terminal, `source {env_file}`, or:",
        *(f"  export {k}={v}" for k, v in chain.settings().items()),
        "",
        "Listening. Ctrl-C stops the chain (its state is not kept).",
    ]
    return "\n".join(lines) + "\n"


def run(args: argparse.Namespace, out: IO[str] = sys.stdout) -> int:
    if args.fund <= 0:
        raise ConfigError(f"--fund must be a positive number of USDC, got {args.fund}")
    funding = round(args.fund * 10**USDC_DECIMALS)
    state_dir: Path = args.dir
    state_dir.mkdir(parents=True, exist_ok=True)
    out.write("x402-escrow dev: a local chain ready for a first paid request\n")
    node = _step(
        out,
        1,
        4,
        f"starting anvil on 127.0.0.1:{args.port} (chain id {BASE_SEPOLIA_CHAIN_ID})",
        lambda: _anvil(args.port),
    )
    # SIGTERM ends it like Ctrl-C: the chain process never outlives this one.
    signal.signal(signal.SIGTERM, _interrupt)
    try:
        chain = set_up(node, funding=funding, state_dir=state_dir, out=out)
        out.write(greeting(chain, state_dir / "dev.env"))
        out.flush()
        while node.alive():
            time.sleep(0.5)
        out.write("anvil exited\n")
        return 1
    except KeyboardInterrupt:
        out.write("\nstopping anvil\n")
        return 0
    finally:
        node.stop()


def _interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


def _anvil(port: int) -> Anvil:
    try:
        return Anvil(port=port)
    except RpcError as exc:
        raise ConfigError(f"anvil could not start on port {port} ({exc}); is another chain there? try --port") from None


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    dev = sub.add_parser(
        "dev",
        help="start a local chain with the escrow and a funded buyer, print the settings, run until Ctrl-C",
        description=__doc__.split("\n\n")[1] if __doc__ else None,
    )
    dev.add_argument("--port", type=int, default=DEFAULT_PORT, help=f"anvil's port (default {DEFAULT_PORT})")
    dev.add_argument(
        "--fund", type=float, default=DEFAULT_FUNDING, help=f"USDC minted to the buyer (default {DEFAULT_FUNDING})"
    )
    dev.add_argument("--dir", type=Path, default=STATE_DIR, help=f"where records and dev.env go (default {STATE_DIR}/)")
    dev.set_defaults(func=run)
