"""Deploy X402Escrow with Ape and record it in the package's deployment registry.

    ape run deploy --network base:sepolia:node --account deployer
    ape run deploy --network base:anvil:node --account TEST::0      # local anvil, chain id 84532

The bytecode deployed is the shipped artifact's (escrow_py/chain/artifacts), the very
code the Python layer is tested against; before deploying, the script checks that
Ape's own compile of contracts/ reproduces it. On local networks the USDC-like
TestUSDC is deployed too. The result goes to escrow_py/chain/deployments/ (or to
$X402_ESCROW_DEPLOYMENTS_DIR).
"""

from __future__ import annotations

import time

import click
from ape import chain, project
from ape.cli import ConnectedProviderCommand, account_option
from ape.contracts import ContractContainer
from ethpm_types import ContractType

from escrow_py.chain.artifacts import load_artifact
from escrow_py.chain.registry import Deployment, record

LOCAL_NETWORKS = {"local", "anvil"}


def _without_metadata(code: str) -> bytes:
    """Runtime code less its CBOR metadata trailer (whose length is its last two bytes)."""
    raw = bytes.fromhex(code.removeprefix("0x"))
    return raw[: -2 - int.from_bytes(raw[-2:], "big")]


def _container(name: str) -> ContractContainer:
    artifact = load_artifact(name)
    contract_type = ContractType.model_validate(
        {
            "contractName": name,
            "abi": artifact["abi"],
            "deploymentBytecode": {"bytecode": artifact["bytecode"]},
            "runtimeBytecode": {"bytecode": artifact["deployedBytecode"]},
        }
    )
    return ContractContainer(contract_type)


def _check_reproducible() -> None:
    compiled = project.X402Escrow.contract_type.runtime_bytecode
    shipped = load_artifact("X402Escrow")["deployedBytecode"]
    if compiled is None or compiled.bytecode is None:
        raise click.ClickException("Ape produced no runtime bytecode for X402Escrow")
    if _without_metadata(compiled.bytecode) != _without_metadata(shipped):
        raise click.ClickException(
            "Ape's compile of contracts/X402Escrow.sol differs from the shipped artifact: "
            "run `make artifacts` and check ape-config.yaml's solidity settings"
        )


@click.command(cls=ConnectedProviderCommand)
@account_option()
@click.option("--skip-compile-check", is_flag=True, help="deploy without comparing Ape's compile to the artifact")
def cli(account, network, provider, skip_compile_check):  # type: ignore[no-untyped-def]
    """Deploy X402Escrow (and TestUSDC on local networks) and record the deployment."""
    if not skip_compile_check:
        _check_reproducible()
        click.echo("Ape's compile reproduces the shipped artifact")
    escrow = account.deploy(_container("X402Escrow"))
    tx_hash = escrow.txn_hash
    block = int(provider.web3.eth.get_transaction_receipt(tx_hash)["blockNumber"])
    onchain = "0x" + bytes(provider.web3.eth.get_code(escrow.address)).hex()
    if onchain != load_artifact("X402Escrow")["deployedBytecode"]:
        raise click.ClickException(f"runtime bytecode at {escrow.address} differs from the shipped artifact")
    click.echo(f"X402Escrow at {escrow.address} (block {block}); runtime bytecode verified")
    token = None
    if network.name in LOCAL_NETWORKS:
        token = account.deploy(_container("TestUSDC"), "USDC", "2").address
        click.echo(f"TestUSDC at {token}")
    deployment = Deployment(
        network=f"eip155:{chain.chain_id}",
        chain_id=chain.chain_id,
        escrow=escrow.address,
        block=block,
        transaction=tx_hash if isinstance(tx_hash, str) else "0x" + bytes(tx_hash).hex(),
        deployer=account.address,
        deployed_at=int(time.time()),
        token=token,
    )
    click.echo(f"recorded in {record(deployment)}")
