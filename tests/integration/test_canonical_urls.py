"""The canonical URL end to end: real uvicorn, the session anvil, two clients that derive it independently.

The independent client (independent_client.py) computes `resource.url` and the requestHash
from the README's rule alone and refuses a 402 that disagrees; the project's EscrowClient
uses terms.canonical_url. Both must pay Unicode paths, %20, +, repeated and empty query
keys, mixed-case escapes and a trailing ?, exactly as they send them.
"""

from __future__ import annotations

import json
from pathlib import Path

import localhttp
import pytest
from fixtures.chain import Chain
from helpers import BUYER, dev

from escrow_devtools.anvil import dev_private_key
from escrow_py.buyer import EscrowClient, PaymentState
from escrow_py.protocol.wire import PAYMENT_REQUIRED_HEADER, decode_payment_required

from .independent_client import canonical_url, pay
from .world import serving

TARGETS = [
    "/report/été-✓?q=a%20b",  # Unicode path, an encoded space in the query
    "/report/a%20b",  # an encoded space in the path
    "/report/a b?x=1 2",  # raw spaces: the client encodes them, both sides see %20
    "/report/plus?q=a+b",  # + is a plus, not a space
    "/report/keys?a=1&a=&b&a=2",  # repeated and empty keys, order kept
    "/report/trailing?",  # an empty query is no query
    "/report/%7ecase?q=%2f&r=%c3%a9",  # unreserved escape decoded, others upper-cased
]


@pytest.fixture(scope="module")
def expectations() -> dict[str, str]:
    """What each target's canonical URL must end with, written out by hand from the rule."""
    return {
        TARGETS[0]: "/report/%C3%A9t%C3%A9-%E2%9C%93?q=a%20b",
        TARGETS[1]: "/report/a%20b",
        TARGETS[2]: "/report/a%20b?x=1%202",
        TARGETS[3]: "/report/plus?q=a+b",
        TARGETS[4]: "/report/keys?a=1&a=&b&a=2",
        TARGETS[5]: "/report/trailing",
        TARGETS[6]: "/report/~case?q=%2F&r=%C3%A9",
    }


def test_every_target_pays_from_the_independent_client_and_from_ours(
    chain: Chain, tmp_path: Path, expectations: dict[str, str]
) -> None:
    with serving(chain, tmp_path / "seller.sqlite") as base:
        for target in TARGETS:
            url = base + target
            offered = decode_payment_required(localhttp.get(url).headers[PAYMENT_REQUIRED_HEADER])
            assert offered.resource is not None
            assert offered.resource.url == base + expectations[target]
            assert canonical_url(url) == base + expectations[target]

            paid = pay(url, dev_private_key(BUYER), 84532, chain.node.url)
            assert paid.status == 200, (target, paid.body)
            assert paid.resource_url == base + expectations[target]

        with EscrowClient(dev(BUYER), chain.node.url, tmp_path / "buyer.sqlite") as client:
            for target in TARGETS:
                response = client.get(base + target)
                assert response.status_code == 200, (target, response.text)
                assert json.loads(response.content)["item"]
            states = [entry.state for entry in client.journal.entries()]
    assert states == [PaymentState.DELIVERED] * len(TARGETS)
