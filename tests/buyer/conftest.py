"""The buyer tests' fixtures (defined with the shop they pay in shop.py)."""

from .shop import served, shop

__all__ = ["served", "shop"]
