"""The server's log lines: JSON objects (one per line) or plain text, each with the record's
`fields`; shared by the supervisor, the front-ends and the engine core process.

One record is always exactly one line, whatever its message and fields hold (a request id, an
error message, a traceback): a caller must not be able to start a line of its own and forge a
record. JSON escapes control characters already; the text format escapes them itself.
"""

from __future__ import annotations

import json
import logging
import sys
from datetime import datetime, timezone
from typing import Any

# Line breaks for some readers (str.splitlines, editors, log viewers) that json.dumps leaves as
# they are when ensure_ascii is off.
_JSON_LINE_BREAKS = str.maketrans({"\x85": "\\u0085", "\u2028": "\\u2028", "\u2029": "\\u2029"})


class JsonFormatter(logging.Formatter):
    """One JSON object per line: time, level, logger, message, and the record's `fields`."""

    def format(self, record: logging.LogRecord) -> str:
        out = {"ts": datetime.fromtimestamp(record.created, timezone.utc).isoformat(timespec="milliseconds"),
               "level": record.levelname.lower(), "logger": record.name, "message": record.getMessage()}
        out.update(getattr(record, "fields", {}))
        if record.exc_info:
            out["exception"] = self.formatException(record.exc_info)
        line = json.dumps(out, ensure_ascii=False, default=str)
        return line if line.isascii() else line.translate(_JSON_LINE_BREAKS)


def escape(text: str) -> str:
    """Text with backslashes and unprintable characters (newlines, other controls, line and
    paragraph separators) written as Python escapes (`\\n`, `\\x1b`, `\\u2028`); printable text
    as it is."""
    if text.isprintable() and "\\" not in text:
        return text
    return "".join(c if c.isprintable() and c != "\\" else c.encode("unicode_escape").decode("ascii")
                   for c in text)


def _value(value: Any) -> str:
    """A field's value for a key=value pair: bare when that is unambiguous, else in double quotes."""
    text = escape(str(value))
    if text and not any(c in text for c in ' ="'):
        return text
    return '"' + text.replace('"', '\\"') + '"'


class TextFormatter(logging.Formatter):
    """Plain lines, with the record's `fields` as key=value pairs (values with spaces, `=` or quotes
    in double quotes) and a traceback as an `exception` field, all on one line."""

    def __init__(self) -> None:
        super().__init__("%(asctime)s %(levelname)s %(name)s: %(message)s")

    def format(self, record: logging.LogRecord) -> str:
        record.message = escape(record.getMessage())
        record.asctime = self.formatTime(record, self.datefmt)
        line = self.formatMessage(record)  # not super().format: it appends tracebacks on lines of their own
        fields: dict[str, Any] = dict(getattr(record, "fields", None) or {})
        if record.exc_info:
            fields["exception"] = self.formatException(record.exc_info)
        if record.stack_info:
            fields["stack"] = self.formatStack(record.stack_info)
        return line + "".join(f" {escape(str(k))}={_value(v)}" for k, v in fields.items())


def configure_logging(log_format: str, level: str) -> None:
    """Every log line of this process to stderr, in the given format, from the given level up."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter() if log_format == "json" else TextFormatter())
    logging.basicConfig(level=level.upper(), handlers=[handler], force=True)
