"""Response validators: a JSON schema or a callable, run on a delivered body before the agent sees it.

A validator answers "is this what I paid for?" in shape and freshness. It runs only
after the body's hash matched the seller's commitment, so a failure means the money
is spent on garbage: it is recorded, and raised as ResponseInvalid.

    client.get(url, extensions={VALIDATOR_EXTENSION: {"type": "object", "required": ["price"]}})
    EscrowClient(..., validator=lambda r: time.time() - r.json()["as_of"] < 60)
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping
from typing import Any

import httpx

# A callable says no by raising (its message is recorded) or by returning False.
Validator = Callable[[httpx.Response], object] | Mapping[str, Any]

# Per-request overrides of the client's settings, as httpx request extensions.
VALIDATOR_EXTENSION = "x402_validator"
TASK_EXTENSION = "x402_task"


def problem_with(validator: Validator, response: httpx.Response) -> str | None:
    """What is wrong with the response according to `validator`; None if it passes."""
    if isinstance(validator, Mapping):
        try:
            document = json.loads(response.content)
        except ValueError as exc:
            return f"the body is not JSON: {exc}"
        # jsonschema (about 0.1 s of CPU at import) is loaded when a schema is first checked, not by every buyer.
        import jsonschema

        try:
            jsonschema.validate(document, validator)
        except jsonschema.ValidationError as exc:
            where = "/".join(str(p) for p in exc.absolute_path) or "(root)"
            return f"schema: at {where}: {exc.message}"
        except jsonschema.SchemaError as exc:
            return f"the validator's schema is invalid: {exc.message}"
        return None
    try:
        verdict = validator(response)
    except Exception as exc:  # noqa: BLE001 - the caller's code: any failure is a rejection, recorded
        return f"{type(exc).__name__}: {exc}"
    return "the validator returned False" if verdict is False else None
