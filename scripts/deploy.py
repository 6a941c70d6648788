"""Deploy X402Escrow with Ape, at its one address on every chain, and record it in the deployment registry.

    ape run deploy --network base:sepolia:node --account deployer
    ape run deploy --network base:anvil:node --account TEST::0      # local anvil, chain id 84532

The escrow takes no constructor arguments, so it is created through the standard CREATE2
deployment proxy (`registry.CREATE2_PROXY`) with the fixed salt: it lands at
`registry.ESCROW_ADDRESS` on every chain, the address buyers trust by default. The script
refuses to deploy anywhere else (another `--salt`, or a chain without the proxy) unless
`--allow-elsewhere` is given. If the genuine contract is at the address already (anyone
may have deployed it), nothing is sent and the deployment is only verified and recorded.

The bytecode is the shipped artifact's (escrow_py/chain/artifacts), the very code the
Python layer is tested against; before deploying, the script checks that Ape's own compile
of contracts/ reproduces it. On local networks the USDC-like TestUSDC is deployed too, and
the record goes to .x402-escrow/deployments/ (or $X402_ESCROW_DEPLOYMENTS_DIR), never over
the shipped Base Sepolia record; public networks are recorded in escrow_py/chain/deployments/
(or $X402_ESCROW_DEPLOYMENTS_DIR).
"""

from __future__ import annotations

import time

import click
from ape import chain, compilers, project
from ape.cli import ConnectedProviderCommand, account_option
from ape.contracts import ContractContainer
from ethpm_types import ContractType

from escrow_py.chain.artifacts import load_artifact
from escrow_py.chain.registry import (
    CREATE2_PROXY,
    ESCROW_ADDRESS,
    ESCROW_SALT,
    Deployment,
    canonical_escrow_address,
    escrow_init_code,
    record,
)

LOCAL_NETWORKS = {"local", "anvil"}


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
    # The shipped artifacts are built with `bytecodeHash: none`, which ape-config.yaml cannot set,
    # so it is given here: Ape's compile (the config's version, EVM, viaIR and optimizer) must then
    # reproduce the runtime code byte for byte, its metadata trailer included.
    # Every source Ape compiles (ape-config.yaml leaves out contracts/test/), as build.py's
    # deployed_input() does: the same input, so the solc-js wrapper compiles it once for both.
    settings = {"solidity": {"metadata": {"bytecodeHash": "none"}}}
    compiled = {ct.name: ct for ct in compilers.compile(project.sources.paths, project=project, settings=settings)}
    escrow = compiled.get("X402Escrow")
    runtime = escrow.runtime_bytecode if escrow else None
    if runtime is None or runtime.bytecode is None:
        raise click.ClickException("Ape produced no runtime bytecode for X402Escrow")
    if runtime.bytecode != load_artifact("X402Escrow")["deployedBytecode"]:
        raise click.ClickException(
            "Ape's compile of contracts/X402Escrow.sol differs from the shipped artifact: "
            "run `make artifacts` and check ape-config.yaml's solidity settings"
        )


def _salt(value: str | None) -> bytes:
    if value is None:
        return ESCROW_SALT
    raw = bytes.fromhex(value.removeprefix("0x"))
    if len(raw) != 32:
        raise click.BadParameter(
            f"a CREATE2 salt is 32 bytes (0x + 64 hex digits), not {len(raw)}", param_hint="--salt"
        )
    return raw


def _hex(value: object) -> str:
    return value if isinstance(value, str) else "0x" + bytes(value).hex()  # type: ignore[arg-type]


@click.command(cls=ConnectedProviderCommand)
@account_option()
@click.option("--skip-compile-check", is_flag=True, help="deploy without comparing Ape's compile to the artifact")
@click.option("--salt", help="a CREATE2 salt other than the fixed one (0x + 64 hex digits); needs --allow-elsewhere")
@click.option(
    "--allow-elsewhere",
    is_flag=True,
    help=f"deploy even where the escrow does not land at {ESCROW_ADDRESS} (another salt, or no CREATE2 proxy)",
)
def cli(account, network, provider, *, skip_compile_check, salt, allow_elsewhere):  # type: ignore[no-untyped-def]
    """Deploy X402Escrow at its one address (and TestUSDC on local networks) and record the deployment."""
    w3 = provider.web3
    chosen = _salt(salt)
    has_proxy = bool(w3.eth.get_code(CREATE2_PROXY))
    target = canonical_escrow_address(chosen) if has_proxy else None
    if target != ESCROW_ADDRESS and not allow_elsewhere:
        why = (
            f"salt 0x{chosen.hex()} puts it at {target}" if has_proxy else f"this chain has no code at {CREATE2_PROXY}"
        )
        raise click.ClickException(
            f"refusing to deploy X402Escrow anywhere but {ESCROW_ADDRESS}, its address on every chain: {why}. "
            "Pass --allow-elsewhere to deploy there anyway (buyers will not trust it by default)."
        )
    if not skip_compile_check:
        _check_reproducible()
        click.echo("Ape's compile reproduces the shipped artifact")
    runtime = load_artifact("X402Escrow")["deployedBytecode"]
    tx_hash: str | None = None
    block: int | None = None
    if target is None:
        escrow = account.deploy(_container("X402Escrow"))  # a plain CREATE: only with --allow-elsewhere
        address, tx_hash = escrow.address, _hex(escrow.txn_hash)
        block = int(w3.eth.get_transaction_receipt(tx_hash)["blockNumber"])
    elif "0x" + bytes(w3.eth.get_code(target)).hex() == runtime:
        address = target
        click.echo(f"X402Escrow is already at {address}: nothing to send")
    else:
        receipt = account.transfer(CREATE2_PROXY, 0, data=chosen + escrow_init_code())
        address, tx_hash, block = target, _hex(receipt.txn_hash), int(receipt.block_number)
    onchain = "0x" + bytes(w3.eth.get_code(address)).hex()
    if onchain != runtime:
        raise click.ClickException(f"runtime bytecode at {address} differs from the shipped artifact")
    click.echo(f"X402Escrow at {address} (block {block}); runtime bytecode verified")
    local = network.name in LOCAL_NETWORKS
    token = None
    if local:
        token = account.deploy(_container("TestUSDC"), "USDC", "2").address
        click.echo(f"TestUSDC at {token}")
    deployment = Deployment(
        network=f"eip155:{chain.chain_id}",
        chain_id=chain.chain_id,
        escrow=address,
        block=block,
        transaction=tx_hash,
        deployer=account.address,
        deployed_at=int(time.time()),
        token=token,
        factory=CREATE2_PROXY if target is not None else None,
        salt="0x" + chosen.hex() if target is not None else None,
    )
    click.echo(f"recorded in {record(deployment, local=local)}")
