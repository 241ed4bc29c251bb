"""The engine's failures, one class per thing the proxy answers differently."""

from __future__ import annotations

import asyncio


class FramingError(Exception):
    """A client sent a request head or body that is malformed or ambiguous (→ 400).
    ``reason`` is short, plain text, safe to show to the client."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class BodyError(Exception):
    """The client's request body did not arrive whole: the client closed, broke the
    chunked framing, or sent nothing for the body timeout."""


class UpstreamError(Exception):
    """Talking to the upstream failed (→ 502 unless a subclass says otherwise)."""


class ConnectError(UpstreamError):
    """Connecting failed: refused, unreachable, DNS, TLS handshake or verification."""

    def __init__(self, message: str, os_error: OSError | None = None) -> None:
        super().__init__(message)
        self.os_error = os_error


class Disconnected(UpstreamError):
    """The connection closed or was reset before a complete response head arrived."""


class ResponseFramingError(UpstreamError):
    """The response is not valid HTTP/1.x or its framing is ambiguous (both
    Content-Length and Transfer-Encoding, several lengths, a bad chunk)."""


class ResponseBodyError(UpstreamError):
    """The response body broke off (closed early, bad chunk) after the head was passed on."""


class UpstreamTimeout(UpstreamError, asyncio.TimeoutError):
    """Connecting, waiting for a connection, or waiting for the response took too long (→ 504)."""


class RequestBodyError(UpstreamError):
    """The request body stream given to the pool failed or did not match its declared length."""


class ClientDisconnected(ConnectionError):
    """The client connection is gone (closed, reset, aborted, or already answered and
    closing): nothing more can be sent on it. Raised by the server's respond/start/
    write/end; the engine treats one escaping a handler as expected (no log)."""
