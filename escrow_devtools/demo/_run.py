"""The demo's world (a chain, a token, an escrow, a seller app, a keeper process) and its five stories."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import logging
import os
import secrets
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

from web3 import HTTPProvider, Web3

from escrow_devtools.anvil import Anvil, dev_private_key
from escrow_devtools.demo._shop import (
    QUOTE_PRICE,
    REPORT_PRICE,
    SERVE_FIRST_LIMITS,
    STUCK_PRICE,
    build_shop,
    quote_route,
    routes,
)
from escrow_devtools.harness import ServerDidNotStart, serving
from escrow_py.buyer import (
    AsyncEscrowClient,
    EscrowClient,
    HandlerFailedRefunded,
    PaymentError,
    PaymentState,
    RecoveryAction,
    delivered_hash,
    recover,
)
from escrow_py.chain import rpc
from escrow_py.chain.escrow import Deposited, Escrow, Refunded, Settled, deploy_local
from escrow_py.chain.registry import USDC
from escrow_py.chain.signer import DEFAULT_KEY_ENV, LocalSigner
from escrow_py.chain.token import Token
from escrow_py.chain.tx import TxSender
from escrow_py.protocol.errors import ConfigError, EscrowError
from escrow_py.protocol.terms import State, delivery_hash
from escrow_py.protocol.wire import (
    PAYMENT_RESPONSE_HEADER,
    SettlementExtra,
    SettlementStatus,
    decode_payment_response,
    network_of,
)
from escrow_py.seller import FacilitatorSellerConfig, SellerConfig

FUNDING = 1_000_000  # 1 USDC for the local buyer
BURST = 5  # story 5: serve-first quotes bought at once
# Story 5's settlements wait this long for each other, so one settleMany pays the whole burst.
SETTLE_BATCH_WAIT = 5.0
NEEDED = 3 * REPORT_PRICE + STUCK_PRICE + BURST * QUOTE_PRICE  # what the five stories ask of the buyer
# Anvil's dev accounts (public keys of a public mnemonic): who plays which part on the local chain.
DEPLOYER, BUYER, SELLER, KEEPER = 0, 1, 2, 3
# Environment variables naming the keys on an existing chain; each falls back to X402_ESCROW_PRIVATE_KEY.
ROLE_KEY_ENVS = {
    "buyer": "X402_ESCROW_BUYER_KEY",
    "seller": "X402_ESCROW_SELLER_KEY",
    "keeper": "X402_ESCROW_KEEPER_KEY",
}

log = logging.getLogger("escrow_devtools.demo")


@dataclass(frozen=True, slots=True)
class DemoOptions:
    """Where to play: a fresh local anvil by default, or an existing chain given `rpc_url` and `escrow`."""

    rpc_url: str | None = None
    escrow: str | None = None
    token: str | None = None
    workdir: Path | None = None
    work_seconds: float = 3.0  # how long /report works: the window in which story 4 kills the buyer
    facilitator: bool = False  # the seller holds no key and no RPC: a facilitator (seller's key) settles for it

    def __post_init__(self) -> None:
        if (self.rpc_url is None) != (self.escrow is None):
            raise ConfigError("an existing chain needs both --rpc and --escrow (or neither, for a local anvil)")
        if self.token is not None and self.rpc_url is None:
            raise ConfigError("--token only applies with --rpc and --escrow: the local chain deploys its own")


@dataclass
class StoryResult:
    number: int
    title: str
    ok: bool = False
    outcome: str = "did not finish"
    escrow_id: bytes | None = None


@dataclass
class World:
    """Everything the stories act on."""

    w3: Web3
    rpc_url: str
    chain_id: int
    token: Token
    escrow: Escrow
    keys: dict[str, str]  # role -> private key, handed to child processes through their environment only
    start_block: int
    workdir: Path
    work_seconds: float = 3.0
    base_url: str = ""
    facilitator_url: str | None = None
    facilitator_key: str | None = None
    # The demo's own anvil: its clock may be moved. Never an existing chain's, whoever runs it.
    owns_clock: bool = False
    signers: dict[str, LocalSigner] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.signers = {role: LocalSigner.from_key(key) for role, key in self.keys.items()}

    def address(self, role: str) -> str:
        return self.signers[role].address

    def now(self) -> int:
        return int(self.w3.eth.get_block("latest")["timestamp"])


class Display:
    """Progress as it happens: one line per event, stamped with the seconds since the start."""

    def __init__(self, out: IO[str]) -> None:
        self.out = out
        self.t0 = time.monotonic()

    def __call__(self, text: str = "") -> None:
        stamp = f"[{time.monotonic() - self.t0:6.1f}s] " if text else ""
        print(stamp + text, file=self.out, flush=True)

    def wait(self, what: str, done: Callable[[], bool], *, timeout: float, every: float = 5.0) -> bool:
        """Poll `done` until true; say what we wait for now and then. False after `timeout` seconds."""
        start = last = time.monotonic()
        while not done():
            now = time.monotonic()
            if now - start > timeout:
                self(f"  gave up waiting for {what} after {timeout:.0f}s")
                return False
            if now - last >= every:
                self(f"  ... still waiting for {what} ({now - start:.0f}s)")
                last = now
            time.sleep(0.2)
        return True


class Books:
    """The accounting: the token balances of every party, and what the escrow should hold."""

    def __init__(self, world: World) -> None:
        self.world = world
        # One row per address: on an existing chain one key may play several parts.
        self.parties: dict[str, str] = {}
        for role in ("buyer", "seller", "keeper"):
            self.parties.setdefault(world.address(role), role)
        self.parties.setdefault(world.escrow.address, "escrow")
        self.before = self.balances()

    def balances(self, block: int | None = None) -> dict[str, int]:
        at = int(self.world.w3.eth.block_number) if block is None else block
        return {address: self.world.token.balance_of(address, at) for address in self.parties}

    def held_by_us(self, block: int) -> int:
        """The sum of Held amounts, at `block`, over the escrows this demo's buyer opened since it started."""
        buyer = self.world.address("buyer")
        escrow = self.world.escrow
        return sum(
            e.terms.amount
            for e in escrow.events(self.world.start_block, block)
            if isinstance(e, Deposited) and e.terms.buyer == buyer and escrow.state_of(e.id, block) is State.HELD
        )

    def check(self) -> tuple[bool, str]:
        """Sum of balances unchanged, and the escrow holding exactly what is Held (beyond what it held before).

        Everything is read at one block: the seller and the keeper keep sending transactions meanwhile.
        """
        block = int(self.world.w3.eth.block_number)
        after = self.balances(block)
        conserved = sum(after.values()) == sum(self.before.values())
        escrow = self.world.escrow.address
        held = self.held_by_us(block)
        holds_held = after[escrow] - self.before[escrow] == held
        extra = after[escrow] - self.before[escrow]
        text = (
            f"sum of balances {'unchanged' if conserved else 'CHANGED'}; the escrow holds {_usdc(extra)} more than "
            f"before, Held is {_usdc(held)}{'' if holds_held else ' (MISMATCH)'}"
        )
        return conserved and holds_held, text

    def table(self) -> list[str]:
        after = self.balances()
        rows = [f"  {'party':<8} {'address':<44} {'before':>12} {'after':>12} {'change':>12}"]
        for address, role in self.parties.items():
            b, a = self.before[address], after[address]
            rows.append(f"  {role:<8} {address:<44} {_usdc(b):>12} {_usdc(a):>12} {_usdc(a - b, sign=True):>12}")
        total_b, total_a = sum(self.before.values()), sum(after.values())
        change = _usdc(total_a - total_b, sign=True)
        rows.append(f"  {'total':<8} {'':<44} {_usdc(total_b):>12} {_usdc(total_a):>12} {change:>12}")
        return rows


def _usdc(amount: int, *, sign: bool = False) -> str:
    return f"{amount / 10**6:{'+' if sign else ''},.6f}"


def _short(escrow_id: bytes | None) -> str:
    return "-" if escrow_id is None else "0x" + escrow_id.hex()[:12] + "…"


# -- the world ---------------------------------------------------------------------------------


@contextlib.contextmanager
def _local_world(workdir: Path, display: Display) -> Iterator[World]:
    display("starting anvil (chain id 84532, one block per second)")
    with Anvil(block_time=1) as node:
        w3 = node.web3()
        deployer = TxSender(w3, LocalSigner.from_key(dev_private_key(DEPLOYER)))
        escrow_address, token_address = deploy_local(deployer)  # ape run deploy's order: the same addresses
        token, escrow = Token(w3, token_address), Escrow(w3, escrow_address)
        keys = {"buyer": dev_private_key(BUYER), "seller": dev_private_key(SELLER), "keeper": dev_private_key(KEEPER)}
        world = World(w3, node.url, node.chain_id, token, escrow, keys, int(w3.eth.block_number), workdir)
        world.owns_clock = True
        token.mint(deployer, world.address("buyer"), FUNDING)
        display(f"deployed TestUSDC at {token.address} and X402Escrow at {escrow.address}")
        display(f"funded the buyer {world.address('buyer')} with {_usdc(FUNDING)} USDC")
        yield world


def _existing_world(options: DemoOptions, workdir: Path, display: Display) -> World:
    assert options.rpc_url is not None and options.escrow is not None
    w3 = Web3(HTTPProvider(options.rpc_url, request_kwargs={"timeout": 60}))
    chain_id = int(w3.eth.chain_id)
    network = network_of(chain_id)
    token_address = options.token or (USDC[network].address if network in USDC else None)
    if token_address is None:
        raise ConfigError(f"no known USDC on {network}: pass --token")
    keys: dict[str, str] = {}
    for role, env in ROLE_KEY_ENVS.items():
        key = os.environ.get(env) or os.environ.get(DEFAULT_KEY_ENV)
        if not key:
            raise ConfigError(f"the {role} key: set {env} or {DEFAULT_KEY_ENV} (a funded key on chain {chain_id})")
        keys[role] = key
    escrow = Escrow(w3, options.escrow)
    if not w3.eth.get_code(escrow.address):
        raise ConfigError(f"no contract at {escrow.address} on chain {chain_id}")
    world = World(w3, options.rpc_url, chain_id, Token(w3, token_address), escrow, keys, 0, workdir)
    world.start_block = int(w3.eth.block_number)
    balance = world.token.balance_of(world.address("buyer"))
    if balance < NEEDED:
        raise ConfigError(
            f"the buyer {world.address('buyer')} holds {_usdc(balance)} of {token_address}; the stories need "
            f"{_usdc(NEEDED)}"
        )
    for role in ("seller", "keeper"):
        if w3.eth.get_balance(world.signers[role].address) == 0:
            raise ConfigError(f"the {role} {world.address(role)} has no ETH for gas on chain {chain_id}")
    display(f"existing chain {chain_id} at {options.rpc_url}: escrow {escrow.address}, token {token_address}")
    return world


@contextlib.contextmanager
def _facilitator(world: World, display: Display) -> Iterator[None]:
    """`--facilitator`: the seller's key moves into a facilitator on loopback; the shop gets an API key for it."""
    from escrow_py.facilitator import Facilitator, FacilitatorConfig, KeyStore, create_app

    domain = world.token.domain(world.chain_id)
    database = world.workdir / "facilitator.sqlite"
    config = FacilitatorConfig(
        rpc_url=world.rpc_url, escrow=world.escrow.address, token=world.token.address,
        network=network_of(world.chain_id), operator=world.signers["seller"], store=database,
        token_name=domain.name, token_version=domain.version,
        # The keyless shop hands each serve-first settlement over on its own: they wait here for each other.
        settle_batch_wait=SETTLE_BATCH_WAIT,
    )  # fmt: skip
    keys = KeyStore(database)
    _, world.facilitator_key = keys.create("demo shop", [world.address("seller")])
    console = secrets.token_urlsafe(12)
    facilitator = Facilitator(config)
    app = create_app(facilitator, keys, console_token=console)
    try:
        with serving(app, timeout_graceful_shutdown=2, log_config=None) as running:
            world.facilitator_url = running.url
            url = running.url
            display(f"facilitator on {url} holds the operator key; console {url}/console?token={console}")
            yield
    except ServerDidNotStart as exc:
        raise EscrowError(f"the facilitator's uvicorn did not start (see seller.log): {exc}") from exc
    finally:
        facilitator.close()
        keys.close()


@contextlib.contextmanager
def _seller(world: World, display: Display) -> Iterator[None]:
    domain = world.token.domain(world.chain_id)
    config: SellerConfig | FacilitatorSellerConfig
    if world.facilitator_url is not None and world.facilitator_key is not None:
        # The facilitator deposits and delivers (hold), and settles what the shop served first (/quote).
        config = FacilitatorSellerConfig(
            facilitator_url=world.facilitator_url, api_key=world.facilitator_key, network=network_of(world.chain_id),
            token=world.token.address, pay_to=world.address("seller"), routes=[*routes(), quote_route()],
            store=world.workdir / "seller.sqlite", **SERVE_FIRST_LIMITS,  # type: ignore[arg-type]
        )  # fmt: skip
        how = "FacilitatorMiddleware: no key, no RPC"
    else:
        config = SellerConfig(
            rpc_url=world.rpc_url,
            escrow=world.escrow.address,
            token=world.token.address,
            network=network_of(world.chain_id),
            pay_to=world.address("seller"),
            operator=world.signers["seller"],
            routes=[*routes(), quote_route()],
            store=world.workdir / "seller.sqlite",
            token_name=domain.name,
            token_version=domain.version,
            settle_batch_wait=SETTLE_BATCH_WAIT,
            **SERVE_FIRST_LIMITS,  # type: ignore[arg-type]
        )
        how = "EscrowMiddleware"
    app = build_shop(config, work_seconds=world.work_seconds)
    # uvicorn's records go to the root logger (log_config=None), hence to seller.log, not the story.
    try:
        with serving(app, timeout_graceful_shutdown=2, log_config=None) as running:
            world.base_url = running.url
            display(f"seller app on {world.base_url} (FastAPI + {how}), paid to {world.address('seller')}")
            yield
    except ServerDidNotStart as exc:
        raise EscrowError(f"the seller's uvicorn did not start (see seller.log): {exc}") from exc


@contextlib.contextmanager
def _keeper(world: World, display: Display) -> Iterator[subprocess.Popen[bytes]]:
    log_file = (world.workdir / "keeper.log").open("ab")
    command = [
        sys.executable, "-m", "escrow_py.cli", "keeper", "run",
        "--rpc", world.rpc_url, "--escrow", world.escrow.address,
        "--database", str(world.workdir / "keeper.sqlite"),
        "--start-block", str(world.start_block), "--poll-interval", "1",
        "--buyer", world.address("buyer"),
        # The keeper refunds only allowed tokens (the registry's USDC by default): the demo's may be TestUSDC.
        "--token", world.token.address, "--network", f"eip155:{world.chain_id}",
    ]  # fmt: skip
    env = {**os.environ, DEFAULT_KEY_ENV: world.keys["keeper"]}
    process = subprocess.Popen(command, env=env, stdout=log_file, stderr=log_file)
    display(f"keeper process {process.pid} running as {world.address('keeper')}")
    try:
        yield process
    finally:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(15)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
        log_file.close()


# -- the buyer agent as a separate process -----------------------------------------------------


class Agent:
    """`python -m escrow_devtools.demo.agent ...` with the buyer's key in its environment; its JSON lines, parsed."""

    def __init__(self, world: World, *args: str) -> None:
        env = {**os.environ, DEFAULT_KEY_ENV: world.keys["buyer"], "PYTHONUNBUFFERED": "1"}
        stderr = (world.workdir / "agents.log").open("ab")
        command = [sys.executable, "-m", "escrow_devtools.demo.agent", *args, "--rpc", world.rpc_url]
        self.process = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=stderr, text=True)
        stderr.close()
        self.lines: list[dict[str, Any]] = []
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.process.stdout is not None
        for line in self.process.stdout:
            with contextlib.suppress(json.JSONDecodeError):
                self.lines.append(json.loads(line))

    def kill(self) -> int:
        self.process.send_signal(signal.SIGKILL)
        return self.process.wait()

    def finish(self, timeout: float) -> list[dict[str, Any]]:
        try:
            self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
        self._reader.join(5)
        return self.lines


def _new_deposit(world: World, since: int, known: set[bytes]) -> Deposited | None:
    buyer = world.address("buyer")
    for event in world.escrow.events(since, int(world.w3.eth.block_number)):
        if isinstance(event, Deposited) and event.terms.buyer == buyer and event.id not in known:
            return event
    return None


def _kill_after_deposit(world: World, display: Display, agent: Agent, since: int) -> Deposited | None:
    """Watch the chain until the agent's payment is deposited, then SIGKILL the agent."""
    found: list[Deposited] = []

    def deposited() -> bool:
        if agent.process.poll() is not None:
            return True
        event = _new_deposit(world, since, set())
        if event is not None:
            found.append(event)
        return bool(found)

    display.wait("the seller's deposit", deposited, timeout=90)
    if not found:
        display(f"  the agent exited early ({agent.process.returncode}): {agent.finish(5)}")
        return None
    code = agent.kill()
    event = found[0]
    display(
        f"  deposited in block {event.at.block_number}: escrow {_short(event.id)} Held, deadline in "
        f"{event.terms.deadline - world.now()}s"
    )
    display(f"  SIGKILL the buyer agent (pid {agent.process.pid}, exit {code}) before it reads any answer")
    return event


# -- the stories -------------------------------------------------------------------------------


def _story_paid(world: World, display: Display) -> StoryResult:
    result = StoryResult(1, STORIES[0][0])
    with EscrowClient(world.signers["buyer"], world.rpc_url, world.workdir / "buyer.sqlite", timeout=60) as client:
        display("  GET /report/weather: 402, the client signs, retries; the seller deposits and serves")
        response = client.get(f"{world.base_url}/report/weather")
    settled = SettlementExtra.from_json(decode_payment_response(response.headers[PAYMENT_RESPONSE_HEADER]).extra)
    result.escrow_id = settled.escrow_id
    display(f"  200, {len(response.content)} bytes, keccak256 = PAYMENT-RESPONSE deliveryHash (checked by the client)")
    if not display.wait(
        "the seller's deliverMany", lambda: world.escrow.state_of(settled.escrow_id) is State.RELEASED, timeout=60
    ):
        result.outcome = "the seller never posted the delivery"
        return result
    on_chain = delivered_hash(world.w3, world.escrow.address, settled.escrow_id)
    result.ok = on_chain == delivery_hash(response.content)
    display(f"  Delivered event on chain: 0x{(on_chain or b'').hex()[:16]}…, matches the body: {result.ok}")
    result.outcome = "released to the seller; body matches the on-chain hash" if result.ok else "HASH MISMATCH"
    return result


def _story_handler_fails(world: World, display: Display) -> StoryResult:
    result = StoryResult(2, STORIES[1][0])
    before = world.token.balance_of(world.address("buyer"))
    with EscrowClient(world.signers["buyer"], world.rpc_url, world.workdir / "buyer.sqlite", timeout=60) as client:
        display("  GET /fail: paid, deposited, and the handler raises")
        try:
            client.get(f"{world.base_url}/fail")
        except HandlerFailedRefunded as exc:
            result.escrow_id = exc.escrow_id
            tx = "unknown" if exc.refund_tx is None else "0x" + exc.refund_tx.hex()[:16] + "…"
            display(f"  HandlerFailedRefunded: status {exc.status}, refund tx {tx}")
        except PaymentError as exc:
            result.outcome = f"unexpected {type(exc).__name__}: {exc}"
            return result
    if result.escrow_id is None:
        result.outcome = "the paid request did not fail"
        return result
    state = world.escrow.state_of(result.escrow_id)
    after = world.token.balance_of(world.address("buyer"))
    result.ok = state is State.REFUNDED and after == before
    display(f"  escrow {state.name}; buyer balance back to {_usdc(after)} USDC: {after == before}")
    result.outcome = "refunded by the seller's operator at once" if result.ok else f"escrow {state.name}"
    return result


def _story_keeper_refunds(world: World, display: Display) -> StoryResult:
    result = StoryResult(3, STORIES[2][0])
    since = int(world.w3.eth.block_number)
    agent = Agent(world, "pay", f"{world.base_url}/stuck", "--journal", str(world.workdir / "agent-3.sqlite"))
    display(f"  buyer agent pid {agent.process.pid}: GET /stuck (its upstream never answers)")
    event = _kill_after_deposit(world, display, agent, since)
    if event is None:
        result.outcome = "the payment was never deposited"
        return result
    result.escrow_id = event.id
    display("  nobody alive will ask for this money back; the keeper watches the deadline")
    ahead = event.terms.deadline - world.now()
    if world.owns_clock and ahead > 2:
        # What the story needs is the chain saying the deadline has passed; on the demo's own anvil that is
        # one call, not twenty seconds of every process polling an idle chain.
        rpc.request(world.w3, "evm_setNextBlockTimestamp", [event.terms.deadline])
        display(f"  the local chain's clock jumps {ahead}s ahead to the deadline, as if the time had passed")
    if not display.wait(
        f"the deadline and the keeper (deadline {event.terms.deadline})",
        lambda: world.escrow.state_of(event.id) is State.REFUNDED,
        timeout=event.terms.deadline - world.now() + 90,
    ):
        result.outcome = "still Held: the keeper did not refund"
        return result
    refund = next(
        e
        for e in world.escrow.events(event.at.block_number, int(world.w3.eth.block_number))
        if isinstance(e, Refunded) and e.id == event.id
    )
    result.ok = refund.caller == world.address("keeper")
    display(f"  Refunded in block {refund.at.block_number} by {refund.caller}, the keeper: {result.ok}")
    result.outcome = "refunded by the keeper after the deadline" if result.ok else f"refunded by {refund.caller}"
    return result


def _story_recover(world: World, display: Display) -> StoryResult:
    result = StoryResult(4, STORIES[3][0])
    journal = str(world.workdir / "agent-4.sqlite")
    since = int(world.w3.eth.block_number)
    agent = Agent(world, "pay", f"{world.base_url}/report/sunrise", "--journal", journal)
    display(f"  buyer agent pid {agent.process.pid}: GET /report/sunrise (the report takes a few seconds)")
    event = _kill_after_deposit(world, display, agent, since)
    if event is None:
        result.outcome = "the payment was never deposited"
        return result
    result.escrow_id = event.id
    if not display.wait(
        "the seller to finish and post the delivery",
        lambda: world.escrow.state_of(event.id) is State.RELEASED,
        timeout=90,
    ):
        result.outcome = "the seller never delivered"
        return result
    on_chain = delivered_hash(world.w3, world.escrow.address, event.id)
    display(f"  released to the seller; Delivered hash 0x{(on_chain or b'').hex()[:16]}…")
    recovery = Agent(world, "recover", "--journal", journal)
    display(f"  a new buyer process (pid {recovery.process.pid}) runs recover() on the journal")
    lines = recovery.finish(120)
    items = [line for line in lines if line.get("event") == "recovered" and line.get("body")]
    if not items:
        result.outcome = f"recover() got no bytes: {lines}"
        return result
    body = base64.b64decode(items[0]["body"])
    result.ok = on_chain is not None and delivery_hash(body) == on_chain
    display(f"  recover(): {items[0]['action']}, {items[0]['outcome']}")
    display(f"  the bytes: {body.decode(errors='replace')}")
    result.outcome = "recovered the exact bytes, checked against the chain" if result.ok else "BYTES DO NOT MATCH"
    return result


def _story_serve_first(world: World, display: Display) -> StoryResult:
    result = StoryResult(5, STORIES[4][0])
    buyer, seller = world.address("buyer"), world.address("seller")
    before = {buyer: world.token.balance_of(buyer), seller: world.token.balance_of(seller)}
    journal = world.workdir / "buyer-5.sqlite"

    async def burst() -> list[tuple[float, Any]]:
        async with AsyncEscrowClient(world.signers["buyer"], world.rpc_url, journal, timeout=60) as client:

            async def one(i: int) -> tuple[float, Any]:
                start = time.monotonic()
                response = await client.get(f"{world.base_url}/quote/item-{i}")
                return time.monotonic() - start, response

            return await asyncio.gather(*(one(i) for i in range(BURST)))

    display(f"  {BURST} x GET /quote/...: a serve-first route; the client signs, the seller checks and answers")
    answers = asyncio.run(burst())
    extras = [SettlementExtra.from_json(decode_payment_response(r.headers[PAYMENT_RESPONSE_HEADER]).extra)
              for _, r in answers]  # fmt: skip
    ids = [e.escrow_id for e in extras]
    result.escrow_id = ids[0]
    slowest = max(t for t, _ in answers)
    pending = all(e.settlement is SettlementStatus.PENDING for e in extras)
    unused = not any(world.token.authorization_state(buyer, i) for i in ids)
    display(f"  {BURST} answers, the slowest in {slowest * 1000:.0f} ms, each 'pending'; no money moved yet: {unused}")
    if not (pending and unused):
        result.outcome = "the burst was not served first"
        return result
    if not display.wait(
        "the seller's settleMany", lambda: all(world.token.authorization_state(buyer, i) for i in ids), timeout=60
    ):
        result.outcome = "the seller never settled"
        return result
    events = [world.escrow.settlement_of(i, since=world.now() - 600) for i in ids]
    settled = [e for e in events if isinstance(e, Settled)]
    txs = {e.at.tx_hash for e in settled}
    hashes_match = [e.delivery_hash for e in settled] == [delivery_hash(r.content) for _, r in answers]
    display(
        f"  {len(settled)} Settled events in {len(txs)} transaction(s); every hash matches its body: {hashes_match}"
    )
    paid = world.token.balance_of(seller) - before[seller]
    spent = before[buyer] - world.token.balance_of(buyer)
    display(f"  the seller received {_usdc(paid)} USDC, the buyer spent {_usdc(spent)} USDC")
    report = recover(journal, world.signers["buyer"], world.rpc_url)
    closed = all(
        (i.action, i.journal_state) == (RecoveryAction.MARKED_SETTLED, PaymentState.DELIVERED) for i in report.items
    )
    display(f"  recover(): {len(report.items)} unsettled payments closed as delivered and spent: {closed}")
    result.ok = (
        len(settled) == BURST and len(txs) == 1 and hashes_match and paid == spent == BURST * QUOTE_PRICE and closed
    )
    result.outcome = (
        f"{BURST} answered at once, paid by one settleMany" if result.ok else "the settlement did not match the burst"
    )
    return result


STORIES: list[tuple[str, Callable[[World, Display], StoryResult]]] = [
    ("paid and delivered, hash verified", _story_paid),
    ("the handler fails: instant refund", _story_handler_fails),
    ("buyer killed, seller never delivers: the keeper refunds", _story_keeper_refunds),
    ("buyer killed after paying, seller delivered: recover()", _story_recover),
    ("a burst served first, then one settleMany pays them all", _story_serve_first),
]


def run_demo(options: DemoOptions | None = None, out: IO[str] | None = None) -> bool:
    """Play the five stories; True when every story ended as promised and every token is accounted for."""
    options = options or DemoOptions()
    display = Display(out or sys.stdout)
    workdir = options.workdir or Path(tempfile.mkdtemp(prefix="x402-escrow-demo-"))
    workdir.mkdir(parents=True, exist_ok=True)
    # Logs of the seller and the keeper go to files, so the story reads cleanly.
    handler = logging.FileHandler(workdir / "seller.log")
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s %(message)s"))
    root = logging.getLogger()
    root.addHandler(handler)
    previous_level = root.level
    root.setLevel(logging.INFO)
    display(f"work directory {workdir} (journals, stores and logs)")
    try:
        with contextlib.ExitStack() as stack:
            if options.rpc_url is None:
                world = stack.enter_context(_local_world(workdir, display))
            else:
                world = _existing_world(options, workdir, display)
            world.work_seconds = options.work_seconds
            if options.facilitator:
                stack.enter_context(_facilitator(world, display))
            stack.enter_context(_seller(world, display))
            stack.enter_context(_keeper(world, display))
            return _play(world, display)
    finally:
        root.removeHandler(handler)
        root.setLevel(previous_level)
        handler.close()


def _play(world: World, display: Display) -> bool:
    books = Books(world)
    results: list[StoryResult] = []
    books_ok = True
    for number, (title, story) in enumerate(STORIES, start=1):
        display()
        display(f"story {number}: {title}")
        result = StoryResult(number, title)
        try:
            result = story(world, display)
        except EscrowError as exc:
            result.outcome = f"{type(exc).__name__}: {exc}"
        results.append(result)
        ok, text = books.check()
        books_ok = books_ok and ok
        display(f"  {'PASS' if result.ok else 'FAIL'}: {result.outcome}; {text}")
    display()
    display("stories")
    for r in results:
        display(f"  {r.number}. {r.title:<58} {_short(r.escrow_id):<16} {'ok' if r.ok else 'FAILED'}")
    display("balances (USDC)")
    for row in books.table():
        display(row)
    ok, text = books.check()
    everything = ok and books_ok and all(r.ok for r in results)
    display(text)
    display("every token accounted for" if everything else "ACCOUNTING FAILED")
    return everything
