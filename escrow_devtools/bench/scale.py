"""`x402-escrow bench scale`: seller replicas on one store and one operator key, under paid load.

The parts, each usable alone (the tests in tests/integration/test_replicas.py use them):

- `replica_app()`, in `replica.py` (a module of its own, so that a replica process imports nothing
  else of the benchmark): the seller app a replica runs, configured from the environment.
- `Replicas`: N uvicorn processes (each with `--workers W`) on one store URL.
- `ConnectionRoundRobin`: a TCP balancer that sends each new connection to the next live replica (run_load
  opens one per request); `RoundRobinProxy`: an HTTP one that sends each request to the next live replica.
- `run_load()`: buyers paying through the proxy, with deliberate duplicates (the same payment
  sent to several replicas at once) and replays (sent again to a replica other than the proxy's).
- `audit()`: what the chain committed against what the buyers got: deposits per payment,
  handler runs per payment, replays whose bytes are not the ones whose hash is on chain.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Iterator, Sequence
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
from starlette.requests import Request
from starlette.responses import Response
from starlette.types import Receive, Scope, Send

from escrow_devtools.anvil import free_port
from escrow_devtools.bench.replica import CONFIG_ENV, KEY_ENV, run_key
from escrow_devtools.harness import serving, wait_until_answering
from escrow_py.chain.escrow import Delivered, Deposited, Escrow
from escrow_py.chain.signer import LocalSigner, Signer
from escrow_py.protocol.eip3009 import RECEIVE_WITH_AUTHORIZATION, authorization_for, typed_data
from escrow_py.protocol.terms import Terms, delivery_hash
from escrow_py.protocol.wire import (
    PAYMENT_REQUIRED_HEADER,
    PAYMENT_RESPONSE_HEADER,
    PAYMENT_SIGNATURE_HEADER,
    EscrowPayload,
    EscrowRequirements,
    decode_payment_required,
    encode_header,
)

PUBLIC_URL = "http://shop.example"
# Texts a node answers when two transactions of one key collide (tx.py's NonceConflict cases).
NONCE_ERROR_TEXTS = ("nonce too low", "replacement transaction underpriced", "operator_nonce_conflict", "nonce taken")


def handler_runs(runs_dir: Path) -> tuple[Counter[str], dict[str, Counter[str]]]:
    """Runs per payment (by run_key) over every replica, and per replica process id."""
    total: Counter[str] = Counter()
    by_pid: dict[str, Counter[str]] = {}
    for path in runs_dir.glob("runs-*.log"):
        for line in path.read_text().splitlines():
            key, _route, pid = line.split()
            total[key] += 1
            by_pid.setdefault(pid, Counter())[key] += 1
    return total, by_pid


# -- replica processes -----------------------------------------------------------------------------


@dataclass
class ChainSetup:
    """Where the replicas' chain, contract and token are, and who is paid."""

    rpc_url: str
    escrow: str
    token: str
    pay_to: str
    operator_key: str


class Replicas:
    """`count` uvicorn processes of replica_app on one store, each with `workers` workers; stop() ends them."""

    def __init__(
        self,
        setup: ChainSetup,
        store: str,
        *,
        count: int,
        workers: int = 1,
        work_dir: Path,
        work_seconds: float = 0.0,
        blocking_work: bool = False,
        seller: dict[str, Any] | None = None,
        poster_interval: float = 0.2,
    ) -> None:
        self.work_dir = work_dir
        self.runs_dir = work_dir / "runs"
        self.runs_dir.mkdir(parents=True, exist_ok=True)
        settings = {
            "rpc_url": setup.rpc_url,
            "escrow": setup.escrow,
            "token": setup.token,
            "pay_to": setup.pay_to,
            "store": store,
            "runs_dir": str(self.runs_dir),
            "work_seconds": work_seconds,
            "blocking_work": blocking_work,
            "poster_interval": poster_interval,
            # Behind a balancer every replica prices the one public URL, whichever port a request reached.
            "seller": {"public_base_url": PUBLIC_URL, **(seller or {})},
        }
        env = {**os.environ, CONFIG_ENV: json.dumps(settings), KEY_ENV: setup.operator_key}
        self.processes: list[subprocess.Popen[bytes]] = []
        self.urls: list[str] = []
        self.logs: list[Path] = []
        for n in range(count):
            port = free_port()
            log = work_dir / f"replica-{n}.log"
            command = [
                sys.executable, "-m", "uvicorn", "--factory", "escrow_devtools.bench.replica:replica_app",
                "--host", "127.0.0.1", "--port", str(port), "--workers", str(workers),
                "--lifespan", "on", "--log-level", "warning", "--timeout-graceful-shutdown", "2",
            ]  # fmt: skip
            with log.open("wb") as out:
                self.processes.append(subprocess.Popen(command, env=env, stdout=out, stderr=subprocess.STDOUT))
            self.urls.append(f"http://127.0.0.1:{port}")
            self.logs.append(log)
        try:
            for n in range(count):
                self._wait_ready(n)
        except BaseException:
            self.stop()
            raise

    def _wait_ready(self, n: int, timeout: float = 60.0) -> None:
        wait_until_answering(
            f"{self.urls[n]}/report/ping",
            ready=lambda answer: answer.status_code == 402,
            process=self.processes[n],
            output=lambda: self.logs[n].read_text()[-3000:],
            timeout=timeout,
            what=f"replica {n}",
        )

    def kill(self, n: int) -> None:
        """SIGKILL replica `n` and its workers (no shutdown, no last poster pass): a crash."""
        process = self.processes[n]
        with open(os.devnull, "wb"):
            for child in _children(process.pid):
                os.kill(child, signal.SIGKILL)
            process.kill()
        process.wait()

    def log_text(self) -> str:
        return "\n".join(p.read_text(errors="replace") for p in self.logs if p.exists())

    def stop(self) -> None:
        for process in self.processes:
            if process.poll() is None:
                process.terminate()
        for process in self.processes:
            try:
                process.wait(20)
            except subprocess.TimeoutExpired:
                for child in _children(process.pid):
                    os.kill(child, signal.SIGKILL)
                process.kill()
                process.wait()


def _children(pid: int) -> list[int]:
    """The process ids of `pid`'s children (uvicorn's workers), from /proc."""
    found = []
    for task in Path("/proc").glob("[0-9]*"):
        try:
            fields = (task / "stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid:
            found.append(int(task.name))
    return found


# -- the load balancer -----------------------------------------------------------------------------


class RoundRobinProxy:
    """An HTTP load balancer on 127.0.0.1: each request goes to the next backend, skipping dead ones.

    A backend that refuses the connection is skipped (nothing reached it); one that dies with the
    request in flight answers 502, as a real balancer does, and the client decides what to resend.
    """

    def __init__(self, backends: Sequence[str]) -> None:
        self.backends = list(backends)
        self._next = 0
        self._client: httpx.AsyncClient | None = None
        self._stack = ExitStack()
        self.url = ""

    async def _app(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            await self._lifespan(receive, send)
            return
        if self._client is None:
            raise RuntimeError("the proxy's lifespan did not start")
        request = Request(scope, receive)
        body = await request.body()
        headers = [(k, v) for k, v in request.headers.raw if k.lower() not in (b"host", b"content-length")]
        target = request.url.path + (f"?{request.url.query}" if request.url.query else "")
        answer = Response(b"no backend", status_code=502)
        for _ in range(len(self.backends)):
            backend = self.backends[self._next % len(self.backends)]
            self._next += 1
            try:
                upstream = await self._client.request(request.method, backend + target, headers=headers, content=body)
            except httpx.ConnectError:
                continue  # dead: nothing was sent, try the next one
            except httpx.TransportError:
                answer = Response(b"backend died mid-request", status_code=502)
                break
            kept = [
                (k, v) for k, v in upstream.headers.raw if k.lower() not in (b"content-length", b"transfer-encoding")
            ]
            answer = Response(upstream.content, status_code=upstream.status_code)
            answer.raw_headers = [*kept, (b"content-length", str(len(upstream.content)).encode())]
            break
        await answer(scope, receive, send)

    async def _lifespan(self, receive: Receive, send: Send) -> None:
        """The client to the backends lives in the server's event loop, and is closed there."""
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                self._client = httpx.AsyncClient(timeout=120, limits=httpx.Limits(max_connections=400))
                await send({"type": "lifespan.startup.complete"})
            elif message["type"] == "lifespan.shutdown":
                if self._client is not None:
                    await self._client.aclose()
                await send({"type": "lifespan.shutdown.complete"})
                return

    def __enter__(self) -> RoundRobinProxy:
        self.url = self._stack.enter_context(serving(self._app, interface="asgi3")).url
        return self

    def __exit__(self, *exc: object) -> None:
        self._stack.close()


class ConnectionRoundRobin:
    """A TCP load balancer on 127.0.0.1: each new connection goes to the next backend that accepts it.

    The bytes are spliced both ways, never parsed, so the balancer costs next to nothing next to the
    replicas it measures (an HTTP-level proxy, RoundRobinProxy, parses and re-sends every request and
    answer). Requests alternate replicas as long as the client opens a connection per request, as
    run_load does through it. A backend that refuses the connection is skipped (nothing reached it);
    one that dies with a request in flight drops the client's connection, which the client sees as a
    transport error and may resend, as it would a balancer's 502.
    """

    def __init__(self, backends: Sequence[str]) -> None:
        self.backends = [_host_port(b) for b in backends]
        self._next = 0
        self._loop = asyncio.new_event_loop()
        self._thread: threading.Thread | None = None
        self._server: asyncio.Server | None = None
        self._open: set[asyncio.StreamWriter] = set()  # both ends of the connections being spliced, closed on exit
        self.url = ""

    async def _splice(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        """Copy `reader` to `writer` until either side ends; then close `writer` (the other direction ends too)."""
        try:
            while chunk := await reader.read(65536):
                writer.write(chunk)
                await writer.drain()
        except OSError:
            pass
        finally:
            writer.close()

    async def _connection(self, client_reader: asyncio.StreamReader, client_writer: asyncio.StreamWriter) -> None:
        self._open.add(client_writer)
        try:
            first = self._next
            self._next += 1
            for n in range(len(self.backends)):  # from this connection's turn on, whatever others take meanwhile
                host, port = self.backends[(first + n) % len(self.backends)]
                try:
                    backend_reader, backend_writer = await asyncio.open_connection(host, port)
                except OSError:
                    continue  # dead: nothing was sent, try the next one
                self._open.add(backend_writer)
                try:
                    await asyncio.gather(
                        self._splice(client_reader, backend_writer), self._splice(backend_reader, client_writer)
                    )
                finally:
                    self._open.discard(backend_writer)
                return
            client_writer.write(
                b"HTTP/1.1 502 Bad Gateway\r\ncontent-length: 10\r\nconnection: close\r\n\r\nno backend"
            )
            client_writer.close()
        finally:
            self._open.discard(client_writer)

    def __enter__(self) -> ConnectionRoundRobin:
        started = threading.Event()

        async def serve() -> None:
            self._server = await asyncio.start_server(self._connection, "127.0.0.1", 0)
            started.set()

        def run() -> None:
            asyncio.set_event_loop(self._loop)
            self._loop.run_until_complete(serve())
            self._loop.run_forever()

        self._thread = threading.Thread(target=run, name="round-robin", daemon=True)
        self._thread.start()
        if not started.wait(30):
            raise RuntimeError("the round-robin balancer did not start")
        assert self._server is not None
        self.url = f"http://127.0.0.1:{self._server.sockets[0].getsockname()[1]}"
        return self

    def __exit__(self, *exc: object) -> None:
        async def stop() -> None:
            if self._server is not None:
                self._server.close()
            for writer in list(self._open):
                writer.close()  # each splice then reads the end of its connection and returns
            deadline = time.monotonic() + 5
            while self._open and time.monotonic() < deadline:
                await asyncio.sleep(0.01)

        asyncio.run_coroutine_threadsafe(stop(), self._loop).result(10)
        self._loop.call_soon_threadsafe(self._loop.stop)
        if self._thread is not None:
            self._thread.join(10)
        self._loop.close()


def _host_port(url: str) -> tuple[str, int]:
    parsed = httpx.URL(url)
    assert parsed.port is not None, f"{url}: a backend needs a port"
    return parsed.host, parsed.port


# -- the buyers ------------------------------------------------------------------------------------


@dataclass
class LoadResult:
    """Every answer the buyers got, by payment."""

    latencies: list[float] = field(default_factory=list)  # seconds per paid request (first answer)
    ok: int = 0  # payments answered 200
    failed: list[str] = field(default_factory=list)  # payments never answered 200, with the last answer
    nonce_errors: int = 0  # answers that name a nonce collision
    bodies: dict[str, list[bytes]] = field(default_factory=dict)  # run_key -> every 200 body (copies, replays)
    ids: dict[str, bytes] = field(default_factory=dict)  # run_key -> escrow id
    elapsed: float = 0.0


def sign(signer: Signer, required_header: str, now: int) -> tuple[str, bytes]:
    """A PAYMENT-SIGNATURE for the 402's first offer, signed by `signer`; and its escrow id."""
    required = decode_payment_required(required_header)
    accepted = required.accepts[0]
    req = EscrowRequirements.from_model(accepted)
    terms = Terms(
        buyer=signer.address,
        seller=req.pay_to,
        operator=req.extra.operator,
        token=req.asset,
        amount=req.amount,
        deadline=now + req.max_timeout_seconds,
        request_hash=req.extra.request_hash,
        salt=Terms.new_salt(),
    )
    auth = authorization_for(terms, req.extra.escrow, req.chain_id, 0, terms.deadline)
    domain = req.token_domain()
    signature = signer.sign_typed_data(typed_data(RECEIVE_WITH_AUTHORIZATION, domain, auth))
    envelope: dict[str, Any] = {
        "x402Version": 2,
        "accepted": accepted.model_dump(by_alias=True, exclude_none=True),
        "payload": EscrowPayload(authorization=auth, signature=signature, terms=terms).to_json(),
    }
    if required.resource is not None:
        envelope["resource"] = required.resource.model_dump(by_alias=True, exclude_none=True)
    return encode_header(envelope), auth.nonce


async def run_load(
    entry: str,
    replicas: Sequence[str],
    buyers: Sequence[Signer],
    *,
    requests_per_buyer: int,
    chain_now: int,
    duplicate_every: int = 0,
    replay_every: int = 0,
    fail_every: int = 0,
    give_up_after: float = 90.0,
    on_progress: Any = None,
) -> LoadResult:
    """Each buyer pays `requests_per_buyer` requests through `entry`, one after another, all buyers at once.

    Every `duplicate_every`-th payment is also sent, at the same moment, straight to two other
    replicas; every `replay_every`-th is replayed to another replica once answered. A 503 (the
    seller asks for the same payment again) or a 502 that is not the seller's (a replica died) is
    answered by sending the same payment again, until `give_up_after` seconds. `chain_now` is the chain's
    clock at the start.
    """
    # A connection per request, never kept: through a ConnectionRoundRobin each request then reaches the next
    # replica, and the pool holds no idle connections to scan (httpcore checks each idle one per request).
    limits = httpx.Limits(max_connections=len(buyers) * 4 + 8, max_keepalive_connections=0)
    started = time.monotonic()
    async with httpx.AsyncClient(timeout=120, limits=limits) as client:
        load = _Load(client, entry, replicas, chain_now - time.time(), give_up_after)
        load.duplicate_every, load.replay_every, load.fail_every = duplicate_every, replay_every, fail_every
        load.on_progress = on_progress
        await asyncio.gather(*(load.buyer(n, signer, requests_per_buyer) for n, signer in enumerate(buyers)))
    load.result.elapsed = time.monotonic() - started
    return load.result


def again(response: httpx.Response) -> bool:
    """Whether to send a request again: a 503 (the seller asks for the payment again), or a 502 that is not the
    seller's (no PAYMENT-RESPONSE: a transport error, a replica that died mid-request, no replica up). A seller's
    502 is its handler's failure, answered with its refund: final, and so is every replay of it."""
    if response.status_code == 503:
        return True
    return response.status_code == 502 and PAYMENT_RESPONSE_HEADER not in response.headers


class _Load:
    """One run of run_load: its HTTP client and what the buyers got."""

    def __init__(
        self, client: httpx.AsyncClient, entry: str, replicas: Sequence[str], offset: float, give_up_after: float
    ) -> None:
        self.client = client
        self.entry = entry
        self.replicas = replicas
        self.offset = offset  # chain clock minus wall clock
        self.give_up_after = give_up_after
        self.result = LoadResult()
        self.duplicate_every = self.replay_every = self.fail_every = 0
        self.on_progress: Any = None

    async def send(self, url: str, path: str, header: str) -> httpx.Response:
        """GET `path` (with the payment `header`, if any), again after an answer that asks for it (`again`)
        until give_up_after."""
        until = time.monotonic() + self.give_up_after
        while True:
            try:
                headers = {PAYMENT_SIGNATURE_HEADER: header} if header else {}
                response = await self.client.get(url + path, headers=headers)
            except httpx.TransportError:
                response = httpx.Response(502, content=b"transport error")
            if any(t in response.text.lower() for t in NONCE_ERROR_TEXTS):
                self.result.nonce_errors += 1
            if not again(response) or time.monotonic() > until:
                return response
            await asyncio.sleep(0.2)

    def keep(self, key: str, response: httpx.Response) -> None:
        if response.status_code == 200:
            self.result.bodies.setdefault(key, []).append(response.content)

    async def buyer(self, n: int, signer: Signer, count: int) -> None:
        result, replicas = self.result, self.replicas
        duplicate_every, replay_every, fail_every = self.duplicate_every, self.replay_every, self.fail_every
        for i in range(count):
            serial = n * count + i
            route = "fail" if fail_every and serial % fail_every == fail_every - 1 else "report"
            path = f"/{route}/b{n}-{i}"
            quote = await self.send(self.entry, path, "")
            if quote.status_code != 402:
                result.failed.append(f"{path}: quote {quote.status_code} {quote.text[:200]}")
                continue
            header, escrow_id = sign(signer, quote.headers[PAYMENT_REQUIRED_HEADER], int(time.time() + self.offset))
            key = run_key(header)
            result.ids[key] = escrow_id
            t0 = time.monotonic()
            sends = [self.send(self.entry, path, header)]
            if duplicate_every and serial % duplicate_every == 0:
                sends += [self.send(replicas[(n + k) % len(replicas)], path, header) for k in (1, 2)]
            answers = await asyncio.gather(*sends)
            result.latencies.append(time.monotonic() - t0)
            for answer in answers:
                self.keep(key, answer)
            expected = 502 if route == "fail" else 200
            if answers[0].status_code != expected:
                result.failed.append(f"{path}: {answers[0].status_code} {answers[0].text[:300]}")
                continue
            result.ok += 1
            if replay_every and serial % replay_every == 0:
                self.keep(key, await self.send(replicas[(n + i) % len(replicas)], path, header))
            if self.on_progress is not None:
                self.on_progress(result)


# -- what the chain says ---------------------------------------------------------------------------


@dataclass
class Audit:
    deposits: Counter[bytes]  # escrow id -> Deposited events
    delivered: dict[bytes, bytes]  # escrow id -> delivery hash on chain
    duplicate_runs: int  # handler runs beyond the first, over every payment
    mismatched: int  # 200 bodies whose hash is not the one on chain (or whose payment has none yet)
    undelivered: list[bytes]  # answered 200, not delivered on chain


def audit(escrow: Escrow, from_block: int, load: LoadResult, runs_dir: Path) -> Audit:
    latest = int(escrow.w3.eth.block_number)
    events = escrow.events(from_block, latest)
    deposits: Counter[bytes] = Counter(e.id for e in events if isinstance(e, Deposited))
    delivered = {e.id: e.delivery_hash for e in events if isinstance(e, Delivered)}
    runs, _ = handler_runs(runs_dir)
    duplicate_runs = sum(n - 1 for key, n in runs.items() if key in load.ids and n > 1)
    mismatched = 0
    undelivered = []
    for key, bodies in load.bodies.items():
        escrow_id = load.ids[key]
        onchain = delivered.get(escrow_id)
        if onchain is None:
            undelivered.append(escrow_id)
        mismatched += sum(1 for b in bodies if delivery_hash(b) != onchain)
    return Audit(deposits, delivered, duplicate_runs, mismatched, undelivered)


def percentile(values: Sequence[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def summary(load: LoadResult, checked: Audit, nonce_errors_in_logs: int) -> dict[str, Any]:
    return {
        "requests": len(load.latencies),
        "ok": load.ok,
        "failed": len(load.failed),
        "p50_ms": round(statistics.median(load.latencies) * 1000, 1) if load.latencies else None,
        "p95_ms": round(percentile(load.latencies, 0.95) * 1000, 1),
        "req_per_s": round(len(load.latencies) / load.elapsed, 2) if load.elapsed else None,
        "nonce_errors": load.nonce_errors + nonce_errors_in_logs,
        "duplicate_handler_runs": checked.duplicate_runs,
        "mismatched_replays": checked.mismatched,
        "double_deposits": sum(1 for n in checked.deposits.values() if n > 1),
    }


def nonce_errors_in(text: str) -> int:
    lowered = text.lower()
    return sum(lowered.count(t) for t in NONCE_ERROR_TEXTS)


@contextmanager
def work_dir() -> Iterator[Path]:
    with tempfile.TemporaryDirectory(prefix="x402-scale-") as tmp:
        yield Path(tmp)


# -- the benchmark ---------------------------------------------------------------------------------

# (engine, replicas) in the order they run: the same anvil, token and escrow for all.
VARIANTS = (("sqlite", 1), ("postgresql", 1), ("postgresql", 2), ("postgresql", 3))
TARGET_P50_RATIO = 1.15  # PostgreSQL single replica against SQLite


def funded_buyers(token: Any, deployer: Any, count: int, tag: str) -> list[LocalSigner]:
    """`count` fresh buyer keys, each minted test USDC (buyers only sign: they need no ETH)."""
    buyers = [LocalSigner.from_key("0x" + hashlib.sha256(f"{tag}-{n}".encode()).hexdigest()) for n in range(count)]
    for buyer in buyers:
        token.mint(deployer, buyer.address, 10**9)
    return buyers


def measure_scale(
    *,
    buyers: int = 20,
    requests_per_buyer: int = 10,
    postgres_url: str | None = None,
    progress: Any = lambda _: None,
) -> dict[str, Any]:
    """Each variant of VARIANTS under the same paid load through a round-robin balancer; the JSON-ready result.

    `postgres_url`: a server whose user may create databases (one per variant); by default a
    throwaway server is started with the local PostgreSQL binaries (escrow_devtools.bench.postgres).
    """
    import psycopg

    from escrow_devtools.anvil import Anvil, dev_private_key, dev_signer
    from escrow_devtools.artifacts import deploy
    from escrow_devtools.bench.postgres import PostgresServer
    from escrow_py.chain.token import Token
    from escrow_py.chain.tx import TxSender

    result: dict[str, Any] = {}
    with ExitStack() as stack, tempfile.TemporaryDirectory(prefix="x402-bench-scale-") as tmp:
        progress("anvil (automine), deploying")
        node = stack.enter_context(Anvil())
        w3 = node.web3()
        deployer = TxSender(w3, dev_signer(0))
        token = Token(w3, deploy(deployer, "TestUSDC", "USDC", "2"))
        escrow = Escrow(w3, deploy(deployer, "X402Escrow"))
        setup = ChainSetup(node.url, escrow.address, token.address, dev_signer(2).address, dev_private_key(3))
        if postgres_url is None:
            progress("throwaway PostgreSQL server")
            server = PostgresServer(durable=True)  # commits flushed, as SQLite's are
            stack.callback(server.stop)
            postgres_url = server.url
        for engine, count in VARIANTS:
            name = f"{engine}_{count}"
            if engine == "postgresql":
                database = f"x402_scale_{os.getpid()}_{count}"
                with psycopg.connect(postgres_url, autocommit=True) as conn:
                    conn.execute(f'CREATE DATABASE "{database}"')
                store = postgres_url.rsplit("/", 1)[0] + "/" + database
            else:
                store = f"sqlite:///{tmp}/{name}.sqlite"
            people = funded_buyers(token, deployer, buyers, name)
            progress(f"{name}: {count} replica(s), {buyers} buyers x {requests_per_buyer} paid requests")
            work = Path(tmp) / name
            work.mkdir()
            result[name] = _variant(
                setup, escrow, store, count=count, people=people, requests=requests_per_buyer, work=work
            )
        p50_pg, p50_sqlite = result["postgresql_1"]["p50_ms"], result["sqlite_1"]["p50_ms"]
        result["ratio_p50_postgresql_1_vs_sqlite_1"] = round(p50_pg / p50_sqlite, 3)
        result["target_ratio_p50"] = TARGET_P50_RATIO
        result["settings"] = {
            "buyers": buyers,
            "requests_per_buyer": requests_per_buyer,
            "duplicate_every": 7,
            "replay_every": 3,
            "anvil": "automine",
            "cores": os.cpu_count(),
        }
    return result


def _variant(
    setup: ChainSetup, escrow: Escrow, store: str, *, count: int, people: list[LocalSigner], requests: int, work: Path
) -> dict[str, Any]:
    """One variant: `count` replicas on `store`, a warm-up payment per buyer, then the measured load, audited."""
    w3 = escrow.w3
    start = int(w3.eth.block_number) + 1
    replicas = Replicas(setup, store, count=count, work_dir=work)
    try:
        with ConnectionRoundRobin(replicas.urls) as proxy:
            # Unmeasured: one payment per buyer fills the connection pools and the replicas' caches.
            warm = asyncio.run(run_load(proxy.url, replicas.urls, people, requests_per_buyer=1, chain_now=_now(w3)))
            if warm.failed:
                raise RuntimeError(f"warm-up payments failed: {warm.failed[:3]}")
            load = asyncio.run(
                run_load(
                    proxy.url,
                    replicas.urls,
                    people,
                    requests_per_buyer=requests,
                    chain_now=_now(w3),
                    duplicate_every=7,
                    replay_every=3,
                )
            )
        _wait_delivered(escrow, [load.ids[k] for k in load.bodies])
        checked = audit(escrow, start, load, replicas.runs_dir)
        logs = replicas.log_text()
    finally:
        replicas.stop()
    return summary(load, checked, nonce_errors_in(logs))


def _now(w3: Any) -> int:
    return int(w3.eth.get_block("latest")["timestamp"])


def _wait_delivered(escrow: Escrow, ids: list[bytes], timeout: float = 120.0) -> None:
    from escrow_py.protocol.terms import State

    deadline = time.monotonic() + timeout
    pending = list(ids)
    while pending and time.monotonic() < deadline:
        pending = [i for i in pending if escrow.state_of(i) != State.RELEASED]
        time.sleep(0.2)
