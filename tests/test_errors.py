"""The one exception tree: every exception class of the package derives from EscrowError and is drawn
in escrow_py.protocol.errors' docstring, and each also is the builtin its callers would catch."""

from __future__ import annotations

import importlib
import inspect
import pkgutil
import re

import escrow_py
from escrow_devtools.build import BuildError
from escrow_py.protocol import errors
from escrow_py.protocol.codec import invalid_payload
from escrow_py.protocol.reasons import Reason


def _exception_classes() -> dict[str, type[BaseException]]:
    found: dict[str, type[BaseException]] = {"BuildError": BuildError}
    for module in pkgutil.walk_packages(escrow_py.__path__, "escrow_py."):
        loaded = importlib.import_module(module.name)
        for name, value in vars(loaded).items():
            if (
                inspect.isclass(value)
                and issubclass(value, BaseException)
                and value.__module__.startswith("escrow_py")
                and not name.startswith("_")  # private control flow inside one module
            ):
                found[name] = value
    return found


def test_every_exception_of_the_package_is_in_the_one_tree() -> None:
    classes = _exception_classes()
    assert {"Refusal", "SellerUnavailable", "NodeError", "PaymentRejected", "KeyLoadError"} <= set(classes)
    outside = sorted(name for name, cls in classes.items() if not issubclass(cls, errors.EscrowError))
    assert outside == []
    drawn = set(re.findall(r"\b[A-Z][A-Za-z]+\b", errors.__doc__ or ""))
    buyer = importlib.import_module("escrow_py.buyer").__doc__ or ""
    undrawn = sorted(name for name in classes if name not in drawn and name not in buyer)
    assert undrawn == []


def test_each_error_is_also_the_builtin_it_stands_for() -> None:
    assert issubclass(errors.ConfigError, ValueError)
    assert issubclass(errors.ProtocolError, ValueError)
    assert issubclass(errors.RpcTimeout, TimeoutError) and issubclass(errors.TransactionTimeout, TimeoutError)
    assert issubclass(BuildError, RuntimeError)
    # A decode error reaches code that only knows ValueError (int(), json) as one.
    refused = invalid_payload("terms.amount must be a uint256")
    assert isinstance(refused, ValueError) and refused.reason is Reason.INVALID_PAYLOAD
    assert str(refused) == "invalid_payload: terms.amount must be a uint256"
