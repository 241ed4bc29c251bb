"""Reading a body that may have to be read twice: the request's, for the one
replay after a rejection, and the reply's, for the scheme to inspect.

Either is kept in memory only up to ``max_replay_body``. Past that it is never
held: what was read so far goes first, then the rest streams on, and the
request is not replayable (the reply not inspected). A request whose
``Content-Length`` is already over the limit is not read at all before it is
sent, so a large upload never waits in the proxy.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, AsyncIterator

from authproxy.http1.errors import BodyError, UpstreamError
from authproxy.proxy.errors import ProxyError

if TYPE_CHECKING:
    from authproxy.http1.pool import Response
    from authproxy.http1.server import Exchange


async def read_request_body(
    ex: "Exchange", max_replay: int, body_timeout: float, service: str
) -> tuple[bytes | None, AsyncIterator[bytes] | None, bool]:
    """→ (kept body, stream to send, replayable). Bodies up to ``max_replay`` are
    kept; larger ones stream through without ever being held in memory."""
    ex.body_timeout = body_timeout
    length = ex.content_length
    parts: list[bytes] = []
    size = 0
    try:
        if length is not None and length > max_replay:
            return None, request_stream(ex, []), False
        while size <= max_replay:
            chunk = await ex.read()
            if not chunk:
                return b"".join(parts), None, True
            parts.append(chunk)
            size += len(chunk)
    except BodyError as e:
        raise ProxyError("bad_request", f"the request body did not arrive whole: {e}", service) from None
    return None, request_stream(ex, parts), False


async def peek_reply(resp: "Response", max_replay: int, origin: str, service: str) -> tuple[bytes, AsyncIterator[bytes] | None]:
    """Read a reply up to ``max_replay`` for the scheme to inspect; past that
    the reply is not inspected and streams on (what was read goes first)."""
    length = resp.content_length
    if length is not None and length > max_replay:
        return b"", reply_stream(resp, [])
    parts: list[bytes] = []
    size = 0
    try:
        while True:
            chunk = await resp.read()
            if not chunk:
                return b"".join(parts), None
            parts.append(chunk)
            size += len(chunk)
            if size > max_replay:
                return b"", reply_stream(resp, parts)
    except UpstreamError as e:
        raise ProxyError("upstream_unreachable", f"{origin} broke off its reply: {e}", service) from None


async def request_stream(ex: "Exchange", first: list[bytes]) -> AsyncIterator[bytes]:
    """The request body: the chunks already read, then the rest as it arrives."""
    for p in first:
        yield p
    while True:
        chunk = await ex.read()
        if not chunk:
            return
        yield chunk


async def reply_stream(resp: "Response", first: list[bytes]) -> AsyncIterator[bytes]:
    """The reply's body: the chunks already read, then the rest as it arrives."""
    for p in first:
        yield p
    while True:
        chunk = await resp.read()
        if not chunk:
            return
        yield chunk
