"""Seller hooks for tests: they record what they saw (in order), and answer or raise as a test sets them."""

from __future__ import annotations

from typing import Any

from escrow_py.seller import SellerHooks

HOOKS = ("before_verify", "after_verify", "before_settle", "after_settle")


class Books:
    """Hooks that record what they saw, and answer (or raise) as a test sets them."""

    def __init__(self, shop_calls: dict[str, int]) -> None:
        self.seen: list[tuple[str, Any]] = []
        self.answer: dict[str, Any] = {}
        self.raises: set[str] = set()
        self.calls = shop_calls

    def hook(self, name: str) -> Any:
        async def run(context: Any) -> Any:  # async, as the SDK allows
            self.seen.append((name, context))
            if name in self.raises:
                raise RuntimeError(f"{name}: the bookkeeping database is down")
            return self.answer.get(name)

        return run

    def hooks(self) -> SellerHooks:
        hooks = SellerHooks()
        for name in HOOKS:
            getattr(hooks, f"on_{name}")(self.hook(name))
        return hooks

    def names(self) -> list[str]:
        return [name for name, _ in self.seen]

    def context(self, name: str) -> Any:
        (context,) = [c for n, c in self.seen if n == name]
        return context
