"""Each role's process imports only what its common path uses (issue 13: the suite starts well over a hundred
Python processes, and each pays its imports in CPU before it does its job).

One fresh interpreter walks the roles in turn, each step reporting which of the watched heavy modules are
loaded after it. The order keeps every check meaningful: a module a step must not load was found absent at
every step before it, so no earlier step can have loaded it in its place. The last steps are the controls:
the feature that needs a deferred module does load it (the check is not vacuous).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from helpers import OPERATOR, SELLER, address

from escrow_devtools.anvil import dev_private_key

# What each deferral saves per process, in CPU at import on the 2-core machine (python -X importtime, time):
# web3 (with the eth_account it signs with) ~0.6 s; the x402 SDK's package and the wire's models ~0.1 s;
# httpx ~0.1 s plus its CLI's rich, click and pygments (installed beside it by eth-ape) ~0.13 s; the bazaar
# with jsonschema ~0.15 s; jsonschema alone ~0.1 s.
WATCHED = (
    "web3",
    "x402",
    "escrow_py.protocol.wire",
    "fastapi",
    "starlette",
    "httpx",
    "rich",
    "jsonschema",
    "x402.extensions.bazaar",
    "x402.mechanisms.evm.exact",
)

STEPS = r"""
import json, os, sys

def step(name):
    print(json.dumps([name, sorted(m for m in WATCHED if m in sys.modules)]), flush=True)

# `x402-escrow keeper run` with a bad setting ends before it imports the chain stack; a running keeper's modules.
from escrow_py import cli
code = cli.main(["keeper", "run", "--rpc", "http://127.0.0.1:1", "--escrow", "0x" + "11" * 20, "--poll-interval", "0"])
assert code == 2, code
step("keeper refusing a setting")
import escrow_py.keeper._cli, escrow_py.keeper._daemon, escrow_py.keeper._status
step("keeper")

# A seller holding its own key, as the bench's replica processes build it (uvicorn --factory).
import uvicorn.main
from escrow_devtools.bench.replica import replica_app
replica_app()
step("seller replica")

# The demo shop the integration tests' seller processes serve.
from escrow_devtools.demo._shop import build_shop
step("demo shop")

# `x402-escrow facilitator serve`: its command, the app and the service.
import escrow_py.facilitator._cli, escrow_py.facilitator._app, escrow_py.facilitator._service
step("facilitator")

# A buyer process (the fleet agents, the demo's agents): the client, its recovery, its journal.
import escrow_py.buyer
step("buyer")

# The controls: each deferred module is loaded by the feature that uses it.
import httpx
from escrow_py.buyer._validate import problem_with
problem_with({"type": "object"}, httpx.Response(200, content=b"{}"))
step("a schema checked")
from escrow_py.seller import PricedRoute
PricedRoute("GET", "/found", amount=1, discovery={"bazaar": {}})
step("a route that declares discovery")
"""


def test_each_role_loads_only_what_its_common_path_uses(tmp_path: Path) -> None:
    config = {
        "rpc_url": "http://127.0.0.1:1", "escrow": address(SELLER), "token": address(SELLER),
        "pay_to": address(SELLER), "store": str(tmp_path / "seller.sqlite"), "runs_dir": str(tmp_path),
    }  # fmt: skip
    env = {**os.environ, "X402_SCALE_CONFIG": json.dumps(config), "X402_ESCROW_PRIVATE_KEY": dev_private_key(OPERATOR)}
    code = f"WATCHED = {WATCHED!r}\n{STEPS}"
    out = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True, timeout=120
    ).stdout
    loaded = {name: set(modules) for name, modules in map(json.loads, out.splitlines())}

    assert loaded["keeper refusing a setting"] == set()
    assert loaded["keeper"] == {"web3"}  # not the SDK, the wire, an ASGI framework, httpx or jsonschema
    # A seller with its own key: the SDK and its ASGI stack, but no HTTP client, no bazaar, no exact, no schemas.
    assert loaded["seller replica"] == {"web3", "x402", "escrow_py.protocol.wire", "fastapi", "starlette"}
    assert loaded["demo shop"] == loaded["seller replica"]
    assert loaded["facilitator"] == loaded["seller replica"]
    # The buyer is an HTTP client: httpx (and what httpx loads with it) is its job; a schema is not.
    assert loaded["buyer"] - loaded["facilitator"] <= {"httpx", "rich"}
    assert "httpx" in loaded["buyer"]

    assert loaded["a schema checked"] - loaded["buyer"] == {"jsonschema"}
    assert loaded["a route that declares discovery"] - loaded["a schema checked"] == {"x402.extensions.bazaar"}
