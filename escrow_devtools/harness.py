"""One way to run an ASGI app on a real uvicorn in a thread on 127.0.0.1: for the demo, the benchmarks and the tests.

with serving(app) as running:      # started (lifespan on) before the block runs
    httpx.get(running.url + "/report/1")
# stopped: the server was asked to exit and its thread joined
"""

from __future__ import annotations

import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import httpx
import uvicorn

from escrow_devtools.anvil import free_port
from escrow_py.protocol.tls import tls_context


class ServerDidNotStart(RuntimeError):
    """uvicorn stopped, or did not answer as started, within the start-up deadline."""


@dataclass
class Running:
    url: str
    server: uvicorn.Server
    thread: threading.Thread


@contextmanager
def serving(
    app: Any,
    *,
    port: int | None = None,
    wait: bool = True,
    startup_timeout: float = 30.0,
    stop_timeout: float = 15.0,
    **config: Any,
) -> Iterator[Running]:
    """`app` on uvicorn (lifespan on, warnings only; `config` overrides uvicorn.Config's settings).

    With wait=False the block runs without waiting for the start (a failing start-up is what a test looks at).
    """
    port = port or free_port()
    settings: dict[str, Any] = {"lifespan": "on", "log_level": "warning", "timeout_graceful_shutdown": 1, **config}
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, **settings))
    thread = threading.Thread(target=server.run, name=f"uvicorn-{port}", daemon=True)
    thread.start()
    deadline = time.monotonic() + startup_timeout
    while wait and not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            server.should_exit = True
            thread.join(stop_timeout)
            raise ServerDidNotStart(f"uvicorn on 127.0.0.1:{port} did not start within {startup_timeout:.0f}s")
        time.sleep(0.02)
    try:
        yield Running(f"http://127.0.0.1:{port}", server, thread)
    finally:
        server.should_exit = True
        thread.join(stop_timeout)


def wait_until_answering(
    url: str,
    *,
    ready: Callable[[httpx.Response], bool] = lambda _: True,
    process: subprocess.Popen[Any] | None = None,
    output: Callable[[], str] = lambda: "",
    timeout: float = 60.0,
    what: str = "the server",
) -> None:
    """Poll `url` every 0.1 s until an answer is `ready` (by default: any answer); a server started in another process.

    Raises ServerDidNotStart when `process` exits first (with its `output()`) or after `timeout` seconds.
    One HTTP client serves every poll: a new one per poll (`httpx.get`) builds a TLS context each time,
    about 40 ms of CPU, which on a loaded machine is taken from the very process being waited for.
    """
    deadline = time.monotonic() + timeout
    with httpx.Client(timeout=2, verify=tls_context()) as client:
        while True:
            if process is not None and process.poll() is not None:
                raise ServerDidNotStart(f"{what} exited ({process.returncode}) at start-up:\n{output()}")
            if time.monotonic() > deadline:
                raise ServerDidNotStart(f"{what} did not answer {url} as started within {timeout:.0f}s")
            try:
                if ready(client.get(url)):
                    return
            except httpx.TransportError:
                pass
            time.sleep(0.1)
