"""The seller tests' fixtures (defined with the shop they build in shop.py)."""

from .shop import shop

__all__ = ["shop"]
