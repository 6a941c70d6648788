"""The spending policy: every rule allows and denies with its reason code and numbers; TOML and objects agree."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from helpers import BUYER, SELLER, SELLER2, STRANGER, address

from escrow_py.buyer import PaymentContext, Policy, Reason, Usage, WindowBudget
from escrow_py.protocol.errors import ConfigError

TOKEN = "0x036CbD53842c5426634e7929541eC2318f3dCF7e"
ESCROW = address(STRANGER)


def ctx(**overrides: object) -> PaymentContext:
    fields: dict[str, object] = {
        "network": "eip155:84532",
        "token": TOKEN,
        "escrow": ESCROW,
        "seller": address(SELLER),
        "host": "api.example.com",
        "amount": 10_000,
        "deadline_seconds": 120,
        "task": "research",
    }
    fields.update(overrides)
    return PaymentContext(**fields)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("policy", "context", "reason"),
    [
        (Policy(max_per_request=9_999), ctx(), Reason.OVER_PER_REQUEST),
        (Policy(max_deadline_seconds=60), ctx(), Reason.DEADLINE_TOO_FAR),
        (Policy(networks=frozenset({"eip155:8453"})), ctx(), Reason.NETWORK_NOT_ALLOWED),
        (Policy(tokens=frozenset({address(BUYER)})), ctx(), Reason.TOKEN_NOT_ALLOWED),
        (Policy(escrows=frozenset({address(BUYER)})), ctx(), Reason.ESCROW_NOT_ALLOWED),
        (Policy(sellers=frozenset({address(SELLER2)})), ctx(), Reason.SELLER_NOT_ALLOWED),
        (Policy(hosts=frozenset({"other.example.com"})), ctx(), Reason.HOST_NOT_ALLOWED),
        (Policy(hosts=frozenset({"api.example.com"})), ctx(host=None), Reason.HOST_UNKNOWN),
    ],
)
def test_each_offer_rule_denies_with_its_reason(policy: Policy, context: PaymentContext, reason: Reason) -> None:
    decision = policy.check_offer(context)
    assert (decision.allowed, decision.reason) == (False, reason)
    assert decision.detail


def test_an_offer_within_every_rule_is_allowed() -> None:
    policy = Policy(
        max_per_request=10_000,
        max_deadline_seconds=120,
        networks=frozenset({"eip155:84532"}),
        tokens=frozenset({TOKEN.lower()}),  # addresses compare checksummed, whatever their case
        escrows=frozenset({ESCROW}),
        sellers=frozenset({address(SELLER)}),
        hosts=frozenset({"API.example.com"}),
    )
    assert policy.check_offer(ctx()).allowed
    assert policy.check_offer(ctx()).reason is Reason.ALLOWED


@pytest.mark.parametrize(
    ("policy", "usage", "reason", "limit", "available"),
    [
        (Policy(total_budget=50_000), Usage(total=45_000), Reason.OVER_TOTAL_BUDGET, 50_000, 5_000),
        (Policy(task_budget=20_000), Usage(task=10_001), Reason.OVER_TASK_BUDGET, 20_000, 9_999),
        (Policy(seller_budget=10_000), Usage(seller=1), Reason.OVER_SELLER_BUDGET, 10_000, 9_999),
        (
            Policy(windows=(WindowBudget(3600, 100_000), WindowBudget(60, 15_000))),
            Usage(windows={3600: 20_000, 60: 10_000}),
            Reason.OVER_WINDOW_BUDGET,
            15_000,
            5_000,
        ),
    ],
)
def test_each_budget_denies_with_the_numbers(
    policy: Policy, usage: Usage, reason: Reason, limit: int, available: int
) -> None:
    decision = policy.check_budgets(ctx(), usage)
    assert (decision.allowed, decision.reason) == (False, reason)
    assert (decision.limit, decision.wanted, decision.available) == (limit, 10_000, available)


def test_a_budget_is_allowed_up_to_exactly_its_limit() -> None:
    policy = Policy(total_budget=50_000, task_budget=50_000, seller_budget=50_000, windows=(WindowBudget(60, 50_000),))
    exactly = Usage(total=40_000, task=40_000, seller=40_000, windows={60: 40_000})
    assert policy.check_budgets(ctx(), exactly).allowed
    assert not policy.check_budgets(ctx(amount=10_001), exactly).allowed


POLICY_TOML = """
max_per_request = 50000
max_deadline_seconds = 600
networks = ["eip155:84532"]
tokens = ["0x036CbD53842c5426634e7929541eC2318f3dCF7e"]
hosts = ["api.example.com"]

[budget]
total = 1000000
per_task = 200000
per_seller = 500000
windows = [{seconds = 3600, amount = 100000}, {seconds = 86400, amount = 400000}]
"""


def test_toml_gives_the_same_policy_as_objects(tmp_path: Path) -> None:
    path = tmp_path / "policy.toml"
    path.write_text(POLICY_TOML)
    assert Policy.from_toml(path) == Policy(
        max_per_request=50_000,
        max_deadline_seconds=600,
        total_budget=1_000_000,
        task_budget=200_000,
        seller_budget=500_000,
        windows=(WindowBudget(3600, 100_000), WindowBudget(86400, 400_000)),
        networks=frozenset({"eip155:84532"}),
        tokens=frozenset({TOKEN}),
        hosts=frozenset({"api.example.com"}),
    )


def test_the_readme_policy_example_loads(tmp_path: Path) -> None:
    readme = (Path(__file__).resolve().parents[2] / "README.md").read_text()
    (block,) = re.findall(r"```toml\n(.*?)```", readme, re.DOTALL)
    path = tmp_path / "policy.toml"
    path.write_text(block)
    policy = Policy.from_toml(path)
    assert policy.max_per_request is not None and policy.total_budget is not None


@pytest.mark.parametrize(
    ("text", "fragment"),
    [
        ("max_per_request = ", "not valid TOML"),
        ("max_per_request = -1", "max_per_request must be a non-negative integer"),
        ("max_per_request = 1.5", "max_per_request must be a non-negative integer"),
        ("sellers = ['0x1234']", "policy.sellers is not an address: '0x1234'"),
        # EIP-55: mixed case is a checksum; USDC's address with one letter's case flipped is a typo.
        ("tokens = ['0x036cbD53842c5426634e7929541eC2318f3dCF7e']", "has a wrong EIP-55 checksum"),
        ("sellers = '0x036CbD53842c5426634e7929541eC2318f3dCF7e'", "policy.sellers must be a list"),
        ("networks = ['base-sepolia']", "is not a CAIP-2 eip155 id"),
        ("max_per_requests = 5", "unknown keys ['max_per_requests']"),
        ("[budget]\ntotl = 5", "unknown keys ['totl']"),
        ("[budget]\nwindows = [{seconds = 60}]", "must be {seconds = ..., amount = ...}"),
    ],
)
def test_bad_policy_files_say_what_is_wrong(tmp_path: Path, text: str, fragment: str) -> None:
    path = tmp_path / "policy.toml"
    path.write_text(text)
    with pytest.raises(ConfigError, match=re.escape(fragment)):
        Policy.from_toml(path)


def test_a_missing_policy_file_is_a_config_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot read the policy file"):
        Policy.from_toml(tmp_path / "absent.toml")
