"""The facilitator tests' fixtures (defined in kit.py)."""

from .kit import fac

__all__ = ["fac"]
