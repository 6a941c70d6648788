"""Log formatters every role's command uses: plain text that keeps `extra` fields, or JSON lines.

Records carry their facts (escrow ids, transactions, counts) as `extra` attributes. Python's
default formatter drops those, so an operator reading plain text would lose exactly the fields
that say where the money is; both formatters here keep them.
"""

from __future__ import annotations

import json
import logging
from typing import Any

# Attributes every LogRecord has; anything else on a record came from `extra`.
_STANDARD = set(logging.LogRecord("", 0, "", 0, "", None, None).__dict__) | {"message", "asctime"}


def extra_fields(record: logging.LogRecord) -> dict[str, Any]:
    """The fields a caller attached with `extra=`, in the order they were given."""
    return {k: v for k, v in record.__dict__.items() if k not in _STANDARD}


class PlainFormatter(logging.Formatter):
    """`time LEVEL logger message key=value ...`: one line per record, extras kept as key=value."""

    def __init__(self) -> None:
        super().__init__("%(asctime)s %(levelname)s %(name)s %(message)s")

    def format(self, record: logging.LogRecord) -> str:
        line = super().format(record)
        fields = " ".join(f"{k}={_plain(v)}" for k, v in extra_fields(record).items())
        if not fields:
            return line
        # The traceback, when there is one, stays last so it reads as one block.
        head, sep, trace = line.partition("\n")
        return f"{head} {fields}{sep}{trace}"


class JsonFormatter(logging.Formatter):
    """One JSON object per line, with any `extra` fields."""

    def format(self, record: logging.LogRecord) -> str:
        data: dict[str, Any] = {
            "ts": round(record.created, 3),
            "level": record.levelname,
            "logger": record.name,
            "msg": record.getMessage(),
        }
        data.update(extra_fields(record))
        if record.exc_info:
            data["exc"] = self.formatException(record.exc_info)
        return json.dumps(data, default=str)


def _plain(value: object) -> str:
    text = value if isinstance(value, str) else json.dumps(value, default=str, separators=(",", ":"))
    # Quote a value that would otherwise split into two fields.
    return json.dumps(text) if (not text or any(c.isspace() or c == '"' for c in text)) else text


__all__ = ["JsonFormatter", "PlainFormatter", "extra_fields"]
