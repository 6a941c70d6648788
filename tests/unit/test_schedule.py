"""The suite's order (tests/fixtures/schedule.py): the recorded long tests first, each followed by a short one."""

from __future__ import annotations

from dataclasses import dataclass
from typing import cast

import pytest
from fixtures.schedule import longest_first


@dataclass
class _Item:
    nodeid: str


def _order(ids: list[str], durations: dict[str, float]) -> list[str]:
    items = cast("list[pytest.Item]", [_Item(i) for i in ids])
    return [item.nodeid for item in longest_first(items, durations)]


def test_the_longest_come_first_each_followed_by_a_short_one_in_collection_order() -> None:
    ids = ["a", "b", "long2", "c", "long1", "d", "e", "long3"]
    durations = {"long1": 90.0, "long2": 30.0, "long3": 5.0}
    assert _order(ids, durations) == ["long1", "a", "long2", "b", "long3", "c", "d", "e"]


def test_every_test_runs_once_whatever_the_file_says() -> None:
    ids = [f"t{n}" for n in range(50)]
    durations = {"t7": 3.0, "t3": 8.0, "gone": 100.0, "t49": 1.5}  # a renamed test leaves an unknown id behind
    order = _order(ids, durations)
    assert sorted(order) == sorted(ids)
    assert order[:6] == ["t3", "t0", "t7", "t1", "t49", "t2"]


def test_more_long_tests_than_short_ones_keep_their_order_by_duration() -> None:
    durations = {"x": 2.0, "y": 4.0, "z": 3.0}
    assert _order(["x", "s", "y", "z"], durations) == ["y", "s", "z", "x"]
