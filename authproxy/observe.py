"""Logs: what an operator reads of authproxy.

Logs are events with fields (``event=token_fetched service=x expires_in=3600``),
written as text for people or JSON lines for collectors, always to stderr.
Field values go through :func:`_render`, which prints a :class:`Secret` as ``***``
so that no code path can log a credential by accident; and, once the proxy has
called :func:`set_log_redactor` with every configured secret, every text a log
line carries (fields, message, traceback) has those masked in any encoding.
:func:`setup_logging` also points the access log (:mod:`authproxy.access`, one
record per request, and the audit file) at the same stream and format; the
metrics are :mod:`authproxy.metrics`.
"""

from __future__ import annotations

import json
import logging
import sys
import time
from typing import Any

from authproxy.access import access_log
from authproxy.secret import MASK, Redactor, Secret

# Re-exported: they lived here before authproxy.access, and tests import them from here.
from authproxy.access import AccessLog as AccessLog, AccessRecord as AccessRecord, AuditFile as AuditFile, fingerprint as fingerprint


def log_event(logger: logging.Logger, level: int, event: str, **fields: Any) -> None:
    """Log an event with fields; costs one check when the level is off."""
    if logger.isEnabledFor(level):
        logger.log(level, event, extra={"fields": fields})


_redactor: Redactor | None = None


def set_log_redactor(redactor: Redactor | None) -> None:
    """The last line of defence for every log line but the access log (whose path the
    proxy masks per service): the secrets of every configured service, masked in
    whatever text a line carries. Set at config load; None turns it off."""
    global _redactor
    _redactor = redactor if redactor else None


def _masked(text: str) -> str:
    r = _redactor
    return r.redact(text) if r is not None else text


def _render(value: Any) -> Any:
    if isinstance(value, Secret):
        return MASK
    if isinstance(value, float):
        return round(value, 3)
    if _redactor is not None:
        if isinstance(value, str):
            return _redactor.redact(value)
        if isinstance(value, (list, tuple)):
            return [_render(v) for v in value]
        if isinstance(value, dict):
            return {k: _render(v) for k, v in value.items()}
    return value


class TextFormatter(logging.Formatter):
    """``2026-11-25T18:06:22.123Z INFO  event key=value …`` — one line, grep-able."""

    def format(self, record: logging.LogRecord) -> str:
        ts = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created)) + f".{int(record.msecs):03d}Z"
        fields = getattr(record, "fields", None)
        parts = [ts, f"{record.levelname:<5}", _masked(record.getMessage()) if fields is None else record.msg]
        if fields:
            for k, v in fields.items():
                if v is None:
                    continue
                v = _render(v)
                s = str(v)
                if not s or any(c in s for c in ' "=\n'):
                    s = json.dumps(s)
                parts.append(f"{k}={s}")
        line = " ".join(parts)
        if record.exc_info:
            line += "\n" + _masked(self.formatException(record.exc_info))
        return line


class JsonFormatter(logging.Formatter):
    """One JSON object a line: ts, level, event, then the event's fields."""

    def format(self, record: logging.LogRecord) -> str:
        fields = getattr(record, "fields", None)
        doc: dict[str, Any] = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created)) + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "event": record.msg if fields is not None else "message",
            "logger": record.name,
        }
        if fields is None:
            doc["message"] = _masked(record.getMessage())
        else:
            for k, v in fields.items():
                if v is not None:
                    doc[k] = _render(v)
        if record.exc_info:
            doc["exception"] = _masked(self.formatException(record.exc_info))
        return json.dumps(doc, default=str)


def setup_logging(level: str = "info", fmt: str = "text", stream: Any = None) -> None:
    root = logging.getLogger("authproxy")
    stream = stream or sys.stderr
    access_log.configure(stream, fmt, logging.getLevelName(level.upper()))
    handler = logging.StreamHandler(stream)
    handler.setFormatter(JsonFormatter() if fmt == "json" else TextFormatter())
    for h in list(root.handlers):
        root.removeHandler(h)
    root.addHandler(handler)
    root.setLevel(level.upper())
    root.propagate = False
    # aiohttp's own loggers speak plain messages; route their warnings through ours.
    for name in ("aiohttp.server", "aiohttp.web", "aiohttp.client", "asyncio"):
        lg = logging.getLogger(name)
        lg.handlers = [handler]
        lg.setLevel(logging.WARNING)
        lg.propagate = False
