"""The MCP tool tests' fixtures (defined with the server they pay in shop.py)."""

from .shop import shop

__all__ = ["shop"]
